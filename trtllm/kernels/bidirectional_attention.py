"""Bidirectional (non-causal, unpaged) attention: a vision encoder's self-attention.

    out[b, h, i] = sum_j softmax_j(scale * q[b, h, i] . k[b, h, j]) v[b, h, j]     (j over all S keys)

Shapes: q, k, v [B, H, S, D] of one dtype (fp32 / fp16 / bf16), any strides with the last dim
contiguous (a ViT's `proj(x).view(B, S, H, D).transpose(1, 2)` as it comes); out [B, H, S, D]
in q's dtype, laid out as [B, S, H, D] (a transposed view, as torch SDPA's flash kernel returns
it): the ViT's `out.transpose(1, 2).reshape(B, S, H * D)` is then a view, not a copy (one
[B, S, H * D] round trip a layer saved; estimated ~1.1 ms of a batch-64 CLIP-L pass on the H100,
not yet timed). No mask, no causality, no cache: every token of an image attends to
every token of that image, which is what `F.scaled_dot_product_attention(q, k, v)` computes
for a ViT. Flash-attention's forward: one program per (query tile, batch x head) loops over
key tiles with an online softmax in fp32; P is cast to v's dtype before P @ V (exact in fp32).
fp32 inputs take IEEE dots (not TF32), so the fp32 kernel matches the reference to ~1e-6.
"""
import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import interpreter_upcast, register_op


def bidirectional_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, S, S]
    out = torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype)  # [B, H, S, D]
    return out.transpose(1, 2).contiguous().transpose(1, 2)  # laid out [B, S, H, D], as the kernel's


def _empty_out(q: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] laid out as [B, S, H, D]."""
    B, H, S, D = q.shape
    return q.new_empty((B, S, H, D)).transpose(1, 2)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) by BLOCK_D: D <= 64 (CLIP's 64), else (Qwen2.5-VL's 80, SigLIP's 72).
# D <= 64 measured on the H100 at CLIP-L's [64 images, 16, 577, 64], ms a layer (2026-12-06): (64, 64, 4, 2)
# 0.343, (64, 64, 4, 3) 0.318, (128, 64, 8, 3) 0.315, (128, 64, 8, 4) 0.313, (128, 128, 8, 3) 0.431; torch
# SDPA (FlashAttention-2) 0.289. The other row is unmeasured.
LAUNCH = {64: (128, 64, 8, 3), 256: (32, 32, 4, 2)}


@triton.jit
def _bidirectional_attention_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr,
    seq_len, num_heads, head_dim, scale,
    q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, v_sb, v_sh, v_ss, o_sb, o_sh, o_ss,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # Grid: (query tiles, B * H). Each program owns BLOCK_M queries of one (batch, head).
    tile = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // num_heads, bh % num_heads
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < seq_len, dims < head_dim
    q = tl.load(q_ptr + b * q_sb + h * q_sh + rows[:, None] * q_ss + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    for start in range(0, seq_len, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < seq_len
        k = tl.load(k_ptr + b * k_sb + h * k_sh + cols[:, None] * k_ss + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + b * v_sb + h * v_sh + cols[:, None] * v_ss + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
        m_new = tl.maximum(m, tl.max(s, axis=1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + b * o_sb + h * o_sh + rows[:, None] * o_ss + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def bidirectional_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                                   launch: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """launch: (BLOCK_M, BLOCK_N, num_warps, num_stages) instead of LAUNCH's (probes sweep it)."""
    assert q.dim() == 4 and q.shape == k.shape == v.shape, \
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected one [B, H, S, D] shape"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert q.device == k.device == v.device
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1 or t.shape[-1] == 1, f"{name}: the head dim must be contiguous"
    B, H, S, D = q.shape
    out = _empty_out(q)
    if out.numel() == 0:
        return out
    BLOCK_D = max(16, triton.next_power_of_2(D))
    assert BLOCK_D <= 256, f"head dim {D} > 256"
    BLOCK_M, BLOCK_N, warps, stages = launch or LAUNCH[64 if BLOCK_D <= 64 else 256]
    with interpreter_upcast((q, k, v), (out,)) as ((q_, k_, v_), (out_,)):
        _bidirectional_attention_kernel[(triton.cdiv(S, BLOCK_M), B * H)](
            q_, k_, v_, out_, S, H, D, float(scale),
            q_.stride(0), q_.stride(1), q_.stride(2), k_.stride(0), k_.stride(1), k_.stride(2),
            v_.stride(0), v_.stride(1), v_.stride(2), out_.stride(0), out_.stride(1), out_.stride(2),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IEEE=q_.dtype == torch.float32,
            num_warps=warps, num_stages=stages,
        )
    return out


def _bidirectional_attention_fake(q, k, v, scale):
    return _empty_out(q)


bidirectional_attention = register_op("bidirectional_attention", launcher=bidirectional_attention_triton,
                                      reference=bidirectional_attention_ref, fake=_bidirectional_attention_fake)
