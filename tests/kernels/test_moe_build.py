"""The MoE kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_moe_build.py, in its own process: the suite's kernels are interpreted ones):
every kernel builds as its launcher calls it, and the grouped GEMMs' tl.dot is a
tensor-core MMA (wgmma for the 64-row tiles): the bf16 kernels, the decode path's (bf16 and
FP8, per-channel and block scales) and fused_moe_fp8's grouped GEMMs."""
from tools.sm90_build import run_build_check


def test_sm90_build():
    out = run_build_check("check_moe_build.py", timeout=300)
    assert out.count("ok   ") == 30 and out.count(": wgmma") == 6, out
