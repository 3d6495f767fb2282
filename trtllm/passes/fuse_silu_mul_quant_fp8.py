"""A gated MLP product that feeds only FP8 linears leaves as FP8: `trtllm.silu_mul_quant_fp8`.

Before (after quantize_linears and fuse_silu_mul; the down projection's input quantization):

    h = torch.ops.trtllm.silu_mul(gate, up)                  # gate, up [.., N]
    hq, hs = torch.ops.trtllm.quantize_fp8(h.reshape(-1, N), group)
After:

    hq, hs = torch.ops.trtllm.silu_mul_quant_fp8(gate.reshape(-1, N), up.reshape(-1, N), group)

The product is never written in bf16 and no quantize kernel runs between it and the GEMM
(kernels/silu_mul_quant_fp8.py says what that costs). Matched only where every use of the
product is such a quantization, all with one group size, as fuse_rms_norm_quant_fp8
matches norms; a product that also feeds anything else stays as it is. With a static input
scale s (`hq = quantize_fp8_static(h.reshape(-1, N), s)`) it becomes
`silu_mul_quant_fp8(gate.reshape(-1, N), up.reshape(-1, N), None, input_scale=s)[0]`.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.kernels.silu_mul  # noqa: F401  (registers the ops)
import trtllm.kernels.silu_mul_quant_fp8  # noqa: F401
from trtllm.passes.context import PassContext
from trtllm.passes.fuse_rms_norm_quant_fp8 import (
    quantizations_of,
    quantized_fake,
    replace_quantizations,
    reshaped_rows,
)
from trtllm.passes.match import value


def fuse_silu_mul_quant_fp8(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for product in [n for n in graph.nodes if n.target is torch.ops.trtllm.silu_mul.default]:
        gate, up = product.args
        gv = value(gate)
        if gv is None:
            continue
        n = gv.shape[-1]
        found = quantizations_of(product, n)
        if found is None:
            continue
        reshapes, quantizes, group, static = found
        with graph.inserting_before(product):
            new = graph.call_function(torch.ops.trtllm.silu_mul_quant_fp8.default,
                                      (reshaped_rows(graph, gate, n), reshaped_rows(graph, up, n), group),
                                      {} if static is None else {"input_scale": static})
        new.meta["example_value"] = quantized_fake(quantizes[0])
        for size in [u for u in product.users if u.op == "call_method" and u.target == "size"]:
            size.replace_input_with(product, gate)  # gate has the product's shape
        replace_quantizations(graph, quantizes, new)
        for node in [*quantizes, *reshapes, product]:
            graph.erase_node(node)
        matches += 1
    return matches
