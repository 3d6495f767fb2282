"""Our ops (`torch.ops.trtllm.*`) as inductor fallbacks, declared before inductor lowers a graph.

Inductor runs an op it has no lowering for as a fallback kernel (the op itself, between its
generated kernels), and creates that fallback the first time it meets the op. torch 2.11
builds the "Creating implicit fallback" log line while doing so, whether or not the log is on:
the str of the op's argument IR, which grows exponentially with the unrealized pointwise work
behind it. The FP8 Llama-3.1-8B decode graph meets `fused_add_rms_norm` first at the final norm
(every earlier one became fused_add_rms_norm_quant_fp8): building the engine never finished
(> 6 min on the H200, 2026-12-02; with 2 layers too). torch 2.13 builds the line lazily.
Declared here, the fallback is the one inductor would make (the op's layout tag, default
included), without the line.
"""
from __future__ import annotations

import torch
import torch.fx as fx


def declare_inductor_fallbacks(graph: fx.Graph) -> list[torch._ops.OpOverload]:
    """Make inductor's fallback for each trtllm op in `graph` that has none yet; returns those made."""
    from torch._inductor.lowering import lowerings, make_fallback, tag_to_layout_constraint
    from torch._library.utils import get_layout_constraint_tag

    made = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        for op in _overloads(node.target):
            if op.namespace == "trtllm" and op not in lowerings:
                make_fallback(op, layout_constraint=tag_to_layout_constraint(get_layout_constraint_tag(op)),
                              warn=False)
                made.append(op)
    return made


def _overloads(target) -> list[torch._ops.OpOverload]:
    """The op overloads a graph node's target may lower to: itself, a packet's overloads, or
    the overload behind a `torch.library.custom_op` (as model code calls it)."""
    target = getattr(target, "_opoverload", target)
    if isinstance(target, torch._ops.OpOverload):
        return [target]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return [getattr(target, name) for name in target.overloads()]
    return []
