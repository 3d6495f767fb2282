"""A norm whose output only feeds a residual add and the next norm: the three in one
`trtllm.norm_add_rms_norm` (Gemma-2/3's "sandwich" norms).

Before (after fuse_add_rms_norm; a block's output norm, the residual add, the next input norm):

    n = torch.ops.trtllm.rms_norm(x, v, eps, True)              # post_attention_layernorm
    y, h = torch.ops.trtllm.fused_add_rms_norm(residual, n, w, eps, True)   # pre_feedforward_layernorm
After:

    y, h = torch.ops.trtllm.norm_add_rms_norm(x, v, residual, w, eps, True)

Two launches become one and the normed block output is never written. Fused only where
the first norm's one user is the add (either operand) and both norms share eps and
rounding (unit_offset); elsewhere the pair stays as it is. Runs after
fuse_rms_norm_quant_fp8: an FP8 model's norm + quantization keeps the add it took.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.kernels.rms_norm  # noqa: F401  (registers the ops)
from trtllm.passes.context import PassContext


def _norm_args(node, eps, unit_offset):
    """(x, v) of `rms_norm(x, v, eps[, unit_offset])` with the given eps and rounding, else None."""
    if not isinstance(node, fx.Node) or node.target is not torch.ops.trtllm.rms_norm.default or len(node.users) != 1:
        return None
    x, v, e, *offset = node.args
    return (x, v) if e == eps and bool(offset and offset[0]) == unit_offset else None


def fuse_norm_add_rms_norm(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for fused in [n for n in graph.nodes if n.target is torch.ops.trtllm.fused_add_rms_norm.default]:
        a, b, weight, eps, *offset = fused.args
        unit_offset = bool(offset and offset[0])
        # the normed operand (its inputs come before it, so before `fused`), its input and weight, the residual
        found = next(((norm, *xv, residual) for norm, residual in ((b, a), (a, b))
                      if (xv := _norm_args(norm, eps, unit_offset)) is not None), None)
        if found is None:
            continue
        norm, x, pre_weight, residual = found
        with graph.inserting_before(fused):
            new = graph.call_function(torch.ops.trtllm.norm_add_rms_norm.default,
                                      (x, pre_weight, residual, weight, eps, unit_offset))
        new.meta.update(fused.meta)
        fused.replace_all_uses_with(new)
        graph.erase_node(fused)
        graph.erase_node(norm)
        matches += 1
    return matches
