"""A residual add feeding an RMS norm becomes one `trtllm.fused_add_rms_norm`.

Before (after fuse_rms_norm; the sum is also the next residual):

    h = x + residual
    y = torch.ops.trtllm.rms_norm(h, weight, eps)
    ... h ...
After:

    y, h = torch.ops.trtllm.fused_add_rms_norm(x, residual, weight, eps)

The sum is written once and re-read by the norm in registers instead of from memory.
The fused op goes where the sum was, or after the norm's weight where that is computed
later; a use of the sum in between leaves the pair unfused. Gemma's norm (`unit_offset`)
fuses the same way.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import trtllm.kernels.rms_norm  # noqa: F401  (registers the ops)
from trtllm.passes.context import PassContext
from trtllm.passes.match import kind, value


def fuse_add_rms_norm(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    rms_norm = torch.ops.trtllm.rms_norm.default
    order = {n: i for i, n in enumerate(graph.nodes)}
    for norm in [n for n in graph.nodes if n.target is rms_norm]:
        add, weight, eps, *unit_offset = norm.args  # unit_offset: Gemma's norm
        if kind(add) != "add" or len(add.args) != 2 or add.kwargs:
            continue
        a, b = add.args
        av, bv, sv = value(a), value(b), value(add)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or av is None or bv is None \
                or not (av.shape == bv.shape == sv.shape and av.dtype == bv.dtype == sv.dtype):
            continue
        where = add
        if isinstance(weight, fx.Node) and order[weight] > order[add]:
            where = weight
            if any(order.get(u, 0) <= order[weight] for u in add.users if u is not norm):
                continue
        with graph.inserting_after(where):
            fused = graph.call_function(torch.ops.trtllm.fused_add_rms_norm.default, (a, b, weight, eps, *unit_offset))
        with graph.inserting_after(fused):
            total = graph.call_function(operator.getitem, (fused, 1))
            out = graph.call_function(operator.getitem, (total.args[0], 0))
        total.meta.update(add.meta)
        out.meta.update(norm.meta)
        norm.replace_all_uses_with(out)
        graph.erase_node(norm)
        add.replace_all_uses_with(total)
        graph.erase_node(add)
        matches += 1
    return matches
