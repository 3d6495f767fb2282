"""What a pass may read besides the graph (the graph's input values, the model's attention
layers, its quantization description) and what it hands back besides the rewritten graph (constant inputs, the LM head
and the op that applies it, work to do after the first call). Passes are functions
`(graph, ctx) -> int` (matches made); CompiledModel acts on what they hand back without
knowing which pass handed it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F

from trtllm.expert_load import ExpertLoad
from trtllm.hidden_states import HiddenStash
from trtllm.lora_slots import LoraSlots
from trtllm.parallel.pipeline_parallel import PipelineStage
from trtllm.parallel.tensor_parallel import TensorParallel
from trtllm.passes.match import module_path
from trtllm.quantization.fp8_linears import Fp8Linears


class GraphInputs:
    """The graph's placeholders with the values dynamo traced them with, plus the
    constant inputs passes add (e.g. a fused weight made once at compile time)."""

    def __init__(self, graph: fx.Graph, example_inputs: list, made: dict | None = None):
        self.graph = graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._values = dict(zip(placeholders, example_inputs))
        self.constants: list[torch.Tensor] = []
        self._made = {} if made is None else made  # made_constant's tensors, kept by the caller across graphs

    def tensor(self, node) -> torch.Tensor | None:
        """The real tensor a placeholder was traced with (None for other nodes)."""
        v = self._values.get(node) if isinstance(node, fx.Node) else None
        return v if isinstance(v, torch.Tensor) else None

    def add_constant(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A new placeholder after the existing ones, fed `tensor` at every call."""
        last = [n for n in self.graph.nodes if n.op == "placeholder"][-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(name)
        node.meta["example_value"] = tensor
        node._dynamo_source = None  # not a user input: aot_autograd must not look for one
        self._values[node] = tensor
        self.constants.append(tensor)
        return node

    def made_constant(self, name: str, sources: list[torch.Tensor], make: Callable[[], torch.Tensor],
                      tag: str = "") -> fx.Node:
        """add_constant of `make()`, a tensor made from `sources` (e.g. a fused copy of
        weights), made once: every graph compiled for one model (CompiledModel's variants,
        captured once) gets the same tensor, so the model holds one copy, not one per graph."""
        key = (tag, *map(id, sources))
        if key not in self._made:  # the sources are kept too: their ids stay theirs
            self._made[key] = (list(sources), make())
        return self.add_constant(name, self._made[key][1])


@dataclass
class AttentionLayers:
    """Numbers attention layers 0..L-1 in the order they are first met, keyed by the
    module that calls SDPA, so a recompile (new shapes) gives each layer its index again."""

    windows: list[int] = field(default_factory=list)  # sliding window per layer, 0 = none
    softcaps: list[float] = field(default_factory=list)  # logit soft-capping per layer, 0.0 = none
    latent: bool = False  # multi-head latent attention (AttentionSpec.latent): place_mla_attention pages it
    alibi_slopes: tuple[float, ...] = ()  # ALiBi's slope per query head (AttentionSpec.alibi_slopes), () = none
    _index: dict[str, int] = field(default_factory=dict)

    def index(self, node: fx.Node, position_in_graph: int) -> int:
        key = module_path(node) or f"#{position_in_graph}"
        return self._index.setdefault(key, len(self._index))

    def window(self, layer: int) -> int:
        return self.windows[layer] if layer < len(self.windows) else 0

    def softcap(self, layer: int) -> float:
        return self.softcaps[layer] if layer < len(self.softcaps) else 0.0

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class LMHead:
    """The LM head a pass took out of the graph (split_lm_head): CompiledModel applies it
    after the graph, to the rows it is asked for, with `linear`, which a later pass may
    replace by its own op of F.linear's signature (use_gemv_linear: trtllm.linear)."""
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    linear: Callable = F.linear
    softcap: float = 0.0  # final logit soft-capping (Gemma-2/3): logits = cap * tanh(logits / cap); 0 = none
    name: str = ""  # the head's module path (its weights' checkpoint names: `{name}.weight`)
    # after the linear: vocabulary-parallel ranks' all-gather of their logit slices
    # (passes/shard_vocab_parallel.py); None: the weight is the whole vocabulary
    gather: Callable | None = None

    @property
    def op_name(self) -> str:
        if self.linear is F.linear:
            return "F.linear"
        return str(self.linear) if isinstance(self.linear, torch._ops.OpOverloadPacket) else self.linear.__qualname__

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V]; `linear` for hidden of the weight's dtype."""
        op = self.linear if hidden.dtype == self.weight.dtype else F.linear
        logits = op(hidden, self.weight, self.bias)
        if self.gather is not None:
            logits = self.gather(logits)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class PassContext:
    inputs: GraphInputs
    attention: AttentionLayers
    lm_head: LMHead | None = None
    tensor_parallel: TensorParallel | None = None  # this rank, when compiled tensor-parallel
    pipeline: PipelineStage | None = None  # this rank's stage, when compiled pipeline-parallel
    # the model's FP8 linears (quantize_linears places them), None for an unquantized model
    quantization: Fp8Linears | None = None
    # the LoRA adapters' slots (apply_lora wraps the targeted linears), None without LoRA
    lora: LoraSlots | None = None
    # the MoE blocks' expert counters (fuse_moe counts each block's routed tokens), None: not counted
    expert_load: ExpertLoad | None = None
    # the hidden states to keep a row per KV slot (EAGLE-3's target and draft), None: none
    hidden_stash: HiddenStash | None = None
    # run once the call that compiled the graph has returned (e.g. fuse_parallel_linears
    # makes the model's weights views of the fused copy, so it holds one copy, not two)
    after_first_call: list[Callable[[], None]] = field(default_factory=list)
    # what a pass found but left as captured, and why (e.g. an MoE block fuse_moe could not
    # prove equal to its ops): CompiledModel.summary() lists them
    notes: list[str] = field(default_factory=list)
