"""Test helper: capture a function's dynamo graph, run one pass on it, run the result."""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from trtllm.passes.context import AttentionLayers, GraphInputs, PassContext


class Captured:
    def __init__(self, fn, *args):
        self.graphs: list[tuple[fx.GraphModule, list]] = []

        def backend(gm, example_inputs):
            self.graphs.append((gm, list(example_inputs)))
            return gm.forward

        torch._dynamo.reset()
        with torch._dynamo.config.patch(specialize_float=True):
            torch.compile(fn, backend=backend, fullgraph=True)(*args)
        (dynamo_gm, self.example_inputs), = self.graphs
        self.gm = fx.GraphModule(dynamo_gm, copy.deepcopy(dynamo_gm.graph))
        self.inputs = GraphInputs(self.gm.graph, self.example_inputs)
        self.ctx = PassContext(inputs=self.inputs, attention=AttentionLayers())

    def apply(self, graph_pass) -> int:
        matches = graph_pass(self.gm.graph, self.ctx)
        self.gm.graph.lint()
        self.gm.recompile()
        return matches

    def count(self, target) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_function" and n.target is target)

    def run(self):
        with torch.no_grad():
            out = self.gm(*self.example_inputs, *self.inputs.constants)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
