"""What every rank of a tensor-parallel LLM does alike, rank 0 and the workers: load its
slices of the checkpoint and compile the model with its place in the group.

    model, slices = load_rank(spec, device)
    compiled = compile_rank(model, slices, spec, rank, group_name, workers=None)
    loaded_bytes(model, slices)   # the weights this rank holds: about 1/TP of the split ones
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from trtllm.compile import CompiledModel, compile as trtllm_compile
from trtllm.models.loader import load_model, read_json
from trtllm.parallel.checkpoint_slices import CheckpointSlices, is_split
from trtllm.parallel.expert_checkpoint import EXPERT_NAMES, load_moe_rank
from trtllm.parallel.expert_parallel import ExpertParallel
from trtllm.parallel.process_group import COLLECTIVE_TIMEOUT_S
from trtllm.parallel.tensor_parallel import TensorParallel, is_unloaded


@dataclass(frozen=True)
class RankSpec:
    """How every rank builds its model (picklable: it goes to the worker processes)."""
    path: str
    dtype: torch.dtype | None  # None: the checkpoint's
    world: int
    device_type: str  # "cpu" or "cuda" (rank r on cuda:r)
    block_size: int
    compile_options: dict = field(default_factory=dict)
    timeout_s: float = COLLECTIVE_TIMEOUT_S
    moe_expert_parallel_size: int = 1  # the MoE layers: experts over this many ranks, TP inside them over
    # world // it (parallel/expert_parallel.py; resolved from the user's sizes before any process starts)


def rank_device(spec: RankSpec, rank: int) -> torch.device:
    return torch.device("cuda", rank) if spec.device_type == "cuda" else torch.device("cpu")


def load_rank(spec: RankSpec, device: torch.device) -> tuple[nn.Module, CheckpointSlices]:
    """The model with its split weights left unloaded, and the reader of this rank's slices
    (for an HF MoE family, also of its experts: `slices.read_experts`)."""
    slices = CheckpointSlices(spec.path)
    if read_json(Path(spec.path) / "config.json").get("architectures", ["?"])[0] in EXPERT_NAMES:
        model, slices.read_experts = load_moe_rank(spec.path, spec.dtype, device, is_split, slices)
        return model, slices
    return load_model(spec.path, dtype=spec.dtype, device=device, leave_unloaded=is_split), slices


def compile_rank(model: nn.Module, slices: CheckpointSlices, spec: RankSpec, rank: int, group_name: str,
                 workers=None) -> CompiledModel:
    moe = ExpertParallel(spec.moe_expert_parallel_size, spec.world // spec.moe_expert_parallel_size)
    tp = TensorParallel(rank, spec.world, group_name, read_slice=slices, workers=workers, moe=moe,
                        read_experts=slices.read_experts)
    return trtllm_compile(model, **spec.compile_options, block_size=spec.block_size, tensor_parallel=tp)


def loaded_bytes(model: nn.Module, slices: CheckpointSlices) -> int:
    """Bytes of the weights this rank read: those it loaded whole, and its slices (read at the
    first call, when the pass runs)."""
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if not is_unloaded(p))
    return whole + slices.bytes_read
