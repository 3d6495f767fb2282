"""Stash the hidden states leaving chosen decoder layers, a row per KV slot, for an EAGLE-3
draft (trtllm/hidden_states.py). Runs only when compiled with `hidden_stash=HiddenStash(...)`;
else no match.

Before (a target, layers (1, 2, 4) asked, EAGLE-3's fc as `combine`):

    x2 = layer1(layer0(x0, cos, sin), cos, sin)       # [B, S, H]
    x3 = layer2(x2, cos, sin); x5 = layer4(layer3(x3, cos, sin), cos, sin)
    return lm_head(norm(layer5(x5, cos, sin)))
After:

    g = F.linear(cat([x2, x3, x5], -1), fc)           # [B, S, W]: fc a constant input [W, 3H]
    trtllm.stash_hidden(g, done)                      # rows of g to the active store, by KV slot
    ... the graph as before
and with one layer and no `combine` (the draft's own output: EAGLE-3's layer returns the
state before the final norm) `trtllm.stash_hidden(x1, done)`.

The states leaving layer i are the one [B, S, H] tensor that nodes of layer i (module paths
`...layers.<i>...`) make and nodes outside it read; anything else is a CompileError naming
the candidates. Runs right after attention is paged, while every node still has its module
path. Under tensor parallelism it runs before shard_tensor_parallel, on the whole graph: the
states leaving a layer are the residual stream, whole on every rank after the row-parallel
all-reduce, so rank 0 (whose engine runs the head) stashes them as one rank does. Refused under
pipeline parallelism (no stage holds every layer's states).
"""
from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from trtllm.contract import CompileError
from trtllm.hidden_states import stash_hidden  # noqa: F401  registers torch.ops.trtllm.stash_hidden
from trtllm.parallel.pipeline_parallel import layer_of
from trtllm.passes.context import PassContext
from trtllm.passes.match import describe, module_path, value


def stash_hidden_states(graph: fx.Graph, ctx: PassContext) -> int:
    stash = ctx.hidden_stash
    if stash is None:
        return 0
    if ctx.pipeline is not None:
        raise CompileError("stashing hidden states (EAGLE-3) under pipeline parallelism is not supported")
    layers = {n: layer_of(module_path(n)) for n in graph.nodes if n.op in ("call_function", "call_method")}
    leaving = [_leaving(layers, i, stash.hidden_size) for i in stash.layers]
    device = value(leaving[0]).device
    weight = ctx.inputs.add_constant("hidden_stash_combine", stash.combine) if stash.combine is not None else None
    done = ctx.inputs.add_constant("hidden_stash_done", torch.zeros(1, device=device))
    order = {n: i for i, n in enumerate(graph.nodes)}
    x = max(leaving, key=order.__getitem__)  # the new nodes go after the last of them
    if len(leaving) > 1:
        x = _node(graph, x, torch.cat, (leaving, -1), stash.hidden_size * len(leaving))
    if weight is not None:
        x = _node(graph, x, F.linear, (x, weight), stash.width)
    with graph.inserting_after(x):
        node = graph.call_function(torch.ops.trtllm.stash_hidden.default, (x, done))
    node.meta["example_value"] = None
    return 1


def _node(graph: fx.Graph, after: fx.Node, target, args, width: int) -> fx.Node:
    """target(*args) right after `after`; its example value [B, S, width] like `after`'s (made
    by new_empty: computed on fake tensors, a constant's dims would turn symbolic)."""
    with graph.inserting_after(after):
        node = graph.call_function(target, args)
    v = value(after)
    node.meta["example_value"] = v.new_empty((*v.shape[:-1], width))
    return node


def _leaving(layers: dict, layer: int, hidden_size: int) -> fx.Node:
    """The hidden states [B, S, H] that decoder layer `layer` hands on (module docstring)."""
    inside = [n for n, i in layers.items() if i == layer]
    if not inside:
        raise CompileError(f"stash_hidden_states: no node of the graph sits in a module path `...layers.{layer}...`"
                           " (a model whose decoder layers are not numbered so, or fewer layers)")
    found = []
    for node in inside:
        v = value(node)
        if isinstance(v, torch.Tensor) and v.dim() == 3 and v.is_floating_point() and v.shape[-1] == hidden_size \
                and any(layers.get(u) != layer for u in node.users):
            found.append(node)
    if len(found) != 1:
        raise CompileError(f"stash_hidden_states: expected one [B, S, {hidden_size}] hidden state leaving layer {layer},"
                           f" found {len(found)}: {', '.join(map(describe, found)) or 'none'}")
    return found[0]
