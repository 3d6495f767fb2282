"""A per-head RMS norm right before rope (QK-norm: Gemma-3, Qwen3) joins it in one `trtllm.rms_norm_rotary`.

Before (after fuse_rms_norm and fuse_rotary; q and k alike):

    qn = torch.ops.trtllm.rms_norm(q, w, eps[, unit_offset])      # q [B, S, H, D], w [D]
    qt = qn.transpose(1, 2)                                         # [B, H, S, D]
    y = torch.ops.trtllm.rotary(qt, cos, sin, interleaved)
After:

    y = torch.ops.trtllm.rms_norm_rotary(q.transpose(1, 2), w, eps, unit_offset, cos, sin, interleaved)

The ops between the norm and the rope (HF Qwen3 and our model files: one transpose; HF
Gemma-3 norms after its transpose: none) are transposes, views and reshapes that keep the
last dim; they are made again on the norm's input. Two launches and the normed tensor in
memory become one launch. A norm whose output is read elsewhere too, or one not over the
head dim, stays as it is.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.kernels.rotary  # noqa: F401  (registers torch.ops.trtllm.rms_norm_rotary)
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, eliminate_dead_code, kind, value

_VIEWS = ("transpose", "view", "reshape", "contiguous")


def _keeps_last_dim(node: fx.Node) -> bool:
    src, out = value(node.args[0]), value(node)
    if src is None or out is None or str(src.shape[-1]) != str(out.shape[-1]):
        return False
    if kind(node) == "transpose":
        dims = node.args[1:3]
        return len(dims) == 2 and all(isinstance(d, int) and d % src.dim() != src.dim() - 1 for d in dims)
    return True


def _norm_and_views(x: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(the rms_norm node, the view nodes from it to x, in order) when x is views of an
    rms_norm each read only by the next, else None."""
    views = []
    while kind(x) in _VIEWS and len(x.users) == 1 and _keeps_last_dim(x):
        views.append(x)
        x = x.args[0]
    if not (isinstance(x, fx.Node) and x.target is torch.ops.trtllm.rms_norm.default and len(x.users) == 1):
        return None
    return x, views[::-1]


def _remake(graph: fx.Graph, view: fx.Node, src: fx.Node) -> fx.Node:
    """`view` applied to src; a view as a reshape (src, unlike the norm's output, may not be contiguous)."""
    method = "reshape" if view.target == "view" else view.target
    new = graph.call_method(method, (src, *view.args[1:]), dict(view.kwargs))
    new.meta.update(view.meta)
    args = [value(a) if isinstance(a, fx.Node) else a for a in view.args[1:]]
    new.meta["example_value"] = getattr(value(src), method)(*args, **view.kwargs)
    return new


def fuse_rms_norm_rotary(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for rope in [n for n in graph.nodes if n.target is torch.ops.trtllm.rotary.default]:
        found = _norm_and_views(rope.args[0])
        if found is None:
            continue
        norm, views = found
        src, weight, eps = norm.args[:3]
        wv, xv, sv = value(weight), value(rope.args[0]), value(src)
        if wv is None or xv is None or sv is None or wv.dim() != 1 or str(wv.shape[0]) != str(xv.shape[-1]) \
                or sv.stride(-1) != 1:
            continue
        with graph.inserting_before(rope):
            x = src
            for view in views:
                x = x if view.target == "contiguous" else _remake(graph, view, x)  # the op takes any strides
            args = (x, weight, eps, arg(norm, 3, "unit_offset", False), arg(rope, 1, "cos"), arg(rope, 2, "sin"),
                    arg(rope, 3, "interleaved", False))
            new = graph.call_function(torch.ops.trtllm.rms_norm_rotary.default, args)
        new.meta.update(rope.meta)
        rope.replace_all_uses_with(new)
        matches += 1
    eliminate_dead_code(graph)
    return matches
