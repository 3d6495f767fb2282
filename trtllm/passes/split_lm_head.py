"""Take the LM head out of the graph, so the runtime computes logits only where needed.

Before:                                       After:

    h = final_norm(...)          # [B, S, H]      h = final_norm(...)
    logits = linear(h, W_head)   # [B, S, V]      return h
    return logits

The head goes to `ctx.lm_head`; `CompiledModel` applies it on the rows it is asked for: at a
prefill step of T tokens the runtime needs logits for one token per sequence, and
the [T, V] product it skips is as large as a decoder layer's GEMMs at Llama-3's
128k vocabulary. Only a head that feeds the output directly (optionally through
HF's `h[:, slice(-0, None), :]`) is taken out; anything else (a cast, soft-capping)
leaves the graph as it is, still correct, with full logits.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from trtllm.passes.context import LMHead, PassContext
from trtllm.passes.match import arg, kind, value


def _keeps_every_row(index) -> bool:
    """HF's `hidden[:, slice(-0, None), :]` (logits_to_keep=0): a no-op slice."""
    return (isinstance(index, tuple) and len(index) == 3 and index[0] == slice(None)
            and index[2] == slice(None) and isinstance(index[1], slice)
            and index[1].start in (0, None) and index[1].stop is None and index[1].step is None)


def split_lm_head(graph: fx.Graph, ctx: PassContext) -> int:
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    if not isinstance(results, (tuple, list)) or len(results) != 1 or kind(results[0]) != "linear":
        return 0
    head = results[0]
    weight = ctx.inputs.tensor(arg(head, 1, "weight"))
    bias_node = arg(head, 2, "bias")
    bias = ctx.inputs.tensor(bias_node) if bias_node is not None else None
    if weight is None or (bias_node is not None and bias is None):
        return 0
    hidden = head.args[0]
    if hidden.op == "call_function" and hidden.target is operator.getitem and _keeps_every_row(hidden.args[1]):
        hidden = hidden.args[0]
    if value(hidden) is None or value(hidden).dim() != 3:
        return 0
    output.args = ((hidden,),)
    graph.eliminate_dead_code()
    ctx.lm_head = LMHead(weight, bias)
    return 1
