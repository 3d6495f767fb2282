"""An RMS norm that feeds only FP8 linears leaves as FP8: `trtllm.rms_norm_quant_fp8`.

Before (after quantize_linears and fuse_rms_norm / fuse_add_rms_norm; q/k/v stacked, or
gate/up, so usually one quantization per norm):

    y = torch.ops.trtllm.rms_norm(x, w, eps)              # x [.., H]
    xq, xs = torch.ops.trtllm.quantize_fp8(y.reshape(-1, H), group)
After:

    xq, xs = torch.ops.trtllm.rms_norm_quant_fp8(x.reshape(-1, H), w, eps, group)

and with the residual add (the sum is the next residual, as before):

    y, h = torch.ops.trtllm.fused_add_rms_norm(x, r, w, eps)
    xq, xs = torch.ops.trtllm.quantize_fp8(y.reshape(-1, H), group)
becomes
    xq, xs, h2 = torch.ops.trtllm.fused_add_rms_norm_quant_fp8(x.reshape(-1, H), r.reshape(-1, H), w, eps, group)
    h = h2.view_as(x)

and a static input scale s (quantize_linears' `quantize_fp8_static`, the GEMM taking s as x's scale):

    xq = torch.ops.trtllm.quantize_fp8_static(y.reshape(-1, H), s)
becomes
    xq = torch.ops.trtllm.rms_norm_quant_fp8(x.reshape(-1, H), w, eps, None, input_scale=s)[0]

The normalized row is never written in bf16 and no quantize kernel runs between the norm
and the GEMM. Matched only where every use of the norm's output is such a quantization,
all with one group size or one static scale (a norm that also feeds a bf16 linear, e.g. a
tied LM head, stays as it is). Gemma's norm (`unit_offset`) fuses the same way.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import trtllm.kernels.quantize_fp8_static  # noqa: F401
import trtllm.kernels.rms_norm  # noqa: F401  (registers the ops)
import trtllm.kernels.rms_norm_quant_fp8  # noqa: F401
from trtllm.passes.context import PassContext
from trtllm.passes.match import value

_DYNAMIC, _STATIC = torch.ops.trtllm.quantize_fp8.default, torch.ops.trtllm.quantize_fp8_static.default


def quantizations_of(normed: fx.Node, hidden: int) -> tuple[list[fx.Node], list[fx.Node], object, object] | None:
    """(the reshapes, the quantization nodes, their group size, their static scale node) if
    `normed` feeds only `quantize_fp8(normed.reshape(-1, hidden), group)` with one group size, or
    only `quantize_fp8_static(normed.reshape(-1, hidden), s)` with one scale s (and `normed.size(d)`,
    which quantize_linears reads to shape its output); else None."""
    reshapes = [u for u in normed.users if not (u.op == "call_method" and u.target == "size")]
    quantizes = []
    for r in reshapes:
        if not (r.op == "call_method" and r.target == "reshape" and r.args[1:] == (-1, hidden) and not r.kwargs):
            return None
        for q in r.users:
            if q.target not in (_DYNAMIC, _STATIC) or q.args[0] is not r:
                return None
            quantizes.append(q)
    kinds = {(q.target, q.args[1] if len(q.args) > 1 else q.kwargs.get("group_size")) for q in quantizes}
    if not quantizes or len(kinds) != 1:
        return None
    target, arg = kinds.pop()
    return (reshapes, quantizes, arg, None) if target is _DYNAMIC else (reshapes, quantizes, None, arg)


def replace_quantizations(graph: fx.Graph, quantizes: list[fx.Node], fused: fx.Node) -> None:
    """Point the quantizations' users at the fused op: a dynamic one's (xq, xs) are the fused
    op's first two outputs, at the same indices; a static one's xq is its output 0."""
    for q in quantizes:
        if q.target is _STATIC:
            with graph.inserting_after(fused):
                xq = graph.call_function(operator.getitem, (fused, 0))
            xq.meta.update(q.meta)
            q.replace_all_uses_with(xq)
        else:
            q.replace_all_uses_with(fused)


def quantized_fake(quantize: fx.Node):
    """The fused op's (xq, xs) fakes: a dynamic quantization's own; a static one's xq with an
    [M, 1] scale."""
    fake = quantize.meta.get("example_value")
    if quantize.target is _DYNAMIC or fake is None:
        return fake
    with fake.fake_mode:
        return fake, fake.new_empty((fake.shape[0], 1), dtype=torch.float32)


def reshaped_rows(graph: fx.Graph, x: fx.Node, hidden: int) -> fx.Node:
    node = graph.call_method("reshape", (x, -1, hidden))
    xv = value(x)
    with xv.fake_mode:
        node.meta["example_value"] = xv.new_empty((xv.numel() // hidden, hidden))
    return node


def fuse_rms_norm_quant_fp8(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    plain, with_add = torch.ops.trtllm.rms_norm.default, torch.ops.trtllm.fused_add_rms_norm.default
    for norm in [n for n in graph.nodes if n.target in (plain, with_add)]:
        xv = value(norm.args[0])
        if xv is None:
            continue
        hidden = xv.shape[-1]
        if norm.target is plain:
            x, weight, eps, *unit_offset = norm.args
            found = quantizations_of(norm, hidden)
            if found is None:
                continue
            reshapes, quantizes, group, static = found
            with graph.inserting_before(norm):
                new = graph.call_function(torch.ops.trtllm.rms_norm_quant_fp8.default,
                                          (reshaped_rows(graph, x, hidden), weight, eps, group, *unit_offset),
                                          {} if static is None else {"input_scale": static})
            new.meta["example_value"] = quantized_fake(quantizes[0])
            dead = [*quantizes, *reshapes, norm]
        else:
            x, residual, weight, eps, *unit_offset = norm.args
            getitems = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
            if len(getitems) != len(norm.users) or 0 not in getitems:
                continue
            found = quantizations_of(getitems[0], hidden)
            if found is None:
                continue
            reshapes, quantizes, group, static = found
            with graph.inserting_before(norm):
                new = graph.call_function(
                    torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default,
                    (reshaped_rows(graph, x, hidden), reshaped_rows(graph, residual, hidden), weight, eps, group,
                     *unit_offset), {} if static is None else {"input_scale": static})
            q_fake, s_fake = quantized_fake(quantizes[0]) or (None, None)
            with xv.fake_mode:
                flat = xv.new_empty((xv.numel() // hidden, hidden))
            new.meta["example_value"] = (q_fake, s_fake, flat)
            if 1 in getitems:  # the sum, the next residual: back to x's shape
                with graph.inserting_before(norm):
                    flat_sum = graph.call_function(operator.getitem, (new, 2))
                    summed = graph.call_method("view_as", (flat_sum, x))
                flat_sum.meta["example_value"] = flat
                summed.meta.update(getitems[1].meta)
                getitems[1].replace_all_uses_with(summed)
            dead = [*quantizes, *reshapes, *getitems.values(), norm]
        normed = norm if norm.target is plain else getitems[0]
        for size in [u for u in normed.users if u.op == "call_method" and u.target == "size"]:
            size.replace_input_with(normed, x)  # x has the normalized output's shape
        replace_quantizations(graph, quantizes, new)
        for node in dead:
            graph.erase_node(node)
        matches += 1
    return matches
