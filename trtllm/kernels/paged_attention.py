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
- `_decode_kernel` (kernels/paged_attention_decode.py; max_query_len == 1), grid
  (Hkv, num_seqs, splits), the whole step in
  one launch: the G query heads are the (padded to 16) rows of one tile; K/V pages stream
  through; the new key is taken from k/v (and written to the cache) by the split owning
  it; with splits > 1 (flash-decoding) each split writes (max, sum, acc) partials and the
  last one to finish (an atomic ticket per sequence and kv head) merges them.

Both attention kernels take the new tokens' own keys/values from k/v rather than from the
cache they were just written to: identical values as long as slot_mapping agrees with
block_tables (the runtime's invariant; the reference reads the cache). Page size: any
16..128 works; 16 (vLLM's default) is what the bench and the H100 defaults assume.
"""
import torch
import triton
import triton.language as tl

from trtllm.kernels.attention_tiles import LOG2E as _LOG2E, attend as _attend, \
    load_tile as _load_tile, write_token as _write_token
from trtllm.kernels.paged_attention_decode import launch_decode
from trtllm.kernels.registry import register_op

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, True, DOT_PREC, False)

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
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, kk, False, DOT_PREC, False)
    for k0 in range(tl.maximum(full_end, (kk_lo // BLOCK_N) * BLOCK_N), i_hi + 1, BLOCK_N):
        kk = k0 + offs_n
        kk_ok = (kk >= kk_lo) & (kk <= i_hi)
        k = _load_tile(k_base + kk[:, None] * stride_kt, kk_ok, d_ok, True, EVEN_D)
        v = _load_tile(v_base + kk[:, None] * stride_vt, kk_ok, d_ok, True, EVEN_D)
        mask = kk_ok[None, :] & (kk[None, :] <= i[:, None]) \
            & ((window <= 0) | (kk[None, :] > i[:, None] - window))
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, mask, True, DOT_PREC, False)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # l == 0: no key at all -> 0
    tl.store(o_ptr + q_rows[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
             out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ------------------------------------------------------------------ launcher


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


def _paged_attention_impl(
    q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, seq_lens, query_start_loc,
    scale, window, num_seqs, max_query_len, max_seq_len,
    *, num_splits=None, prefill_config=None, decode_config=None, force_prefill=False, trace=None,
    decode_cluster=None,
):
    """The launcher; the keywords force a path/config (tests) or trace the decode kernel's
    phases (bench/probes/decode_timeline.py)."""
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
    assert scale > 0, f"softmax scale must be > 0 (the kernels take row maxima before scaling), got {scale}"
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
        launch_decode(q, k, v, kc, vc, out, slot_mapping, block_tables, seq_lens, query_start_loc,
                      qk_scale, window, num_seqs, max_seq_len, dot_prec, num_splits=num_splits,
                      config=decode_config, trace=trace, cluster=decode_cluster)
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