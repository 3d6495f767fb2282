"""Replace causal SDPA with paged attention over the runtime's KV cache.

Before (any model written to the contract, or HF's attention through our interface):

    attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s, enable_gqa=True)
        # q [B, Hq, S, D], k/v [B, Hkv, S, D]
After:

    attn = torch.ops.trtllm.attention(q, k, v, layer=i, scale=s, window=w, softcap=c,
                                      alibi_slopes=slopes)   # slopes: a constant input, or None

The new op writes k/v into layer i of the paged cache and attends over each
sequence's cached context (trtllm/attention_context.py). The layer's sliding window w and
logit soft-capping c (0 = none) are what compile()'s probe learnt (contract.AttentionSpec),
and so are ALiBi's slopes (one per query head, the same on every layer: one [Hq] fp32
constant input of the graph, made once a graph; None without ALiBi):
the model's eager path applies them itself, the traced graph holds plain causal SDPA. Attention it cannot express
(an explicit mask, dropout, non-causal attention over several queries: contract.py's
`unpageable`, which compile()'s eager probe applies too) is refused: left as SDPA it
would attend across the sequences of a flat ragged batch.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

import trtllm.attention_context  # noqa: F401  (registers torch.ops.trtllm.attention)
from trtllm.contract import CompileError, unpageable
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, kind, value


def replace_sdpa_with_paged_attention(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    slopes = None  # the ALiBi slopes' constant input, made at the first match
    for position, node in enumerate([n for n in graph.nodes if kind(n) == "sdpa"]):
        q, k, v = node.args[:3]
        mask = arg(node, 3, "attn_mask")
        dropout = arg(node, 4, "dropout_p", 0.0)
        is_causal = arg(node, 5, "is_causal", False)
        scale = node.kwargs.get("scale", arg(node, 6, "scale"))
        reason = unpageable(mask is not None, dropout, is_causal, value(q).shape[-2])
        if reason is not None:
            raise CompileError(f"{describe(node)}: {reason}")
        if isinstance(scale, fx.Node):
            raise CompileError(f"{describe(node)}: SDPA scale must be a constant, got a traced value")
        if scale is None:
            scale = 1.0 / math.sqrt(value(q).shape[-1])
        layer = ctx.attention.index(node, position)
        if ctx.attention.alibi_slopes and slopes is None:
            slopes = ctx.inputs.add_constant("alibi_slopes", torch.tensor(
                ctx.attention.alibi_slopes, dtype=torch.float32, device=value(q).device))
        with graph.inserting_before(node):
            new = graph.call_function(
                torch.ops.trtllm.attention.default,
                (q, k, v, layer, float(scale), ctx.attention.window(layer), ctx.attention.softcap(layer), slopes))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        matches += 1
    return matches
