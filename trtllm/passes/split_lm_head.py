"""Take the LM head out of the graph, so the runtime computes logits only where needed.

Before:                                       After:

    h = final_norm(...)          # [B, S, H]      h = final_norm(...)
    logits = linear(h, W_head)   # [B, S, V]      return h
    return logits

The head goes to `ctx.lm_head`; `CompiledModel` applies it on the rows it is asked for: at a
prefill step of T tokens the runtime needs logits for one token per sequence, and
the [T, V] product it skips is as large as a decoder layer's GEMMs at Llama-3's
128k vocabulary (and larger at Gemma's 256k). A head that feeds the output directly
(optionally through HF's `h[:, slice(-0, None), :]`) is taken out, and so is one followed by
final logit soft-capping (Gemma-2/3), which goes with it (`LMHead.softcap`):

    logits = torch.tanh(linear(h, W_head) / cap) * cap      # cap: a constant float

Anything else (a cast, a scale) leaves the graph as it is, still correct, with full logits.
"""
from __future__ import annotations

import operator

import torch.fx as fx

from trtllm.passes.context import LMHead, PassContext
from trtllm.passes.match import arg, eliminate_dead_code, kind, module_path, value


def _keeps_every_row(index) -> bool:
    """HF's `hidden[:, slice(-0, None), :]` (logits_to_keep=0): a no-op slice."""
    return (isinstance(index, tuple) and len(index) == 3 and index[0] == slice(None)
            and index[2] == slice(None) and isinstance(index[1], slice)
            and index[1].start in (0, None) and index[1].stop is None and index[1].step is None)


def _softcap(node: fx.Node) -> tuple[fx.Node, float] | None:
    """(the capped logits, cap) for `tanh(logits / cap) * cap` ending at `node`, else None."""
    if kind(node) != "mul" or len(node.args) != 2 or node.kwargs:
        return None
    tanh = next((a for a in node.args if kind(a) == "tanh"), None)
    cap = node.args[1] if node.args[0] is tanh else node.args[0]
    if tanh is None or len(tanh.users) != 1 or len(tanh.args) != 1 or tanh.kwargs:
        return None
    div = tanh.args[0]
    if kind(div) != "div" or len(div.args) != 2 or div.kwargs or len(div.users) != 1:
        return None
    logits, divisor = div.args
    if not isinstance(cap, float) or divisor != cap or cap <= 0 or len(logits.users) != 1:
        return None
    return logits, cap


def split_lm_head(graph: fx.Graph, ctx: PassContext) -> int:
    output = next(n for n in graph.nodes if n.op == "output")
    results = output.args[0]
    if not isinstance(results, (tuple, list)) or len(results) != 1:
        return 0
    head, softcap = results[0], 0.0
    capped = _softcap(head)
    if capped is not None:
        head, softcap = capped
    if kind(head) != "linear":
        return 0
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
    eliminate_dead_code(graph)
    ctx.lm_head = LMHead(weight, bias, softcap=softcap, name=module_path(head))
    return 1
