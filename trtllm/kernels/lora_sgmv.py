"""Batched LoRA over a flat batch whose tokens use different adapters (Punica / S-LoRA's
SGMV): each token's slot index picks its adapter's weights; -1 means no adapter.

    shrink:  h[t, :]   = x[t, :] @ A[slot[t]]^T                 (0 where slot[t] = -1)
    expand:  out[t, :] = base[t, :] + h[t, :] @ B[slot[t]]^T    (base[t, :] where slot[t] = -1)

so that, with base = x @ W^T (the linear the adapter targets), out = x @ (W + B A)^T for
each token's own adapter. The adapter's scaling (lora_alpha / r, or / sqrt(r) with rsLoRA)
is folded into B when an adapter is loaded into its slot (runtime/adapters.py).

Shapes: x [..., K] (leading dims flattened to T rows; last dim contiguous); A [S, R, K]
(S slots of rank R = max_lora_rank: an adapter of rank r < R has zero rows r.. R-1);
slot_ids [>= T] integer, only its first T entries read (a fixed-address buffer of
max_num_tokens that the runtime refills each step, so CUDA graphs replay with the step's
slots); h [..., R] in x's dtype (peft rounds lora_A's output to it too). base [..., N],
B [S, N, R], out [..., N] contiguous in base's dtype; base + the product summed in fp32
and rounded once. x, A share a dtype; base, h, B share a dtype (fp32/fp16/bf16).

Several linears at once (the fused QKV or gate-up GEMM of passes/fuse_parallel_linears.py):
A stacks their A's along R ([S, 3R, K] for q, k, v: one shrink reads x once) and B is
block-diagonal ([S, Nq + Nk + Nv, 3R], zero off the blocks): the same formulas. The expand's
`parts` ([start, size] of B's rows for each block of R / len(parts) ranks, in rank order) tell
it where the blocks are: each row of B is read at its own part's ranks only, not the zeros
(half of a fused gate-up B's bytes, two thirds of a fused QKV's); rows of no part, not at all.

The kernels: one program per BLOCK_T tokens (and BLOCK_R ranks / BLOCK_N features). The
flat batch keeps each sequence's tokens together, so a block of tokens mostly uses one
adapter; a program loops over the distinct slots among its tokens (usually one, at decode
up to BLOCK_T), each a tl.dot over the rows of that slot (the others masked to zero).
Rows with no adapter cost nothing past the slot read in shrink, and a copy of base in
expand. The decode path (T <= SPLIT_K_MAX_TOKENS): shrink also splits K over programs
(SPLIT_K_CHUNK elements each; fp32 partial sums added in order by a second small kernel, so
results do not depend on timing), where one block of 16 tokens would otherwise stream all
of A in one program.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import interpreter_upcast, register_op

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NO_SLOT = 2**31 - 1  # larger than any slot: "no slot left" in the kernels' slot loops


# -- reference ---------------------------------------------------------------------------
def lora_shrink_ref(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    slots = slot_ids[: x2.shape[0]].long()
    a = lora_a.float()[slots.clamp(min=0)]  # [T, R, K]: each token's adapter
    h = torch.einsum("tk,trk->tr", x2, a) * (slots >= 0)[:, None]
    return h.to(x.dtype).reshape(*x.shape[:-1], lora_a.shape[1])


def lora_expand_ref(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor,
                    parts: list[int] | None = None) -> torch.Tensor:
    n = base.shape[-1]
    base2, h2 = base.reshape(-1, n).float(), h.reshape(-1, h.shape[-1]).float()
    slots = slot_ids[: base2.shape[0]].long()
    b = lora_b.float()[slots.clamp(min=0)] * _blocks(parts, *lora_b.shape[1:], lora_b.device)  # [T, N, R]: each token's adapter
    delta = torch.einsum("tr,tnr->tn", h2, b) * (slots >= 0)[:, None]
    return (base2 + delta).to(base.dtype).reshape(base.shape)


def _blocks(parts: list[int] | None, n: int, r: int, device: torch.device | str = "cpu") -> torch.Tensor | float:
    """1 where B [N, R] is read: each part's rows at its own ranks (all of B without parts)."""
    if parts is None:
        return 1.0
    mask, per = torch.zeros(n, r, device=device), r // (len(parts) // 2)
    for i, (start, size) in enumerate(zip(parts[::2], parts[1::2])):
        mask[start:start + size, i * per:(i + 1) * per] = 1.0
    return mask


# -- kernels -------------------------------------------------------------------------------
@triton.jit
def _next_slot(slots, current):
    """The smallest slot among `slots` above `current` (_NO_SLOT if none)."""
    return tl.min(tl.where(slots > current, slots, 2147483647), axis=0)


@triton.jit
def _lora_shrink_kernel(
    x_ptr, a_ptr, slot_ptr, h_ptr,
    T, K, R, K_PER_SPLIT,
    x_row_stride, a_slot_stride, a_row_stride, h_split_stride, h_row_stride,
    DOT_PRECISION: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_T), cdiv(R, BLOCK_R), splits of K). Split s sums K range
    # [s * K_PER_SPLIT, (s + 1) * K_PER_SPLIT) into h[s] (one split: h is the output).
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    k_start = tl.program_id(2) * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    offs_k = tl.arange(0, BLOCK_K)
    t_mask, r_mask = offs_t < T, offs_r < R
    slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int32)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    slot = _next_slot(slots, -1)
    while slot < 2147483647:  # each distinct adapter among these tokens
        rows = t_mask & (slots == slot)
        x_ptrs = x_ptr + offs_t.to(tl.int64)[:, None] * x_row_stride + k_start + offs_k[None, :]
        a_ptrs = (a_ptr + slot.to(tl.int64) * a_slot_stride + offs_r.to(tl.int64)[:, None] * a_row_stride
                  + k_start + offs_k[None, :])
        for k0 in range(k_start, k_end, BLOCK_K):
            k_mask = (k0 + offs_k) < k_end
            x = tl.load(x_ptrs, mask=rows[:, None] & k_mask[None, :], other=0.0)
            a = tl.load(a_ptrs, mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(a), acc, input_precision=DOT_PRECISION)
            x_ptrs += BLOCK_K
            a_ptrs += BLOCK_K
        slot = _next_slot(slots, slot)
    h_ptrs = (h_ptr + tl.program_id(2).to(tl.int64) * h_split_stride + offs_t.to(tl.int64)[:, None] * h_row_stride
              + offs_r[None, :])
    tl.store(h_ptrs, acc.to(h_ptr.dtype.element_ty), mask=t_mask[:, None] & r_mask[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, SPLITS, NUMEL, MAX_SPLITS: tl.constexpr, BLOCK: tl.constexpr):
    # Grid: (cdiv(NUMEL, BLOCK),). out = sum over the splits of part [SPLITS, NUMEL] (fp32), in
    # order. Unrolled to MAX_SPLITS >= SPLITS so that every split's load is in flight at once
    # (a runtime loop issued them one after another: latency-bound, 16-56 of them a linear).
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(MAX_SPLITS):
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask & (s < SPLITS), other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _part_ranks(n_lo, n_hi, start, end, j: tl.constexpr, RANKS_PER_PART, r_lo, r_hi):
    """(r_lo, r_hi) widened by part j's ranks if its rows [start, end) meet [n_lo, n_hi)."""
    hit = (start < n_hi) & (end > n_lo)
    return (tl.where(hit, tl.minimum(r_lo, j * RANKS_PER_PART), r_lo),
            tl.where(hit, tl.maximum(r_hi, (j + 1) * RANKS_PER_PART), r_hi))


@triton.jit
def _lora_expand_kernel(
    base_ptr, h_ptr, b_ptr, slot_ptr, out_ptr,
    T, N, R, SPLITS, RANKS_PER_PART, P0S, P0E, P1S, P1E, P2S, P2E, P3S, P3E,
    base_row_stride, h_split_stride, h_row_stride, b_slot_stride, b_row_stride, out_row_stride,
    DOT_PRECISION: tl.constexpr, MAX_SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Grid: (cdiv(T, BLOCK_T), cdiv(N, BLOCK_N)). h: [SPLITS, T, R], summed over the splits
    # and rounded to B's dtype (one split in B's dtype: lora_expand's h as it is). Parts j < 4:
    # B's rows [PjS, PjE) use ranks [j, j + 1) * RANKS_PER_PART (an unused part: PjS = PjE);
    # a program loops over the ranks of the parts its features meet (none when they meet
    # none), and each row reads its own part's ranks only: B off the blocks is never read.
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_lo = tl.program_id(1) * BLOCK_N
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    t_mask, n_mask = offs_t < T, offs_n < N
    tn_mask = t_mask[:, None] & n_mask[None, :]
    rows64 = offs_t.to(tl.int64)
    n_hi = tl.minimum(n_lo + BLOCK_N, N)
    r_lo, r_hi = R + 0 * n_lo, 0 * n_lo
    r_lo, r_hi = _part_ranks(n_lo, n_hi, P0S, P0E, 0, RANKS_PER_PART, r_lo, r_hi)
    r_lo, r_hi = _part_ranks(n_lo, n_hi, P1S, P1E, 1, RANKS_PER_PART, r_lo, r_hi)
    r_lo, r_hi = _part_ranks(n_lo, n_hi, P2S, P2E, 2, RANKS_PER_PART, r_lo, r_hi)
    r_lo, r_hi = _part_ranks(n_lo, n_hi, P3S, P3E, 3, RANKS_PER_PART, r_lo, r_hi)
    row_part = tl.where((offs_n >= P0S) & (offs_n < P0E), 0, -1)
    row_part = tl.where((offs_n >= P1S) & (offs_n < P1E), 1, row_part)
    row_part = tl.where((offs_n >= P2S) & (offs_n < P2E), 2, row_part)
    row_part = tl.where((offs_n >= P3S) & (offs_n < P3E), 3, row_part)
    acc = tl.load(base_ptr + rows64[:, None] * base_row_stride + offs_n[None, :], mask=tn_mask,
                  other=0.0).to(tl.float32)
    slots = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1).to(tl.int32)
    slot = _next_slot(slots, -1)
    while slot < 2147483647:
        rows = t_mask & (slots == slot)
        b_rows = b_ptr + slot.to(tl.int64) * b_slot_stride + offs_n.to(tl.int64)[:, None] * b_row_stride
        for r0 in range(r_lo, r_hi, BLOCK_R):
            ranks = r0 + offs_r
            r_mask = ranks < r_hi
            h_ptrs = h_ptr + rows64[:, None] * h_row_stride + ranks[None, :]
            h = tl.load(h_ptrs, mask=rows[:, None] & r_mask[None, :], other=0.0)
            for s in tl.static_range(1, MAX_SPLITS):  # unrolled: every split's load in flight at once
                h += tl.load(h_ptrs + s * h_split_stride, mask=rows[:, None] & r_mask[None, :] & (s < SPLITS),
                             other=0.0)
            h = h.to(b_ptr.dtype.element_ty)
            own = row_part[:, None] == (ranks // RANKS_PER_PART)[None, :]  # a row's own part's ranks
            b = tl.load(b_rows + ranks[None, :], mask=n_mask[:, None] & r_mask[None, :] & own, other=0.0)
            acc = tl.dot(h, tl.trans(b), acc, input_precision=DOT_PRECISION)
        slot = _next_slot(slots, slot)
    tl.store(out_ptr + rows64[:, None] * out_row_stride + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=tn_mask)


# -- launchers -----------------------------------------------------------------------------
def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., C] -> [M, C] with a contiguous last dim (a view when it can be)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 or t2.shape[-1] <= 1 else t2.contiguous()


def _check_slots(slot_ids: torch.Tensor, rows: int, device: torch.device) -> None:
    assert slot_ids.dim() == 1 and slot_ids.shape[0] >= rows, \
        f"slot_ids {tuple(slot_ids.shape)} must be a vector of at least the {rows} tokens"
    assert not slot_ids.is_floating_point() and slot_ids.is_contiguous(), "slot_ids: a contiguous integer vector"
    assert slot_ids.device == device, f"slot_ids on {slot_ids.device}, tokens on {device}"


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def lora_shrink_triton(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    r = lora_a.shape[1]
    x2 = _rows(x, "x")
    t = x2.shape[0]
    h = torch.empty((t, r), dtype=x.dtype, device=x.device)
    if t and r:
        splits, k_per_split = _check_shrink(x2, lora_a, slot_ids)
        with interpreter_upcast((), (h,)) as (_, (h_,)):
            if splits == 1:  # the kernel stores h itself
                _launch_shrink(x2, lora_a, slot_ids, h_[None], k_per_split)
            else:  # fp32 partial sums [splits, T, R], summed in order by a second kernel
                part = torch.empty((splits, t, r), dtype=torch.float32, device=x.device)
                _launch_shrink(x2, lora_a, slot_ids, part, k_per_split)
                _sum_splits_kernel[(triton.cdiv(t * r, SUM_BLOCK),)](
                    part, h_, splits, t * r, MAX_SPLITS=triton.next_power_of_2(splits), BLOCK=SUM_BLOCK, num_warps=4)
    return h.reshape(*x.shape[:-1], r)


def lora_shrink_partials(x2: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """The shrink's fp32 sums over K splits, [splits, T, R] for x2 [T, K] (one split past
    SPLIT_K_MAX_TOKENS tokens): h = their sum in split order, rounded to x's dtype.
    lora_shrink sums them with a second kernel; kernels/linear_lora.py inside its GEMV."""
    (t, _), r = x2.shape, lora_a.shape[1]
    splits, k_per_split = _check_shrink(x2, lora_a, slot_ids)
    part = torch.empty((splits, t, r), dtype=torch.float32, device=x2.device)
    if t and r:
        _launch_shrink(x2, lora_a, slot_ids, part, k_per_split)
    return part


def _check_shrink(x2: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> tuple[int, int]:
    """Asserts the shrink's operands; returns (splits of K, K elements a split)."""
    assert x2.dtype in _FLOAT_DTYPES and lora_a.dtype == x2.dtype, f"x {x2.dtype}, lora_a {lora_a.dtype}"
    assert x2.dim() == 2 and (x2.stride(1) == 1 or x2.shape[1] <= 1), \
        f"x2 {tuple(x2.shape)}: rows with a contiguous last dim"
    assert lora_a.dim() == 3 and lora_a.shape[2] == x2.shape[1] and lora_a.stride(2) == 1, \
        f"lora_a {tuple(lora_a.shape)} must be [slots, rank, K={x2.shape[1]}] with a contiguous last dim"
    assert lora_a.device == x2.device, f"lora_a on {lora_a.device}, x on {x2.device}"
    _check_slots(slot_ids, x2.shape[0], x2.device)
    return shrink_splits(x2.shape[0], x2.shape[1], _shrink_block_k(x2.shape[1]),
                         triton.cdiv(lora_a.shape[1], _shrink_block_r(lora_a.shape[1])))


def _shrink_block_k(k: int) -> int:
    return max(16, min(128, triton.next_power_of_2(k)))


def _shrink_block_r(r: int) -> int:
    return max(16, min(64, triton.next_power_of_2(r)))


def _launch_shrink(x2: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor, out: torch.Tensor,
                   k_per_split: int) -> None:
    """The shrink kernel into out [splits, T, R] (split s: K range [s, s + 1) * k_per_split)."""
    (t, k), r = x2.shape, lora_a.shape[1]
    block_r, block_t = _shrink_block_r(r), token_block(t)
    with interpreter_upcast((x2, lora_a)) as ((x2_, a_), _):
        _lora_shrink_kernel[(triton.cdiv(t, block_t), triton.cdiv(r, block_r), out.shape[0])](
            x2_, a_, slot_ids, out,
            t, k, r, k_per_split,
            x2_.stride(0), a_.stride(0), a_.stride(1), out.stride(0), out.stride(1),
            DOT_PRECISION=_dot_precision(x2.dtype),
            BLOCK_T=block_t, BLOCK_R=block_r, BLOCK_K=_shrink_block_k(k),
            num_warps=4,
        )


# Tokens up to which shrink splits K into every SPLIT_K_CHUNK: at decode one block of 16
# tokens would otherwise be one program per 16-64 ranks streaming all of A (K x 48 for a
# fused QKV) alone. Past it, K is split only as far as the grid needs to reach
# SHRINK_PROGRAMS: with one split, 128 tokens over 32 adapters (bench_lora's 256 x 64 row
# in its 32 slots) were 8 programs, each looping over ~4 adapters' A through all of K
# while the other SMs idled.
SPLIT_K_MAX_TOKENS = 64
SPLIT_K_CHUNK = 256  # K elements a split covers (at least)
SHRINK_PROGRAMS = 264  # two a streaming multiprocessor of an H100 / H200 (132)

# Tokens a program takes: 16 at decode (a block of decodes meets as many adapters as it has
# sequences, and a program loops over them one after another), 64 from WIDE_BLOCK_MIN_TOKENS
# tokens, a prefill-sized step (a prompt's tokens are contiguous: a block mostly meets one
# adapter). With 16 a prefill step re-read each adapter's A and B once per 16 tokens in
# programs too small to keep the GPU busy: the LoRA engine's prefill steps took 197.7 ms
# against the base's 160.6 (bench/probes/lora_step.py --many, H100, 2026-12-07).
WIDE_BLOCK_MIN_TOKENS = 1024


def token_block(t: int) -> int:
    """BLOCK_T of the shrink and expand over t tokens."""
    return 64 if t >= WIDE_BLOCK_MIN_TOKENS else 16
SUM_BLOCK = 256  # the split sum's elements a program: 12 programs for 64 tokens x rank 48


def shrink_splits(t: int, k: int, block_k: int, r_blocks: int = 1) -> tuple[int, int]:
    """(splits of K, K elements per split) for a shrink over t tokens whose ranks take
    r_blocks programs: chunks of SPLIT_K_CHUNK up to SPLIT_K_MAX_TOKENS tokens, past it as
    many as fill SHRINK_PROGRAMS programs (one once the token blocks alone do)."""
    per_split = triton.cdiv(max(SPLIT_K_CHUNK, block_k), block_k) * block_k
    most = triton.cdiv(k, per_split)
    if k <= SPLIT_K_CHUNK:
        return 1, k
    if t > SPLIT_K_MAX_TOKENS:
        most = min(most, triton.cdiv(SHRINK_PROGRAMS, triton.cdiv(t, token_block(t)) * r_blocks))
        if most <= 1:
            return 1, k
        per_split = triton.cdiv(triton.cdiv(k, most), block_k) * block_k
    return triton.cdiv(k, per_split), per_split


def lora_expand_triton(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor,
                       parts: list[int] | None = None) -> torch.Tensor:
    assert base.dtype in _FLOAT_DTYPES and h.dtype == base.dtype, f"base {base.dtype}, h {h.dtype}"
    assert h.shape[:-1] == base.shape[:-1], f"h {tuple(h.shape)} and base {tuple(base.shape)}: tokens differ"
    base2, h2 = _rows(base, "base"), _rows(h, "h")
    return lora_expand_partials(base2, h2[None], lora_b, slot_ids, parts=parts).reshape(base.shape)


MAX_PARTS = 4  # the expand kernel's part arguments; more parts: every rank read (zeros too)


def _part_args(parts: list[int] | None, n: int, r: int) -> tuple[int, list[int]]:
    """(ranks a part, [P0S, P0E, ..., P3S, P3E]) for the kernel: `parts` ([start, size] a
    part) checked against B [N, R]; none (or more than MAX_PARTS): one part of every row."""
    if parts is None or not 0 < len(parts) // 2 <= MAX_PARTS:
        return r, [0, n] + [0, 0] * (MAX_PARTS - 1)
    count = len(parts) // 2
    assert len(parts) % 2 == 0 and r % count == 0, f"parts {parts}: [start, size] pairs over R={r} ranks"
    bounds = []
    for start, size in zip(parts[::2], parts[1::2]):
        assert 0 <= start and 0 <= size and start + size <= n, f"parts {parts}: rows outside B's {n}"
        bounds += [start, start + size]
    return r // count, bounds + [0, 0] * (MAX_PARTS - count)


def lora_expand_partials(base2: torch.Tensor, h_parts: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor,
                         blocks: tuple[int, int, int] | None = None, parts: list[int] | None = None) -> torch.Tensor:
    """The expand for base2 [T, N] (last dim contiguous) with h given as [splits, T, R]: fp32
    partial sums (lora_shrink_partials), added in split order and rounded to B's dtype in
    the kernel, or one split in base's dtype. Returns [T, N] contiguous. blocks: (BLOCK_T,
    BLOCK_N, num_warps) in place of the default (bench/probes/lora_linears.py sweeps them);
    parts: where B's rank blocks are (module docstring)."""
    (t, n), r = base2.shape, h_parts.shape[-1]
    assert lora_b.dtype == base2.dtype, f"base {base2.dtype}, lora_b {lora_b.dtype}"
    assert h_parts.dim() == 3 and h_parts.shape[1] == t and h_parts.stride(2) == 1, \
        f"h {tuple(h_parts.shape)}: [splits, T={t}, R] with a contiguous last dim"
    assert h_parts.dtype == base2.dtype or h_parts.dtype == torch.float32, f"h {h_parts.dtype}"
    assert lora_b.dim() == 3 and lora_b.shape[1:] == (n, r) and lora_b.stride(2) == 1, \
        f"lora_b {tuple(lora_b.shape)} must be [slots, N={n}, rank={r}] with a contiguous last dim"
    assert lora_b.device == base2.device and h_parts.device == base2.device, "base, h, lora_b on different devices"
    _check_slots(slot_ids, t, base2.device)
    out = torch.empty((t, n), dtype=base2.dtype, device=base2.device)
    if t and n:
        wide = token_block(t) > 16  # a prefill-sized step: blocks of 64 tokens x 128 features
        block_t, block_n, num_warps = blocks or (token_block(t), max(16, min(128 if wide else 64,
                                                                             triton.next_power_of_2(n))), 4)
        ranks_per_part, bounds = _part_args(parts, n, r)
        block_r = max(16, min(64, triton.next_power_of_2(ranks_per_part)))
        with interpreter_upcast((base2, h_parts, lora_b), (out,)) as ((base_, h_, b_), (out_,)):
            _lora_expand_kernel[(triton.cdiv(t, block_t), triton.cdiv(n, block_n))](
                base_, h_, b_, slot_ids, out_,
                t, n, r, h_.shape[0], ranks_per_part, *bounds,
                base_.stride(0), h_.stride(0), h_.stride(1), b_.stride(0), b_.stride(1), out_.stride(0),
                DOT_PRECISION=_dot_precision(base2.dtype), MAX_SPLITS=triton.next_power_of_2(h_.shape[0]),
                BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=block_r,
                num_warps=num_warps,
            )
    return out


def _lora_shrink_fake(x: torch.Tensor, lora_a: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], lora_a.shape[1]))


def _lora_expand_fake(base: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, slot_ids: torch.Tensor,
                      parts: list[int] | None = None) -> torch.Tensor:
    return base.new_empty(base.shape)


lora_shrink = register_op("lora_shrink", launcher=lora_shrink_triton, reference=lora_shrink_ref,
                          fake=_lora_shrink_fake)
lora_expand = register_op("lora_expand", launcher=lora_expand_triton, reference=lora_expand_ref,
                          fake=_lora_expand_fake)
