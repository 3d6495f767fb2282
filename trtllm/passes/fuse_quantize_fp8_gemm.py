"""In decode graphs, an FP8 linear's own quantization (per token or static) moves into its GEMV.

Before (quantize_linears' and fuse_silu_mul_quant_fp8's output, the norms' fusions done):

    xq, xs = torch.ops.trtllm.quantize_fp8(x2, None)                 # x2 [M, K], e.g. o_proj's input
    y2 = torch.ops.trtllm.fp8_gemm(xq, W8, xs, sw, b, dtype)          # sw per tensor or channel
    hq, hs = torch.ops.trtllm.silu_mul_quant_fp8(gate, up, None)      # gate, up [M, K]: down's input
    y3 = torch.ops.trtllm.fp8_gemm(hq, W8d, hs, swd, bd, dtype)
    xq4 = torch.ops.trtllm.quantize_fp8_static(x4, s)                 # a checkpoint's static input scale s
    y4 = torch.ops.trtllm.fp8_gemm(xq4, W8o, s, swo, bo, dtype)
    hq5 = torch.ops.trtllm.silu_mul_quant_fp8(gate, up, None, input_scale=s5)[0]
    y5 = torch.ops.trtllm.fp8_gemm(hq5, W8d, s5, swd, bd, dtype)
After:

    y2 = torch.ops.trtllm.quantize_fp8_gemm(x2, W8, sw, b, dtype)
    y3 = torch.ops.trtllm.silu_mul_fp8_gemm(gate, up, W8d, swd, bd, dtype)
    y4 = torch.ops.trtllm.quantize_fp8_gemm(x4, W8o, swo, bo, dtype, input_scale=s)
    y5 = torch.ops.trtllm.silu_mul_fp8_gemm(gate, up, W8d, swd, bd, dtype, input_scale=s5)

A decode-graph pass (passes/__init__.py): in the batch-1 graph each op's GEMV quantizes its
input itself, to the same e4m3 values. o_proj's quantize launch goes (10.0 us a call against
12.1 on the H100: kernels/quantize_fp8_gemm.py; with a static scale, quantize_fp8_static's launch
goes); down's one-program silu_mul_quant_fp8 becomes a SiLU·mul spread over programs that
also stores partial amaxes (kernels/silu_mul_fp8_gemm.py; with a static scale the GEMV divides
by it, and its CUDA-core weight stream replaces fp8_gemm's tl.dot GEMV). The graphs of more rows run the same two kernels as before.
Matched only where every use of the quantization is such a GEMM (several GEMMs of one input
each get the fused op, and each recomputes the quantization); 1x128 groups (block weights) are
not.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import trtllm.kernels.quantize_fp8_gemm  # noqa: F401  (registers torch.ops.trtllm.quantize_fp8_gemm)
import trtllm.kernels.quantize_fp8_static  # noqa: F401  (registers torch.ops.trtllm.quantize_fp8_static)
import trtllm.kernels.silu_mul_fp8_gemm  # noqa: F401  (registers torch.ops.trtllm.silu_mul_fp8_gemm)
from trtllm.passes.context import PassContext

_GEMM = torch.ops.trtllm.fp8_gemm.default
_STATIC = torch.ops.trtllm.quantize_fp8_static.default
_QUANTIZE_GEMM = torch.ops.trtllm.quantize_fp8_gemm.default
_SILU = torch.ops.trtllm.silu_mul_quant_fp8.default
_SILU_GEMM = torch.ops.trtllm.silu_mul_fp8_gemm.default
# producer -> (the fused op, how many of the producer's leading args are its inputs)
_FUSED = {
    torch.ops.trtllm.quantize_fp8.default: (_QUANTIZE_GEMM, 1),
    _SILU: (_SILU_GEMM, 2),
}


def _gemms_of(quantize: fx.Node) -> list[fx.Node] | None:
    """The fp8_gemm nodes that are the only uses of quantize's (xq, xs), or None."""
    parts = list(quantize.users)
    if not all(p.target is operator.getitem and p.args[1] in (0, 1) for p in parts):
        return None
    by_index = {p.args[1]: p for p in parts}
    if len(by_index) != 2 or len(parts) != 2:
        return None
    xq, xs = by_index[0], by_index[1]
    gemms = {u for p in parts for u in p.users}
    for g in gemms:
        if g.target is not _GEMM or g.kwargs or g.args[0] is not xq or g.args[2] is not xs:
            return None
    return list(gemms)


def _static_producer(node: fx.Node) -> tuple[object, tuple, fx.Node, list[fx.Node]] | None:
    """A static quantization: (the fused op, its inputs, the scale, the nodes that are xq), or
    None. quantize_fp8_static(x, s) is xq itself; silu_mul_quant_fp8(gate, up, None,
    input_scale=s) gives xq as its output 0 (the scale output is s repeated per row)."""
    if node.target is _STATIC:
        scale = node.args[1] if len(node.args) > 1 else node.kwargs["scale"]
        return _QUANTIZE_GEMM, (node.args[0],), scale, [node]
    if node.target is not _SILU:
        return None
    scale = node.args[3] if len(node.args) > 3 else node.kwargs.get("input_scale")
    group = node.args[2] if len(node.args) > 2 else node.kwargs.get("group_size")
    if scale is None or group is not None:
        return None
    xqs = list(node.users)
    if not all(u.target is operator.getitem and u.args[1] == 0 for u in xqs):
        return None  # its scale output is used: left as it is
    return _SILU_GEMM, tuple(node.args[:2]), scale, xqs


def _fuse_static(graph: fx.Graph) -> int:
    matches = 0
    for quantize in [n for n in graph.nodes if n.target in (_STATIC, _SILU)]:
        found = _static_producer(quantize)
        if found is None:
            continue
        fused, inputs, scale, xqs = found
        gemms = [g for xq in xqs for g in xq.users]
        if not gemms or any(g.target is not _GEMM or g.kwargs or g.args[0] not in xqs or g.args[2] is not scale
                            for g in gemms):
            continue  # each use must be a GEMM taking the static scale as its x scale
        for gemm in gemms:
            _, w, _, sw, *rest = gemm.args
            with graph.inserting_before(gemm):
                new = graph.call_function(fused, (*inputs, w, sw, *rest), {"input_scale": scale})
            new.meta.update(gemm.meta)
            gemm.replace_all_uses_with(new)
            graph.erase_node(gemm)
            matches += 1
        for xq in xqs:
            if xq is not quantize:
                graph.erase_node(xq)
        graph.erase_node(quantize)
    return matches


def fuse_quantize_fp8_gemm(graph: fx.Graph, ctx: PassContext) -> int:
    matches = _fuse_static(graph)
    for quantize in [n for n in graph.nodes if n.target in _FUSED]:
        fused, n_inputs = _FUSED[quantize.target]
        if set(quantize.kwargs) - {"group_size"} or len(quantize.args) > n_inputs + 1:
            continue  # more than inputs and a group size (a static scale, say): not what the fused ops compute
        inputs = quantize.args[:n_inputs]
        group = quantize.args[n_inputs] if len(quantize.args) > n_inputs else quantize.kwargs.get("group_size")
        gemms = _gemms_of(quantize) if group is None else None
        if not gemms:
            continue
        for gemm in gemms:
            _, w, _, sw, *rest = gemm.args
            with graph.inserting_before(gemm):
                new = graph.call_function(fused, (*inputs, w, sw, *rest))
            new.meta.update(gemm.meta)
            gemm.replace_all_uses_with(new)
            graph.erase_node(gemm)
            matches += 1
        for part in list(quantize.users):
            graph.erase_node(part)
        graph.erase_node(quantize)
    return matches
