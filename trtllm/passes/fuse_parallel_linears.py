"""Horizontal fusion: linears that read the same input become one GEMM.

Before (Q/K/V projections; likewise gate/up):

    q = linear(x, Wq, bq)    # [.., Nq]
    k = linear(x, Wk, bk)    # [.., Nk]
    v = linear(x, Wv, bv)    # [.., Nv]
After:

    qkv = linear(x, W_qkv, b_qkv)          # W_qkv = cat([Wq, Wk, Wv]), made once
    q = narrow(qkv, -1, 0, Nq); k = narrow(qkv, -1, Nq, Nk); v = narrow(qkv, -1, Nq + Nk, Nv)

One launch and one read of x instead of three; at decode the three small GEMVs
become one larger one. The fused weight is a constant input of the graph. When the
weights already lie back to back in one storage (see `share_fused_storage`), it is a
view of them and costs no memory.
"""
from __future__ import annotations

import functools
from collections import defaultdict

import torch
import torch.fx as fx

from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, kind, value


def _adjacent_view(tensors: list[torch.Tensor]) -> torch.Tensor | None:
    """The single tensor the row-blocks `tensors` already are, if they sit back to back."""
    first = tensors[0]
    offset = first.storage_offset()
    for t in tensors:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or t.storage_offset() != offset):
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows,) + tuple(first.shape[1:]), first.stride(), first.storage_offset())


def _fused(tensors: list[torch.Tensor]) -> torch.Tensor:
    view = _adjacent_view(tensors)
    return view if view is not None else torch.cat([t.detach() for t in tensors])


def _constant_input(ctx: PassContext, name: str, parts: list[torch.Tensor]) -> fx.Node:
    node = ctx.inputs.made_constant(name, parts, lambda: _fused(parts), tag="fused")
    fused = ctx.inputs.tensor(node)
    if fused.data_ptr() != parts[0].data_ptr() and all(isinstance(p, torch.nn.Parameter) for p in parts):
        ctx.after_first_call.append(functools.partial(share_fused_storage, parts, fused))
    return node


def fuse_parallel_linears(graph: fx.Graph, ctx: PassContext) -> int:
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if kind(node) == "linear":
            groups[node.args[0]].append(node)
    matches = 0
    for x, linears in groups.items():
        weights = [ctx.inputs.tensor(arg(n, 1, "weight")) for n in linears]
        biases = [arg(n, 2, "bias") for n in linears]
        if len(linears) < 2 or any(w is None or w.dim() != 2 for w in weights):
            continue
        if len({(w.shape[1], w.dtype, w.device) for w in weights}) != 1:
            continue
        has_bias = [b is not None for b in biases]
        if any(has_bias) and not all(has_bias):
            continue
        bias_values = [ctx.inputs.tensor(b) for b in biases] if all(has_bias) else []
        if any(b is None for b in bias_values):
            continue
        stem = linears[0].name
        w_node = _constant_input(ctx, f"{stem}_fused_weight", weights)
        b_node = _constant_input(ctx, f"{stem}_fused_bias", bias_values) if bias_values else None
        with graph.inserting_before(linears[0]):
            fused = graph.call_function(torch._C._nn.linear, (x, w_node, b_node))
            fused.meta.update(linears[0].meta)
            xv, total = value(x), sum(w.shape[0] for w in weights)
            with xv.fake_mode:  # shape-only: a fake linear trips on symbolic sizes (torch 2.11)
                fused.meta["example_value"] = xv.new_empty(tuple(xv.shape[:-1]) + (total,))
            start = 0
            for node, w in zip(linears, weights):
                part = graph.call_function(torch.narrow, (fused, -1, start, w.shape[0]))
                part.meta.update(node.meta)
                node.replace_all_uses_with(part)
                start += w.shape[0]
        for node in linears:
            graph.erase_node(node)
        matches += 1
    return matches


def share_fused_storage(params: list[torch.nn.Parameter], fused: torch.Tensor) -> None:
    """Point `params` (the row blocks of `fused`, in order) at views of `fused`, so the
    model keeps one copy of those weights instead of two."""
    start = 0
    with torch.no_grad():
        for p in params:
            p.data = fused[start: start + p.shape[0]]
            start += p.shape[0]
