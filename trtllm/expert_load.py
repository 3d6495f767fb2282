"""Expert load statistics: tokens routed to each expert of each MoE block, counted on the device.

Opt-in: `trtllm.compile(model, expert_load=ExpertLoad())` (an LLM:
`compile_options={"expert_load": ExpertLoad()}`; trtllm-bench's --expert_load). passes/fuse_moe.py then
adds, after each block's routing, the graph op `trtllm.count_expert_load(topk_ids, counts)`:
one small kernel a step per MoE block (kernels/count_experts.py), adding the step's routed
slots into that block's fixed-address counter `counts` [E] int64. Nothing is copied to the host
until `snapshot()` is called (one copy per block then), so a step never waits for the counts.
Without an ExpertLoad nothing is inserted and a step costs nothing more.

Counted: every (token, choice) slot of the tokens the step computed, prompt chunks and decoded
tokens alike, the padding tokens of a CUDA graph's batch left out (their cache slot is -1 in
the active attention context's metadata). With expert parallelism every rank computes the
whole routing (passes/shard_experts.py shifts only fused_moe's ids), so each rank counts every
expert; an LLM reads rank 0's counters. One ExpertLoad counts one model: a second model compiled
with it (a speculative draft model given the same compile options) is refused.

A block is keyed by its module path (or its top-k node's name), so the graphs compiled for one
model (ordinary calls, decode graphs, a recompile) add into one counter per block.
"""
from __future__ import annotations

import torch

from trtllm.attention_context import active_context, in_attention_context
from trtllm.kernels.count_experts import count_experts
from trtllm.kernels.registry import register_op


class ExpertLoad:
    def __init__(self):
        self.counters: dict[str, torch.Tensor] = {}  # block -> tokens per expert [E] int64, on the device
        self._model: int | None = None  # id() of the model it counts

    def bind(self, model) -> None:
        """Count `model`'s blocks (trtllm.compile calls this); a second model is refused."""
        if self._model is not None and self._model != id(model):
            raise ValueError("this ExpertLoad already counts another model's MoE blocks; give each model its own "
                             "(a speculative draft model shares the target's compile options: turn expert load "
                             "statistics off with a draft model)")
        self._model = id(model)

    def counter(self, block: str, num_experts: int, device: torch.device | str) -> torch.Tensor:
        """The block's counter (made at its first graph, the same tensor for every later one)."""
        counts = self.counters.setdefault(block, torch.zeros(num_experts, dtype=torch.int64, device=device))
        if counts.shape[0] != num_experts:
            raise ValueError(f"MoE block {block}: {num_experts} experts, but its counter has {counts.shape[0]}")
        return counts

    def snapshot(self) -> dict[str, list[int]]:
        """Tokens per expert of each block so far (the one host sync: after every step launched
        so far, e.g. one the overlap scheduler launched ahead, has run)."""
        if any(c.is_cuda for c in self.counters.values()):
            torch.cuda.synchronize()
        return {block: counts.tolist() for block, counts in self.counters.items()}

    def __getstate__(self):  # sent to parallel ranks before compilation: each counts its own
        return {"counters": {}, "_model": None}


def _count_expert_load(topk_ids: torch.Tensor, counts: torch.Tensor) -> None:
    """counts [E] += the slots of topk_ids [T, k] per expert, padding tokens left out."""
    slots = active_context().metadata.slot_mapping if in_attention_context() else None
    count_experts(topk_ids, counts, slots)


def _count_expert_load_fake(topk_ids, counts):
    return None


count_expert_load = register_op("count_expert_load", impl=_count_expert_load, fake=_count_expert_load_fake,
                                mutates_args=("counts",))
