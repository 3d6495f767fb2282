"""The FP8 kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_fp8_build.py, in its own process: the suite's kernels are interpreted ones):
tl.dot on e4m3 operands as wgmma, promoted to fp32 every 128 of K (the GEMV at Llama's
o_proj shape, 32 features a program: an exact fp16 mma, fp32 accumulators); the quantization's
IEEE division and round-to-nearest e4m3 cast."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sm90_build():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_fp8_build.py")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("e4m3 wgmma") == 2, run.stdout      # the tiled kernel, row and block scales
    assert run.stdout.count("exact fp16 mma") == 2, run.stdout  # the GEMV at N = 4096, row and block scales
