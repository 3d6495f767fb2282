import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from trtllm.kernels.rms_norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    norm_add_rms_norm,
    norm_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)

# Kernel vs reference. The reference rounds twice (normalized value, then the product);
# in bf16 the kernel runs here in fp32 (registry.interpreter_upcast) and rounds only its
# outputs, so bf16 differs by up to 2 ulps (a third of the values of a [64, 769] fused
# add + norm differ); fp32/fp16 differ only by the order of the fp32 sum of squares.
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=2e-2),
}
DTYPES = list(TOLERANCES)
EPS = 1e-6


def _inputs(rows, n, dtype):
    x = torch.randn(rows, n, dtype=dtype) * 3
    weight = (1 + 0.1 * torch.randn(n)).to(dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 16), (7, 83), (83, 64), (7, 769), (1, 5125)])
def test_rms_norm_matches_reference(rows, n, dtype):
    x, weight = _inputs(rows, n, dtype)
    out = rms_norm(x, weight, EPS)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, rms_norm_ref(x, weight, EPS), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 16), (7, 83), (83, 64), (7, 769), (1, 5125)])
def test_fused_add_rms_norm_matches_reference(rows, n, dtype):
    x, weight = _inputs(rows, n, dtype)
    residual = torch.randn(rows, n, dtype=dtype)
    out, summed = fused_add_rms_norm(x, residual, weight, EPS)
    out_ref, summed_ref = fused_add_rms_norm_ref(x, residual, weight, EPS)
    assert summed.is_contiguous() and out.is_contiguous()
    torch.testing.assert_close(summed, summed_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(out, out_ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs(dtype):
    # x: a column slice of a wider 3-d tensor (merged leading dims, row stride 2N);
    # residual: a transpose (leading dims that cannot be merged into one stride).
    n = 83
    x = torch.randn(2, 7, 2 * n, dtype=dtype)[..., n:]
    residual = torch.randn(7, 2, n, dtype=dtype).transpose(0, 1)
    weight = torch.randn(2 * n, dtype=dtype)[::2]  # not contiguous: rejected
    with pytest.raises(AssertionError):
        rms_norm(x, weight, EPS)
    weight = weight.contiguous()
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS), **tol)
    out, summed = fused_add_rms_norm(x, residual, weight, EPS)
    out_ref, summed_ref = fused_add_rms_norm_ref(x, residual, weight, EPS)
    torch.testing.assert_close(summed, summed_ref, **tol)
    torch.testing.assert_close(out, out_ref, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_hf_llama(dtype):
    # Bit-exact: same fp32 ops, and a 16-bit x 16-bit product is exact in fp32.
    n = 769
    hf = LlamaRMSNorm(n, eps=1e-5).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(n))
    x, residual = torch.randn(2, 7, n, dtype=dtype), torch.randn(2, 7, n, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm_ref(x, hf.weight, 1e-5), hf(x))
        out, summed = fused_add_rms_norm_ref(x, residual, hf.weight, 1e-5)
        assert torch.equal(summed, residual + x)  # HF's decoder-layer residual add
        assert torch.equal(out, hf(residual + x))


def test_empty_and_reference_without_interpreter(monkeypatch):
    x, weight = _inputs(0, 64, torch.float16)
    assert rms_norm(x, weight, EPS).shape == (0, 64)
    # With the interpreter off, a CPU tensor takes the reference path.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, weight = (t.cpu() for t in _inputs(3, 64, torch.float32))  # CPU also where the default device is CUDA
    assert torch.equal(rms_norm(x, weight, EPS), rms_norm_ref(x, weight, EPS))


def test_opcheck():
    x, weight = _inputs(7, 83, torch.bfloat16)
    residual = torch.randn(7, 83, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.trtllm.rms_norm.default, (x, weight, EPS))
    torch.library.opcheck(
        torch.ops.trtllm.fused_add_rms_norm.default, (x, residual, weight, EPS)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(7, 83), (1, 5125)])
def test_unit_offset_matches_reference(rows, n, dtype):
    """Gemma's norm: weight stored as an offset from 1 (around 0 here, as trained ones are)."""
    x, weight = _inputs(rows, n, dtype)
    weight = weight - 1
    residual = torch.randn(rows, n, dtype=dtype)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(rms_norm(x, weight, EPS, True), rms_norm_ref(x, weight, EPS, True), **tol)
    out, summed = fused_add_rms_norm(x, residual, weight, EPS, True)
    out_ref, summed_ref = fused_add_rms_norm_ref(x, residual, weight, EPS, True)
    torch.testing.assert_close(summed, summed_ref, **tol)
    torch.testing.assert_close(out, out_ref, **tol)
    # not Llama's rounding: the offset is applied
    assert not torch.allclose(rms_norm_ref(x, weight, EPS, True).float(), rms_norm_ref(x, weight, EPS).float())


@pytest.mark.parametrize("dtype", DTYPES)
def test_unit_offset_reference_is_hf_gemma(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    n = 769
    hf = GemmaRMSNorm(n, eps=1e-6).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(0.1 * torch.randn(n))
        x, residual = torch.randn(2, 7, n, dtype=dtype), torch.randn(2, 7, n, dtype=dtype)
        assert torch.equal(rms_norm_ref(x, hf.weight, 1e-6, True), hf(x))
        out, summed = fused_add_rms_norm_ref(x, residual, hf.weight, 1e-6, True)
        assert torch.equal(out, hf(residual + x))


def test_opcheck_unit_offset():
    x, weight = _inputs(7, 83, torch.bfloat16)
    residual = torch.randn(7, 83, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.trtllm.rms_norm.default, (x, weight, EPS, True))
    torch.library.opcheck(torch.ops.trtllm.fused_add_rms_norm.default, (x, residual, weight, EPS, True))


@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", [(1, 16), (7, 83), (83, 64), (7, 769), (1, 5125)])
def test_norm_add_rms_norm_matches_reference(rows, n, dtype, unit_offset):
    x, weight = _inputs(rows, n, dtype)
    pre_weight = (0.1 * torch.randn(n)).to(dtype) if unit_offset else _inputs(1, n, dtype)[1]
    residual = torch.randn(rows, n, dtype=dtype)
    out, summed = norm_add_rms_norm(x, pre_weight, residual, weight, EPS, unit_offset)
    out_ref, summed_ref = norm_add_rms_norm_ref(x, pre_weight, residual, weight, EPS, unit_offset)
    assert summed.is_contiguous() and out.is_contiguous()
    torch.testing.assert_close(summed, summed_ref, **TOLERANCES[dtype])
    torch.testing.assert_close(out, out_ref, **TOLERANCES[dtype])
    # the first norm is applied: its weight changes the sum
    other, _ = norm_add_rms_norm(x, pre_weight * 2 + 1, residual, weight, EPS, unit_offset)
    assert not torch.allclose(other, out)


def test_opcheck_norm_add_rms_norm():
    x, weight = _inputs(7, 83, torch.float32)
    residual = torch.randn(7, 83)
    for unit_offset in (False, True):
        torch.library.opcheck(torch.ops.trtllm.norm_add_rms_norm.default,
                              (x, 0.1 * torch.randn(83), residual, weight, EPS, unit_offset))
