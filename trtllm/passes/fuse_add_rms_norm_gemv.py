"""In decode graphs, the residual add + RMS norm moves into the GEMV it feeds.

Before (use_gemv_linear's linears; fuse_rms_norm_quant_fp8's FP8 norms):

    y, s = torch.ops.trtllm.fused_add_rms_norm(x, r, nw, eps)            # x, r [.., K]; s: next residual
    out = torch.ops.trtllm.linear(y, W, b)                               # W [N, K]: q/k/v or gate/up
    y1, s1 = torch.ops.trtllm.norm_add_rms_norm(x, v, r, nw, eps, True)  # Gemma-2/3's sandwich norms
    out1 = torch.ops.trtllm.linear(y1, W, b)
    xq, xs, s2 = torch.ops.trtllm.fused_add_rms_norm_quant_fp8(x2, r2, nw, eps, None)   # x2, r2 [M, K]
    out2 = torch.ops.trtllm.fp8_gemm(xq, W8, xs, sw, b, dtype)           # sw per tensor or channel
    xq3, _, s3 = torch.ops.trtllm.fused_add_rms_norm_quant_fp8(x3, r3, nw, eps, None, input_scale=c)
    out3 = torch.ops.trtllm.fp8_gemm(xq3, W8, c, sw, b, dtype)           # a checkpoint's static scale c
After:

    out, s = torch.ops.trtllm.add_rms_norm_linear(x, r, nw, eps, False, W, b)
    out1, s1 = torch.ops.trtllm.add_rms_norm_linear(x, r, nw, eps, True, W, b, pre_weight=v)
    out2, s2 = torch.ops.trtllm.add_rms_norm_fp8_gemm(x2, r2, nw, eps, False, W8, sw, b, dtype)
    out3, s3 = torch.ops.trtllm.add_rms_norm_fp8_gemm(x3, r3, nw, eps, False, W8, sw, b, dtype, input_scale=c)

A decode-graph pass (passes/__init__.py): in the batch-1 graph a Llama layer's two norms stop
being launches of their own (kernels/add_rms_norm_gemv.py: each GEMV program normalizes the row
itself; graphs of more rows run the same two kernels as before; in Gemma-2/3 both of a layer's
sandwich norms). Matched only where the norm's
output feeds one such GEMM and nothing else, and the GEMM's weight is a graph input (the fused op
is placed where the norm was, before the sum's other users). Gemma's `unit_offset` norms fuse
too; norms without the residual add (a model's first) and 1x128 groups are left as they are.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import trtllm.kernels.add_rms_norm_gemv  # noqa: F401  (registers the fused ops)
import trtllm.kernels.rms_norm_quant_fp8  # noqa: F401
from trtllm.passes.context import PassContext
from trtllm.passes.match import value

_NORM = torch.ops.trtllm.fused_add_rms_norm.default
_SANDWICH = torch.ops.trtllm.norm_add_rms_norm.default
_NORM_FP8 = torch.ops.trtllm.fused_add_rms_norm_quant_fp8.default
_LINEAR = torch.ops.trtllm.linear.default
_GEMM = torch.ops.trtllm.fp8_gemm.default


def _outputs(norm: fx.Node) -> dict[int, fx.Node] | None:
    """The norm's getitems by index, or None if it has another kind of user or two of one index."""
    parts = {u.args[1]: u for u in norm.users if u.target is operator.getitem}
    return parts if len(parts) == len(norm.users) else None


def _only_user(node: fx.Node, target) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and users[0].target is target and not users[0].kwargs else None


def _graph_inputs(*nodes) -> bool:
    """Defined before any op (so the fused op can take the norm's place)."""
    return all(not isinstance(n, fx.Node) or n.op in ("placeholder", "get_attr") for n in nodes)


def _unit_offset(norm: fx.Node, first_optional: int) -> bool | None:
    """The norm's unit_offset (an argument after the first_optional-th), or None if not a plain bool."""
    rest = norm.args[first_optional:]
    flag = rest[0] if rest else norm.kwargs.get("unit_offset", False)
    return flag if isinstance(flag, bool) else None


def _bf16_match(norm: fx.Node):
    outs = _outputs(norm)
    if outs is None or 0 not in outs or norm.kwargs:
        return None
    linear = _only_user(outs[0], _LINEAR)
    if linear is None or linear.args[0] is not outs[0] or not _graph_inputs(*linear.args[1:]):
        return None
    sandwich = norm.target is _SANDWICH
    unit_offset = _unit_offset(norm, 5 if sandwich else 4)
    if unit_offset is None:
        return None
    if sandwich:
        (x, pre_weight, r, nw, eps), kwargs = norm.args[:5], {}
        kwargs["pre_weight"] = pre_weight
    else:
        (x, r, nw, eps), kwargs = norm.args[:4], {}
    weight, bias = linear.args[1], linear.args[2] if len(linear.args) > 2 else None
    return ((x, r, nw, eps, unit_offset, weight, bias), kwargs, torch.ops.trtllm.add_rms_norm_linear.default,
            linear, outs)


def _fp8_match(norm: fx.Node):
    outs = _outputs(norm)
    if outs is None or 0 not in outs or set(norm.kwargs) - {"input_scale", "unit_offset"}:
        return None
    group = norm.args[4] if len(norm.args) > 4 else norm.kwargs.get("group_size")
    static = norm.args[6] if len(norm.args) > 6 else norm.kwargs.get("input_scale")
    unit_offset = _unit_offset(norm, 5)
    gemm = _only_user(outs[0], _GEMM)
    if group is not None or unit_offset is None or gemm is None or gemm.args[0] is not outs[0]:
        return None
    _, weight, x_scale, weight_scale, *rest = gemm.args
    if x_scale is not (static if static is not None else outs.get(1)) or not _graph_inputs(weight, weight_scale, *rest):
        return None
    if 1 in outs and list(outs[1].users) != ([gemm] if static is None else []):
        return None  # the scale is read elsewhere too
    sw, w = value(weight_scale), value(weight)
    if sw is None or w is None or tuple(sw.shape) not in ((1,), (w.shape[0], 1)):
        return None  # block weight scales
    x, r, nw, eps = norm.args[:4]
    kwargs = {} if static is None else {"input_scale": static}
    return ((x, r, nw, eps, unit_offset, weight, weight_scale, *rest), kwargs,
            torch.ops.trtllm.add_rms_norm_fp8_gemm.default, gemm, outs)


def fuse_add_rms_norm_gemv(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for norm in [n for n in graph.nodes if n.target in (_NORM, _SANDWICH, _NORM_FP8)]:
        found = (_fp8_match if norm.target is _NORM_FP8 else _bf16_match)(norm)
        if found is None:
            continue
        args, kwargs, fused, gemm, outs = found
        summed = outs.get(2 if norm.target is _NORM_FP8 else 1)
        with graph.inserting_before(norm):
            new = graph.call_function(fused, args, kwargs)
            y = graph.call_function(operator.getitem, (new, 0))
            s = graph.call_function(operator.getitem, (new, 1))
        y.meta.update(gemm.meta)
        if summed is not None:
            s.meta.update(summed.meta)
        new.meta["example_value"] = (y.meta.get("example_value"), s.meta.get("example_value"))
        gemm.replace_all_uses_with(y)
        if summed is not None:
            summed.replace_all_uses_with(s)
        graph.erase_node(gemm)
        for part in outs.values():
            graph.erase_node(part)
        graph.erase_node(norm)
        if not s.users:
            graph.erase_node(s)
        matches += 1
    return matches
