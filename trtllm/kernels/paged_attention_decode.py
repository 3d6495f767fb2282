"""The decode path of paged attention (max_query_len == 1): one launch per layer.

`_decode_kernel`, grid (Hkv, num_seqs, splits): the G query heads of one kv head are the
(padded to 16) rows of one tile; K/V pages stream through; the new key is taken from k/v
(and written to the cache) by the split owning it. With splits > 1 (flash-decoding) the
splits' (max, sum, acc) partials are merged in the same launch:
- 2 splits on sm_90+ (batch ~8 on an H100): the two programs are one thread-block cluster,
  grid (splits, Hkv, num_seqs); the other split writes its partials into the merging
  program's shared memory and arrives at the cluster barrier (kernels/cluster.py);
- otherwise each split writes its partials to global memory and takes an atomic ticket
  per (sequence, kv head); the last to finish merges.
Semantics and shapes: kernels/paged_attention.py.
"""

import torch
import triton
import triton.language as tl

from trtllm.kernels.attention_tiles import attend as _attend, load_tile as _load_tile, \
    write_token as _write_token
from trtllm.kernels.cluster import cluster_arrive, cluster_launchable, cluster_wait, launch_cluster, \
    scratch_addr, shared_load, store_to_rank0
from trtllm.kernels.decode_shape import decode_config, merges_in_cluster, num_splits as default_splits

# Cache offsets (elements of one layer's cache) are int32 up to here, int64 past it: the
# 64-bit math cost the K/V loop 45 of its 296 SASS instructions per tile at b8 x 2048.
_MAX_INT32_OFFSET = 2**31 - 1

TRACE_SLOTS = 16  # per program: (globaltimer ns, clock64) at stamps 0..4, then %smid
_TRACE_SLOTS = tl.constexpr(TRACE_SLOTS)


@triton.jit
def _stamp(row_ptr, k: tl.constexpr, after):
    """Stamp k of a traced program: globaltimer and clock64, taken once the scalar `after`
    (>= 0) is known -- the branch on it makes the warp wait for the load behind it."""
    if after >= 0:
        now = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64,
                                        is_pure=False, pack=1)
        clk = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=tl.int64,
                                        is_pure=False, pack=1)
        tl.store(row_ptr + 2 * k, now)
        tl.store(row_ptr + 2 * k + 1, clk)
        if k == 0:
            sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32,
                                           is_pure=True, pack=1)
            tl.store(row_ptr + _TRACE_SLOTS - 1, sm.to(tl.int64))


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
def _merge(m_i, l_i, acc, m_sp, l_sp, a_sp):
    """Two splits' (max, sum, acc) softmax states of the same rows as one."""
    m_new = tl.maximum(m_i, m_sp)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # both still empty
    alpha, beta = tl.math.exp2(m_i - m_use), tl.math.exp2(m_sp - m_use)
    return m_new, l_i * alpha + l_sp * beta, acc * alpha[:, None] + a_sp * beta[:, None]


@triton.jit
def _fold_partial(m_i, l_i, acc, pm_ptr, pl_ptr, pacc_ptr, r, r_ok, d_ok, offs_d, HEAD_D: tl.constexpr):
    """(m_i, l_i, acc) merged with the stored partial at rows r (where r_ok)."""
    m_sp = tl.load(pm_ptr + r, mask=r_ok, other=float("-inf"), cache_modifier=".cg")
    l_sp = tl.load(pl_ptr + r, mask=r_ok, other=0.0, cache_modifier=".cg")
    a_sp = tl.load(pacc_ptr + r.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :],
                   mask=r_ok[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
    return _merge(m_i, l_i, acc, m_sp, l_sp, a_sp)


@triton.jit
def _scratch_slot(slot, offs_g, offs_d, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SCRATCH: tl.constexpr):
    """Shared-memory addresses (max [BLOCK_G], sum [BLOCK_G], acc [BLOCK_G, BLOCK_D]; fp32)
    of one split's partials in the merging program's cluster scratch."""
    base = slot * (2 + BLOCK_D) * BLOCK_G * 4
    return (scratch_addr(base + offs_g * 4, SCRATCH), scratch_addr(base + (BLOCK_G + offs_g) * 4, SCRATCH),
            scratch_addr(base + (2 * BLOCK_G + offs_g[:, None] * BLOCK_D + offs_d[None, :]) * 4, SCRATCH))


@triton.jit
def _store_out(o_ptrs, acc, l_i, g_ok):
    tl.store(o_ptrs, (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(o_ptrs.dtype.element_ty), mask=g_ok)


@triton.jit(do_not_specialize=["window", "num_tokens"])
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, o_ptr, slot_ptr, bt_ptr, seq_lens_ptr, qsl_ptr,
    pm_ptr, pl_ptr, pacc_ptr, count_ptr, trace_ptr,
    qk_scale, window, num_tokens,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_bt,
    STRIDE_CB: tl.constexpr, STRIDE_CS: tl.constexpr, STRIDE_CH: tl.constexpr,
    G: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr, HKV: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HQ: tl.constexpr,
    DOT_PREC: tl.constexpr, TRACE: tl.constexpr, CLUSTER: tl.constexpr, OFF64: tl.constexpr,
):
    """One launch for the whole decode step (launches are a large share of a 20-30 us
    step): the cache write, the zero rows, attention and the split merge. TRACE (GPU
    only, bench/probes/decode_timeline.py) stamps each program's phases into trace_ptr."""
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
    trace_row = trace_ptr + ((split * num_seqs + s) * HKV + kvh) * _TRACE_SLOTS
    if TRACE:
        _stamp(trace_row, 0, 0)
    if (kvh == 0) & (split == 0):
        # Tokens no sequence covers (padding of a captured batch), shared out over s.
        q_first = tl.load(qsl_ptr)
        total = tl.load(qsl_ptr + num_seqs)
        for u in range(s, q_first + num_tokens - total, num_seqs):
            tok = tl.where(u < q_first, u, total + u - q_first)
            _write_token(tok, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, o_ptr, True,
                         stride_kt, stride_kh, stride_vt, stride_vh, STRIDE_CB, STRIDE_CS,
                         STRIDE_CH, stride_ot, stride_oh, HKV, G * HKV, HEAD_D, PAGE,
                         BLOCK_HKV, BLOCK_HQ, BLOCK_D)
    # The step's metadata (bounds, length, block table) is read by every layer's launch:
    # kept in L2 (evict_last) past the K/V streaming that would evict it between layers.
    # b8 x 2048 on the H100, by turns: 29.95-30.03 -> 29.58-29.64 us per layer.
    t = tl.load(qsl_ptr + s, eviction_policy="evict_last")
    t_next = tl.load(qsl_ptr + s + 1, eviction_policy="evict_last")
    L = tl.load(seq_lens_ptr + s, eviction_policy="evict_last")  # issued with the row's bounds
    if t_next <= t:  # unused row of a captured batch
        return
    if TRACE:
        _stamp(trace_row, 1, L)

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
    # Split grids keep column sums through the loop, reduced once after it (b8 x 2048
    # 30.46 -> 30.17 us per layer); a full grid does not: the [G, BLOCK_N] registers
    # cost it programs per SM (b64 x 2048 182.9 -> 200.6 us). bench/probes/decode_timeline.py.
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
    k_new = tl.load(k_ptr + t.to(tl.int64) * stride_kt + kvh * stride_kh + offs_d, mask=new_ok)
    v_new = tl.load(v_ptr + t.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d, mask=new_ok)
    slot = tl.load(slot_ptr + t, mask=owns_new, other=-1).to(tl.int64)
    bt_row = bt_ptr + s.to(tl.int64) * stride_bt
    kv_hi = tl.minimum(j_end, L - 1)  # this split's cached keys: [j_start, kv_hi)
    for j0 in range(j_start, kv_hi, BLOCK_N):
        j = j0 + offs_n
        j_ok = (j >= lo) & (j < kv_hi)
        # Rows past kv_hi re-read its last row (written, so finite) and are masked in the
        # scores: the loads need no predicates. With the cache strides as constexprs this
        # took the loop from 323 to ~290 SASS instructions per tile (b8 x 2048 on the H100);
        # unsigned // and % (a shift and a mask) and int32 offsets, 296 -> 249: 28.3 -> 28.2 us.
        jc = tl.minimum(j, kv_hi - 1).to(tl.uint32)
        page = tl.load(bt_row + jc // PAGE, eviction_policy="evict_last")
        if OFF64:
            page = page.to(tl.int64)
        off = page[:, None] * STRIDE_CB + (jc % PAGE).to(tl.int32)[:, None] * STRIDE_CS \
            + kvh * STRIDE_CH + offs_d[None, :]
        k = _load_tile(kc_ptr + off, j_ok, d_ok, False, EVEN_D)
        v = _load_tile(vc_ptr + off, j_ok, d_ok, False, EVEN_D)
        acc, m_i, l_i = _attend(acc, m_i, l_i, q, k, v, qk_scale, j_ok[None, :], True, DOT_PREC,
                                SUM_LATE)
    if SUM_LATE:
        l_i = tl.sum(l_i, 1)
    if TRACE:
        _stamp(trace_row, 2, (tl.sum(l_i, 0) >= 0).to(tl.int32))
    if owns_new:
        if slot >= 0:
            dst = (slot // PAGE) * STRIDE_CB + (slot % PAGE) * STRIDE_CS + kvh * STRIDE_CH + offs_d
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
        _store_out(o_ptrs, acc, l_i, g_ok)
    elif CLUSTER:
        # The splits of one (sequence, kv head) are one thread-block cluster. Cluster rank 0
        # (the last split: the one with the new key past (splits - 1) * BLOCK_N keys, so its
        # cache write needs no ordering) merges. The others store their partials into its shared memory (slot rank - 1),
        # arrive with release and exit; rank 0 arrives relaxed, waits, and folds them in
        # from its own shared memory. No global round trip, no ticket: b8 x 2048 on the H100,
        # by turns, 29.6 -> 28.3 us per layer. Rank 0 reading the others' shared memory
        # over the cluster instead (a second barrier keeping it alive): 28.7; with release
        # arrivals on both programs as well (waiting out their global stores): 29.5.
        SCRATCH: tl.constexpr = (NUM_SPLITS - 1) * (2 + BLOCK_D) * BLOCK_G * 4
        cluster_wait()  # the start's phase: every program of the cluster is running
        if rank == 0:
            cluster_arrive(False)
            cluster_wait()
            if TRACE:
                _stamp(trace_row, 3, 0)
            for sp in tl.static_range(NUM_SPLITS - 1):
                # Padding rows (>= G) were never written: they merge garbage, never stored.
                m_at, l_at, acc_at = _scratch_slot(sp, offs_g, offs_d, BLOCK_G, BLOCK_D, SCRATCH)
                m_i, l_i, acc = _merge(m_i, l_i, acc, shared_load(m_at), shared_load(l_at), shared_load(acc_at))
            _store_out(o_ptrs, acc, l_i, g_ok)
        else:
            m_at, l_at, acc_at = _scratch_slot(rank - 1, offs_g, offs_d, BLOCK_G, BLOCK_D, SCRATCH)
            store_to_rank0(m_at, m_i, offs_g < G)
            store_to_rank0(l_at, l_i, offs_g < G)
            store_to_rank0(acc_at, acc, g_ok)
            cluster_arrive(True)
            if TRACE:
                _stamp(trace_row, 3, 0)
    else:
        # Every split stores its partials [S, Hq, NUM_SPLITS] (+ [HEAD_D] for acc;
        # unnormalized) and takes a ticket (acq_rel); the last for its (sequence, kv head)
        # merges them: no second launch. Up to 8 splits it folds the others' into its own,
        # still in registers, all loads at once (b8 x 2048: 31.0 -> 30.5 us per layer).
        # Merging without the release fence (a relaxed ticket, the others publishing
        # after it, the merger polling a done count) was slower on the H100: the poll
        # waits out the others' fences, 2.8 -> 3.6 us after the loop (decode_timeline).
        row = (s * G * HKV + head) * NUM_SPLITS + split
        tl.store(pm_ptr + row, m_i, mask=offs_g < G)
        tl.store(pl_ptr + row, l_i, mask=offs_g < G)
        tl.store(pacc_ptr + row.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :], acc, mask=g_ok)
        tl.debug_barrier()  # every thread's partials are issued before the release below
        ticket = tl.atomic_add(count_ptr + s * HKV + kvh, 1, sem="acq_rel")
        if TRACE:
            _stamp(trace_row, 3, ticket)
        if ticket == NUM_SPLITS - 1:
            tl.debug_barrier()  # every thread reads the partials after the acquire
            base = (s * G * HKV + head) * NUM_SPLITS
            if NUM_SPLITS <= 8:  # unrolled: every split's loads go out at once
                for sp in tl.static_range(NUM_SPLITS):
                    m_i, l_i, acc = _fold_partial(m_i, l_i, acc, pm_ptr, pl_ptr, pacc_ptr, base + sp,
                                                  (offs_g < G) & (sp != split), d_ok, offs_d, HEAD_D)
            else:
                # Many splits: a folding loop waits on each split's loads in turn (b1 x 2048,
                # 16 splits: 10.5 -> 14.3 us). Every split's max and sum first, then a loop
                # whose loads do not wait on the one before.
                offs_s = tl.arange(0, BLOCK_S)
                rows = base[None, :] + offs_s[:, None]
                sg_ok = (offs_s < NUM_SPLITS)[:, None] & (offs_g < G)[None, :]
                m_all = tl.load(pm_ptr + rows, mask=sg_ok, other=float("-inf"), cache_modifier=".cg")
                l_all = tl.load(pl_ptr + rows, mask=sg_ok, other=0.0, cache_modifier=".cg")
                m_max = tl.max(m_all, 0)
                m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # all splits empty
                l_i = tl.sum(tl.math.exp2(m_all - m_max[None, :]) * l_all, 0)
                acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
                for sp in range(NUM_SPLITS):
                    m_sp = tl.load(pm_ptr + base + sp, mask=offs_g < G, other=float("-inf"),
                                   cache_modifier=".cg")
                    a_sp = tl.load(pacc_ptr + (base + sp).to(tl.int64)[:, None] * HEAD_D + offs_d[None, :],
                                   mask=g_ok, other=0.0, cache_modifier=".cg")
                    acc += tl.math.exp2(m_sp - m_max)[:, None] * a_sp
            _store_out(o_ptrs, acc, l_i, g_ok)
            tl.atomic_xchg(count_ptr + s * HKV + kvh, 0)  # ready for the next launch / replay
    if TRACE:
        _stamp(trace_row, 4, 0)


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
                  qk_scale, window, num_seqs, max_seq_len, dot_prec, *, num_splits=None, config=None,
                  trace=None, cluster=None):
    """One decode step of one layer (one new token per sequence) into `out`. trace: an
    int64 CUDA tensor of programs x TRACE_SLOTS to stamp (bench/probes/decode_timeline.py);
    cluster: force the cluster merge on or off (default: 2 splits on sm_90+)."""
    T, Hq, D = q.shape
    Hkv, BS = kc.shape[2], kc.shape[1]
    G = Hq // Hkv
    BLOCK_D = max(16, triton.next_power_of_2(D))
    splits = num_splits or default_splits(num_seqs, Hkv, max_seq_len, q.device)
    if trace is not None:
        assert trace.dtype == torch.int64 and trace.is_cuda
        assert trace.numel() >= Hkv * num_seqs * splits * TRACE_SLOTS
    if cluster is None:
        cluster = merges_in_cluster(splits, q.device)
    block_n, warps, stages = config or decode_config(D, q.element_size(), splits, cluster)
    BLOCK_G = max(16, triton.next_power_of_2(G))
    args = dict(
        q_ptr=q, k_ptr=k, v_ptr=v, kc_ptr=kc, vc_ptr=vc, o_ptr=out, slot_ptr=slot_mapping,
        bt_ptr=block_tables, seq_lens_ptr=seq_lens, qsl_ptr=query_start_loc,
        pm_ptr=out, pl_ptr=out, pacc_ptr=out, count_ptr=out,  # the ticket merge's, set below
        trace_ptr=out if trace is None else trace, qk_scale=qk_scale, window=window, num_tokens=T,
        stride_qt=q.stride(0), stride_qh=q.stride(1), stride_kt=k.stride(0), stride_kh=k.stride(1),
        stride_vt=v.stride(0), stride_vh=v.stride(1), stride_ot=out.stride(0),
        stride_oh=out.stride(1), stride_bt=block_tables.stride(0),
        STRIDE_CB=kc.stride(0), STRIDE_CS=kc.stride(1), STRIDE_CH=kc.stride(2),
        G=G, HEAD_D=D, BLOCK_D=BLOCK_D, PAGE=BS, BLOCK_G=BLOCK_G,
        BLOCK_N=block_n, NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits),
        HKV=Hkv, BLOCK_HKV=triton.next_power_of_2(Hkv), BLOCK_HQ=triton.next_power_of_2(Hq),
        DOT_PREC=dot_prec, TRACE=trace is not None,
        OFF64=kc.numel() > _MAX_INT32_OFFSET,  # v_cache has k_cache's shape
    )
    if cluster:
        if not (cluster_launchable(q.device) and 2 <= splits <= 8):
            raise ValueError(f"the cluster merge needs 2 to 8 splits (got {splits}) on an sm_90+ GPU "
                             f"(got {q.device})")
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
