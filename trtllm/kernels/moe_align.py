"""MoE token alignment: the token -> expert sort the grouped GEMM of fused_moe reads.

Each of the T * k (token, choice) pairs is a *slot* s = t * k + j, routed to expert
topk_ids[t, j]. The slots are grouped by expert (experts in order 0..E-1, slots of one expert
in ascending order) and each expert's run is padded with the sentinel T * k up to a multiple
of block_m, so that every block of block_m rows belongs to one expert:

    count[e]         = #{s : topk_ids.flat[s] == e}
    padded[e]        = ceil(count[e] / block_m) * block_m
    start[e]         = sum_{e' < e} padded[e']
    sorted_ids[start[e] + i] = the i-th slot of expert e  (i < count[e]);  T * k elsewhere
    expert_ids[b]    = the expert of rows [b * block_m, (b + 1) * block_m); -1 past the end
    num_tokens_post_padded[0] = sum_e padded[e]

Shapes: topk_ids [T, k] int32 (contiguous). Outputs sorted_ids [T*k + min(E, T*k) * (block_m - 1)]
int32 (the most any routing can need, so the size depends on shapes only and the op needs no
host sync: CUDA-graph safe), expert_ids [cdiv(len(sorted_ids), block_m)] int32, and
num_tokens_post_padded [1] int32. An expert with no slot gets no block. An id outside [0, E)
(an expert another rank holds, with expert parallelism later) is in no expert's run: its slot
is not computed, and fused_moe adds nothing for it.

Kernels: one program per expert, twice: count its slots; then, from the starts (a cumsum in
torch between the launches), write its slots in order (a running tl.cumsum over chunks of the
ids) and its blocks' expert id. Each program reads all T * k ids; a one-pass histogram
version is the obvious next step for large T * k, not measured yet.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import register_op


def _check_args(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be [T, k] int32, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts} must be >= 1")
    if block_m < 1:
        raise ValueError(f"block_m={block_m} must be >= 1")


def max_padded_slots(num_slots: int, num_experts: int, block_m: int) -> int:
    """len(sorted_ids): all slots plus the most padding min(E, slots) non-empty experts can need."""
    return num_slots + min(num_experts, num_slots) * (block_m - 1)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_args(topk_ids, num_experts, block_m)
    flat = topk_ids.flatten().long()
    num_slots = flat.numel()
    size = max_padded_slots(num_slots, num_experts, block_m)
    dev = topk_ids.device
    sorted_ids = torch.full((size,), num_slots, dtype=torch.int32, device=dev)
    expert_ids = torch.full((triton.cdiv(size, block_m),), -1, dtype=torch.int32, device=dev)
    start = 0
    for e in range(num_experts):
        slots = (flat == e).nonzero().flatten()
        sorted_ids[start:start + slots.numel()] = slots.to(torch.int32)
        padded = triton.cdiv(slots.numel(), block_m) * block_m
        expert_ids[start // block_m:(start + padded) // block_m] = e
        start += padded
    return sorted_ids, expert_ids, torch.tensor([start], dtype=torch.int32, device=dev)


@triton.jit
def _count_kernel(ids_ptr, counts_ptr, num_slots, BLOCK: tl.constexpr):
    # Grid: (E,).
    e = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    hits = tl.zeros((BLOCK,), dtype=tl.int32)  # per lane: an int32 tensor from the start, as a loop carry must be
    for s0 in range(0, num_slots, BLOCK):
        ids = tl.load(ids_ptr + s0 + offs, mask=s0 + offs < num_slots, other=-1)
        hits += (ids == e).to(tl.int32)
    tl.store(counts_ptr + e, tl.sum(hits, axis=0))


@triton.jit
def _scatter_kernel(ids_ptr, starts_ptr, counts_ptr, sorted_ptr, expert_ids_ptr, num_slots,
                    BLOCK_M: tl.constexpr, BLOCK: tl.constexpr):
    # Grid: (E,). Expert e's slots, in ascending order, from sorted_ids[start[e]] on.
    e = tl.program_id(0)
    start = tl.load(starts_ptr + e)
    offs = tl.arange(0, BLOCK)
    written = tl.zeros((BLOCK,), dtype=tl.int32)  # the slots stored so far, in every lane
    for s0 in range(0, num_slots, BLOCK):
        ids = tl.load(ids_ptr + s0 + offs, mask=s0 + offs < num_slots, other=-1)
        mine = (ids == e).to(tl.int32)
        pos = start + written + tl.cumsum(mine, axis=0) - 1
        tl.store(sorted_ptr + pos, s0 + offs, mask=mine == 1)
        written += tl.sum(mine, axis=0)
    n_blocks = tl.cdiv(tl.load(counts_ptr + e), BLOCK_M)
    for b0 in range(0, n_blocks, BLOCK):
        tl.store(expert_ids_ptr + start // BLOCK_M + b0 + offs, e, mask=b0 + offs < n_blocks)


def moe_align_triton(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_args(topk_ids, num_experts, block_m)
    ids = topk_ids.contiguous()
    num_slots = ids.numel()
    size = max_padded_slots(num_slots, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.full((size,), num_slots, dtype=torch.int32, device=dev)
    expert_ids = torch.full((triton.cdiv(size, block_m),), -1, dtype=torch.int32, device=dev)
    if num_slots == 0:
        return sorted_ids, expert_ids, torch.zeros(1, dtype=torch.int32, device=dev)
    counts = torch.empty(num_experts, dtype=torch.int32, device=dev)
    BLOCK = min(triton.next_power_of_2(num_slots), 1024)
    _count_kernel[(num_experts,)](ids, counts, num_slots, BLOCK=BLOCK)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0, dtype=torch.int32)
    starts = (ends - padded).to(torch.int32)
    _scatter_kernel[(num_experts,)](ids, starts, counts, sorted_ids, expert_ids, num_slots,
                                    BLOCK_M=block_m, BLOCK=BLOCK)
    return sorted_ids, expert_ids, ends[-1:].clone()


def _moe_align_fake(topk_ids, num_experts, block_m):
    size = max_padded_slots(topk_ids.numel(), num_experts, block_m)
    return (topk_ids.new_empty(size), topk_ids.new_empty(triton.cdiv(size, block_m)), topk_ids.new_empty(1))


moe_align = register_op("moe_align", launcher=moe_align_triton, reference=moe_align_ref, fake=_moe_align_fake)
