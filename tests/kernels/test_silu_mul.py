import pytest
import torch
from transformers.activations import ACT2FN

from trtllm.kernels.silu_mul import silu_mul, silu_mul_ref

# Kernel vs reference: both fp32 inside and rounded once, so they differ by the fp32
# sigmoid's last bits (bf16: the kernel runs here in fp32 and its output is rounded by
# torch, as the reference's: registry.interpreter_upcast).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
DTYPES = list(TOLERANCES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 16), (7, 83), (83, 64), (7, 769), (1, 5125), (3, 5125)])
def test_silu_mul_matches_reference(rows, n, dtype):
    gate, up = torch.randn(rows, n, dtype=dtype) * 4, torch.randn(rows, n, dtype=dtype)
    out = silu_mul(gate, up)
    assert out.dtype == dtype and out.shape == gate.shape and out.is_contiguous()
    torch.testing.assert_close(out, silu_mul_ref(gate, up), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    # The two halves of a fused [B, S, 2N] gate_up projection, and a transposed `up`.
    n = 769
    gate_up = torch.randn(2, 7, 2 * n, dtype=dtype)
    gate, up = gate_up[..., :n], gate_up[..., n:]
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(silu_mul(gate, up), silu_mul_ref(gate, up), **tol)
    up_t = torch.randn(7, 2, n, dtype=dtype).transpose(0, 1)
    torch.testing.assert_close(silu_mul(gate, up_t), silu_mul_ref(gate, up_t), **tol)
    with pytest.raises(AssertionError):
        silu_mul(gate.transpose(1, 2), up.transpose(1, 2))


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_hf_llama_mlp_activation(dtype):
    gate, up = torch.randn(7, 769, dtype=dtype) * 4, torch.randn(7, 769, dtype=dtype)
    hf = ACT2FN["silu"](gate) * up  # LlamaMLP: act_fn(gate_proj(x)) * up_proj(x)
    if dtype == torch.float32:
        assert torch.equal(silu_mul_ref(gate, up), hf)
    else:  # HF rounds the silu and the product separately; we round once
        torch.testing.assert_close(silu_mul_ref(gate, up), hf, atol=2e-2, rtol=2e-2)


def test_empty():
    assert silu_mul(torch.empty(0, 64), torch.empty(0, 64)).shape == (0, 64)


def test_opcheck():
    gate_up = torch.randn(7, 2 * 83, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.trtllm.silu_mul.default, (gate_up[:, :83], gate_up[:, 83:]))
