"""Replace a vision encoder's bidirectional SDPA with the fused Triton attention kernel.

Before (a ViT written plainly, e.g. models/clip_vision.py):

    attn = F.scaled_dot_product_attention(q, k, v, scale=s)      # q/k/v [B, H, S, D], no mask
After:

    attn = torch.ops.trtllm.bidirectional_attention(q, k, v, s)

An encoder pass (ENCODER_PASSES, run by `trtllm.compile_encoder`), never in the decoder's list:
there `replace_sdpa_with_paged_attention` refuses non-causal attention, which across a flat
ragged batch of sequences would attend from one sequence into another. Here a batch is whole
images of one length, so bidirectional attention over each is right. What the kernel does not
express (a mask, dropout, causal attention, GQA) is refused with a CompileError naming it.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

import trtllm.kernels.bidirectional_attention  # noqa: F401  (registers torch.ops.trtllm.bidirectional_attention)
from trtllm.contract import CompileError
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, kind, value


def replace_sdpa_with_bidirectional_attention(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for node in [n for n in graph.nodes if kind(n) == "sdpa"]:
        q, k, v = node.args[:3]
        if arg(node, 3, "attn_mask") is not None:
            raise CompileError(f"{describe(node)}: encoder SDPA with an attn_mask is not supported")
        if arg(node, 4, "dropout_p", 0.0) not in (0, 0.0):
            raise CompileError(f"{describe(node)}: SDPA with dropout (inference only)")
        if arg(node, 5, "is_causal", False):
            raise CompileError(f"{describe(node)}: causal SDPA in an encoder (compile it with trtllm.compile)")
        if node.kwargs.get("enable_gqa", False) or value(q).shape != value(k).shape:
            raise CompileError(f"{describe(node)}: q {tuple(value(q).shape)} and k {tuple(value(k).shape)} differ "
                               "(the encoder kernel takes one head count and length for all three)")
        scale = node.kwargs.get("scale", arg(node, 6, "scale"))
        if isinstance(scale, fx.Node):
            raise CompileError(f"{describe(node)}: SDPA scale must be a constant, got a traced value")
        scale = 1.0 / math.sqrt(value(q).shape[-1]) if scale is None else float(scale)
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.trtllm.bidirectional_attention.default, (q, k, v, scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        matches += 1
    return matches
