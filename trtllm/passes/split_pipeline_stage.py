"""Pipeline parallelism: keep one stage's decoder layers of the whole model's graph. Runs only when
compiled with `pipeline=PipelineStage(...)` (trtllm/parallel/pipeline_parallel.py); else no match.

Before (the whole model; stage 1 of 2 holds layers 2..3 of 4):

    x0 = embed(input_ids)                          # [B, S, H]
    x2 = layer1(layer0(x0, cos, sin), cos, sin)    # cos, sin = rope(positions)
    x4 = layer3(layer2(x2, cos, sin), cos, sin)
    return lm_head(norm(x4))
After, on stage 1:

    x2 = trtllm.stage_input(input_ids, H, dtype)   # what stage 0 sent (the runtime receives it)
    x4 = layer3(layer2(x2, cos, sin), cos, sin)    # attention layers renumbered 0, 1: this stage's cache
    return lm_head(norm(x4))
and on stage 0 the graph returns x2 (the hidden states entering layer 2) instead of logits.

A stage's input is the one tensor of shape [B, S, H] (H = hidden size) that the nodes of its
first layer read from outside the layer (module paths say which layer a node belongs to:
`...layers.<i>...`); its output, the same tensor of the layer after its last. Anything else is
a CompileError naming the candidates. Nodes no longer needed (the embedding on later stages, the
other stages' layers, the head on earlier ones) are dropped, and with them the reads of the
weights this rank did not load (parallel/rank_model.py loads only its stage's). Runs right after
attention is paged and before shard_tensor_parallel, which then splits only this stage's layers.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from trtllm.contract import CompileError
from trtllm.parallel.pipeline_parallel import layer_of  # registers torch.ops.trtllm.stage_input
from trtllm.parallel.tensor_parallel import is_unloaded
from trtllm.passes.context import PassContext
from trtllm.passes.match import describe, eliminate_dead_code, module_path, value


def split_pipeline_stage(graph: fx.Graph, ctx: PassContext) -> int:
    stage = ctx.pipeline
    if stage is None or stage.num_stages == 1:
        return 0
    # the weights too (placeholders): a layer's own 3-D weight (fused experts [E, 2I, H]) is not its input
    layers = {n: layer_of(module_path(n)) for n in graph.nodes if n.op in ("call_function", "call_method", "placeholder")}
    output = next(n for n in graph.nodes if n.op == "output")
    if not stage.is_last:
        output.args = ((_entering(graph, layers, stage.end_layer, stage.hidden_size),),)
    if not stage.is_first:
        entering = _entering(graph, layers, stage.first_layer, stage.hidden_size)
        if value(entering).dtype != stage.dtype:
            raise CompileError(f"{describe(entering)}: the hidden states entering layer {stage.first_layer} are "
                               f"{value(entering).dtype}, the pipeline sends {stage.dtype}")
        like = next((n for n in graph.nodes if n.op == "placeholder" and _is_token_grid(n, entering)), None)
        if like is None:
            raise CompileError("pipeline stage: no [B, S] integer input (input_ids) to shape the stage's input by")
        with graph.inserting_after(like):
            received = graph.call_function(torch.ops.trtllm.stage_input.default, (like, stage.hidden_size, stage.dtype))
        received.meta["example_value"] = value(entering)
        entering.replace_all_uses_with(received)
    eliminate_dead_code(graph)
    while _drop_other_layers(graph, layers, stage):
        eliminate_dead_code(graph)
    _renumber_attention(graph, stage)
    tp = ctx.tensor_parallel
    if tp is None or tp.size == 1:  # else shard_tensor_parallel reads the split weights' slices, and checks
        for node in graph.nodes:
            t = ctx.inputs.tensor(node)
            if node.op == "placeholder" and node.users and t is not None and is_unloaded(t):
                raise CompileError(f"{node.name}: this rank loaded only pipeline stage {stage.stage}'s weights, but "
                                   f"its graph reads this one (in {', '.join(map(describe, node.users))})")
    return 1


def _drop_other_layers(graph: fx.Graph, layers: dict, stage) -> int:
    """Erase the unused nodes of other stages' layers, last first, in-place ones too (which
    eliminate_dead_code keeps: an HF MoE layer's in-place routing ops would keep its layer alive);
    how many."""
    dropped = 0
    for node in reversed(list(graph.nodes)):
        layer = layers.get(node)
        if node.op != "placeholder" and layer is not None and not stage.first_layer <= layer < stage.end_layer \
                and not node.users:
            graph.erase_node(node)
            dropped += 1
    return dropped


def _is_token_grid(node: fx.Node, hidden: fx.Node) -> bool:
    v, h = value(node), value(hidden)
    return isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dim() == 2 and v.dim() == h.dim() - 1


def _entering(graph: fx.Graph, layers: dict, layer: int, hidden_size: int) -> fx.Node:
    """The hidden states [B, S, H] the nodes of decoder layer `layer` read from outside it."""
    inside = [n for n, i in layers.items() if i == layer]
    if not inside:
        raise CompileError(f"pipeline stage boundary at layer {layer}: no node of the graph sits in a module "
                           "path `...layers.<i>...` of that number")
    found = []
    for node in inside:
        for a in node.all_input_nodes:
            v = value(a)
            if layers.get(a) != layer and a not in found and isinstance(v, torch.Tensor) and v.dim() == 3 \
                    and v.is_floating_point() and v.shape[-1] == hidden_size:
                found.append(a)
    if len(found) != 1:
        raise CompileError(f"pipeline stage boundary at layer {layer}: expected one [B, S, {hidden_size}] hidden "
                           f"state entering it, found {len(found)}: {', '.join(map(describe, found)) or 'none'}")
    return found[0]


def _renumber_attention(graph: fx.Graph, stage) -> None:
    """This stage's attention layers first_layer..end_layer-1 become 0..: its KV cache holds only them."""
    ops = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.ops.trtllm.attention.default]
    kept = sorted(n.args[3] for n in ops)
    if kept != list(range(stage.first_layer, stage.end_layer)):
        raise CompileError(f"pipeline stage {stage.stage} keeps attention layers {kept}, expected layers "
                           f"{stage.first_layer}..{stage.end_layer - 1} (one attention a decoder layer)")
    for n in ops:
        n.args = (*n.args[:3], n.args[3] - stage.first_layer, *n.args[4:])
