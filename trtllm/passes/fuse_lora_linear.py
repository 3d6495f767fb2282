"""A LoRA-wrapped plain linear becomes one `trtllm.linear_lora` (kernels/linear_lora.py).

Before (apply_lora's output):                   After:

    y0 = linear(x, W, b)                            y = torch.ops.trtllm.linear_lora(x, W, b, A, B, slot_ids)
    h = torch.ops.trtllm.lora_shrink(x, A, slot_ids)
    y = torch.ops.trtllm.lora_expand(y0, h, B, slot_ids)

At decode (the GEMV's few rows) the op is two launches instead of four (the shrink's split
sums and the expand ride in the GEMV), and steps with no adapter (`no_adapters` in kernels/linear_lora.py)
launch the base linear alone. Matched where the linear's weight (and bias) are graph inputs
that `trtllm.linear` takes (contiguous, of the input's dtype) and the linear and the shrink feed
only this expand; other LoRA linears (FP8 weights, a weight computed in the graph) stay unfused.
Runs right after apply_lora; the linears it takes are no longer plain linears for
use_gemv_linear (the op makes the same GEMV choice itself).
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.kernels.linear_lora  # noqa: F401  (registers torch.ops.trtllm.linear_lora)
from trtllm.kernels.linear import unsupported
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, eliminate_dead_code, kind, value


def fuse_lora_linear(graph: fx.Graph, ctx: PassContext) -> int:
    if ctx.lora is None:
        return 0
    matches = 0
    for expand in [n for n in graph.nodes if n.target is torch.ops.trtllm.lora_expand.default]:
        base, h, lora_b, slot_ids, *parts = expand.args
        if kind(base) != "linear" or len(base.users) != 1 or h.target is not torch.ops.trtllm.lora_shrink.default \
                or len(h.users) != 1:
            continue
        x, w_node, b_node = base.args[0], arg(base, 1, "weight"), arg(base, 2, "bias")
        if h.args[0] is not x or h.args[2] is not slot_ids:
            continue
        weight = ctx.inputs.tensor(w_node)
        bias = ctx.inputs.tensor(b_node) if b_node is not None else None
        xv = value(x)
        if weight is None or (b_node is not None and bias is None) or xv is None \
                or unsupported(xv.dtype, weight, bias) is not None:
            continue
        with graph.inserting_before(expand):
            new = graph.call_function(torch.ops.trtllm.linear_lora.default,
                                      (x, w_node, b_node, h.args[1], lora_b, slot_ids, *parts))
        new.meta.update(expand.meta)
        expand.replace_all_uses_with(new)
        matches += 1
    eliminate_dead_code(graph)
    return matches
