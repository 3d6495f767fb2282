"""The paged attention kernels with an FP8 or INT8 KV cache as the H100/H200 gets them,
compiled here for sm_90 without a GPU (tools/check_kv_quant_build.py, in its own process:
the suite's kernels are interpreted ones): IEEE division by the scale, e4m3 casts that
round to nearest with saturation, INT8's round to nearest even not folded away, and the
cached tiles converted from e4m3 / int8."""
from tools.sm90_build import run_build_check


def test_sm90_build():
    out = run_build_check("check_kv_quant_build.py", timeout=600)
    assert out.count(" SASS (bf16 cache ") == 12, out
