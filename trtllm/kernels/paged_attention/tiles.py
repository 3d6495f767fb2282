"""Tile-level Triton building blocks shared by the paged attention kernels (prefill.py,
decode.py)."""
import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax runs in base 2, with scale * log2(e) folded in


@triton.jit
def write_token(
    t, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, o_ptr, zero_row,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    stride_ot, stride_oh,
    HKV: tl.constexpr, HQ: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Token t: k/v rows of all heads to slot_mapping[t] (if >= 0); output row zeroed
    if no sequence covers it (the attention programs write the others)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_h = tl.arange(0, BLOCK_HKV)
    kv_ok = (offs_h < HKV)[:, None] & d_ok[None, :]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs \
            + offs_h[:, None] * stride_ch + offs_d[None, :]
        kk = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=kv_ok)
        vv = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=kv_ok)
        tl.store(kc_ptr + dst, kk.to(kc_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(vc_ptr + dst, vv.to(vc_ptr.dtype.element_ty), mask=kv_ok)
    if zero_row:
        offs_q = tl.arange(0, BLOCK_HQ)
        zero = tl.zeros([BLOCK_HQ, BLOCK_D], dtype=o_ptr.dtype.element_ty)
        tl.store(o_ptr + t * stride_ot + offs_q[:, None] * stride_oh + offs_d[None, :], zero,
                 mask=(offs_q < HQ)[:, None] & d_ok[None, :])


@triton.jit
def load_tile(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    # Unmasked loads where the tile is known to be in bounds keep 16-byte vector loads.
    if ROW_MASK:
        if EVEN_D:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=d_ok[None, :], other=0.0)
    return x


@triton.jit
def attend(acc, m_i, l_i, q, k, v, qk_scale, mask, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
           SUM_LATE: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, D] K/V tile (m_i in log2 units; qk_scale > 0
    with log2(e) folded in). SUM_LATE:
    l_i is [M, BLOCK_N], column-wise sums the caller reduces once after its loop (a row
    sum across warps per tile less)."""
    # The scale (> 0) goes into the exp2's argument as one FMA, not a multiply per score
    # first: the row max of unscaled scores, scaled, is the max of the scaled ones.
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    if SUM_LATE:
        l_i = l_i * alpha[:, None] + p
    else:
        l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


