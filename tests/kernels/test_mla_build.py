"""The MLA decode kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_mla_build.py, in its own process: the suite's kernels are interpreted ones):
they build at DeepSeek's latent geometry with tensor-core dots and no register spills."""
from tools.sm90_build import run_build_check


def test_sm90_build():
    out = run_build_check("check_mla_build.py", timeout=300)
    assert out.count("ok   ") == 6 and out.count(", mma") == 1, out
