"""What every rank of a parallel LLM does alike, rank 0 and the workers: load its stage's
weights (its tensor-parallel slices of them) and compile the model with its place in the groups.

    model, slices = load_rank(spec, rank, device)
    compiled = compile_rank(model, slices, spec, rank, groups, workers=None)
    loaded_bytes(model, slices)   # the weights this rank holds: about 1/(TP x PP) of the layers

Ranks are numbered as TensorRT-LLM's Mapping numbers them: rank = stage * tp_size + tp_rank.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from trtllm.compile import CompiledModel, compile as trtllm_compile
from trtllm.config import QuantAlgo
from trtllm.contract import adapter_module_path
from trtllm.lora_config import LoraConfig
from trtllm.lora_slots import LoraSlots
from trtllm.models.checkpoint_config import read_json
from trtllm.models.loader import ARCHITECTURES, load_model
from trtllm.multimodal_context import LANGUAGE_MODEL
from trtllm.parallel.checkpoint_slices import CheckpointSlices, is_split
from trtllm.parallel.checks import MULTIMODAL_ARCHITECTURES
from trtllm.parallel.expert_checkpoint import EXPERT_NAMES, load_moe_rank
from trtllm.parallel.expert_parallel import ExpertParallel
from trtllm.parallel.pipeline_parallel import PipelineStage, layer_of
from trtllm.parallel.process_group import COLLECTIVE_TIMEOUT_S, Groups
from trtllm.parallel.tensor_parallel import TensorParallel, head_range, is_unloaded
from trtllm.quantization.fp8_linears import quantize_model


@dataclass(frozen=True)
class RankLora:
    """Every rank's LoRA slots, as rank 0's (runtime/build_engine.py makes them from its LoraConfig)."""
    config: LoraConfig  # max_loras, max_lora_rank, max_cpu_loras (a worker's host cache of slot images)
    target_modules: tuple[str, ...]
    max_num_tokens: int

    def slots(self, model: nn.Module) -> LoraSlots:
        return LoraSlots(self.config.max_loras, self.config.max_lora_rank, self.target_modules,
                         self.max_num_tokens, next(model.parameters()).device, adapter_module_path(model))


@dataclass(frozen=True)
class RankSpec:
    """How every rank builds its model (picklable: it goes to the worker processes)."""
    path: str
    dtype: torch.dtype | None  # None: the checkpoint's
    world: int  # tp_size * pp_size
    device_type: str  # "cpu" or "cuda" (rank r on cuda:local_rank)
    block_size: int
    compile_options: dict = field(default_factory=dict)
    timeout_s: float = COLLECTIVE_TIMEOUT_S
    tp_size: int = 0  # 0: world (tensor parallelism alone)
    stages: tuple[tuple[int, int], ...] = ()  # (first layer, end layer) per pipeline stage; () = one stage
    tie_word_embeddings: bool = False  # the last stage then holds the embedding too (its LM head)
    moe_expert_parallel_size: int = 1  # the MoE layers: experts over this many ranks, TP inside them over
    # tp // it (parallel/expert_parallel.py; resolved from the user's sizes before any process starts)
    quant_algo: QuantAlgo | None = None  # QuantConfig's online FP8: a stage's whole weights quantized as
    # they load, the split ones' slices by the pass (quantization/fp8_slices.py)
    kv_cache_dtype: str = "auto"  # "fp8" / "int8": every rank's KV pool quantized, with kv_cache_scales
    kv_cache_scales: torch.Tensor | None = None  # [L, 2, Hkv] of the whole model (None: FP8's 1.0)
    lora: RankLora | None = None  # LoRA slots on every rank, alike (each holds its part of an adapter)
    max_num_tokens: int = 0  # rank 0's: a multimodal model's image-feature buffers on every first-stage rank

    @property
    def tp(self) -> int:
        return self.tp_size or self.world

    @property
    def pp(self) -> int:
        return max(len(self.stages), 1)

    def place(self, rank: int) -> tuple[int, int]:
        """(pipeline stage, tensor-parallel rank) of `rank`."""
        return divmod(rank, self.tp)


def rank_device(spec: RankSpec, rank: int, local_rank: int | None = None) -> torch.device:
    if spec.device_type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", rank if local_rank is None else local_rank)


def holds(spec: RankSpec, stage: int, name: str) -> bool:
    """Whether a rank of `stage` needs the checkpoint tensor `name`: its layers; the embedding on
    the first stage (and the last, when the LM head is tied to it); the rest (final norm, LM
    head) on the last."""
    if spec.pp == 1:
        return True
    layer = layer_of(name)
    if layer is not None:
        first, end = spec.stages[stage]
        return first <= layer < end
    if "embed" in name:
        return stage == 0 or (spec.tie_word_embeddings and stage == spec.pp - 1)
    return stage == spec.pp - 1


def rank_kv_scales(scales: torch.Tensor | None, spec: RankSpec, rank: int) -> torch.Tensor | None:
    """The whole model's KV cache scales [L, 2, Hkv] -> this rank's: its stage's layers, its
    tensor-parallel KV heads (the one it replicates, when there are fewer than ranks)."""
    if scales is None:
        return None
    stage, tp_rank = spec.place(rank)
    first, end = spec.stages[stage] if spec.pp > 1 else (0, scales.shape[0])
    head, count = head_range(scales.shape[2], spec.tp, tp_rank, kv=True)
    return scales[first:end, :, head:head + count].clone()


def load_rank(spec: RankSpec, rank: int, device: torch.device) -> tuple[nn.Module, CheckpointSlices]:
    """The model with what this rank does not read whole left unloaded (other stages' weights;
    its tensor-parallel split weights, whose slices the pass reads; a multimodal model's vision
    side on every rank but 0), and the reader of its slices."""
    stage, _ = spec.place(rank)
    arch = read_json(Path(spec.path) / "config.json").get("architectures", ["?"])[0]
    multimodal = arch in MULTIMODAL_ARCHITECTURES

    def unloaded(name: str) -> bool:
        if multimodal and not name.startswith(LANGUAGE_MODEL):  # the vision side: rank 0 encodes the images
            return rank != 0
        return not holds(spec, stage, name) or (spec.tp > 1 and is_split(name))

    slices = CheckpointSlices(spec.path, getattr(ARCHITECTURES.get(arch), "checkpoint_name", None))
    if arch in EXPERT_NAMES:
        # an HF MoE family: this stage's experts read whole (one tensor-parallel rank) or left to the
        # pass, which reads this rank's share through `read_experts`
        model, slices.read_experts = load_moe_rank(spec.path, spec.dtype, device, unloaded, slices,
                                                   split_experts=spec.tp > 1)
        if spec.quant_algo is not None:  # what it loaded whole; the passes quantize its slices and experts
            quantize_model(model, spec.quant_algo, leave=is_unloaded)
        return model, slices
    return load_model(spec.path, dtype=spec.dtype, device=device, leave_unloaded=unloaded,
                      quant_algo=spec.quant_algo), slices


def compile_rank(model: nn.Module, slices: CheckpointSlices, spec: RankSpec, rank: int, groups: Groups,
                 workers=None) -> CompiledModel:
    stage, tp_rank = spec.place(rank)
    moe = ExpertParallel(spec.moe_expert_parallel_size, spec.tp // spec.moe_expert_parallel_size)
    tp = TensorParallel(tp_rank, spec.tp, groups.tp_group_name, read_slice=slices, workers=workers, moe=moe,
                        read_experts=slices.read_experts, quant_algo=spec.quant_algo, read_whole=slices.whole)
    pipeline = None
    if spec.pp > 1:
        first, end = spec.stages[stage]
        text = getattr(model.config, "text", model.config)  # a multimodal model's language model
        pipeline = PipelineStage(stage, spec.pp, first, end, text.hidden_size,
                                 next(p.dtype for p in model.parameters() if p.is_floating_point()))
    lora = {"lora": spec.lora.slots(model)} if spec.lora is not None else {}
    return trtllm_compile(model, **spec.compile_options, block_size=spec.block_size, tensor_parallel=tp,
                          pipeline=pipeline, **lora)


def loaded_bytes(model: nn.Module, slices: CheckpointSlices) -> int:
    """Bytes of the weights this rank read: those it loaded whole, and its slices (read at the
    first call, when the pass runs)."""
    whole = sum(p.numel() * p.element_size() for p in model.parameters() if not is_unloaded(p))
    return whole + slices.bytes_read
