"""Bidirectional attention within segments of one packed sequence: a ViT over several images
of different sizes (Qwen2.5-VL's full-attention blocks), or over the windows of an image (its
windowed blocks), in one launch.

    out[h, i] = sum_j softmax_j(scale * q[h, i] . k[h, j]) v[h, j]     (j over seg_start[i] <= j < seg_end[i])

Shapes: q, k, v [H, T, D] of one dtype (fp32 / fp16 / bf16), any strides with the last dim
contiguous (a ViT's `qkv(x).view(T, 3, H, D)` unbound and transposed, as it comes);
seg_start, seg_end [T] int32: the bounds of token i's segment (a token attends to its segment
only; segments are runs of consecutive tokens, as flash-attention's `cu_seqlens` gives them,
here spelled per token so the kernel needs no search and no host-side maximum length).
out [H, T, D] contiguous, q's dtype. This is what HF's Qwen2.5-VL vision attention computes
by splitting at `cu_seqlens` and running SDPA per piece.

Flash-attention's forward: one program per (query tile, head) loops over the key tiles from
its rows' smallest segment start to their largest end, with an online softmax in fp32 and each
row's keys masked to its own segment (a row whose keys a tile misses entirely adds nothing).
fp32 inputs take IEEE dots (not TF32), so the fp32 kernel matches the reference to ~1e-6.
"""
import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import interpreter_upcast, register_op


def segment_bounds(cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cu_seqlens [n + 1] (0, end of segment 0, ..., T) -> (seg_start, seg_end) [T] int32."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths)
    ends = torch.repeat_interleave(cu_seqlens[1:].long(), lengths)
    return starts.to(torch.int32), ends.to(torch.int32)


def segment_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor,
                          seg_end: torch.Tensor, scale: float) -> torch.Tensor:
    cols = torch.arange(q.shape[1], device=q.device)
    visible = (cols[None, :] >= seg_start[:, None].long()) & (cols[None, :] < seg_end[:, None].long())  # [T, T]
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [H, T, T]
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.matmul(scores.softmax(dim=-1), v.float()).to(q.dtype).contiguous()


@triton.jit
def _segment_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, out_ptr,
    seq_len, head_dim, scale,
    q_sh, q_ss, k_sh, k_ss, v_sh, v_ss, o_sh, o_ss,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
):
    # Grid: (query tiles, H). Each program owns BLOCK_M queries of one head.
    tile = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok, dim_ok = rows < seq_len, dims < head_dim
    lo_row = tl.load(start_ptr + rows, mask=row_ok, other=seq_len)
    hi_row = tl.load(end_ptr + rows, mask=row_ok, other=0)
    lo = (tl.min(lo_row, axis=0) // BLOCK_N) * BLOCK_N  # the tile's keys: [lo, hi)
    hi = tl.max(hi_row, axis=0)
    q = tl.load(q_ptr + h * q_sh + rows[:, None] * q_ss + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < seq_len
        k = tl.load(k_ptr + h * k_sh + cols[:, None] * k_ss + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        v = tl.load(v_ptr + h * v_sh + cols[:, None] * v_ss + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        visible = (cols[None, :] >= lo_row[:, None]) & (cols[None, :] < hi_row[:, None]) & col_ok[None, :]
        s = tl.where(visible, s * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N], log2 units
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: adds nothing
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
    tl.store(out_ptr + h * o_sh + rows[:, None] * o_ss + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def segment_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor,
                             seg_end: torch.Tensor, scale: float) -> torch.Tensor:
    assert q.dim() == 3 and q.shape == k.shape == v.shape, \
        f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: expected one [H, T, D] shape"
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    H, T, D = q.shape
    for name, t in (("seg_start", seg_start), ("seg_end", seg_end)):
        assert t.shape == (T,) and t.dtype == torch.int32 and t.is_contiguous(), \
            f"{name}: expected [{T}] contiguous int32, got {tuple(t.shape)} {t.dtype}"
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(-1) == 1 or t.shape[-1] == 1, f"{name}: the head dim must be contiguous"
    out = torch.empty((H, T, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    BLOCK_D = max(16, triton.next_power_of_2(D))
    assert BLOCK_D <= 256, f"head dim {D} > 256"
    BLOCK_M = 64 if BLOCK_D <= 64 else 32
    BLOCK_N = 64 if BLOCK_D <= 64 else 32
    with interpreter_upcast((q, k, v), (out,)) as ((q_, k_, v_), (out_,)):
        _segment_attention_kernel[(triton.cdiv(T, BLOCK_M), H)](
            q_, k_, v_, seg_start, seg_end, out_, T, D, float(scale),
            q_.stride(0), q_.stride(1), k_.stride(0), k_.stride(1), v_.stride(0), v_.stride(1),
            out_.stride(0), out_.stride(1),
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IEEE=q_.dtype == torch.float32,
            num_warps=4, num_stages=2,
        )
    return out


def _segment_attention_fake(q, k, v, seg_start, seg_end, scale):
    return q.new_empty(q.shape)


segment_attention = register_op("segment_attention", launcher=segment_attention_triton,
                                reference=segment_attention_ref, fake=_segment_attention_fake)
