"""The tails of the decode kernel (decode.py): how a program's softmax state (max m, sum l,
unnormalized acc over its run of the context, rows = the G query heads of one kv head)
becomes the output. With 1 split it is stored; with more, the splits of one (sequence,
kv head) merge in the same launch, one of two ways:

- `cluster_merge` (2 splits on sm_90+ by default): the splits are one thread-block
  cluster; the others write their partials into the merging program's shared memory
  (cluster.py);
- `ticket_merge` (otherwise): every split writes its partials to global memory and takes
  an atomic ticket; the last to finish merges, in split order (`fold_in_split_order`, up to
  8 splits; `_sum_all_partials` past 8), so the output does not depend on which split that was.
"""
import triton
import triton.language as tl

from trtllm.kernels.paged_attention.cluster import (
    cluster_arrive,
    cluster_wait,
    scratch_addr,
    shared_load,
    store_to_rank0,
)
from trtllm.kernels.paged_attention.trace import stamp


@triton.jit
def merge(m_i, l_i, acc, m_sp, l_sp, a_sp):
    """Two splits' (max, sum, acc) softmax states of the same rows as one."""
    m_new = tl.maximum(m_i, m_sp)
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # both still empty
    alpha, beta = tl.math.exp2(m_i - m_use), tl.math.exp2(m_sp - m_use)
    return m_new, l_i * alpha + l_sp * beta, acc * alpha[:, None] + a_sp * beta[:, None]


@triton.jit
def store_out(o_ptrs, acc, l_i, g_ok):
    """The normalized rows (acc / l; 0 where no key was seen) where g_ok."""
    tl.store(o_ptrs, (acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]).to(o_ptrs.dtype.element_ty), mask=g_ok)


@triton.jit
def _scratch_slot(slot, offs_g, offs_d, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, SCRATCH: tl.constexpr):
    """Shared-memory addresses (max [BLOCK_G], sum [BLOCK_G], acc [BLOCK_G, BLOCK_D]; fp32)
    of one split's partials in the merging program's cluster scratch."""
    base = slot * (2 + BLOCK_D) * BLOCK_G * 4
    return (scratch_addr(base + offs_g * 4, SCRATCH), scratch_addr(base + (BLOCK_G + offs_g) * 4, SCRATCH),
            scratch_addr(base + (2 * BLOCK_G + offs_g[:, None] * BLOCK_D + offs_d[None, :]) * 4, SCRATCH))


@triton.jit
def cluster_merge(m_i, l_i, acc, rank, o_ptrs, g_ok, offs_g, offs_d, stamps,
                  G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, TRACE: tl.constexpr):
    """The splits of one (sequence, kv head) are one thread-block cluster. Cluster rank 0
    (the last split: the one with the new key past (splits - 1) * BLOCK_N keys, so its
    cache write needs no ordering) merges. The others store their partials into its
    shared memory (slot rank - 1), arrive with release and exit; rank 0 arrives relaxed,
    waits, and folds them in from its own shared memory. No global round trip, no ticket:
    1.3 us per layer less than the ticket merge at b8 x 2048 on the H100 (time
    `DecodeLaunch(2, False, ...)` against the default in bench/bench_attention.py's
    graphed_layers). The variants tried (rank 0 reading the others' shared memory over the
    cluster, release arrivals on both programs): docs/decisions/decode_attention.md."""
    SCRATCH: tl.constexpr = (NUM_SPLITS - 1) * (2 + BLOCK_D) * BLOCK_G * 4
    cluster_wait()  # the start's phase: every program of the cluster is running
    if rank == 0:
        cluster_arrive(False)
        cluster_wait()
        if TRACE:
            stamp(stamps, 3, 0)
        for sp in tl.static_range(NUM_SPLITS - 1):
            # Padding rows (>= G) were never written: they merge garbage, never stored.
            m_at, l_at, acc_at = _scratch_slot(sp, offs_g, offs_d, BLOCK_G, BLOCK_D, SCRATCH)
            m_i, l_i, acc = merge(m_i, l_i, acc, shared_load(m_at), shared_load(l_at), shared_load(acc_at))
        store_out(o_ptrs, acc, l_i, g_ok)
    else:
        m_at, l_at, acc_at = _scratch_slot(rank - 1, offs_g, offs_d, BLOCK_G, BLOCK_D, SCRATCH)
        store_to_rank0(m_at, m_i, offs_g < G)
        store_to_rank0(l_at, l_i, offs_g < G)
        store_to_rank0(acc_at, acc, g_ok)
        cluster_arrive(True)
        if TRACE:
            stamp(stamps, 3, 0)


@triton.jit
def fold_in_split_order(m_own, l_own, acc_own, split, pm_ptr, pl_ptr, pacc_ptr, base, g_rows, d_ok, offs_d,
                        HEAD_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                        NUM_SPLITS: tl.constexpr):
    """Every split's state merged in split order 0, 1, ..., from the empty state: the merging
    split's own from registers (`split`), the others' stored partials at rows base + sp (where
    g_rows). Whichever split finished last and merges, the additions come in the same order,
    so the output is the same bits from run to run (folding the others into the merger's own
    state first made it depend on which split that was: merge is commutative, not associative).
    Folding the empty state in first is exact (merge's alpha is 0)."""
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for sp in tl.static_range(NUM_SPLITS):
        mine = split == sp
        stored = g_rows & (split != sp)
        m_sp = tl.load(pm_ptr + base + sp, mask=stored, other=float("-inf"), cache_modifier=".cg")
        l_sp = tl.load(pl_ptr + base + sp, mask=stored, other=0.0, cache_modifier=".cg")
        a_sp = tl.load(pacc_ptr + (base + sp).to(tl.int64)[:, None] * HEAD_D + offs_d[None, :],
                       mask=stored[:, None] & d_ok[None, :], other=0.0, cache_modifier=".cg")
        m_sp = tl.where(mine, m_own, m_sp)
        l_sp = tl.where(mine, l_own, l_sp)
        a_sp = tl.where(mine, acc_own, a_sp)
        m_i, l_i, acc = merge(m_i, l_i, acc, m_sp, l_sp, a_sp)
    return m_i, l_i, acc


@triton.jit
def _sum_all_partials(pm_ptr, pl_ptr, pacc_ptr, base, offs_g, offs_d, g_ok, G: tl.constexpr,
                      HEAD_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_S: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """(sum, acc) of all NUM_SPLITS stored partials at rows base + split: every split's max
    and sum first, then a loop whose loads do not wait on the one before. A folding loop
    would wait on each split's loads in turn: 3.8 us more at b1 x 2048 (16 splits) on the
    H100 (bench/bench_attention.py; docs/decisions/decode_attention.md)."""
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
    return l_i, acc


@triton.jit
def ticket_merge(m_i, l_i, acc, s, kvh, split, head, o_ptrs, g_ok, d_ok, offs_g, offs_d,
                 pm_ptr, pl_ptr, pacc_ptr, count_ptr, stamps,
                 G: tl.constexpr, HKV: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, NUM_SPLITS: tl.constexpr,
                 TRACE: tl.constexpr):
    """Every split stores its partials [S, Hq, NUM_SPLITS] (+ [HEAD_D] for acc;
    unnormalized) and takes a ticket (acq_rel); the last for its (sequence, kv head)
    merges them: no second launch. Up to 8 splits it folds them in split order, its own from
    registers, all loads at once (0.5 us per layer less at b8 x 2048 on the H100 than a loop).
    The release fence stays: without it (a relaxed ticket, the others publishing after it,
    the merger polling a done count) the poll waits out the others' fences, 0.8 us more
    after the loop (bench/probes/decode_timeline.py; docs/decisions/decode_attention.md)."""
    row = (s * G * HKV + head) * NUM_SPLITS + split
    tl.store(pm_ptr + row, m_i, mask=offs_g < G)
    tl.store(pl_ptr + row, l_i, mask=offs_g < G)
    tl.store(pacc_ptr + row.to(tl.int64)[:, None] * HEAD_D + offs_d[None, :], acc, mask=g_ok)
    tl.debug_barrier()  # every thread's partials are issued before the release below
    ticket = tl.atomic_add(count_ptr + s * HKV + kvh, 1, sem="acq_rel")
    if TRACE:
        stamp(stamps, 3, ticket)
    if ticket == NUM_SPLITS - 1:
        tl.debug_barrier()  # every thread reads the partials after the acquire
        base = (s * G * HKV + head) * NUM_SPLITS
        if NUM_SPLITS <= 8:  # unrolled: every split's loads go out at once
            m_i, l_i, acc = fold_in_split_order(m_i, l_i, acc, split, pm_ptr, pl_ptr, pacc_ptr, base, offs_g < G,
                                                d_ok, offs_d, HEAD_D, BLOCK_G, BLOCK_D, NUM_SPLITS)
        else:
            l_i, acc = _sum_all_partials(pm_ptr, pl_ptr, pacc_ptr, base, offs_g, offs_d, g_ok, G, HEAD_D,
                                         BLOCK_G, BLOCK_D, BLOCK_S, NUM_SPLITS)
        store_out(o_ptrs, acc, l_i, g_ok)
        tl.atomic_xchg(count_ptr + s * HKV + kvh, 0)  # ready for the next launch / replay
