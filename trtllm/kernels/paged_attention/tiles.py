"""Tile-level Triton building blocks shared by the paged attention kernels (prefill.py,
decode.py)."""
import triton
import triton.language as tl

from trtllm.kernels.paged_attention.kv_quant import quantize_kv

LOG2E = 1.4426950408889634  # softmax runs in base 2, with scale * log2(e) folded in
_LOG2E = tl.constexpr(LOG2E)


@triton.jit
def write_token(
    t, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, o_ptr, zero_row,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    stride_ot, stride_oh,
    HKV: tl.constexpr, HQ: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr, KV_QUANT: tl.constexpr,
    cos_ptr=None, sin_ptr=None, stride_cos=0, stride_sin=0,
    ROPE: tl.constexpr = False, ROPE_INTERLEAVED: tl.constexpr = False,
):
    """Token t: k/v rows of all heads to slot_mapping[t] (if >= 0), quantized with the
    heads' scales ks_ptr / vs_ptr [Hkv] if KV_QUANT ("fp8", "int8"; "" = stored as they
    are, kv_quant.py); output row zeroed if no sequence covers it (the attention programs
    write the others). ROPE: k rotated first (`load_rope`, token t's cos/sin rows)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_h = tl.arange(0, BLOCK_HKV)
    kv_ok = (offs_h < HKV)[:, None] & d_ok[None, :]
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:
        dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs \
            + offs_h[:, None] * stride_ch + offs_d[None, :]
        if ROPE:
            kk = load_rope(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh, offs_d[None, :], kv_ok,
                           cos_ptr + t * stride_cos, sin_ptr + t * stride_sin, d_ok[None, :], HEAD_D,
                           ROPE_INTERLEAVED).to(k_ptr.dtype.element_ty)
        else:
            kk = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=kv_ok)
        vv = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=kv_ok)
        if KV_QUANT != "":
            h_ok = offs_h < HKV
            kk = quantize_kv(kk, tl.load(ks_ptr + offs_h, mask=h_ok, other=1.0)[:, None], KV_QUANT,
                             kc_ptr.dtype.element_ty)
            vv = quantize_kv(vv, tl.load(vs_ptr + offs_h, mask=h_ok, other=1.0)[:, None], KV_QUANT,
                             vc_ptr.dtype.element_ty)
        tl.store(kc_ptr + dst, kk.to(kc_ptr.dtype.element_ty), mask=kv_ok)
        tl.store(vc_ptr + dst, vv.to(vc_ptr.dtype.element_ty), mask=kv_ok)
    if zero_row:
        offs_q = tl.arange(0, BLOCK_HQ)
        zero = tl.zeros([BLOCK_HQ, BLOCK_D], dtype=o_ptr.dtype.element_ty)
        tl.store(o_ptr + t * stride_ot + offs_q[:, None] * stride_oh + offs_d[None, :], zero,
                 mask=(offs_q < HQ)[:, None] & d_ok[None, :])


@triton.jit
def load_rope(rows, offs_d, mask, cos_row, sin_row, d_ok, HEAD_D: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows rows + offs_d of q or k, rotated as kernels/rotary.py's op does, in fp32 (the
    caller rounds to the tensor's dtype, where the unfused graph stored the op's output):

        x[d] * cos[d] + sign(d) * x[partner(d)] * sin[d]

    partner d +- D/2 and sign -1 on the first half (neox / HF layout), or partner d ^ 1 and
    sign -1 on even d (GPT-J's, INTERLEAVED). cos_row / sin_row: the token's [D] rows. The
    partner's load hits the lines the row's own load brought in."""
    if INTERLEAVED:
        first = (offs_d % 2) == 0
        partner = offs_d ^ 1
    else:
        first = offs_d < HEAD_D // 2
        partner = tl.where(first, offs_d + HEAD_D // 2, offs_d - HEAD_D // 2)
    x = tl.load(rows + offs_d, mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(rows + partner, mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(cos_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    sin = tl.load(sin_row + offs_d, mask=d_ok, other=0.0).to(tl.float32)
    return x * cos + tl.where(first, -x_partner, x_partner) * sin


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
def softcap_log2(qk, qk_scale, SOFTCAP: tl.constexpr):
    """Soft-capped scores in the kernels' base-2 units: softcap * tanh(scale * qk / softcap)
    * log2(e), from raw dot products qk and qk_scale = scale * log2(e) (Gemma-2's
    attn_logit_softcapping, applied to the scaled logits in natural units, as HF does).

    tanh(x) = 1 - 2 / (1 + e^(2x)), e^(2x) = 2^(qk * 2 * qk_scale / softcap): one exp2 and
    one division a score; tl has no tanh in every Triton version, and this form is the
    same under the interpreter. No NaN for any finite or infinite qk: e^(2x) overflowing
    to inf gives 1, underflowing to 0 gives -1; near 0 its absolute error is an ulp of 1
    (times softcap), which is what a softmax's logits are judged by."""
    e2x = tl.math.exp2(qk * (2.0 * qk_scale / SOFTCAP))
    return (SOFTCAP * _LOG2E) * (1.0 - 2.0 / (1.0 + e2x))


@triton.jit
def alibi_log2(slope_log2, key_pos, query_pos):
    """ALiBi's bias in the kernels' base-2 units, [M, N]: slope_h * (key - query position)
    * log2(e), from slope_log2 [M] (each row's head slope times log2(e)), key_pos [N] and
    query_pos [M]. <= 0 on every causal key and 0 on the query's own: the relative form keeps
    scores near their unbiased size (HF's BLOOM adds slope * key position, MPT slope *
    (key - last key); under a row's softmax all three are the same)."""
    return slope_log2[:, None] * (key_pos[None, :] - query_pos[:, None]).to(tl.float32)


@triton.jit
def attend(acc, m_i, l_i, q, k, v, qk_scale, mask, MASKED: tl.constexpr, DOT_PREC: tl.constexpr,
           SUM_LATE: tl.constexpr, SOFTCAP: tl.constexpr, bias, ALIBI: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, D] K/V tile (m_i in log2 units; qk_scale > 0
    with log2(e) folded in). K/V tiles of a quantized cache (e4m3 or int8 values) are cast
    to q's dtype for the dots, exactly (their scales are the callers': K's folded into
    qk_scale, V's applied to the output); of q's own dtype the casts are no-ops. SUM_LATE:
    l_i is [M, BLOCK_N], column-wise sums the caller reduces once after its loop (a row
    sum across warps per tile less). SOFTCAP > 0 (a constexpr; 0.0 compiles to the plain
    step): scores soft-capped (`softcap_log2`) before the mask. ALIBI (a constexpr; False
    compiles to the plain step): `bias` ([M, BLOCK_N] fp32, log2 units: `alibi_log2`) added
    to the scaled scores (the launcher refuses it together with SOFTCAP)."""
    # The scale (> 0) goes into the exp2's argument as one FMA, not a multiply per score
    # first: the row max of unscaled scores, scaled, is the max of the scaled ones.
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC)
    if SOFTCAP > 0:  # the scale goes inside the tanh: qk is scaled (log2 units) from here
        qk = softcap_log2(qk, qk_scale, SOFTCAP)
        qk_scale = 1.0
    if ALIBI:  # the scale applied first, then the bias: qk is in log2 units from here
        qk = qk * qk_scale + bias
        qk_scale = 1.0
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
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


