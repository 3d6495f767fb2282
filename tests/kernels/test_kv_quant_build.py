"""The paged attention kernels with an FP8 or INT8 KV cache as the H100/H200 gets them,
compiled here for sm_90 without a GPU (tools/check_kv_quant_build.py, in its own process:
the suite's kernels are interpreted ones): IEEE division by the scale, e4m3 casts that
round to nearest with saturation, INT8's round to nearest even not folded away, and the
cached tiles converted from e4m3 / int8."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sm90_build():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_kv_quant_build.py")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count(" SASS (bf16 cache ") == 12, run.stdout
