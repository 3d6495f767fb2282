"""trtllm.linear_lora (kernels/linear_lora.py): the base linear plus each token's adapter in one
op, against its reference (lora_expand(linear, lora_shrink)); the fused GEMV path (<= GEMV_MAX_M
rows, interpreted on CPU) and the unfused one past it; `no_adapters()` gives the base linear."""
import pytest
import torch

from trtllm.kernels.linear import GEMV_MAX_M, linear_ref
from trtllm.kernels.linear_lora import adapters_off, linear_lora, linear_lora_ref, no_adapters

# bf16 / fp16: the fused path adds the adapter term before rounding, the reference after
# rounding the base output (an output ulp apart); x, W ~N(0, 1), so outputs are ~sqrt(K).
TOLERANCES = {
    torch.float32: dict(atol=1e-3, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=4e-3),
    torch.bfloat16: dict(atol=2e-1, rtol=2e-2),
}


def _operands(t, k, n, rank, dtype, bias=True, num_slots=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    a = (torch.randn(num_slots, rank, k, generator=g) / k**0.5).to(dtype)
    lb = torch.randn(num_slots, n, rank, generator=g).to(dtype)
    slots = torch.randint(-1, num_slots, (t,), generator=g)
    slots = torch.cat([slots, torch.full((3,), 10**6)])  # past t: would index out of bounds
    return x, w, b, a, lb, slots


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("t,k,n,rank,bias", [
    (1, 83, 769, 16, True), (1, 769, 83, 48, False),   # one row: the GEMV's fma variant, K split at 769
    (4, 1100, 40, 16, True),                           # 5 splits over rows with adapters (none dropped)
    (3, 83, 7, 8, True), (7, 600, 83, 16, False),      # a few rows
    (GEMV_MAX_M, 769, 83, 32, True),                   # the GEMV's last row count
    (GEMV_MAX_M + 1, 83, 769, 16, True), (40, 769, 7, 48, False),  # past it: F.linear, shrink, expand
    (83, 769, 83, 16, True),                           # past 64 rows: K still split (the grid), summed once
])
def test_linear_lora_matches_its_reference(t, k, n, rank, bias, dtype):
    x, w, b, a, lb, slots = _operands(t, k, n, rank, dtype, bias)
    out = linear_lora(x, w, b, a, lb, slots)
    assert out.shape == (t, n) and out.dtype == dtype
    torch.testing.assert_close(out.float(), linear_lora_ref(x, w, b, a, lb, slots).float(), **TOLERANCES[dtype])
    base_rows = slots[:t] < 0
    torch.testing.assert_close(out[base_rows].float(), linear_ref(x, w, b)[base_rows].float(), **TOLERANCES[dtype])


def test_adapter_term_is_added():
    # the test above would pass if the adapters were dropped only where their term is small: here it is not
    x, w, b, a, lb, slots = _operands(4, 83, 40, 16, torch.float32)
    slots[:4] = torch.tensor([0, 1, 2, 0])
    delta = linear_lora(x, w, b, a, lb, slots) - linear_ref(x, w, b)
    assert delta.abs().min(dim=1).values.gt(0).all() and delta.abs().mean() > 0.1


@pytest.mark.parametrize("t", [1, 5, GEMV_MAX_M + 3])
def test_no_adapters_gives_the_base_linear(t):
    x, w, b, a, lb, slots = _operands(t, 83, 40, 16, torch.float32)
    slots[:t] = -1
    assert not adapters_off()
    with no_adapters():
        assert adapters_off()
        out = linear_lora(x, w, b, a, lb, slots)
    assert not adapters_off()
    torch.testing.assert_close(out, linear_ref(x, w, b), atol=1e-4, rtol=1e-4)


def test_leading_dims_and_strided_input():
    x = torch.randn(1, 5, 2 * 83)[..., 83:]  # a slice of a wider tensor: rows copied for the GEMV
    _, w, b, a, lb, slots = _operands(5, 83, 40, 16, torch.float32)
    out = linear_lora(x, w, b, a, lb, slots)
    assert out.shape == (1, 5, 40)
    torch.testing.assert_close(out, linear_lora_ref(x, w, b, a, lb, slots), atol=1e-3, rtol=1e-4)


def test_opcheck():
    x, w, b, a, lb, slots = _operands(3, 40, 24, 8, torch.float32)
    torch.library.opcheck(torch.ops.trtllm.linear_lora.default, (x, w, b, a, lb, slots))
