"""The prefill path of paged attention (any batch; the only path once max_query_len > 1:
prefill, chunked prefill, prefix hits, decodes mixed in). Semantics and shapes: op.py.

- `_cache_write_kernel`, grid (T,): scatters the new k/v rows to their slots and zeroes
  the output rows of tokens no sequence covers (no memset needed).
- `_prefill_kernel`, grid (Hkv, T // BLOCK_Q + num_seqs) q tiles found by binary search on
  query_start_loc (vLLM's unified-attention trick). A tile's BLOCK_M rows are BLOCK_Q
  tokens x the G query heads of one kv head, so each K/V tile is loaded once per group.
  Cached context [0, L - n) is read through the block table (a BLOCK_N tile gathers rows
  from several pages); the new tokens' keys come straight from the contiguous k/v tensors,
  unmasked below the diagonal and masked only on the diagonal tiles.

A quantized cache (KV_QUANT "fp8" / "int8", kv_quant.py): the cache write stores k/v
quantized with the layer's per-head scales; the prefill kernel reads every key as stored,
the new tokens' too (through the block table, after the cache write), folds K's scale into
the softmax scale and multiplies the output by V's. Quantizing the new tokens' k/v tiles
in registers instead, again for every q tile, took the kernel from 4.0 ms (bf16 cache) to
11.1 at a 2,048-token prompt (Llama-3.1-8B, 32 layers, H100, 2026-12-06): a cast and an
IEEE division a value, S / BLOCK_Q times over.
"""
import triton
import triton.language as tl

from trtllm.kernels.paged_attention.kv_quant import quant_dot_type
from trtllm.kernels.paged_attention.launch_shape import PrefillLaunch
from trtllm.kernels.paged_attention.tiles import (
    _LOG2E,
    alibi_log2 as _alibi_log2,
    attend as _attend,
    load_tile as _load_tile,
    write_token as _write_token,
)


@triton.jit(do_not_specialize=["num_seqs"])  # ints == 1 would become constexprs
def _cache_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, qsl_ptr, o_ptr, num_seqs,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    stride_ot, stride_oh,
    HKV: tl.constexpr, HQ: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr, KV_QUANT: tl.constexpr,
):
    t = tl.program_id(0)
    uncovered = (t < tl.load(qsl_ptr)) | (t >= tl.load(qsl_ptr + num_seqs))
    _write_token(t, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, o_ptr, uncovered,
                 stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                 stride_ot, stride_oh, HKV, HQ, HEAD_D, PAGE, BLOCK_HKV, BLOCK_HQ, BLOCK_D, KV_QUANT)



@triton.jit
def _find_seq(qsl_ptr, q_block, num_seqs, BLOCK_Q: tl.constexpr):
    # Sequence s owns q blocks [qsl[s] // BLOCK_Q + s, qsl[s+1] // BLOCK_Q + s + 1), a
    # superset of its ceil(n_s / BLOCK_Q) tiles; strictly increasing in s, so bisect.
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(qsl_ptr + mid) // BLOCK_Q + mid <= q_block:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _stored_tiles(kc_ptr, vc_ptr, bt_row, pos, ok, kvh, offs_d, d_ok, stride_cb, stride_cs, stride_ch,
                  PAGE: tl.constexpr, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
    """The cached K and V tiles [BLOCK_N, BLOCK_D] of positions `pos` (rows not `ok` masked
    when ROW_MASK), gathered from their pages through the sequence's block-table row."""
    page = tl.load(bt_row + pos // PAGE, mask=ok, other=0).to(tl.int64)
    off = page[:, None] * stride_cb + (pos % PAGE)[:, None] * stride_cs + kvh * stride_ch + offs_d[None, :]
    return _load_tile(kc_ptr + off, ok, d_ok, ROW_MASK, EVEN_D), _load_tile(vc_ptr + off, ok, d_ok, ROW_MASK, EVEN_D)


@triton.jit(do_not_specialize=["window", "num_seqs", "num_q_blocks"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr, alibi_ptr,
    qk_scale, window, num_seqs, num_q_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr, KV_QUANT: tl.constexpr, ALIBI: tl.constexpr,
):
    kvh = tl.program_id(0)
    # Highest q blocks (longest causal rows) first: better tail balance on the last wave.
    q_block = num_q_blocks - 1 - tl.program_id(1)
    s = _find_seq(qsl_ptr, q_block, num_seqs, BLOCK_Q)
    q_start = tl.load(qsl_ptr + s)
    n = tl.load(qsl_ptr + s + 1) - q_start
    i_lo = (q_block - q_start // BLOCK_Q - s) * BLOCK_Q  # first new-token index of the tile
    if i_lo >= n:
        return
    ctx = tl.load(seq_lens_ptr + s) - n  # cached positions before the new tokens
    i_hi = tl.minimum(i_lo + BLOCK_Q, n) - 1

    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    i = i_lo + offs_m // G  # rows: token-major, the G heads of a token adjacent
    head = kvh * G + offs_m % G
    row_ok = (offs_m < BLOCK_Q * G) & (i < n)
    q_rows = (q_start + i).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if KV_QUANT != "":
        q = q.to(quant_dot_type(q.dtype))  # the dots' operands: see quant_dot_type
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    use_window = window > 0
    if KV_QUANT != "":  # K's scale folded into the softmax scale; V's applied to the output
        k_scale = tl.load(ks_ptr + kvh)
        v_scale = tl.load(vs_ptr + kvh)
        qk_scale = qk_scale * k_scale
    if ALIBI:  # each row's head slope, in log2 units (tiles.alibi_log2)
        slope = tl.load(alibi_ptr + head) * _LOG2E

    # 1) cached context [c_lo, ctx) through the block table: every row sees all of it
    # (ctx <= p), so only the bounds and the window mask apply.
    c_lo = tl.where(use_window, tl.maximum(ctx + i_lo - window + 1, 0), 0)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    pos = ctx + i
    for j0 in range((c_lo // BLOCK_N) * BLOCK_N, ctx, BLOCK_N):
        j = j0 + offs_n
        j_ok = (j >= c_lo) & (j < ctx)
        page = tl.load(bt_row + j // PAGE, mask=j_ok, other=0).to(tl.int64)
        off = page[:, None] * stride_cb + (j % PAGE)[:, None] * stride_cs \
            + kvh * stride_ch + offs_d[None, :]
        k = _load_tile(kc_ptr + off, j_ok, d_ok, True, EVEN_D)
        v = _load_tile(vc_ptr + off, j_ok, d_ok, True, EVEN_D)
        mask = j_ok[None, :] & ((window <= 0) | (j[None, :] > pos[:, None] - window))
        if ALIBI:
            bias = _alibi_log2(slope, j, pos)
        else:
            bias = 0.0
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, True, DOT_PREC, False, SOFTCAP, bias, ALIBI)

    # 2) the new tokens' own keys, from the k/v tensors (same values just written to the
    # cache, contiguous rows, no indirection); a quantized cache's as stored (docstring).
    # Key index kk < n is position ctx + kk.
    k_base = k_ptr + q_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_d[None, :]
    v_base = v_ptr + q_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d[None, :]
    kk_lo = tl.maximum(-ctx, 0)  # > 0 only for L < n (e.g. L == 0): positions < 0 don't exist
    kk_lo = tl.where(use_window, tl.maximum(kk_lo, i_lo - window + 1), kk_lo)
    # Tiles fully below the diagonal (kk <= i_lo <= every row) need no mask at all.
    full_end = tl.where(use_window | (ctx < 0), 0, ((i_lo + 1) // BLOCK_N) * BLOCK_N)
    for k0 in range(0, full_end, BLOCK_N):
        kk = k0 + offs_n
        if KV_QUANT != "":
            k, v = _stored_tiles(kc_ptr, vc_ptr, bt_row, ctx + kk, kk >= 0, kvh, offs_d, d_ok,
                                 stride_cb, stride_cs, stride_ch, PAGE, False, EVEN_D)
        else:
            k = _load_tile(k_base + kk[:, None] * stride_kt, kk, d_ok, False, EVEN_D)
            v = _load_tile(v_base + kk[:, None] * stride_vt, kk, d_ok, False, EVEN_D)
        if ALIBI:  # key kk is at position ctx + kk, row i at ctx + i
            bias = _alibi_log2(slope, kk, i)
        else:
            bias = 0.0
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, kk, False, DOT_PREC, False, SOFTCAP, bias, ALIBI)
    for k0 in range(tl.maximum(full_end, (kk_lo // BLOCK_N) * BLOCK_N), i_hi + 1, BLOCK_N):
        kk = k0 + offs_n
        kk_ok = (kk >= kk_lo) & (kk <= i_hi)
        if KV_QUANT != "":
            k, v = _stored_tiles(kc_ptr, vc_ptr, bt_row, ctx + kk, kk_ok, kvh, offs_d, d_ok,
                                 stride_cb, stride_cs, stride_ch, PAGE, True, EVEN_D)
        else:
            k = _load_tile(k_base + kk[:, None] * stride_kt, kk_ok, d_ok, True, EVEN_D)
            v = _load_tile(v_base + kk[:, None] * stride_vt, kk_ok, d_ok, True, EVEN_D)
        mask = kk_ok[None, :] & (kk[None, :] <= i[:, None]) \
            & ((window <= 0) | (kk[None, :] > i[:, None] - window))
        if ALIBI:
            bias = _alibi_log2(slope, kk, i)
        else:
            bias = 0.0
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, True, DOT_PREC, False, SOFTCAP, bias, ALIBI)

    if KV_QUANT != "":
        acc = acc * v_scale
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0: no key at all -> 0
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])



def launch_prefill(q, k, v, kc, vc, out, slot_mapping, block_tables, seq_lens, query_start_loc,
                   qk_scale, window, softcap, num_seqs, max_query_len, dot_prec, launch: PrefillLaunch,
                   kv_quant="", ks=None, vs=None, alibi_slopes=None):
    """The cache write, then (if any sequence has new tokens) attention, into `out`; kc/vc
    are one layer's caches [NB, BS, Hkv, D]. softcap (0.0 = none) is a constexpr: one
    compiled kernel per value (one per model in practice). kv_quant "fp8" / "int8": the
    caches are quantized with the layer's scales ks / vs [Hkv] fp32 (kv_quant.py).
    alibi_slopes: [Hq] fp32, ALiBi's slope per query head (None = none: the ALIBI constexpr
    off compiles to the kernel without it)."""
    T, Hq, D = q.shape
    Hkv, BS = kc.shape[2], kc.shape[1]
    BLOCK_D = max(16, triton.next_power_of_2(D))
    ks = out if ks is None else ks  # never read without kv_quant
    vs = out if vs is None else vs
    _cache_write_kernel[(T,)](
        k, v, kc, vc, ks, vs, slot_mapping, query_start_loc, out, num_seqs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        out.stride(0), out.stride(1),
        HKV=Hkv, HQ=Hq, HEAD_D=D, PAGE=BS, BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_D=BLOCK_D, KV_QUANT=kv_quant, num_warps=4,
    )
    if num_seqs == 0 or max_query_len == 0:
        return
    G = Hq // Hkv
    block_q = launch.block_m // G
    num_q_blocks = T // block_q + num_seqs  # >= sum over s of ceil(n_s / BLOCK_Q)
    _prefill_kernel[(Hkv, num_q_blocks)](
        q, k, v, kc, vc, ks, vs, out, block_tables, seq_lens, query_start_loc,
        out if alibi_slopes is None else alibi_slopes,  # read only with ALIBI
        qk_scale, window, num_seqs, num_q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=G, HEAD_D=D, BLOCK_D=BLOCK_D, PAGE=BS, BLOCK_Q=block_q, BLOCK_M=launch.block_m,
        BLOCK_N=launch.block_n, DOT_PREC=dot_prec, SOFTCAP=softcap, KV_QUANT=kv_quant,
        ALIBI=alibi_slopes is not None,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
