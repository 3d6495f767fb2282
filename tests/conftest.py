import os

# Exercise every Triton kernel on CPU through the interpreter. Must be set before
# triton (and so trtllm) is imported: @triton.jit reads it at decoration time.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every kernel module now, while TRITON_INTERPRET=1: runtime tests switch it off per test
# (tests/runtime/conftest.py), and a kernel module first imported then
# would be decorated as compiled Triton, failing every later
# interpreter test in that process ("0 active drivers").
import trtllm.kernels.bidirectional_attention  # noqa: E402, F401
import trtllm.kernels.fp8_gemm  # noqa: E402, F401
import trtllm.kernels.fused_moe  # noqa: E402, F401
import trtllm.kernels.linear  # noqa: E402, F401
import trtllm.kernels.lora_sgmv  # noqa: E402, F401
import trtllm.kernels.mla_decode  # noqa: E402, F401
import trtllm.kernels.moe_align  # noqa: E402, F401
import trtllm.kernels.moe_routing  # noqa: E402, F401
import trtllm.kernels.paged_attention  # noqa: E402, F401
import trtllm.kernels.quantize_fp8  # noqa: E402, F401
import trtllm.kernels.rms_norm  # noqa: E402, F401
import trtllm.kernels.rms_norm_quant_fp8  # noqa: E402, F401
import trtllm.kernels.rotary  # noqa: E402, F401
import trtllm.kernels.silu_mul  # noqa: E402, F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
