"""The decode path of paged attention (max_query_len == 1): one launch per layer.

`_decode_kernel`, grid (Hkv, num_seqs, splits): the G query heads of one kv head are the
(padded to 16) rows of one tile; K/V pages stream through; the new key is taken from k/v
(and written to the cache) by the split owning it. With splits > 1 (flash-decoding) the
splits' (max, sum, acc) partials are merged in the same launch (decode_merge.py):
- in a thread-block cluster (2 splits on sm_90+ by default, batch ~8 on an H100): grid
  (splits, Hkv, num_seqs); the other split writes its partials into the merging
  program's shared memory and arrives at the cluster barrier (cluster.py);
- otherwise each split writes its partials to global memory and takes an atomic ticket
  per (sequence, kv head); the last to finish merges.
A quantized cache (KV_QUANT "fp8" / "int8", kv_quant.py): cached tiles are read as stored
and cast to q's dtype, the new key and value quantized in registers (what is written to
the cache is what is attended), K's scale folded into the softmax scale, V's applied to
the program's accumulator before the store or merge (every split of a (sequence, kv head)
has the same one).
Semantics and shapes: op.py; how many splits, which merge, which tiles: launch_shape.py.
"""

import torch
import triton
import triton.language as tl

from trtllm.kernels.paged_attention.cluster import cluster_arrive, cluster_launchable, launch_cluster
from trtllm.kernels.paged_attention.decode_merge import cluster_merge, store_out, ticket_merge
from trtllm.kernels.paged_attention.kv_quant import quant_dot_type, quantize_kv
from trtllm.kernels.paged_attention.launch_shape import DecodeLaunch
from trtllm.kernels.paged_attention.tiles import (
    _LOG2E,
    alibi_log2 as _alibi_log2,
    attend as _attend,
    load_rope as _load_rope,
    load_tile as _load_tile,
    softcap_log2 as _softcap_log2,
    write_token as _write_token,
)
from trtllm.kernels.paged_attention.trace import TRACE_SLOTS, stamp, trace_row

# Cache offsets (elements of one layer's cache) are int32 up to here, int64 past it: 64-bit
# offsets would add 78 SASS instructions to the K/V loop's 483 per tile at b8 x 2048
# (tools/dump_sass.py, its decode_args with OFF64=True).
_MAX_INT32_OFFSET = 2**31 - 1


@triton.jit
def context_range(L, window, split, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """(lo, j_start, j_end): the one query sits at p = L - 1 and sees keys [lo, L); this
    split's share is [j_start, j_end). Splits take equal runs of tiles of the true length
    (the host only knew an upper bound); trailing splits may be empty."""
    lo = tl.where(window > 0, tl.maximum(L - window, 0), 0)
    first = lo // BLOCK_N
    per = tl.cdiv(tl.cdiv(L, BLOCK_N) - first, NUM_SPLITS)
    j_start = (first + split * per) * BLOCK_N
    return lo, j_start, tl.minimum(j_start + per * BLOCK_N, L)


@triton.jit
def _write_uncovered_tokens(s, num_seqs, num_tokens, qsl_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
                            slot_ptr, o_ptr,
                            stride_kt, stride_kh, stride_vt, stride_vh, STRIDE_CB: tl.constexpr,
                            STRIDE_CS: tl.constexpr, STRIDE_CH: tl.constexpr, stride_ot, stride_oh,
                            G: tl.constexpr, HKV: tl.constexpr, HEAD_D: tl.constexpr, PAGE: tl.constexpr,
                            BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_D: tl.constexpr,
                            KV_QUANT: tl.constexpr, cos_ptr, sin_ptr, stride_cos, stride_sin, ROPE: tl.constexpr,
                            ROPE_INTERLEAVED: tl.constexpr):
    """Tokens no sequence covers (padding of a captured batch), shared out over the
    sequences s: their k/v (k rotated with ROPE) to their slots (if any), their output rows
    zeroed."""
    q_first = tl.load(qsl_ptr)
    total = tl.load(qsl_ptr + num_seqs)
    for u in range(s, q_first + num_tokens - total, num_seqs):
        tok = tl.where(u < q_first, u, total + u - q_first)
        _write_token(tok, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, slot_ptr, o_ptr, True,
                     stride_kt, stride_kh, stride_vt, stride_vh, STRIDE_CB, STRIDE_CS,
                     STRIDE_CH, stride_ot, stride_oh, HKV, G * HKV, HEAD_D, PAGE,
                     BLOCK_HKV, BLOCK_HQ, BLOCK_D, KV_QUANT, cos_ptr, sin_ptr, stride_cos, stride_sin, ROPE,
                     ROPE_INTERLEAVED)


@triton.jit
def _attend_new_key(m_i, l_i, acc, q, k_new, v_new, slot, L, kvh, kc_ptr, vc_ptr, offs_d, d_ok, qk_scale,
                    STRIDE_CB: tl.constexpr, STRIDE_CS: tl.constexpr, STRIDE_CH: tl.constexpr,
                    PAGE: tl.constexpr, SOFTCAP: tl.constexpr):
    """The new key (position L - 1, loaded from k/v before the loop) written to its cache
    slot (if any) and attended: one more online-softmax step, of one key. With a quantized
    cache k_new / v_new come quantized (cache values, in the caller's scale units)."""
    if slot >= 0:
        dst = (slot // PAGE) * STRIDE_CB + (slot % PAGE) * STRIDE_CS + kvh * STRIDE_CH + offs_d
        tl.store(kc_ptr + dst, k_new.to(kc_ptr.dtype.element_ty), mask=d_ok)
        tl.store(vc_ptr + dst, v_new.to(vc_ptr.dtype.element_ty), mask=d_ok)
    if L > 0:
        if SOFTCAP > 0:
            qk = _softcap_log2(tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1), qk_scale, SOFTCAP)
        else:
            qk = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
        m_new = tl.maximum(m_i, qk)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
    return m_i, l_i, acc

@triton.jit(do_not_specialize=["window", "num_tokens"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr, o_ptr, slot_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    pm_ptr, pl_ptr, pacc_ptr, count_ptr, trace_ptr, alibi_ptr, cos_ptr, sin_ptr,
    qk_scale, window, num_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_bt, stride_cos, stride_sin,
    STRIDE_CB: tl.constexpr, STRIDE_CS: tl.constexpr, STRIDE_CH: tl.constexpr,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, HKV: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr,
    DOT_PREC: tl.constexpr, TRACE: tl.constexpr, CLUSTER: tl.constexpr, OFF64: tl.constexpr,
    SOFTCAP: tl.constexpr, KV_QUANT: tl.constexpr, ALIBI: tl.constexpr,
    ROPE: tl.constexpr, ROPE_INTERLEAVED: tl.constexpr,
):
    """One launch for the whole decode step (launches are a large share of a 20-30 us
    step), in parts: the tokens no sequence covers (`_write_uncovered_tokens`), the K/V
    loop over this split's cached keys, the new key (`_attend_new_key`), then the store or
    the split merge (decode_merge.py). TRACE (GPU only, bench/probes/decode_timeline.py) stamps
    each program's phases into trace_ptr. SOFTCAP (0.0 = none, which compiles to the plain
    kernel): the scores soft-capped (tiles.softcap_log2). KV_QUANT ("" = none, "fp8",
    "int8"): the caches hold quantized values, scales per kv head at ks_ptr / vs_ptr.
    ALIBI (False compiles to the plain kernel): ALiBi's slope per query head at alibi_ptr
    (tiles.alibi_log2), against the query's position L - 1; the new key's bias is 0, so
    `_attend_new_key` and the split merges are unchanged. ROPE (False compiles to the plain
    kernel): q and the new keys arrive unrotated and are rotated as they load (tiles.load_rope,
    each token's cos/sin rows at cos_ptr / sin_ptr), the launches of the two rotary ops saved."""
    if CLUSTER:  # grid (splits, Hkv, seqs): a cluster is the splits of one (seq, kv head)
        rank = tl.program_id(0)
        split = NUM_SPLITS - 1 - rank
        # Shared memory of another program of the cluster may be written only once it runs:
        # this phase of the cluster barrier, waited on after the K/V loop, says so.
        cluster_arrive(False)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        num_seqs = tl.num_programs(2)
    else:
        kvh = tl.program_id(0)  # fastest: the Hkv programs of a sequence read adjacent rows
        s = tl.program_id(1)
        split = tl.program_id(2)
        num_seqs = tl.num_programs(1)
    stamps = trace_row(trace_ptr, split, num_seqs, s, kvh, HKV)
    if TRACE:
        stamp(stamps, 0, 0)
    if (kvh == 0) & (split == 0):
        _write_uncovered_tokens(s, num_seqs, num_tokens, qsl_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, ks_ptr, vs_ptr,
                                slot_ptr, o_ptr, stride_kt, stride_kh, stride_vt, stride_vh, STRIDE_CB, STRIDE_CS,
                                STRIDE_CH, stride_ot, stride_oh, G, HKV, HEAD_D, PAGE, BLOCK_HKV, BLOCK_HQ, BLOCK_D,
                                KV_QUANT, cos_ptr, sin_ptr, stride_cos, stride_sin, ROPE, ROPE_INTERLEAVED)
    # The step's metadata (bounds, length, block table) is read by every layer's launch:
    # kept in L2 (evict_last) past the K/V streaming that would evict it between layers:
    # its loads take 0.26 us at b8 x 2048 on the H100 (bench/probes/decode_timeline.py's
    # metadata phase; the A/B against plain loads in docs/decisions/decode_attention.md).
    t = tl.load(qsl_ptr + s, eviction_policy="evict_last")
    t_next = tl.load(qsl_ptr + s + 1, eviction_policy="evict_last")
    L = tl.load(seq_lens_ptr + s, eviction_policy="evict_last")  # issued with the row's bounds
    if t_next <= t:  # unused row of a captured batch
        return
    if TRACE:
        stamp(stamps, 1, L)

    EVEN_D: tl.constexpr = BLOCK_D == HEAD_D
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    head = kvh * G + offs_g
    g_ok = (offs_g < G)[:, None] & d_ok[None, :]
    if ROPE:
        cos_row = cos_ptr + t.to(tl.int64) * stride_cos
        sin_row = sin_ptr + t.to(tl.int64) * stride_sin
        q = _load_rope(q_ptr + t.to(tl.int64) * stride_qt + head[:, None] * stride_qh, offs_d[None, :], g_ok,
                       cos_row, sin_row, d_ok[None, :], HEAD_D, ROPE_INTERLEAVED).to(q_ptr.dtype.element_ty)
    else:
        q = tl.load(q_ptr + t.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=g_ok, other=0.0)
    if KV_QUANT != "":
        q = q.to(quant_dot_type(q.dtype))  # the dots' operands: see quant_dot_type
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    # Split grids keep column sums through the loop, reduced once after it (0.29 us per
    # layer less at b8 x 2048 on the H100); a full grid does not: the [G, BLOCK_N] registers
    # would cost it programs per SM (17.7 us per layer more at b64 x 2048). Measured by turns
    # with bench/probes/decode_timeline.py; docs/decisions/decode_attention.md.
    SUM_LATE: tl.constexpr = NUM_SPLITS > 1
    if SUM_LATE:
        l_i = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    else:
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)

    lo, j_start, j_end = context_range(L, window, split, BLOCK_N, NUM_SPLITS)
    # Keys [lo, L - 1) come from the cache; the new key L - 1 from k/v, by the one split
    # that owns it, which also writes it to the cache (no other program reads that slot).
    owns_new = ((j_start < L) & (L <= j_end)) | ((L <= 0) & (split == 0))
    # The new key's loads go out before the loop; they are used after it.
    new_ok = d_ok & owns_new
    if ROPE:
        k_new = _load_rope(k_ptr + t.to(tl.int64) * stride_kt + kvh * stride_kh, offs_d, new_ok, cos_row, sin_row,
                           d_ok, HEAD_D, ROPE_INTERLEAVED).to(k_ptr.dtype.element_ty)
    else:
        k_new = tl.load(k_ptr + t.to(tl.int64) * stride_kt + kvh * stride_kh + offs_d, mask=new_ok)
    v_new = tl.load(v_ptr + t.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d, mask=new_ok)
    slot = tl.load(slot_ptr + t, mask=owns_new, other=-1).to(tl.int64)
    if KV_QUANT != "":  # K's scale folded into the softmax scale; V's applied after the loop
        k_scale = tl.load(ks_ptr + kvh)
        v_scale = tl.load(vs_ptr + kvh)
        qk_scale = qk_scale * k_scale
    if ALIBI:  # each row's head slope, in log2 units; padding rows (>= G) read head G - 1's
        slope = tl.load(alibi_ptr + kvh * G + tl.minimum(offs_g, G - 1)) * _LOG2E
        query_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + (L - 1)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    kv_hi = tl.minimum(j_end, L - 1)  # this split's cached keys: [j_start, kv_hi)
    for j0 in range(j_start, kv_hi, BLOCK_N):
        j = j0 + offs_n
        j_ok = (j >= lo) & (j < kv_hi)
        # Rows past kv_hi re-read its last row (written, so finite) and are masked in the
        # scores: the loads need no predicates. That, the cache strides as constexprs, and
        # unsigned // and % (a shift and a mask) on int32 offsets keep the loop at 483 SASS
        # instructions per tile at b8 x 2048, 2 warps (tools/dump_sass.py; what each saved:
        # docs/decisions/decode_attention.md).
        jc = tl.minimum(j, kv_hi - 1).to(tl.uint32)
        page = tl.load(bt_row + jc // PAGE, eviction_policy="evict_last")
        if OFF64:
            page = page.to(tl.int64)
        off = page[:, None] * STRIDE_CB + (jc % PAGE).to(tl.int32)[:, None] * STRIDE_CS \
            + kvh * STRIDE_CH + offs_d[None, :]
        k = _load_tile(kc_ptr + off, j_ok, d_ok, False, EVEN_D)
        v = _load_tile(vc_ptr + off, j_ok, d_ok, False, EVEN_D)
        if ALIBI:
            bias = _alibi_log2(slope, j, query_pos)
        else:
            bias = 0.0
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, j_ok[None, :], True, DOT_PREC,
                                SUM_LATE, SOFTCAP, bias, ALIBI)
    if SUM_LATE:
        l_i = tl.sum(l_i, 1)
    if TRACE:
        stamp(stamps, 2, (tl.sum(l_i, 0) >= 0).to(tl.int32))
    if KV_QUANT != "":  # the new key and value as the cache stores them (a [BLOCK_D] row each)
        k_new = quantize_kv(k_new, k_scale, KV_QUANT, kc_ptr.dtype.element_ty)
        v_new = quantize_kv(v_new, v_scale, KV_QUANT, vc_ptr.dtype.element_ty)
    if owns_new:
        m_i, l_i, acc = _attend_new_key(m_i, l_i, acc, q, k_new, v_new, slot, L, kvh, kc_ptr, vc_ptr, offs_d, d_ok,
                                        qk_scale, STRIDE_CB, STRIDE_CS, STRIDE_CH, PAGE, SOFTCAP)

    if KV_QUANT != "":
        acc = acc * v_scale
    o_ptrs = o_ptr + t.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SPLITS == 1:
        store_out(o_ptrs, acc, l_i, g_ok)
    elif CLUSTER:
        cluster_merge(m_i, l_i, acc, rank, o_ptrs, g_ok, offs_g, offs_d, stamps, G, BLOCK_G, BLOCK_D, NUM_SPLITS,
                      TRACE)
    else:
        ticket_merge(m_i, l_i, acc, s, kvh, split, head, o_ptrs, g_ok, d_ok, offs_g, offs_d, pm_ptr, pl_ptr,
                     pacc_ptr, count_ptr, stamps, G, HKV, HEAD_D, BLOCK_G, BLOCK_D, BLOCK_S, NUM_SPLITS, TRACE)
    if TRACE:
        stamp(stamps, 4, 0)


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


def launch_decode(q, k, v, kc, vc, out, slot_mapping, block_tables, seq_lens, query_start_loc,
                  qk_scale, window, softcap, num_seqs, dot_prec, launch: DecodeLaunch, *, trace=None,
                  kv_quant="", ks=None, vs=None, alibi_slopes=None, rope=None):
    """One decode step of one layer (one new token per sequence) into `out`; kc/vc are one
    layer's caches [NB, BS, Hkv, D]. softcap (0.0 = none) is a constexpr: one compiled
    kernel per value (one per model in practice). trace: an int64 CUDA tensor of programs x TRACE_SLOTS
    to stamp (bench/probes/decode_timeline.py). kv_quant "fp8" / "int8": the caches are
    quantized with the layer's scales ks / vs [Hkv] fp32 (kv_quant.py). alibi_slopes: [Hq]
    fp32, ALiBi's slope per query head (None = none, the ALIBI constexpr off). rope: (cos, sin,
    interleaved), the [T, D] rows q and k are rotated with in the kernel (None = none)."""
    T, Hq, D = q.shape
    Hkv, BS = kc.shape[2], kc.shape[1]
    G = Hq // Hkv
    BLOCK_D = max(16, triton.next_power_of_2(D))
    splits, cluster = launch.splits, launch.cluster
    block_n, warps, stages = launch.block_n, launch.num_warps, launch.num_stages
    if splits < 1:
        raise ValueError(f"the decode kernel needs splits >= 1: {launch}")
    if cluster and not (cluster_launchable(q.device) and 2 <= splits <= 8):
        raise ValueError(f"the cluster merge needs 2 to 8 splits (got {splits}) on an sm_90+ GPU "
                         f"(got {q.device})")
    if trace is not None:
        assert trace.dtype == torch.int64 and trace.is_cuda
        assert trace.numel() >= Hkv * num_seqs * splits * TRACE_SLOTS
    BLOCK_G = max(16, triton.next_power_of_2(G))
    cos, sin, interleaved = rope if rope is not None else (out, out, False)  # out: an unread stand-in
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, kc_ptr=kc, vc_ptr=vc, o_ptr=out, slot_ptr=slot_mapping,
        ks_ptr=out if ks is None else ks, vs_ptr=out if vs is None else vs,  # read only with kv_quant
        bt_ptr=block_tables, seq_lens_ptr=seq_lens, qsl_ptr=query_start_loc,
        pm_ptr=out, pl_ptr=out, pacc_ptr=out, count_ptr=out,  # the ticket merge's, set below
        trace_ptr=out if trace is None else trace,
        alibi_ptr=out if alibi_slopes is None else alibi_slopes,  # read only with ALIBI
        cos_ptr=cos, sin_ptr=sin,
        qk_scale=qk_scale, window=window, num_tokens=T,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0),
        stride_oh=out.stride(1), stride_bt=block_tables.stride(0), stride_cos=cos.stride(0), stride_sin=sin.stride(0),
        STRIDE_CB=kc.stride(0), STRIDE_CS=kc.stride(1), STRIDE_CH=kc.stride(2),
        G=G, HEAD_D=D, BLOCK_D=BLOCK_D, PAGE=BS, BLOCK_G=BLOCK_G,
        BLOCK_N=block_n, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
        HKV=Hkv, BLOCK_HKV=triton.next_power_of_2(Hkv), BLOCK_HQ=triton.next_power_of_2(Hq),
        DOT_PREC=dot_prec, TRACE=trace is not None,
        OFF64=kc.numel() > _MAX_INT32_OFFSET,  # v_cache has k_cache's shape
        SOFTCAP=softcap, KV_QUANT=kv_quant, ALIBI=alibi_slopes is not None,
        ROPE=rope is not None, ROPE_INTERLEAVED=interleaved,
    )
    if cluster:
        launch_cluster(_decode_kernel, (splits, Hkv, num_seqs), splits,
                       (splits - 1) * (2 + BLOCK_D) * BLOCK_G * 4, dict(args, CLUSTER=True),
                       num_warps=warps, num_stages=stages)
        return
    if splits > 1:  # the ticket merge's partials [S, Hq, splits] (+ [D] for acc)
        part_m = torch.empty((num_seqs, Hq, splits), dtype=torch.float32, device=q.device)
        args.update(pm_ptr=part_m, pl_ptr=torch.empty_like(part_m),
                    pacc_ptr=torch.empty((num_seqs, Hq, splits, D), dtype=torch.float32, device=q.device),
                    count_ptr=_split_counters(q.device, num_seqs * Hkv))
    _decode_kernel[(Hkv, num_seqs, splits)](**args, CLUSTER=False, num_warps=warps, num_stages=stages)
