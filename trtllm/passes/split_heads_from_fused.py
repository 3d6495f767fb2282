"""A slice of a fused linear's output that the model splits into heads is taken from the
heads of the whole, with the same strides.

Before (fuse_parallel_linears' parts, viewed as heads by the model):

    q = narrow(qkv, -1, 0, Nq)           # [.., Nq], strides of qkv [.., Nq + Nk + Nv]
    q4 = view(q, B, S, Nq / D, D)        # [.., Nq / D, D]
After:

    heads = unflatten(qkv, -1, ((Nq + Nk + Nv) / D, D))
    q4 = narrow(heads, -2, 0, Nq / D)    # the same view of the same storage

Why: the shape code of a view of a non-contiguous slice asks whether the token count is 1
(the view's strides depend on it) and guards it; a dynamic token dim then does not serve
one token, and a batch-1 decode graph captures and compiles the model once more (issue 19,
startup: trtllm/compile.py). A narrow of a contiguous unflatten asks nothing. Runs after the
passes that read the plain parts (apply_lora adds each adapter to its slice).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from trtllm.passes.context import PassContext
from trtllm.passes.match import kind, value


def split_heads_from_fused(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for whole in list(graph.nodes):
        wv = value(whole)
        if not _contiguous_producer(whole) or not isinstance(wv, torch.Tensor) or not isinstance(wv.shape[-1], int):
            continue
        parts = [u for u in whole.users if u.target is torch.narrow and u.args[0] is whole and len(u.args) == 4
                 and u.args[1] == -1 and all(isinstance(a, int) for a in u.args[2:])]
        found = [(part, *_head_views(part)) for part in parts]
        found = [(part, views, d) for part, views, d in found if views]
        dims, width = {d for _, _, d in found}, wv.shape[-1]
        if len(dims) != 1 or None in dims:
            continue
        d = dims.pop()
        if width % d or any(part.args[2] % d or part.args[3] % d for part, _, _ in found):
            continue
        with graph.inserting_after(whole):
            heads = graph.call_function(torch.unflatten, (whole, -1, (width // d, d)))
        heads.meta.update(whole.meta)
        with wv.fake_mode:  # shape-only, as fuse_parallel_linears' fused linear
            heads.meta["example_value"] = wv.new_empty(tuple(wv.shape[:-1]) + (width // d, d))
        for part, views, _ in found:
            with graph.inserting_after(heads):
                narrow = graph.call_function(torch.narrow, (heads, -2, part.args[2] // d, part.args[3] // d))
            narrow.meta.update(views[0].meta)
            for view in views:
                view.replace_all_uses_with(narrow)
                graph.erase_node(view)
            if not part.users:
                graph.erase_node(part)
            matches += 1
    return matches


def _contiguous_producer(node: fx.Node) -> bool:
    """A linear's output (fused by fuse_parallel_linears) or one of our ops': a fresh tensor."""
    return kind(node) == "linear" or (node.op == "call_function" and str(node.target).startswith("trtllm."))


def _head_views(part: fx.Node) -> tuple[list[fx.Node], int | None]:
    """The part's users that view it as [.., width / D, D] over its own leading dims, and D."""
    pv = value(part)
    if not isinstance(pv, torch.Tensor) or not isinstance(pv.shape[-1], int):
        return [], None
    views, dims = [], set()
    for user in part.users:
        uv = value(user)
        if kind(user) not in ("view", "reshape") or user.args[0] is not part or not isinstance(uv, torch.Tensor):
            continue
        shape = tuple(uv.shape)
        if (len(shape) != pv.dim() + 1 or not all(isinstance(n, int) for n in shape[-2:])
                or shape[-2] * shape[-1] != pv.shape[-1]
                or not all(statically_known_true(a == b) for a, b in zip(shape[:-2], pv.shape[:-1]))):
            continue
        views.append(user)
        dims.add(shape[-1])
    return views, (dims.pop() if len(dims) == 1 else None)
