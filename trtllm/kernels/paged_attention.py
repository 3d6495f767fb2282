"""Paged attention over a ragged batch: cache write + causal attention, one op.

For each sequence s < num_seqs with new tokens q[a:b] (a, b = query_start_loc[s], [s+1],
n = b - a) and context length L = seq_lens[s] (including the new tokens), new token i has
position p = L - n + i and

    out[a + i, h] = sum_j softmax_j(scale * q[a+i, h] . K_s[j, h // G]) V_s[j, h // G]
    over j in [0, p], or [p - window + 1, p] when window > 0 (sliding window),

where G = Hq // Hkv (GQA/MQA) and K_s[j] = k_cache[layer, block_tables[s, j // BS], j % BS]
(same for V). Before attending, the new k/v rows are written into the cache:
k_cache[layer, slot // BS, slot % BS] = k[t] for slot = slot_mapping[t] >= 0 (-1: padding).
Rows of tokens outside the first num_seqs sequences, and of sequences with L = 0, are 0.

Shapes: q [T, Hq, D], k/v [T, Hkv, D] (any strides, last dim contiguous);
k_cache/v_cache [L, NB, BS, Hkv, D]; slot_mapping [>=T], block_tables [S_max, MB],
seq_lens [S_max], query_start_loc [S_max + 1], all int32 -> out [T, Hq, D] in q.dtype.
num_seqs / max_query_len / max_seq_len are host-side upper bounds that only choose the
path, grid and splits (CUDA-graph capture fixes them); true lengths come from the tensors.

Kernels (all accumulate in fp32, softmax in base 2 with scale * log2(e) folded in):
- `_cache_write_kernel` (before the prefill kernel), grid (T,): scatters k/v to their
  slots and zeroes the output rows of tokens no sequence covers (no memset needed).
- `_prefill_kernel` (any max_query_len > 1: prefill, chunked prefill, prefix hits, mixed
  with decodes), grid (Hkv, T // BLOCK_Q + num_seqs) q tiles found by binary search on
  query_start_loc (vLLM's unified-attention trick). A tile's BLOCK_M rows are BLOCK_Q
  tokens x the G query heads of one kv head, so each K/V tile is loaded once per group.
  Cached context [0, L - n) is read through the block table (a BLOCK_N tile gathers rows
  from several pages); the new tokens' keys come straight from the contiguous k/v tensors,
  unmasked below the diagonal and masked only on the diagonal tiles.
- `_decode_kernel` (max_query_len == 1), grid (Hkv, num_seqs, splits), the whole step in
  one launch: the G query heads are the (padded to 16) rows of one tile; K/V pages stream
  through; the new key is taken from k/v (and written to the cache) by the split owning
  it; with splits > 1 (flash-decoding) each split writes (max, sum, acc) partials and the
  last one to finish (an atomic ticket per sequence and kv head) merges them.

Both attention kernels take the new tokens' own keys/values from k/v rather than from the
cache they were just written to: identical values as long as slot_mapping agrees with
block_tables (the runtime's invariant; the reference reads the cache). Page size: any
16..128 works; 16 (vLLM's default) is what the bench and the H100 defaults assume.
"""
import functools

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import register_op, triton_interpreter_on

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
# Flash-decoding: split a sequence's context only while the grid is smaller than
# _SPLIT_TARGET_PER_SM programs per SM (one wave: 3 decode programs of 72 KB smem fit an
# SM's 228 KB), and never into pieces shorter than _SPLIT_MIN_LEN positions (the
# partials' write + merge must stay small against the K/V stream).
_SPLIT_TARGET_PER_SM = 2
_SPLIT_MIN_LEN = 256
_MAX_SPLITS = 64


def _fix_interpreter_index() -> None:
    """Let the Triton interpreter run `range(start, stop)` with runtime bounds.

    The interpreter holds scalars as 1-element numpy arrays and its `tensor.__index__` is
    `int(array)`, which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted
    to Python scalars"). Wrap the interpreter's tensor patching to index element 0.
    """
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_index_fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched._index_fixed = True
    interpreter._patch_lang_tensor = patched


if triton_interpreter_on():
    _fix_interpreter_index()


# ------------------------------------------------------------------ reference


def paged_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor, scale: float, window: int,
    num_seqs: int, max_query_len: int, max_seq_len: int,
) -> torch.Tensor:
    """The semantics of record: plain torch, fp32 inside, one sequence at a time."""
    T, Hq, _ = q.shape
    Hkv, BS = k.shape[1], k_cache.shape[2]
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    blk, off = slots[keep] // BS, slots[keep] % BS
    k_cache[layer, blk, off] = k[keep].to(k_cache.dtype)
    v_cache[layer, blk, off] = v[keep].to(v_cache.dtype)

    out = torch.zeros(T, Hq, v.shape[-1], dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s in range(num_seqs):
        a, b, L = qsl[s], qsl[s + 1], lens[s]
        if b <= a or L <= 0:
            continue
        j = torch.arange(L, device=q.device)
        pages = block_tables[s, j // BS].long()
        keys = k_cache[layer, pages, j % BS].float().repeat_interleave(Hq // Hkv, dim=1)
        vals = v_cache[layer, pages, j % BS].float().repeat_interleave(Hq // Hkv, dim=1)
        for c in range(a, b, 1024):  # query chunks bound the [Hq, rows, L] score memory
            e = min(c + 1024, b)
            p = (L - (b - a) + torch.arange(c - a, e - a, device=q.device))[:, None]
            allowed = (j[None, :] <= p) & ((window <= 0) | (j[None, :] > p - window))
            scores = torch.einsum("nhd,lhd->hnl", q[c:e].float(), keys) * scale
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            out[c:e] = torch.einsum("hnl,lhd->nhd", probs.nan_to_num(0.0), vals)
    return out.to(q.dtype)


# ------------------------------------------------------------------ kernels


@triton.jit
def _write_token(
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


@triton.jit(do_not_specialize=["num_seqs"])  # ints == 1 would become constexprs
def _cache_write_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, qsl_ptr, o_ptr, num_seqs,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
    stride_ot, stride_oh,
    HKV: tl.constexpr, HQ: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    uncovered = (t < tl.load(qsl_ptr)) | (t >= tl.load(qsl_ptr + num_seqs))
    _write_token(t, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, o_ptr, uncovered,
                 stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch,
                 stride_ot, stride_oh, HKV, HQ, HEAD_D, PAGE, BLOCK_HKV, BLOCK_HQ, BLOCK_D)


@triton.jit
def _load_tile(ptrs, row_ok, d_ok, ROW_MASK: tl.constexpr, EVEN_D: tl.constexpr):
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
def _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, MASKED: tl.constexpr, DOT_PREC: tl.constexpr):
    """One online-softmax step over a [BLOCK_N, D] K/V tile (m_i in log2 units)."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if MASKED:
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_use = m_new
    p = tl.math.exp2(qk - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


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


@triton.jit(do_not_specialize=["window", "num_seqs", "num_q_blocks"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    qk_scale, window, num_seqs, num_q_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
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
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    use_window = window > 0

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
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, True, DOT_PREC)

    # 2) the new tokens' own keys, from the k/v tensors (same values just written to the
    # cache, contiguous rows, no indirection). Key index kk < n is position ctx + kk.
    k_base = k_ptr + q_start.to(tl.int64) * stride_kt + kvh * stride_kh + offs_d[None, :]
    v_base = v_ptr + q_start.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d[None, :]
    kk_lo = tl.maximum(-ctx, 0)  # > 0 only for L < n (e.g. L == 0): positions < 0 don't exist
    kk_lo = tl.where(use_window, tl.maximum(kk_lo, i_lo - window + 1), kk_lo)
    # Tiles fully below the diagonal (kk <= i_lo <= every row) need no mask at all.
    full_end = tl.where(use_window | (ctx < 0), 0, ((i_lo + 1) // BLOCK_N) * BLOCK_N)
    for k0 in range(0, full_end, BLOCK_N):
        kk = k0 + offs_n
        k = _load_tile(k_base + kk[:, None] * stride_kt, kk, d_ok, False, EVEN_D)
        v = _load_tile(v_base + kk[:, None] * stride_vt, kk, d_ok, False, EVEN_D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, kk, False, DOT_PREC)
    for k0 in range(tl.maximum(full_end, (kk_lo // BLOCK_N) * BLOCK_N), i_hi + 1, BLOCK_N):
        kk = k0 + offs_n
        kk_ok = (kk >= kk_lo) & (kk <= i_hi)
        k = _load_tile(k_base + kk[:, None] * stride_kt, kk_ok, d_ok, True, EVEN_D)
        v = _load_tile(v_base + kk[:, None] * stride_vt, kk_ok, d_ok, True, EVEN_D)
        mask = kk_ok[None, :] & (kk[None, :] <= i[:, None]) \
            & ((window <= 0) | (kk[None, :] > i[:, None] - window))
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, True, DOT_PREC)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0: no key at all -> 0
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=["window", "num_tokens"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, slot_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    pm_ptr, pl_ptr, pacc_ptr, count_ptr,
    qk_scale, window, num_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, HKV: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """One launch for the whole decode step (launches are a large share of a 20-30 us
    step): the cache write, the zero rows, attention and the split merge."""
    kvh = tl.program_id(0)  # fastest: the Hkv programs of a sequence read adjacent rows
    s = tl.program_id(1)
    split = tl.program_id(2)
    num_seqs = tl.num_programs(1)
    if (kvh == 0) & (split == 0):
        # Tokens no sequence covers (padding of a captured batch), shared out over s.
        q_first = tl.load(qsl_ptr)
        total = tl.load(qsl_ptr + num_seqs)
        for u in range(s, q_first + num_tokens - total, num_seqs):
            tok = tl.where(u < q_first, u, total + u - q_first)
            _write_token(tok, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, o_ptr, True,
                         stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs,
                         stride_ch, stride_ot, stride_oh, HKV, G * HKV, HEAD_D, PAGE,
                         BLOCK_HKV, BLOCK_HQ, BLOCK_D)
    t = tl.load(qsl_ptr + s)
    if tl.load(qsl_ptr + s + 1) <= t:  # unused row of a captured batch
        return
    L = tl.load(seq_lens_ptr + s)

    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    head = kvh * G + offs_g
    g_ok = (offs_g < G)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok, other=0.0)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    # The one query sits at p = L - 1: keys [lo, L). Splits take equal runs of tiles of
    # the true length (the host only knew an upper bound); trailing splits may be empty.
    lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)
    first = lo // BLOCK_N
    per = tl.cdiv(tl.cdiv(L, BLOCK_N) - first, NUM_SPLITS)
    j_start = (first + split * per) * BLOCK_N
    j_end = tl.minimum(j_start + per * BLOCK_N, L)
    # Keys [lo, L - 1) come from the cache; the new key L - 1 from k/v, by the one split
    # that owns it, which also writes it to the cache (no other program reads that slot).
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    for j0 in range(j_start, j_end, BLOCK_N):
        j = j0 + offs_n
        j_ok = (j >= lo) & (j < j_end) & (j < L - 1)
        page = tl.load(bt_row + j // PAGE, mask=j_ok, other=0).to(tl.int64)
        off = page[:, None] * stride_cb + (j % PAGE)[:, None] * stride_cs \
            + kvh * stride_ch + offs_d[None, :]
        k = _load_tile(kc_ptr + off, j_ok, d_ok, True, EVEN_D)
        v = _load_tile(vc_ptr + off, j_ok, d_ok, True, EVEN_D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, j_ok[None, :], True, DOT_PREC)
    if ((j_start < L) & (L <= j_end)) | ((L <= 0) & (split == 0)):
        k_new = tl.load(k_ptr + t.to(tl.int64) * stride_kt + kvh * stride_kh + offs_d, mask=d_ok)
        v_new = tl.load(v_ptr + t.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d, mask=d_ok)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:
            dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs + kvh * stride_ch + offs_d
            tl.store(kc_ptr + dst, k_new.to(kc_ptr.dtype.element_ty), mask=d_ok)
            tl.store(vc_ptr + dst, v_new.to(vc_ptr.dtype.element_ty), mask=d_ok)
        if L > 0:
            qk = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, qk)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new

    o_ptrs = o_ptr + t.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        tl.store(o_ptrs, (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(o_ptr.dtype.element_ty),
                 mask=g_ok)
    else:
        # Partials [S, Hq, NUM_SPLITS] (+ [HEAD_D] for acc), unnormalized; the program that
        # finishes last for this (sequence, kv head) merges them: no second launch.
        row = (s * G * HKV + head) * NUM_SPLITS + split
        tl.store(pm_ptr + row, m_i, mask=offs_g < G)
        tl.store(pl_ptr + row, l_i, mask=offs_g < G)
        tl.store(pacc_ptr + row.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :], acc, mask=g_ok)
        tl.debug_barrier()  # every thread's partials are issued before the release below
        ticket = tl.atomic_add(count_ptr + s * HKV + kvh, 1, sem="acq_rel")
        if ticket == NUM_SPLITS - 1:
            tl.debug_barrier()
            offs_s = tl.arange(0, BLOCK_S)
            rows = (s * G * HKV + head)[None, :] * NUM_SPLITS + offs_s[:, None]
            sg_ok = (offs_s < NUM_SPLITS)[:, None] & (offs_g < G)[None, :]
            m_all = tl.load(pm_ptr + rows, mask=sg_ok, other=float("-inf"), cache_modifier=".cg")
            l_all = tl.load(pl_ptr + rows, mask=sg_ok, other=0.0, cache_modifier=".cg")
            m_max = tl.max(m_all, 0)
            m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty
            den = tl.sum(tl.math.exp2(m_all - m_max[None, :]) * l_all, 0)
            total = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
            for sp in range(NUM_SPLITS):
                r = (s * G * HKV + head) * NUM_SPLITS + sp
                m_sp = tl.load(pm_ptr + r, mask=offs_g < G, other=float("-inf"), cache_modifier=".cg")
                a_sp = tl.load(pacc_ptr + r.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :],
                               mask=g_ok, other=0.0, cache_modifier=".cg")
                total += tl.math.exp2(m_sp - m_max)[:, None] * a_sp
            tl.store(o_ptrs, (total / tl.where(den == 0.0, 1.0, den)[:, None]).to(o_ptr.dtype.element_ty),
                     mask=g_ok)
            tl.atomic_xchg(count_ptr + s * HKV + kvh, 0)  # ready for the next launch / replay


# ------------------------------------------------------------------ launcher


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the H100 the heuristics are tuned for; the interpreter tests use it too


def _num_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device) -> int:
    """Flash-decoding splits: fill ~_SPLIT_TARGET_PER_SM programs per SM, e.g. on H100
    batch 8 x 8 kv heads -> 4 splits; batch 1 x 8192 ctx -> 32; batch >= 17 -> 1."""
    target = _SPLIT_TARGET_PER_SM * _num_sms(device)
    by_grid = target // max(num_seqs * num_kv_heads, 1)
    by_len = max_seq_len // _SPLIT_MIN_LEN
    return max(1, min(by_grid, by_len, _MAX_SPLITS))


_counters: dict = {}


def _split_counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tickets, one per (sequence, kv head), kept across calls: the merging
    program resets its ticket, so the buffer is all zeros again after every launch (and
    every CUDA-graph replay). Allocated once per device, outside any graph capture
    normally (the first decode step runs eagerly); 64K entries cover 1K seqs x 64 heads."""
    buf = _counters.get(device)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
        _counters[device] = buf
    return buf


def _prefill_config(head_dim: int, group: int, max_query_len: int, elem_size: int):
    """(BLOCK_M rows = BLOCK_Q tokens x G heads, BLOCK_N, num_warps, num_stages)."""
    rows = max_query_len * group
    if elem_size == 4:  # fp32 (exact "ieee" dots on FMA units): a correctness path
        block_m, block_n, warps, stages = 64, 16, 8, 2  # 64x32x4 warps spills 45 KB at D=128
    elif rows <= 32:  # short chunks / spec-decode-like: don't pad 4 rows to 128
        block_m, block_n, warps, stages = 32 if rows > 16 else 16, 64, 4, 3
    elif head_dim <= 128:
        # sm_90 ptxas: D=128 -> 192 regs, 128 KB smem, no spills (128x128 tiles spill);
        # D=64 with 4 warps needs 255 regs, with 8 warps 124.
        block_m, block_n, warps, stages = 128, 64, 8, 3
    else:
        block_m, block_n, warps, stages = 64, 32, 8, 2  # D=256: 196 regs, 96 KB smem
    return max(block_m, triton.next_power_of_2(group)), block_n, warps, stages


def _decode_config(head_dim: int, elem_size: int):
    """(BLOCK_N, num_warps, num_stages): 64 x 128 bf16 K + V = 32 KB per buffer.

    The K/V addresses come from a block-table load inside the loop, and Triton's
    pipeliner gives that load a stage of its own: in the sm_90 TTGIR, num_stages 2-4
    leave K/V single-buffered (load waits right before use), 5 double-buffers them
    (72 KB smem, 128 regs: 3 programs per SM)."""
    if elem_size == 4 or head_dim > 128:
        return 32, 4, 3
    return 64, 4, 5


def _paged_attention_impl(
    q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, seq_lens, query_start_loc,
    scale, window, num_seqs, max_query_len, max_seq_len,
    *, num_splits=None, prefill_config=None, decode_config=None, force_prefill=False,
):
    """The launcher; the keywords force a path/config (tests)."""
    T, Hq, D = q.shape
    _, NB, BS, Hkv, Dc = k_cache.shape
    assert q.dtype in _FLOAT_DTYPES, f"unsupported dtype {q.dtype}"
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.dtype == q.dtype, f"{name}: dtype {t.dtype} != q dtype {q.dtype}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
    assert q.stride(-1) == 1, "q: last dim must be contiguous"
    assert k.shape == v.shape == (T, Hkv, D), f"k/v {tuple(k.shape)}/{tuple(v.shape)} != ({T}, {Hkv}, {D})"
    assert v_cache.shape == k_cache.shape and Dc == D, "k/v caches must be [L, NB, BS, Hkv, D]"
    assert k_cache.stride() == v_cache.stride(), "k/v caches must share strides"
    assert Hq % Hkv == 0, f"{Hq} query heads not a multiple of {Hkv} kv heads"
    assert 0 <= layer < k_cache.shape[0], f"layer {layer} out of range"
    for name, t in (("slot_mapping", slot_mapping), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        assert t.dtype == torch.int32 and t.device == q.device, f"{name}: int32 on q's device"
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] >= T and slot_mapping.stride(0) == 1
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    assert seq_lens.shape[0] >= num_seqs and seq_lens.stride(0) == 1
    assert query_start_loc.shape[0] >= num_seqs + 1 and query_start_loc.stride(0) == 1
    assert block_tables.shape[0] >= num_seqs

    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    kc, vc = k_cache[layer], v_cache[layer]  # a view: no layer * stride overflow in-kernel
    G = Hq // Hkv
    BLOCK_D = max(16, triton.next_power_of_2(D))
    qk_scale = scale * _LOG2E
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32
    if max_query_len == 1 and num_seqs > 0 and not force_prefill:
        block_n, warps, stages = decode_config or _decode_config(D, q.element_size())
        splits = num_splits or _num_splits(num_seqs, Hkv, max_seq_len, q.device)
        part_m = part_l = part_acc = counts = out  # unused unless splits > 1
        if splits > 1:
            part_m = torch.empty((num_seqs, Hq, splits), dtype=torch.float32, device=q.device)
            part_l = torch.empty_like(part_m)
            part_acc = torch.empty((num_seqs, Hq, splits, D), dtype=torch.float32, device=q.device)
            counts = _split_counters(q.device, num_seqs * Hkv)
        _decode_kernel[(Hkv, num_seqs, splits)](
            q, k, v, kc, vc, out, slot_mapping, block_tables, seq_lens, query_start_loc,
            part_m, part_l, part_acc, counts, qk_scale, window, T,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1),
            block_tables.stride(0),
            G=G, HEAD_D=D, BLOCK_D=BLOCK_D, PAGE=BS, BLOCK_G=max(16, triton.next_power_of_2(G)),
            BLOCK_N=block_n, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
            HKV=Hkv, BLOCK_HKV=triton.next_power_of_2(Hkv), BLOCK_HQ=triton.next_power_of_2(Hq),
            DOT_PREC=dot_prec, num_warps=warps, num_stages=stages,
        )
        return out

    _cache_write_kernel[(T,)](
        k, v, kc, vc, slot_mapping, query_start_loc, out, num_seqs,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
        out.stride(0), out.stride(1),
        HKV=Hkv, HQ=Hq, HEAD_D=D, PAGE=BS, BLOCK_HKV=triton.next_power_of_2(Hkv),
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_D=BLOCK_D, num_warps=4,
    )
    if num_seqs == 0 or max_query_len == 0:
        return out
    block_m, block_n, warps, stages = prefill_config or _prefill_config(
        D, G, max_query_len, q.element_size())
    block_q = block_m // G
    num_q_blocks = T // block_q + num_seqs  # >= sum over s of ceil(n_s / BLOCK_Q)
    _prefill_kernel[(Hkv, num_q_blocks)](
        q, k, v, kc, vc, out, block_tables, seq_lens, query_start_loc,
        qk_scale, window, num_seqs, num_q_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        G=G, HEAD_D=D, BLOCK_D=BLOCK_D, PAGE=BS, BLOCK_Q=block_q, BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PREC=dot_prec, num_warps=warps, num_stages=stages,
    )
    return out


def paged_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor, scale: float, window: int,
    num_seqs: int, max_query_len: int, max_seq_len: int,
) -> torch.Tensor:
    return _paged_attention_impl(
        q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, seq_lens,
        query_start_loc, scale, window, num_seqs, max_query_len, max_seq_len)


def _paged_attention_fake(q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables,
                          seq_lens, query_start_loc, scale, window, num_seqs, max_query_len,
                          max_seq_len):
    return q.new_empty(q.shape[:2] + (v.shape[-1],))


paged_attention = register_op(
    "paged_attention",
    launcher=paged_attention_triton,
    reference=paged_attention_ref,
    fake=_paged_attention_fake,
    mutates_args=("k_cache", "v_cache"),
)
