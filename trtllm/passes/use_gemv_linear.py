"""Linears become `trtllm.linear`: a GEMV that reads the weight once for decode batches.

Before:                                       After:

    y = linear(x, W, b)     # torch._C._nn.linear     y = torch.ops.trtllm.linear(x, W, b)
                            # x [.., K], W [N, K]

At run time the op picks by row count (M = tokens in the step): up to
`kernels/linear.py:GEMV_MAX_M` rows a Triton GEMV streams W once at close to the copy
bandwidth (cuBLAS runs decode shapes such as o_proj and down_proj as a split-K GEMM
plus a reduce kernel); more rows go to F.linear (cuBLAS), as before. A captured CUDA
graph has a fixed M, so the choice is made once, at capture.

Matched: every linear whose weight (and bias) are graph inputs (parameters, or the
fused weights of fuse_parallel_linears) that are contiguous, of the input's dtype.
A linear over a weight computed in the graph (e.g. `W.t()` of a [K, N]-stored weight)
stays F.linear with a warning; matmuls that are not F.linear (`x @ W`, `addmm`) are not
linears and stay as they are. Runs after split_lm_head, which must still find the
head as a plain linear: the head, applied outside the graph, gets trtllm.linear too
(`ctx.lm_head.linear`), as the largest GEMV of a decode step.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F

import trtllm.kernels.linear  # noqa: F401  (registers torch.ops.trtllm.linear)
from trtllm.kernels.linear import unsupported
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, kind, value


def use_gemv_linear(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for node in [n for n in graph.nodes if kind(n) == "linear"]:
        x, w_node, b_node = node.args[0], arg(node, 1, "weight"), arg(node, 2, "bias")
        weight = ctx.inputs.tensor(w_node)
        bias = ctx.inputs.tensor(b_node) if b_node is not None else None
        xv = value(x)
        if weight is None or (b_node is not None and bias is None):
            reason = "its weight or bias is computed in the graph, not a graph input"
        elif xv is None:
            reason = "no example value for its input"
        else:
            reason = unsupported(xv.dtype, weight, bias)
        if reason is not None:
            warnings.warn(f"trtllm.compile: {describe(node)} stays F.linear (cuBLAS): {reason}")
            continue
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.trtllm.linear.default, (x, w_node, b_node))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        matches += 1
    head = ctx.lm_head  # unless an earlier pass gave the head an op of its own
    if head is not None and head.linear is F.linear and unsupported(head.weight.dtype, head.weight, head.bias) is None:
        head.linear = torch.ops.trtllm.linear
    return matches
