"""The FP8 kernels as the H100/H200 gets them, compiled here for sm_90 without a GPU
(tools/check_fp8_build.py, in its own process: the suite's kernels are interpreted ones):
tl.dot on e4m3 operands as wgmma, promoted to fp32 every 128 of K (the GEMV at Llama's
o_proj shape, 32 features a program: an exact fp16 mma, fp32 accumulators); the quantization's
IEEE division and round-to-nearest e4m3 cast."""
from tools.sm90_build import run_build_check


def test_sm90_build():
    out = run_build_check("check_fp8_build.py", timeout=300)
    assert out.count("e4m3 wgmma") == 2, out      # the tiled kernel, row and block scales
    assert out.count("exact fp16 mma") == 2, out  # the GEMV at N = 4096, row and block scales
