"""The MoE kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_moe_build.py, in its own process: the suite's kernels are interpreted ones):
every kernel builds as its launcher calls it, and the grouped GEMMs' tl.dot is a
tensor-core MMA (wgmma for the 64-row tiles): the bf16 kernels, the decode path's (bf16 and
FP8, per-channel and block scales) and fused_moe_fp8's grouped GEMMs."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sm90_build():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_moe_build.py")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok   ") == 30 and run.stdout.count(": wgmma") == 6, run.stdout
