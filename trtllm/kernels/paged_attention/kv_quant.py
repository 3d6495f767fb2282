"""The quantized KV cache: FP8 (e4m3) or INT8 elements, a scale per layer, K or V and kv head.

    fp8:  x_q = clamp(x / s, -448, 448) cast to float8_e4m3fn (round to nearest even)
    int8: x_q = clamp(round(x / s), -127, 127) as int8 (round half to even, as torch.round)
    read: x ~ x_q * s

A cache's element dtype says which (`kv_cache_format`: "" for a cache of the model's own
dtype, "fp8", "int8"); its scales are one fp32 tensor `kv_scales` [L, 2, Hkv]
(kv_scales[layer, 0] K's, [layer, 1] V's, one per kv head). A per-tensor scale (ModelOpt's
`k_scale` / `v_scale`, one number per layer) is that number for every head
(`kv_scales_tensor`). The scales live at a fixed address beside the cache
(attention_context.PagedKVCache), so CUDA graphs replay with them.

How the kernels use them (prefill.py, decode.py, tiles.py): keys and values are written
quantized (`quantize_kv`: the cache-write kernel, and the decode kernel's new key) and
read as they are stored, cast to q's dtype (exact: every e4m3 and int8 value is a bf16 /
fp16 value) for the tensor-core dots; K's scale is folded into the softmax scale and V's
multiplies the output once, since both are constant for a program (one kv head). The new
tokens' own keys and values, which the kernels take from k/v rather than the cache, are
quantized in registers by the same function, so a token attends to exactly what the cache
holds (chunked prefill and prefix hits see the same values a one-shot prefill does).

Under the Triton interpreter an fp8 cache reaches the kernels as an fp32 copy
(registry.interpreter_upcast: the interpreter's casts to e4m3 do not round to nearest);
`quantize_kv` then rounds to e4m3 in fp32 arithmetic (`_round_to_e4m3`), exactly as the
GPU's cvt.rn.satfinite does, and torch stores the already-rounded values back losslessly.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

KV_CACHE_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}
KV_QMAX = {"fp8": 448.0, "int8": 127.0}  # the largest stored magnitude: calibrated scale = amax / this


def kv_cache_format(cache_dtype: torch.dtype, q_dtype: torch.dtype) -> str:
    """"" (the cache holds q's dtype), "fp8" or "int8"; anything else is refused."""
    if cache_dtype == q_dtype:
        return ""
    for name, dtype in KV_CACHE_DTYPES.items():
        if cache_dtype == dtype:
            return name
    raise AssertionError(f"KV cache dtype {cache_dtype}: expected q's dtype {q_dtype}, "
                         f"or a quantized cache ({', '.join(map(str, KV_CACHE_DTYPES.values()))})")


def check_kv_scales(kv_scales: torch.Tensor | None, fmt: str, k_cache: torch.Tensor) -> None:
    """kv_scales as the op needs them: None for an unquantized cache; else fp32 [L, 2, Hkv]
    on the cache's device, contiguous (the kernels index a layer's rows)."""
    assert kv_scales is None or isinstance(kv_scales, torch.Tensor), \
        f"kv_scales must be a tensor or None, got {type(kv_scales).__name__}"
    if not fmt:
        assert kv_scales is None, f"kv_scales given for an unquantized {k_cache.dtype} KV cache"
        return
    num_layers, num_kv_heads = k_cache.shape[0], k_cache.shape[3]
    assert kv_scales is not None, f"an {fmt} KV cache needs kv_scales [L, 2, Hkv] (fp32)"
    assert kv_scales.dtype == torch.float32 and kv_scales.is_contiguous(), \
        f"kv_scales: contiguous float32, got {kv_scales.dtype}"
    assert kv_scales.shape == (num_layers, 2, num_kv_heads), \
        f"kv_scales {tuple(kv_scales.shape)} != ({num_layers}, 2, {num_kv_heads}) for the cache"
    assert kv_scales.device == k_cache.device, f"kv_scales on {kv_scales.device}, cache on {k_cache.device}"


ScaleValue = float | Sequence[float] | torch.Tensor


def kv_scales_tensor(per_layer: Sequence[tuple[ScaleValue, ScaleValue]], num_layers: int, num_kv_heads: int,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """[L, 2, Hkv] fp32 from one (k_scale, v_scale) per layer, each a number (per tensor, as
    ModelOpt's `k_scale` / `v_scale` and compressed-tensors' kv_cache scheme store it: a
    0-d or 1-element tensor) or Hkv numbers (per head). A bad entry is named."""
    if len(per_layer) != num_layers:
        raise ValueError(f"KV cache scales: {len(per_layer)} (k_scale, v_scale) pairs for {num_layers} layers")
    out = torch.empty((num_layers, 2, num_kv_heads), dtype=torch.float32)
    for layer, pair in enumerate(per_layer):
        if len(pair) != 2:
            raise ValueError(f"KV cache scales, layer {layer}: expected (k_scale, v_scale), got {pair!r}")
        for i, value in enumerate(pair):
            name = f"layer {layer} {'kv'[i]}_scale"
            t = torch.as_tensor(value, dtype=torch.float32).detach().cpu().flatten()
            if t.numel() not in (1, num_kv_heads):
                raise ValueError(f"KV cache scales: {name} has {t.numel()} values; expected 1 (per tensor) "
                                 f"or {num_kv_heads} (per kv head)")
            if not (torch.isfinite(t).all() and (t > 0).all()):
                raise ValueError(f"KV cache scales: {name} = {t.tolist()} must be finite and > 0")
            out[layer, i] = t
    return out.to(device)


# ------------------------------------------------------------------ reference


def quantize_kv_ref(x: torch.Tensor, scale: torch.Tensor, fmt: str) -> torch.Tensor:
    """x [..., Hkv, D] with scale [Hkv] -> the stored values (float8_e4m3fn or int8)."""
    y = x.float() / scale[:, None]
    if fmt == "fp8":
        return y.clamp(-KV_QMAX["fp8"], KV_QMAX["fp8"]).to(torch.float8_e4m3fn)
    return torch.round(y).clamp(-KV_QMAX["int8"], KV_QMAX["int8"]).to(torch.int8)


def dequantize_kv_ref(x_q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Stored values [..., Hkv, D] with scale [Hkv] -> fp32."""
    return x_q.float() * scale[:, None]


# ------------------------------------------------------------------ Triton


@triton.jit
def _rint(y):
    """Round to nearest, ties to even, for |y| < 2**22 (fp32): adding 1.5 * 2**23 leaves no
    fraction bits. tl has no rint the interpreter runs; on the GPU this is an add and a sub
    (no fast-math reassociation in Triton: tools/check_kv_quant_build.py checks the PTX)."""
    return (y + 12582912.0) - 12582912.0


@triton.jit
def _round_to_e4m3(y):
    """fp32 y (|y| <= 448) rounded to the nearest e4m3 value, ties to even, still fp32: the
    quantum is 2**(e - 3) for y's exponent e (3 mantissa bits), 2**-9 below e4m3's smallest
    normal 2**-6 (its subnormals). For the interpreter only (see the module docstring)."""
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    quantum = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2**(e - 3), built exactly
    inv = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)    # 2**(3 - e)
    r = _rint(tl.abs(y) * inv) * quantum
    # y's sign bit on r, a zero's too (-0.0, as cvt and torch give; Triton's -r is 0 - r)
    return (r.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.constexpr_function
def quant_dot_type(q_type):
    """The type a quantized cache's tiles (and q, and P) take into tl.dot: fp16 for a 16-bit q,
    else q's own. e4m3 -> fp16 is one cvt per two values on sm_90, where e4m3 -> bf16 goes
    through fp16 and int8 -> bf16 through fp32 (tools/check_kv_quant_build.py prints the
    loops); every e4m3 and int8 value is an fp16 value, and so is a bf16 q of magnitude
    6e-5 to 65504 (past 65504 it would overflow: attention queries are far smaller)."""
    return tl.float16 if q_type.primitive_bitwidth == 16 else q_type


@triton.jit
def quantize_kv(x, scale, KV_QUANT: tl.constexpr, CACHE_TY: tl.constexpr):
    """x (any float tile) / scale (broadcast), as the cache stores it: KV_QUANT "fp8" or
    "int8"; CACHE_TY the cache pointer's element type (float8e4nv, int8, or float32 for
    the interpreter's copy of an fp8 cache). Division by div_rn: the IEEE quotient torch
    computes (a plain `/` compiles to the approximate div.full.f32)."""
    y = tl.math.div_rn(x.to(tl.float32), scale.to(tl.float32))
    if KV_QUANT == "fp8":
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)
        if CACHE_TY == tl.float32:
            out = _round_to_e4m3(y)
        else:
            out = y.to(CACHE_TY)  # cvt.rn.satfinite.e4m3x2.f32 on sm_89+
    else:
        out = _rint(tl.minimum(tl.maximum(y, -127.0), 127.0)).to(CACHE_TY)
    return out
