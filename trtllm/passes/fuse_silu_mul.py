"""The gated MLP's activation becomes one `trtllm.silu_mul`.

Before:                                   After:

    a = F.silu(gate)                          h = torch.ops.trtllm.silu_mul(gate, up)
    h = a * up

One read of gate and up and one write of h, instead of an extra round trip for silu.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.kernels.silu_mul  # noqa: F401  (registers torch.ops.trtllm.silu_mul)
from trtllm.passes.context import PassContext
from trtllm.passes.match import eliminate_dead_code, kind, value


def fuse_silu_mul(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for mul in [n for n in graph.nodes if kind(n) == "mul"]:
        if len(mul.args) != 2 or mul.kwargs:
            continue
        silu = next((a for a in mul.args if kind(a) == "silu" and not a.kwargs.get("inplace")), None)
        if silu is None or len(silu.users) != 1:
            continue
        up = mul.args[1] if mul.args[0] is silu else mul.args[0]
        gate = silu.args[0]
        gv, uv = value(gate), value(up)
        if not isinstance(up, fx.Node) or gv is None or uv is None \
                or gv.shape != uv.shape or gv.dtype != uv.dtype:
            continue
        with graph.inserting_before(mul):
            new = graph.call_function(torch.ops.trtllm.silu_mul.default, (gate, up))
        new.meta.update(mul.meta)
        mul.replace_all_uses_with(new)
        matches += 1
    eliminate_dead_code(graph)
    return matches
