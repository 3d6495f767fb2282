"""An HF mixture-of-experts model (no model file of ours: transformers' module, models/hf.py) for
one rank of a tensor- and/or pipeline-parallel group: built on the meta device, its whole tensors
streamed in from the safetensors files, the others left as stand-ins that hold no memory: those
`leave_unloaded` names (other pipeline stages' tensors; the split ones: attention and dense-MLP
projections, vocabulary) and, when `split_experts`, this stage's experts; the passes read this
rank's slices later. Without `split_experts` (one tensor-parallel rank: a pipeline alone) this
stage's experts are read whole.

    model, read_experts = load_moe_rank(path, dtype, device, leave_unloaded, slices, split_experts)
    read_experts(w13, "w13", first, count, start, length)   # [count, 2*length, H] from the files

Transformers 5 holds a layer's experts fused (`experts.gate_up_proj` [E, 2I, H], gate rows then up
rows, and `experts.down_proj` [E, H, I]) while the checkpoints hold one tensor per expert and
projection (transformers converts on load); `EXPERT_NAMES` says, per architecture, which
checkpoint tensors make them. A rank reads only its experts' tensors, and of each only its
intermediate rows (gate, up) or columns (down).
"""
from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from safetensors import safe_open

from trtllm.models.checkpoint_tensors import check_finite
from trtllm.parallel.checkpoint_slices import CheckpointSlices
from trtllm.parallel.tensor_parallel import unloaded, unloaded_experts


@dataclass(frozen=True)
class ExpertNames:
    """Checkpoint names of expert e's tensors: `{experts}.{e}.{gate|up|down}.weight`, with
    `{experts}` the module path of the fused experts with `renamed` undone."""
    gate: str
    up: str
    down: str
    renamed: tuple[str, str] | None = None  # (in the module, in the checkpoint), e.g. Mixtral's block_sparse_moe

    def checkpoint_name(self, name: str) -> str:
        return name.replace(*self.renamed) if self.renamed is not None else name


# Architectures whose experts split across ranks (tests/parallel: Qwen3-MoE and Mixtral on 2 and 4
# ranks, Qwen2-MoE with its shared expert, split as a dense MLP, on 2).
EXPERT_NAMES: dict[str, ExpertNames] = {
    "MixtralForCausalLM": ExpertNames("w1", "w3", "w2", renamed=(".mlp.", ".block_sparse_moe.")),
    "Qwen3MoeForCausalLM": ExpertNames("gate_proj", "up_proj", "down_proj"),
    "Qwen2MoeForCausalLM": ExpertNames("gate_proj", "up_proj", "down_proj"),
}
_FUSED_EXPERTS = {"gate_up_proj": "w13", "down_proj": "w2"}


def is_fused_experts(name: str) -> bool:
    module, _, leaf = name.rpartition(".")
    return module.rpartition(".")[2] == "experts" and leaf in _FUSED_EXPERTS


def meta_moe_model(path: str | os.PathLike, dtype: torch.dtype | None = None) -> nn.Module:
    """The HF MoE model of checkpoint `path`, built on the meta device (no memory, no weights), in
    `dtype` (None: the config's, else fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM  # slow to import: only when used

    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    arch = (config.architectures or ["?"])[0]
    if arch not in EXPERT_NAMES:
        raise ValueError(f"{arch} is not supported under tensor, pipeline or expert parallelism yet "
                         f"(MoE families: {', '.join(EXPERT_NAMES)})")
    dtype = dtype or getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device("meta"):
        return model_cls._from_config(config, dtype=dtype, attn_implementation="eager")


def load_moe_rank(path: str | os.PathLike, dtype: torch.dtype | None, device: torch.device,
                  leave_unloaded: Callable[[str], bool], slices: CheckpointSlices, split_experts: bool = True):
    """(the HF model, its expert reader) for a rank; every tensor `leave_unloaded` does not name read
    whole, this stage's fused experts too unless `split_experts` (passes/shard_experts.py reads them)."""
    model = meta_moe_model(path, dtype)
    config = model.config
    arch = config.architectures[0]
    names = EXPERT_NAMES[arch]
    dtype = next(model.parameters()).dtype
    experts: dict[int, tuple[str, str]] = {}  # id(fused expert Parameter) -> (its checkpoint prefix, w13 | w2)
    whole: dict[str, list[tuple[str, str]]] = defaultdict(list)  # file -> (parameter, checkpoint name)
    whole_experts: list[tuple[str, str, str]] = []  # (parameter, checkpoint prefix, w13 | w2) read whole
    for name, param in list(model.named_parameters()):
        if is_fused_experts(name):
            module, _, leaf = name.rpartition(".")
            if not leave_unloaded(name) and not split_experts:
                whole_experts.append((name, names.checkpoint_name(module), _FUSED_EXPERTS[leaf]))
                continue
            _assign(model, name, unloaded_experts(param.shape, dtype, device))
            if not leave_unloaded(name):  # this stage's: the pass reads this rank's share
                experts[id(model.get_parameter(name))] = (names.checkpoint_name(module), _FUSED_EXPERTS[leaf])
            continue
        if leave_unloaded(name):
            _assign(model, name, unloaded(param.shape, dtype, device))
            continue
        source = names.checkpoint_name(name)
        if source not in slices.files:
            raise ValueError(f"{path}: the checkpoint has no tensor {source!r} (for {arch}'s {name})")
        whole[slices.files[source]].append((name, source))
    for file, tensors in whole.items():
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name, source in tensors:
                t = f.get_tensor(source)
                param = model.get_parameter(name)
                if t.shape != param.shape:
                    raise ValueError(f"{source}: the checkpoint holds shape {list(t.shape)}, {arch} expects "
                                     f"{list(param.shape)}")
                if param.is_floating_point() and not t.is_floating_point():
                    raise ValueError(f"{file.name}: tensor {source!r} is {t.dtype}, but it is a weight: weights are "
                                     "floating point")
                t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                check_finite(t, source, file.name)
                _assign(model, name, t)
    for name, prefix, which in whole_experts:
        _assign(model, name, _read_whole_experts(slices, names, prefix, which, model.get_parameter(name).shape,
                                                 dtype, device))
    _rebuild_buffers(model, device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.eval().requires_grad_(False)
    return model, ExpertReader(slices, names, experts)


class ExpertReader:
    """`TensorParallel.read_experts`: a rank's experts of a fused expert weight, from the files."""

    def __init__(self, slices: CheckpointSlices, names: ExpertNames, experts: dict[int, tuple[str, str]]):
        self.slices, self.names, self.experts = slices, names, experts

    def __call__(self, full: torch.Tensor, which: str, first: int, count: int, start: int,
                 length: int) -> torch.Tensor:
        if id(full) not in self.experts:
            raise KeyError("an expert weight this rank's loader did not leave unloaded")
        prefix, kind = self.experts[id(full)]
        assert kind == which, (kind, which)
        hidden, inter = (full.shape[2], full.shape[1] // 2) if which == "w13" else full.shape[1:]
        per_expert = []
        for e in range(first, first + count):
            if which == "w13":  # gate rows then up rows, each [start, start + length)
                rows = unloaded((inter, hidden), full.dtype, full.device)
                per_expert.append(torch.cat([self.slices(f"{prefix}.{e}.{p}.weight", rows, 0, start, length)
                                             for p in (self.names.gate, self.names.up)]))
            else:  # down's columns [start, start + length)
                columns = unloaded((hidden, inter), full.dtype, full.device)
                per_expert.append(self.slices(f"{prefix}.{e}.{self.names.down}.weight", columns, 1, start, length))
        return torch.stack(per_expert)


def _read_whole_experts(slices: CheckpointSlices, names: ExpertNames, prefix: str, which: str, shape,
                        dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A fused expert weight [E, 2I, H] (w13: gate rows then up rows) or [E, H, I] (w2), whole,
    from the per-expert checkpoint tensors (what transformers' loader does; not counted in
    `slices.bytes_read`: the parameter itself is)."""
    parts = (names.gate, names.up) if which == "w13" else (names.down,)
    per_expert = []
    for e in range(shape[0]):
        tensors = []
        for p in parts:
            source = f"{prefix}.{e}.{p}.weight"
            if source not in slices.files:
                raise ValueError(f"{slices.path}: the checkpoint has no tensor {source!r}")
            with safe_open(str(slices.files[source]), framework="pt", device="cpu") as f:
                tensor = f.get_tensor(source)
            if not tensor.is_floating_point():  # as CheckpointSlices refuses it (cast, it would be served)
                raise ValueError(f"{slices.files[source].name}: tensor {source!r} is {tensor.dtype}, but it is a "
                                 "weight: weights are floating point")
            tensors.append(tensor)
        per_expert.append(torch.cat(tensors))
    fused = torch.stack(per_expert)
    if fused.shape != shape:
        raise ValueError(f"{prefix}: its experts' checkpoint tensors make shape {list(fused.shape)}, the model "
                         f"expects {list(shape)}")
    fused = fused.to(device=device, dtype=dtype)
    check_finite(fused, f"{prefix}.*.{'/'.join(parts)}.weight", str(slices.path))
    return fused


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    model.get_submodule(module_name)._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def _rebuild_buffers(model: nn.Module, device: torch.device) -> None:
    """The buffers a meta build left without values: the rotary embedding's, computed from the
    config (a fresh module of its class on `device`); any other is refused by name."""
    for module_name, module in list(model.named_modules()):
        meta = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.is_meta]
        if not meta:
            continue
        if not type(module).__name__.endswith("RotaryEmbedding"):
            raise ValueError(f"{module_name} ({type(module).__name__}): buffers {meta} are computed when the model "
                             "is built, and only rotary embeddings' are rebuilt for a rank")
        with torch.device(device):
            fresh = type(module)(config=model.config)
        for n in meta:
            module._buffers[n] = fresh._buffers[n]
        for attr, v in vars(fresh).items():  # e.g. attention_scaling
            if not attr.startswith("_") and not isinstance(v, (nn.Module, torch.Tensor)):
                setattr(module, attr, v)


def check_moe_config(config: dict, moe) -> None:
    """Refuse, naming the numbers, what an HF MoE checkpoint's config.json cannot split by:
    heads, KV heads and the dense MLP's width among the tensor-parallel ranks, experts and their
    width among the MoE split (`moe`: an ExpertParallel), the vocabulary."""
    from trtllm.parallel.expert_parallel import check_moe_sizes, check_vocab
    from trtllm.parallel.tensor_parallel import check_sizes

    world = moe.moe_ep * moe.moe_tp
    num_experts = config.get("num_local_experts", config.get("num_experts"))
    expert_width = config.get("moe_intermediate_size", config.get("intermediate_size"))
    dense = config.get("intermediate_size") if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) > 1 \
        else None
    check_sizes(world, num_attention_heads=config["num_attention_heads"],
                num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
                intermediate_size=dense)
    check_moe_sizes(moe, num_experts=num_experts, moe_intermediate_size=expert_width)
    shared = config.get("shared_expert_intermediate_size")  # Qwen2-MoE's shared expert: a dense MLP
    if shared is not None and shared % world:
        raise ValueError(f"shared_expert_intermediate_size={shared} does not divide among tensor_parallel_size={world}")
    check_vocab(config["vocab_size"], world)
