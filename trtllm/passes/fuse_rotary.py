"""HF-style rotary embedding becomes one `trtllm.rotary`.

Before (neox layout, cos/sin [B, S, D] unsqueezed over heads):

    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = torch.cat((-x[..., D/2:], x[..., :D/2]), dim=-1)
    y = x * c + rot * s                       # x [B, H, S, D]
After:

    y = torch.ops.trtllm.rotary(x, cos, sin, False)

Six launches and two temporaries become one read and one write of x. A rotate-half
whose cos/sin are not laid out as above is left unfused with a warning.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

import trtllm.kernels.rotary  # noqa: F401  (registers torch.ops.trtllm.rotary)
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, eliminate_dead_code, kind, value


def _half(node, x, first: bool) -> bool:
    """node is x[..., :D/2] (first) or x[..., D/2:]."""
    if kind(node) != "getitem" or node.args[0] is not x:
        return False
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis
            and isinstance(index[1], slice) and index[1].step is None):
        return False
    half = value(x).shape[-1] // 2
    sl = index[1]
    return (sl.start in (None, 0) and sl.stop == half) if first else (sl.start == half and sl.stop is None)


def _rotate_half_source(cat: fx.Node):
    parts = cat.args[0]
    if arg(cat, 1, "dim", 0) not in (-1, 3) or not isinstance(parts, (list, tuple)) or len(parts) != 2:
        return None
    neg, first = parts
    if kind(neg) != "neg":
        return None
    x = first.args[0] if kind(first) == "getitem" else None
    if x is None or not _half(first, x, True) or not _half(neg.args[0], x, False):
        return None
    return x


def _unsqueezed_over_heads(node):
    """cos for `cos.unsqueeze(1)` with cos [B, S, D], else None."""
    if kind(node) != "unsqueeze" or arg(node, 1, "dim") != 1:
        return None
    src = node.args[0]
    return src if isinstance(src, fx.Node) and value(src) is not None and value(src).dim() == 3 else None


def _factor(mul: fx.Node, one):
    a, b = mul.args[:2]
    return b if a is one else a if b is one else None


def fuse_rotary(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for cat in [n for n in graph.nodes if kind(n) == "cat"]:
        x = _rotate_half_source(cat)
        if x is None:
            continue
        users = list(cat.users)
        mul_sin = users[0] if len(users) == 1 and kind(users[0]) == "mul" else None
        add = next(iter(mul_sin.users)) if mul_sin is not None and len(mul_sin.users) == 1 else None
        mul_cos = _factor(add, mul_sin) if kind(add) == "add" else None
        sin = _unsqueezed_over_heads(_factor(mul_sin, cat)) if mul_sin is not None else None
        cos = _unsqueezed_over_heads(_factor(mul_cos, x)) if kind(mul_cos) == "mul" else None
        xv = value(x)
        if sin is None or cos is None or xv.dim() != 4 or value(add).dtype != xv.dtype:
            warnings.warn(f"trtllm.compile: rotate-half at {describe(cat)} is not in HF's "
                          "x * cos + rotate_half(x) * sin form over [B, H, S, D]; left unfused")
            continue
        with graph.inserting_before(add):
            new = graph.call_function(torch.ops.trtllm.rotary.default, (x, cos, sin, False))
        new.meta.update(add.meta)
        add.replace_all_uses_with(new)
        matches += 1
    eliminate_dead_code(graph)
    return matches
