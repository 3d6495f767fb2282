"""One stage of a pipeline-parallel model, as `trtllm.compile(model, pipeline=...)` takes it, the
layer partition the stages follow, and the graph op through which a stage reads the hidden
states the stage before it sent.

    parts = partition_layers(costs, stages=2, first_extra=embedding, last_extra=head)  # [(0, 3), (3, 4)]
    stage = PipelineStage(stage=1, num_stages=2, first_layer=3, end_layer=4, hidden_size=64, dtype=fp32)
    with stage_input(hidden):                      # [B, S, hidden] from stage 0
        logits = compiled(input_ids, positions)    # the graph reads `hidden` where layer 3 starts

Stages are contiguous runs of decoder layers. By default they are balanced by parameter count
(the embedding counts on the first stage, the final norm and LM head on the last: what each
stage holds in memory); `pp_partition=[n0, n1, ...]` (TensorRT-LLM's name: layers per stage)
overrides it. The cut itself is a compile pass (passes/split_pipeline_stage.py); the runtime
sends each stage's output to the next (parallel/workers.py, parallel/worker.py).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass

import torch

from trtllm.kernels.registry import register_op

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


def layer_of(name: str) -> int | None:
    """The decoder layer a module path or tensor name belongs to (`model.layers.3.mlp` -> 3), or None."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class PipelineStage:
    """This rank's stage: decoder layers first_layer..end_layer-1, reading the previous stage's
    hidden states [B, S, hidden_size] of `dtype` (none on the first stage) and handing its own
    to the next (the logits on the last stage)."""
    stage: int
    num_stages: int
    first_layer: int
    end_layer: int
    hidden_size: int
    dtype: torch.dtype

    def __post_init__(self):
        if not 0 <= self.stage < self.num_stages:
            raise ValueError(f"pipeline stage {self.stage} is outside 0..{self.num_stages - 1}")
        if not 0 <= self.first_layer < self.end_layer:
            raise ValueError(f"pipeline stage {self.stage}: empty layer range {self.first_layer}..{self.end_layer}")

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1


def check_pipeline_sizes(size, num_layers: int, partition=None) -> None:
    """Refuse, with the numbers, a pipeline that cannot split `num_layers` layers."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"pipeline_parallel_size must be a positive integer, got {size!r}")
    if size > num_layers:
        raise ValueError(f"pipeline_parallel_size={size} is more stages than the model's num_hidden_layers="
                         f"{num_layers} (each stage holds at least one layer)")
    if partition is None:
        return
    partition = list(partition)
    if len(partition) != size:
        raise ValueError(f"pp_partition={partition} has {len(partition)} entries for pipeline_parallel_size={size}")
    if any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in partition):
        raise ValueError(f"pp_partition={partition}: each stage needs a positive whole number of layers")
    if sum(partition) != num_layers:
        raise ValueError(f"pp_partition={partition} sums to {sum(partition)} layers; the model has "
                         f"num_hidden_layers={num_layers}")


def partition_layers(costs: list[int], stages: int, first_extra: int = 0, last_extra: int = 0,
                     partition=None) -> list[tuple[int, int]]:
    """(first layer, end layer) per stage: `partition` (layers per stage) if given, else the
    contiguous split of the layers' `costs` (parameter counts) whose largest stage, counting
    `first_extra` on the first and `last_extra` on the last, is smallest."""
    n = len(costs)
    check_pipeline_sizes(stages, n, partition)
    if partition is None:
        partition = _balanced(costs, stages, first_extra, last_extra)
    bounds, start = [], 0
    for count in partition:
        bounds.append((start, start + count))
        start += count
    return bounds


def _balanced(costs: list[int], stages: int, first_extra: int, last_extra: int) -> list[int]:
    """Layers per stage minimizing the largest stage's cost (dynamic programming, O(P L^2))."""
    n = len(costs)
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(stage: int, a: int, b: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == stages - 1 else 0)
        return prefix[b] - prefix[a] + extra

    inf = float("inf")
    # best[s][i]: the smallest largest-stage cost of layers 0..i-1 in stages 0..s-1; cut[s][i] its last cut
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0
    for s in range(1, stages + 1):
        for i in range(s, n - (stages - s) + 1):
            for j in range(s - 1, i):
                c = max(best[s - 1][j], cost(s - 1, j, i))
                if c < best[s][i]:
                    best[s][i], cut[s][i] = c, j
    counts, i = [], n
    for s in range(stages, 0, -1):
        j = cut[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]


# -- the stage's input: the hidden states the previous stage sent ---------------------------
_active_input: torch.Tensor | None = None


@contextlib.contextmanager
def stage_input(hidden: torch.Tensor):
    """Make `hidden` (the previous stage's output, [B, S, H] or [B * S, H]) what the graph's
    `trtllm.stage_input` op returns during the calls inside."""
    global _active_input
    previous, _active_input = _active_input, hidden
    try:
        yield
    finally:
        _active_input = previous


def _stage_input(input_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The hidden states [B, S, hidden_size] this stage received for the call's input_ids [B, S]."""
    if _active_input is None:
        raise RuntimeError("a pipeline stage after the first ran without its input: call it inside "
                           "trtllm.parallel.pipeline_parallel.stage_input(hidden)")
    shape = (*input_ids.shape, hidden_size)
    if _active_input.numel() != input_ids.numel() * hidden_size or _active_input.dtype != dtype:
        raise RuntimeError(f"pipeline stage input {tuple(_active_input.shape)} {_active_input.dtype}: expected "
                           f"{shape} {dtype}")
    return _active_input.reshape(shape).clone()  # an op's output must not alias what it does not own


def _stage_input_fake(input_ids: torch.Tensor, hidden_size: int, dtype: torch.dtype) -> torch.Tensor:
    return input_ids.new_empty((*input_ids.shape, hidden_size), dtype=dtype)


stage_input_op = register_op("stage_input", impl=_stage_input, fake=_stage_input_fake)
