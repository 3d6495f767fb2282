"""Expert load: how many (token, choice) slots each expert received, added to a running count.

    counts[e] += #{(t, j) : topk_ids[t, j] == e  and  token_slots[t] >= 0}

Shapes: topk_ids [T, k] int32 as `moe_routing` gives them; counts [E] int64, updated in place;
token_slots [>= T] int32 or None (all tokens count): the runtime's cache slot of each token,
-1 for the padding tokens of a CUDA graph's batch (attention_context.AttentionMetadata's
`slot_mapping`), which are computed but belong to no request. An id outside [0, E) (an
expert another rank holds, with expert parallelism) is not counted.

Kernel: one program, a loop over the T*k ids in chunks, an atomic add per id (E is small
and T*k is a step's tokens: one launch, no host sync). What reads the counts (the expert
load statistics, trtllm/expert_load.py) copies them to the host only when asked.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import register_op


def _check_args(topk_ids: torch.Tensor, counts: torch.Tensor, token_slots: torch.Tensor | None) -> None:
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be [T, k] int32, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if counts.dim() != 1 or counts.dtype != torch.int64 or not counts.is_contiguous():
        raise ValueError(f"counts must be a contiguous [E] int64, got {tuple(counts.shape)} {counts.dtype}")
    if token_slots is not None and (token_slots.dim() != 1 or token_slots.dtype != torch.int32
                                    or token_slots.shape[0] < topk_ids.shape[0]):
        raise ValueError(f"token_slots must be [>= T={topk_ids.shape[0]}] int32, got "
                         f"{tuple(token_slots.shape)} {token_slots.dtype}")


def count_experts_ref(topk_ids: torch.Tensor, counts: torch.Tensor, token_slots: torch.Tensor | None) -> None:
    _check_args(topk_ids, counts, token_slots)
    ids = topk_ids.long()
    keep = (ids >= 0) & (ids < counts.shape[0])
    if token_slots is not None:
        keep &= (token_slots[:ids.shape[0]] >= 0)[:, None]
    counts.index_add_(0, ids.clamp(0, counts.shape[0] - 1).flatten(), keep.flatten().long())


@triton.jit
def _count_experts_kernel(ids_ptr, counts_ptr, slots_ptr, num_slots, num_experts,
                          TOP_K: tl.constexpr, HAS_SLOTS: tl.constexpr, BLOCK: tl.constexpr):
    # Grid: (1,).
    offs = tl.arange(0, BLOCK)
    for s0 in range(0, num_slots, BLOCK):
        s = s0 + offs
        ids = tl.load(ids_ptr + s, mask=s < num_slots, other=-1)
        keep = (ids >= 0) & (ids < num_experts)
        if HAS_SLOTS:
            keep &= tl.load(slots_ptr + s // TOP_K, mask=s < num_slots, other=-1) >= 0
        tl.atomic_add(counts_ptr + tl.where(keep, ids, 0), tl.full((BLOCK,), 1, tl.int64), mask=keep)


def count_experts_triton(topk_ids: torch.Tensor, counts: torch.Tensor, token_slots: torch.Tensor | None) -> None:
    _check_args(topk_ids, counts, token_slots)
    ids = topk_ids.contiguous()
    if ids.numel() == 0:
        return
    block = min(triton.next_power_of_2(ids.numel()), 1024)
    _count_experts_kernel[(1,)](ids, counts, token_slots if token_slots is not None else ids, ids.numel(),
                                counts.shape[0], TOP_K=ids.shape[1], HAS_SLOTS=token_slots is not None, BLOCK=block)


def _count_experts_fake(topk_ids, counts, token_slots):
    return None


count_experts = register_op("count_experts", launcher=count_experts_triton, reference=count_experts_ref,
                            fake=_count_experts_fake, mutates_args=("counts",))
