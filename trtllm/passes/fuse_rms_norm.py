"""RMS-norm subgraphs become one `trtllm.rms_norm`.

Before (HF Llama's RMSNorm; `.float()` or `.to(torch.float32)`, factors in either order):

    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * h.to(x.dtype)
After:

    y = torch.ops.trtllm.rms_norm(x, weight, eps)

and HF Gemma's, whose weight is an offset from 1, applied in fp32 before one cast:

    y = (h * (1.0 + weight.float())).type_as(x)        # h as above
After:

    y = torch.ops.trtllm.rms_norm(x, weight, eps, True)   # unit_offset

Five elementwise/reduction launches and an fp32 intermediate become one pass over x.
An rsqrt that looks like a norm but does not fit the pattern is left alone with a
warning naming it.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

import trtllm.kernels.rms_norm  # noqa: F401  (registers torch.ops.trtllm.rms_norm)
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, eliminate_dead_code, is_float32_cast, kind, value


def _other(node: fx.Node, one) -> object:
    a, b = node.args[:2]
    return b if a is one else a


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _uncast(node):
    return node.args[0] if is_float32_cast(node) else node


def _unit_offset_weight(node) -> fx.Node | None:
    """w for `1 + w` or `1 + w.float()` (Gemma's weight), else None."""
    if kind(node) != "add" or len(node.args) != 2 or node.kwargs:
        return None
    one, w = node.args if not isinstance(node.args[0], fx.Node) else node.args[::-1]
    return _uncast(w) if one == 1 and isinstance(w, fx.Node) else None


def _match_unit_offset(x: fx.Node, scaled: fx.Node):
    """(weight, output node) of Gemma's `(scaled * (1 + w.float())).type_as(x)`, or None."""
    mul = _only_user(scaled)
    if kind(mul) != "mul" or len(mul.args) != 2:
        return None
    weight = _unit_offset_weight(_other(mul, scaled))
    out = _only_user(mul)
    if weight is None or kind(out) not in ("to", "type_as"):
        return None
    wv, xv, ov = value(weight), value(x), value(out)
    if wv is None or wv.dim() != 1 or xv.shape[-1] != wv.shape[0] or ov.dtype != xv.dtype or ov.shape != xv.shape:
        return None
    return weight, out


def _match(rsqrt: fx.Node):
    """(x, weight, eps, output node, unit_offset) of the norm around `rsqrt`, or None."""
    add = rsqrt.args[0]
    if kind(add) != "add" or len(add.args) < 2:
        return None
    mean = next((a for a in add.args[:2] if kind(a) == "mean"), None)
    eps = _other(add, mean) if mean is not None else None
    if not isinstance(eps, float) or arg(mean, 1, "dim") not in (-1, [-1], (-1,)) \
            or not arg(mean, 2, "keepdim", False):
        return None
    square = mean.args[0]
    if kind(square) != "pow" or square.args[1] != 2:
        return None
    h = square.args[0]
    x = _uncast(h)
    scaled = _only_user(rsqrt)
    # `h * rsqrt(...)`, or `x.float() * rsqrt(...)` with a second cast of the same x
    if kind(scaled) != "mul" or _uncast(_other(scaled, rsqrt)) is not x:
        return None
    gemma = _match_unit_offset(x, scaled)
    if gemma is not None:
        return x, gemma[0], eps, gemma[1], True
    cast = _only_user(scaled)
    if kind(cast) in ("to", "type_as"):
        out = _only_user(cast)
        normed = cast
    else:
        out, normed = cast, scaled
    if kind(out) != "mul":
        return None
    weight = _other(out, normed)
    wv, xv, ov = value(weight), value(x), value(out)
    if not isinstance(weight, fx.Node) or wv is None or wv.dim() != 1 or ov.dtype != xv.dtype \
            or xv.shape[-1] != wv.shape[0]:
        return None
    return x, weight, eps, out, False


def fuse_rms_norm(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for rsqrt in [n for n in graph.nodes if kind(n) == "rsqrt"]:
        found = _match(rsqrt)
        if found is None:
            warnings.warn(f"trtllm.compile: {describe(rsqrt)} looks like an RMS norm but does "
                          "not match HF's pattern; left unfused")
            continue
        x, weight, eps, out, unit_offset = found
        args = (x, weight, eps, True) if unit_offset else (x, weight, eps)
        with graph.inserting_before(out):
            new = graph.call_function(torch.ops.trtllm.rms_norm.default, args)
        new.meta.update(out.meta)
        out.replace_all_uses_with(new)
        matches += 1
    eliminate_dead_code(graph)
    return matches
