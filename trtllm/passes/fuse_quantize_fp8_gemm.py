"""In decode graphs, an FP8 linear's own per-token quantization moves into its GEMV: `trtllm.quantize_fp8_gemm`.

Before (quantize_linears' output where no norm or SiLU·mul kernel quantizes x for it, e.g. o_proj):

    xq, xs = torch.ops.trtllm.quantize_fp8(x2, None)                 # x2 [M, K], per token
    y2 = torch.ops.trtllm.fp8_gemm(xq, W8, xs, sw, b, dtype)          # sw per tensor or channel
After:

    y2 = torch.ops.trtllm.quantize_fp8_gemm(x2, W8, sw, b, dtype)

A decode-graph pass (passes/__init__.py): in the batch-1 graph the op's GEMV quantizes x itself,
to the same e4m3 values, so the quantize launch goes (one a layer in Llama; 10.0 us a call
against 12.1 on the H100: kernels/quantize_fp8_gemm.py); the graphs of more rows run the same
two kernels as before. Matched only where every use of the quantization is such a GEMM; 1x128 groups
(block weights) are not.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

import trtllm.kernels.quantize_fp8_gemm  # noqa: F401  (registers torch.ops.trtllm.quantize_fp8_gemm)
from trtllm.passes.context import PassContext

_QUANT, _GEMM = torch.ops.trtllm.quantize_fp8.default, torch.ops.trtllm.fp8_gemm.default


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


def fuse_quantize_fp8_gemm(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for quantize in [n for n in graph.nodes if n.target is _QUANT]:
        x2, group = quantize.args[0], quantize.args[1] if len(quantize.args) > 1 else None
        gemms = _gemms_of(quantize) if group is None else None
        if not gemms:
            continue
        for gemm in gemms:
            _, w, _, sw, *rest = gemm.args
            with graph.inserting_before(gemm):
                new = graph.call_function(torch.ops.trtllm.quantize_fp8_gemm.default, (x2, w, sw, *rest))
            new.meta.update(gemm.meta)
            gemm.replace_all_uses_with(new)
            graph.erase_node(gemm)
            matches += 1
        for part in list(quantize.users):
            graph.erase_node(part)
        graph.erase_node(quantize)
    return matches
