"""The MLA decode kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_mla_build.py, in its own process: the suite's kernels are interpreted ones):
they build at DeepSeek's latent geometry with tensor-core dots and no register spills."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_sm90_build():
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=ROOT)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "check_mla_build.py")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok   ") == 6 and run.stdout.count(", mma") == 1, run.stdout
