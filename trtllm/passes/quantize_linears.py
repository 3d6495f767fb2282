"""Linears over FP8 weights become an activation quantization and `trtllm.fp8_gemm`.

Which linears: those whose weight is the placeholder of an `Fp8Linear` in the model's
quantization description (`ctx.quantization`, trtllm/quantization/fp8_linears.py: made by
QuantConfig's online quantization or read from an FP8 checkpoint). Before:

    q = linear(x, Wq, bq)      # x [.., K]; Wq, Wk, Wv placeholders (no memory), bq.. graph inputs
    k = linear(x, Wk, bk)
    v = linear(x, Wv, bv)
After (linears that read the same x with the same activation scheme share one quantization
and one GEMM over their weights side by side, as fuse_parallel_linears does for bf16):

    x2 = x.reshape(-1, K)
    xq, xs = torch.ops.trtllm.quantize_fp8(x2, group)      # dynamic: per token (group None), or
                                                          # 1x128 groups for 128x128 block weights
    #   static input scale s (a checkpoint's input_scale):  xq = torch.ops.trtllm.quantize_fp8_static(x2, s); xs = s
    #   (= (x2 / s).clamp(-448, 448).to(fp8): as an op, no work is left in the layers for Inductor)
    #   a tensor-parallel row slice (Fp8Linear.activation_group): the row's amax all-reduced (max)
    #   over the group, then as the reference quantizes (quantization/fp8_slices.py says why)
    y2 = torch.ops.trtllm.fp8_gemm(xq, W8_qkv, xs, sw_qkv, b_qkv, x.dtype)   # constants: fp8 weight, fp32 scale
    qkv = y2.reshape(*x.shape[:-1], Nq + Nk + Nv)
    q = narrow(qkv, -1, 0, Nq); k = narrow(qkv, -1, Nq, Nk); v = narrow(qkv, -1, Nq + Nk, Nv)

Side by side, per-tensor weight scales become per-channel ones ([N, 1], each layer's scale
repeated: the same products); block weights go side by side only when each N is a multiple
of 128, static input scales only when equal. The fused FP8 weight is made once: the
description's weights are then views of it, so a later compilation (the decode graphs', a
recompile) finds them back to back and makes no copy. The LM head is no quantized linear (the
description never holds it): split_lm_head still finds it. This pass runs before
fuse_parallel_linears (which would otherwise concatenate the placeholders into a real bf16
weight) and use_gemv_linear never sees these linears, so a decode graph keeps them FP8
(fp8_gemm picks its weight-streaming path for M <= 16 itself). A placeholder used any other
way than as a linear's weight is refused with a CompileError naming the node: computed with,
it would give NaN. The output `y` keeps x in its meta (LINEAR_INPUT): apply_lora wraps it
as it wraps a linear.
"""
from __future__ import annotations

import math
import operator
from collections import defaultdict

import torch
import torch.fx as fx

import trtllm.kernels.fp8_gemm  # noqa: F401  (registers torch.ops.trtllm.fp8_gemm)
import trtllm.kernels.quantize_fp8  # noqa: F401  (registers torch.ops.trtllm.quantize_fp8)
import trtllm.kernels.quantize_fp8_static  # noqa: F401  (registers torch.ops.trtllm.quantize_fp8_static)
from trtllm.contract import CompileError
from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, SCALE_BLOCK
from trtllm.kernels.quantize_fp8 import MIN_AMAX
from trtllm.passes.context import PassContext
from trtllm.passes.fuse_parallel_linears import _adjacent_view
from trtllm.passes.match import arg, describe, kind, value
from trtllm.quantization.fp8_linears import Fp8Linear

# the meta key of an FP8 GEMM's output (reshaped as the linears' was) that names the linears' input x
LINEAR_INPUT = "trtllm_fp8_linear_input"


def _side_by_side(qs: list[Fp8Linear]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight [sum N, K], its scale) of the linears' weights stacked along N; the
    description's weights become views of a new stacked copy."""
    weight = _adjacent_view([q.weight for q in qs]) if len(qs) > 1 else qs[0].weight
    if weight is None:
        weight = torch.cat([q.weight for q in qs])
        start = 0
        for q in qs:  # the stacked copy is now the only one held
            q.weight = weight[start: start + q.weight.shape[0]]
            start += q.weight.shape[0]
    if len(qs) == 1:
        return weight, qs[0].weight_scale
    if qs[0].block:
        return weight, torch.cat([q.weight_scale for q in qs]).contiguous()
    return weight, torch.cat([q.weight_scale.reshape(-1, 1).expand(q.weight.shape[0], 1) for q in qs]).contiguous()


def _groups(linears: list[tuple[fx.Node, Fp8Linear]]) -> list[list[tuple[fx.Node, Fp8Linear]]]:
    """The linears that can share an activation quantization and a GEMM."""
    by_key = defaultdict(list)
    for node, q in linears:
        static = None if q.input_scale is None else float(q.input_scale.reshape(()))
        key = (node.args[0], q.block, static, arg(node, 2, "bias") is not None, q.weight.shape[1],
               q.weight.dtype, q.weight.device, q.activation_group)
        by_key[key].append((node, q))
    groups = []
    for (_, block, *_), members in by_key.items():
        if block and len(members) > 1 and any(q.weight.shape[0] % SCALE_BLOCK for _, q in members):
            groups += [[m] for m in members]  # a 128-row scale block would straddle two layers
        else:
            groups.append(members)
    return groups


def _fake(like: torch.Tensor, shape, dtype=None) -> torch.Tensor:
    with like.fake_mode:  # shape-only, as fuse_parallel_linears does (symbolic sizes)
        return like.new_empty(tuple(shape), dtype=dtype or like.dtype)


def _rewrite(graph: fx.Graph, ctx: PassContext, members: list[tuple[fx.Node, Fp8Linear]]) -> None:
    nodes, qs = [n for n, _ in members], [q for _, q in members]
    first, x = nodes[0], nodes[0].args[0]
    xv, stem = value(x), nodes[0].name
    k = qs[0].weight.shape[1]
    sizes = [q.weight.shape[0] for q in qs]
    weight, weight_scale = _side_by_side(qs)
    m = math.prod(xv.shape[:-1])
    with graph.inserting_before(first):
        w_node = ctx.inputs.add_constant(f"{stem}_fp8_weight", weight)
        ws_node = ctx.inputs.add_constant(f"{stem}_fp8_weight_scale", weight_scale)
    bias_nodes = [arg(n, 2, "bias") for n in nodes]
    if bias_nodes[0] is None:
        b_node = None
    elif len(nodes) == 1:
        b_node = bias_nodes[0]
    else:
        biases = [ctx.inputs.tensor(b) for b in bias_nodes]
        if any(b is None for b in biases):
            raise CompileError(f"{describe(first)}: an FP8 linear's bias is computed in the graph, not a graph input")
        b_node = ctx.inputs.add_constant(f"{stem}_fp8_bias", torch.cat([b.detach() for b in biases]))
    with graph.inserting_before(first):
        x2 = graph.call_method("reshape", (x, -1, k))
        x2.meta["example_value"] = _fake(xv, (m, k))
        if qs[0].input_scale is not None:  # static: the checkpoint's calibrated per-tensor scale
            xs = ctx.inputs.add_constant(f"{stem}_fp8_input_scale", qs[0].input_scale.reshape(1).float())
            xq = graph.call_function(torch.ops.trtllm.quantize_fp8_static.default, (x2, xs))
        elif qs[0].activation_group is not None:  # a row-parallel slice: the whole row's amax
            xq, xs = _quantize_over_group(graph, x2, xv, m, k, qs[0].activation_group)
        else:
            group = SCALE_BLOCK if qs[0].block else None
            quantized = graph.call_function(torch.ops.trtllm.quantize_fp8.default, (x2, group))
            xq = graph.call_function(operator.getitem, (quantized, 0))
            xs = graph.call_function(operator.getitem, (quantized, 1))
            groups = 1 if group is None else -(-k // group)
            quantized.meta["example_value"] = (_fake(xv, (m, k), FP8_DTYPE), _fake(xv, (m, groups), torch.float32))
            xs.meta["example_value"] = quantized.meta["example_value"][1]
        xq.meta["example_value"] = _fake(xv, (m, k), FP8_DTYPE)
        y2 = graph.call_function(torch.ops.trtllm.fp8_gemm.default, (xq, w_node, xs, ws_node, b_node, xv.dtype))
        y2.meta["example_value"] = _fake(xv, (m, sum(sizes)))
        dims = [graph.call_method("size", (x, d)) for d in range(xv.dim() - 1)]
        for d, node in enumerate(dims):
            node.meta["example_value"] = xv.shape[d]
        y = graph.call_method("reshape", (y2, *dims, sum(sizes)))
        y.meta.update(first.meta)
        y.meta[LINEAR_INPUT] = x  # apply_lora adds an adapter's shrink of x here
        y.meta["example_value"] = _fake(xv, (*xv.shape[:-1], sum(sizes)))
        start = 0
        for node, n in zip(nodes, sizes):
            if len(nodes) == 1:
                node.replace_all_uses_with(y)
                break
            part = graph.call_function(torch.narrow, (y, -1, start, n))
            part.meta.update(node.meta)
            node.replace_all_uses_with(part)
            start += n
    for node in nodes:
        graph.erase_node(node)


def _quantize_over_group(graph: fx.Graph, x2: fx.Node, xv, m: int, k: int, group_name: str):
    """quantize_fp8_ref's per-row quantization of a tensor-parallel rank's features x2 [M, k], its
    amax all-reduced (max) over `group_name`: the scales one rank computes over the whole row
    (one group a row: per token, or 1x128 blocks of a row of <= 128 features)."""
    def node(op, target, args, shape, dtype=torch.float32):
        n = graph.create_node(op, target, args)
        n.meta["example_value"] = _fake(xv, shape, dtype)
        return n
    xf = node("call_method", "float", (x2,), (m, k))
    magnitude = node("call_method", "abs", (xf,), (m, k))
    amax = node("call_method", "amax", (magnitude, -1, True), (m, 1))
    reduced = node("call_function", torch.ops._c10d_functional.all_reduce.default, (amax, "max", group_name), (m, 1))
    whole = node("call_function", torch.ops._c10d_functional.wait_tensor.default, (reduced,), (m, 1))
    floor = node("call_method", "clamp", (whole,), (m, 1))
    floor.kwargs = {"min": MIN_AMAX}
    scale = node("call_function", operator.truediv, (floor, FP8_MAX), (m, 1))
    divided = node("call_function", torch.div, (xf, scale), (m, k))
    clamped = node("call_method", "clamp", (divided, -FP8_MAX, FP8_MAX), (m, k))
    return node("call_method", "to", (clamped, FP8_DTYPE), (m, k), FP8_DTYPE), scale


def quantize_linears(graph: fx.Graph, ctx: PassContext) -> int:
    fp8 = ctx.quantization
    if fp8 is None or not fp8.linears:
        return 0
    by_weight = fp8.by_placeholder()
    placeholders = {}
    for n in graph.nodes:
        t = ctx.inputs.tensor(n) if n.op == "placeholder" else None
        if t is not None and id(t) in by_weight:
            placeholders[n] = by_weight[id(t)]
    linears = []
    for node in graph.nodes:
        if kind(node) == "linear" and arg(node, 1, "weight") in placeholders and node.args[0] not in placeholders:
            if value(node.args[0]) is None:
                raise CompileError(f"{describe(node)}: an FP8 linear with no example value for its input")
            linears.append((node, placeholders[arg(node, 1, "weight")]))
    groups = _groups(linears)
    for members in groups:
        _rewrite(graph, ctx, members)
    for node in placeholders:
        if node.users:  # what is left would compute with the placeholder's NaN
            user = next(iter(node.users))
            raise CompileError(f"{describe(user)} uses the FP8-quantized weight {node.name} other than as a "
                               "linear's weight; quantize_linears rewrites only F.linear over it")
    return len(groups)
