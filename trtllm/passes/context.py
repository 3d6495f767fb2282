"""What a pass may need besides the graph: the graph's input values and the model's
attention layers. Passes are functions `(graph, ctx) -> int` (matches made)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from trtllm.passes.match import module_path


class CompileError(RuntimeError):
    """A construct trtllm.compile refuses: the message names the node and module."""


class GraphInputs:
    """The graph's placeholders with the values dynamo traced them with, plus the
    constant inputs passes add (e.g. a fused weight made once at compile time)."""

    def __init__(self, graph: fx.Graph, example_inputs: list):
        self.graph = graph
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        self._values = dict(zip(placeholders, example_inputs))
        self.constants: list[torch.Tensor] = []
        # (params, fused tensor) pairs whose params should become views of the fused one
        self.fused_params: list[tuple[list[torch.Tensor], torch.Tensor]] = []

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


@dataclass
class AttentionLayers:
    """Numbers attention layers 0..L-1 in the order they are first met, keyed by the
    module that calls SDPA, so a recompile (new shapes) gives each layer its index again."""

    windows: list[int] = field(default_factory=list)  # sliding window per layer, 0 = none
    _index: dict[str, int] = field(default_factory=dict)

    def index(self, node: fx.Node, position_in_graph: int) -> int:
        key = module_path(node) or f"#{position_in_graph}"
        return self._index.setdefault(key, len(self._index))

    def window(self, layer: int) -> int:
        return self.windows[layer] if layer < len(self.windows) else 0

    def __len__(self) -> int:
        return len(self._index)


@dataclass
class PassContext:
    inputs: GraphInputs
    attention: AttentionLayers
    # (weight, bias) of the LM head when split_lm_head took it out of the graph
    lm_head: tuple[torch.Tensor, torch.Tensor | None] | None = None
