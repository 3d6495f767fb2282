"""The MoE kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_moe_build.py, in its own process: the suite's kernels are interpreted ones):
every kernel builds as its launcher calls it, and the grouped GEMMs' tl.dot is a
tensor-core MMA (wgmma for the 64-row tile)."""
from tools.sm90_build import run_build_check


def test_sm90_build():
    out = run_build_check("check_moe_build.py", timeout=300)
    assert out.count("ok   ") == 10 and out.count(": wgmma") == 2, out
