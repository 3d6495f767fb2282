"""Rotary position embedding (RoPE), plus the inverse-frequency and cos/sin tables it uses.

    rotary(x, cos, sin, interleaved)[b, h, s, :] rotates each pair (x[p], x[q]) of x[b, h, s]:
        out[p] = x[p] * cos[b, s, p] - x[q] * sin[b, s, p]
        out[q] = x[q] * cos[b, s, q] + x[p] * sin[b, s, q]
    neox / HF Llama layout (interleaved=False): pairs (i, i + D/2), i.e. exactly HF's
        x * cos + rotate_half(x) * sin,   rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])
    GPT-J layout (interleaved=True): pairs (2i, 2i + 1).

Shapes: x [B, H, S, D] (any strides, last dim contiguous, D even), cos/sin [B, S, D] or
[1, S, D] (same rules), broadcast over heads (and over the batch if 1). Output [B, H, S, D], contiguous, x.dtype. Computed in fp32
and rounded once (HF rounds after each multiply and the add in the model dtype).

QK-norm fused in front (Gemma-3, Qwen3: a per-head RMS norm of q and k right before rope):

    rms_norm_rotary(x, w, eps, unit_offset, cos, sin, interleaved)
        = rotary(rms_norm(x, w, eps, unit_offset), cos, sin, interleaved)

with the norm over D (w [D]) and rms_norm's roundings (kernels/rms_norm.py): the normed value
is rounded to x.dtype, where the unfused graph stores it, before the rotation. One launch
instead of two.

Tables: `rope_inv_freq` is HF's default and Llama-3 ("llama3") inverse frequencies;
`rope_cos_sin` turns positions into the [..., D] cos/sin tables the op reads.
"""
import math

import torch
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.registry import interpreter_upcast, register_op
from trtllm.kernels.rms_norm import rms_norm_ref


def rope_inv_freq(head_dim: int, theta: float, rope_scaling: dict | None = None) -> torch.Tensor:
    """[head_dim // 2] fp32 inverse frequencies, as HF transformers computes them.

    `rope_scaling` is a config's rope_scaling / rope_parameters dict (or None); its
    "rope_type" (or legacy "type") must be absent, "default" or "llama3".
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = None
    if rope_scaling is not None:
        rope_type = rope_scaling.get("rope_type") or rope_scaling.get("type")
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_type {rope_type!r} (supported: 'default', 'llama3')")

    # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    old_context_len = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, interleaved: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [...] -> (cos, sin), each [..., 2 * len(inv_freq)] in `dtype`, angles in fp32.

    Neox layout cat(freqs, freqs) as HF's LlamaRotaryEmbedding; with interleaved=True each
    frequency is repeated in place (f0, f0, f1, f1, ...), the layout GPT-J pairs need.
    """
    freqs = positions.float()[..., None] * inv_freq.float().to(positions.device)
    if interleaved:
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    xf, cos, sin = x.float(), cos.float().unsqueeze(1), sin.float().unsqueeze(1)
    if interleaved:
        rotated = torch.stack((-xf[..., 1::2], xf[..., 0::2]), dim=-1).flatten(-2)
    else:
        half = x.shape[-1] // 2
        rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype).contiguous()


def rms_norm_rotary_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
    cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
) -> torch.Tensor:
    return rotary_ref(rms_norm_ref(x, weight, eps, unit_offset), cos, sin, interleaved)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, out_ptr, weight_ptr,
    n_heads, seq_len,
    x_stride_b, x_stride_h, x_stride_s,
    cos_stride_b, cos_stride_s, sin_stride_b, sin_stride_s,
    out_stride_b, out_stride_h, out_stride_s,
    eps,
    HEAD_DIM: tl.constexpr,
    INTERLEAVED: tl.constexpr,
    HAS_NORM: tl.constexpr,  # an RMS norm over each head first (weight_ptr [HEAD_DIM], eps)
    UNIT_OFFSET: tl.constexpr,  # the norm's Gemma weight: 1 + w, the product rounded once
    BLOCK_H: tl.constexpr,  # heads per program: they share one cos/sin row
    BLOCK_HALF: tl.constexpr,  # next power of 2 >= HEAD_DIM // 2
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # One program per (batch, position) and block of heads.
    pid_bs = tl.program_id(0)
    b = (pid_bs // seq_len).to(tl.int64)
    s = (pid_bs % seq_len).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)

    pair = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        first, second = 2 * pair, 2 * pair + 1
    else:
        first, second = pair, pair + HEAD_DIM // 2
    pair_mask = pair < HEAD_DIM // 2

    cos_row = cos_ptr + b * cos_stride_b + s * cos_stride_s
    sin_row = sin_ptr + b * sin_stride_b + s * sin_stride_s
    cos1 = tl.load(cos_row + first, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + second, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row + first, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + second, mask=pair_mask, other=0.0).to(tl.float32)[None, :]

    mask = (heads < n_heads)[:, None] & pair_mask[None, :]
    x_rows = x_ptr + b * x_stride_b + s * x_stride_s + heads[:, None].to(tl.int64) * x_stride_h
    x1 = tl.load(x_rows + first[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + second[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:  # kernels/rms_norm.py's roundings, each row's two halves being the whole head
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(weight_ptr + first, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(weight_ptr + second, mask=pair_mask, other=0.0).to(tl.float32)[None, :]
        if UNIT_OFFSET:  # HF Gemma: fp32 throughout
            x1, x2 = x1 * rstd * (1.0 + w1), x2 * rstd * (1.0 + w2)
        else:  # HF Llama rounds the normalized value to x.dtype before the weight multiply.
            x1 = (x1 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w1
            x2 = (x2 * rstd).to(x_ptr.dtype.element_ty).to(tl.float32) * w2
        # the norm's output, an x.dtype tensor in the unfused graph
        x1 = x1.to(x_ptr.dtype.element_ty).to(tl.float32)
        x2 = x2.to(x_ptr.dtype.element_ty).to(tl.float32)

    out1 = x1 * cos1 - x2 * sin1
    out2 = x2 * cos2 + x1 * sin2
    out_rows = out_ptr + b * out_stride_b + s * out_stride_s + heads[:, None].to(tl.int64) * out_stride_h
    tl.store(out_rows + first[None, :], out1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_rows + second[None, :], out2.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, norm, cos, sin, interleaved):
    """norm: (weight, eps, unit_offset) of an RMS norm before the rotation, or None."""
    assert x.dim() == 4, f"x must be [B, H, S, D], got {tuple(x.shape)}"
    B, H, S, D = x.shape
    assert D % 2 == 0, f"head_dim {D} must be even"
    for name, t in (("cos", cos), ("sin", sin)):
        assert t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1:] == (S, D), \
            f"{name} {tuple(t.shape)} is not {(B, S, D)} or {(1, S, D)}"
        assert t.is_floating_point() and t.device == x.device, name
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
    assert x.stride(-1) == 1, "x: last dim must be contiguous"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), x.dtype
    weight, eps, unit_offset = norm if norm is not None else (x, 0.0, False)  # x: an unread stand-in
    if norm is not None:
        assert weight.shape == (D,) and weight.is_contiguous() and weight.device == x.device, \
            f"weight {tuple(weight.shape)} is not a contiguous ({D},)"
    cos, sin = cos.expand(B, S, D), sin.expand(B, S, D)  # a batch of 1 gets batch stride 0
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    BLOCK_HALF = triton.next_power_of_2(D // 2)
    BLOCK_H = min(triton.next_power_of_2(H), max(1, 1024 // BLOCK_HALF))
    # Interpreted in bf16, the kernel runs in fp32 and skips the norm's roundings to x.dtype
    # (registry.interpreter_upcast): an ulp off the GPU's there.
    with interpreter_upcast((x, cos, sin, weight), (out,)) as ((x, cos, sin, weight), (y,)):
        _rotary_kernel[(B * S, triton.cdiv(H, BLOCK_H))](
            x, cos, sin, y, weight,
            H, S,
            x.stride(0), x.stride(1), x.stride(2),
            cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            y.stride(0), y.stride(1), y.stride(2),
            eps,
            HEAD_DIM=D, INTERLEAVED=interleaved, HAS_NORM=norm is not None, UNIT_OFFSET=unit_offset,
            BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF,
            num_warps=4, **pdl_options(x),
        )
    return out


def rotary_triton(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return _launch(x, None, cos, sin, interleaved)


def rms_norm_rotary_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
    cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
) -> torch.Tensor:
    return _launch(x, (weight, eps, unit_offset), cos, sin, interleaved)


def _rotary_fake(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return x.new_empty(x.shape)


def _rms_norm_rotary_fake(
    x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool,
    cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
) -> torch.Tensor:
    return x.new_empty(x.shape)


rotary = register_op("rotary", launcher=rotary_triton, reference=rotary_ref, fake=_rotary_fake)
rms_norm_rotary = register_op(
    "rms_norm_rotary", launcher=rms_norm_rotary_triton, reference=rms_norm_rotary_ref, fake=_rms_norm_rotary_fake
)
