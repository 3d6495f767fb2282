import pytest
import torch
import torch.nn.functional as F

import trtllm.kernels.linear as linear_mod
import trtllm.kernels.linear_configs as linear_configs
from trtllm.kernels.linear import gemv, linear, linear_ref
from trtllm.kernels.linear_configs import GemvConfig

# Kernel vs reference (fp32 inside, rounded once): they differ only by the order of the
# fp32 sums, and for 16-bit outputs by a rounding flip of 1 ulp. bf16 runs here in fp32
# (registry.interpreter_upcast: the interpreter's tl.dot multiplies bf16 operands' raw bits).
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
# Few programs per launch: the interpreter runs them one after another.
FMA = GemvConfig(dot=False, block_n=64, block_k=128, num_warps=4, num_stages=1)
DOT = GemvConfig(dot=True, block_n=64, block_k=64, num_warps=4, num_stages=2)
# Odd N and K (masked tails), plus K a multiple of BLOCK_K (the EVEN_K loop without masks).
SHAPES = [(1, 7, 7), (2, 83, 769), (3, 769, 83), (5, 83, 5125), (8, 7, 5125), (1, 769, 769),
          (1, 7, 256), (4, 83, 1024)]


def _inputs(m, n, k, dtype, bias=True):
    x = torch.randn(m, k, dtype=dtype)
    weight = (torch.randn(n, k) / k ** 0.5).to(dtype)  # outputs of unit scale
    b = torch.randn(n, dtype=dtype) if bias else None
    return x, weight, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [FMA, DOT], ids=["fma", "dot"])
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_gemv_matches_reference(m, n, k, config, dtype):
    x, weight, bias = _inputs(m, n, k, dtype, bias=m % 2 == 1)
    out = gemv(x, weight, bias, torch.empty(m, n, dtype=dtype), config)
    torch.testing.assert_close(out, linear_ref(x, weight, bias), **TOLERANCES[dtype])


@pytest.mark.parametrize("m", [1, 3])
def test_bf16_op(m):
    # the op's own choice: the fma variant for one row, the dot one for several
    x, weight, bias = _inputs(m, 83, 769, torch.bfloat16)
    out = linear(x, weight, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (m, 83)
    torch.testing.assert_close(out, linear_ref(x, weight, bias), **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_op_default_configs(m):
    # The op's own choice (untuned defaults: fma for one row, dot for more), with odd K.
    x, weight, bias = _inputs(m, 83, 769, torch.float16)
    out = linear(x, weight, bias)
    assert out.dtype == x.dtype and out.shape == (m, 83) and out.is_contiguous()
    torch.testing.assert_close(out, linear_ref(x, weight, bias), **TOLERANCES[torch.float16])


def test_dispatch_by_rows(monkeypatch):
    calls = []
    real_gemv = linear_mod.gemv
    monkeypatch.setattr(linear_mod, "gemv", lambda *a: calls.append(a[0].shape[0]) or real_gemv(*a))
    monkeypatch.setattr(linear_mod, "GEMV_MAX_M", 4)
    weight = torch.randn(83, 64)
    for m in (1, 4, 5, 40):
        x = torch.randn(m, 64)
        torch.testing.assert_close(linear(x, weight), F.linear(x, weight), **TOLERANCES[torch.float32])
    assert calls == [1, 4]  # 5 and 40 rows went to F.linear
    # A tuned entry of None sends that shape to F.linear too.
    monkeypatch.setitem(linear_configs.TUNED, (83, 64, 2), None)
    linear(torch.randn(2, 64), weight)
    assert calls == [1, 4]


def test_config_of_untimed_rows_is_next_tuned_count_up(monkeypatch):
    a, b = GemvConfig(False, 4, 1024, 4, 1), GemvConfig(True, 64, 128, 4, 4)
    monkeypatch.setattr(linear_configs, "TUNED", {(83, 64, 1): a, (83, 64, 16): b, (83, 64, 32): None})
    assert linear_configs.gemv_config(1, 83, 64) == a
    assert [linear_configs.gemv_config(m, 83, 64) for m in (2, 3, 8, 16)] == [b] * 4
    assert linear_configs.gemv_config(17, 83, 64) is None
    assert linear_configs.gemv_config(2, 84, 64) == linear_configs.default_config(2, 84, 64)  # shape not tuned


def test_leading_dims_and_strides():
    n, k = 83, 769
    weight, bias = (torch.randn(n, k) / k ** 0.5), torch.randn(n)
    wide = torch.randn(2, 3, 2 * k)
    for x in (wide[..., k:],                               # row stride 2K, merged leading dims
              torch.randn(3, 2, k).transpose(0, 1),        # leading dims that can't merge: copied
              torch.randn(k, 4).t()):                      # last dim not contiguous: copied
        out = linear(x, weight, bias)
        assert out.shape == (*x.shape[:-1], n) and out.is_contiguous()
        torch.testing.assert_close(out, linear_ref(x, weight, bias), **TOLERANCES[torch.float32])


def test_rejects_bad_weights():
    x = torch.randn(2, 64)
    with pytest.raises(AssertionError, match="contiguous"):
        linear(x, torch.randn(64, 83).t())  # a [K, N] weight seen transposed
    with pytest.raises(AssertionError):
        linear(x, torch.randn(83, 64, dtype=torch.float16))
    with pytest.raises(AssertionError):
        linear(x, torch.randn(83, 32))


def test_empty_and_reference_without_interpreter(monkeypatch):
    weight = torch.randn(83, 64)
    assert linear(torch.empty(0, 64), weight).shape == (0, 83)
    assert linear(torch.empty(2, 0, 64), weight).shape == (2, 0, 83)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # a CPU tensor then takes the reference
    x = torch.randn(3, 64, dtype=torch.float16)
    w16 = weight.half()
    assert torch.equal(linear(x, w16), linear_ref(x, w16))


def test_opcheck():
    x, weight, bias = _inputs(3, 83, 64, torch.float16)
    torch.library.opcheck(torch.ops.trtllm.linear.default, (x, weight, bias))
    torch.library.opcheck(torch.ops.trtllm.linear.default, (x[None], weight))
    torch.library.opcheck(torch.ops.trtllm.linear.default, (torch.randn(20, 64), weight.float()))
