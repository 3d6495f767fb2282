"""Mixture-of-experts blocks become `trtllm.moe_routing` + `trtllm.fused_moe`.

Before (transformers 5.17's Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE as dynamo captures them,
with HF's default `grouped_mm` experts; models/qwen3_moe.py's gathered einsums over its 3-D
experts; or a plain-PyTorch MoE with a loop over experts):

    logits = linear(x, W_router)                 # [T, E]   (kept: any router computing logits)
    probs = softmax(logits.float(), dim=-1)      # fp32 softmax
    w, ids = topk(probs, k, dim=-1)              # [T, k]
    w = w / w.sum(-1, keepdim=True)              # optional renormalisation
    w = w.to(x.dtype)                            # optional cast
    out = <expert computation of (x, ids, w) and the expert weights>    # [T, H]:
          HF: sort -> gather -> grouped_mm(gate_up_proj) -> SiLU*mul -> grouped_mm(down_proj)
              -> * w -> un-permute -> sum over k
          plain: zeros_like(x); for e: tok, j = where(ids == e);
                 out.index_add_(0, tok, w2_e(silu(w1_e(x[tok])) * w3_e(x[tok])) * w[tok, j, None])
or DeepSeek-V3's router (transformers' DeepseekV3TopkRouter):

    scores = sigmoid(logits); choice = scores + bias                       # bias [E]: a graph input
    group_scores = choice.view(T, G, E // G).topk(2)[0].sum(-1)            # n_group G
    mask = zeros_like(group_scores).scatter_(1, topk(group_scores, TG)[1], 1) -> [T, E]
    ids = topk(choice.masked_fill(~mask, -inf), k)[1]
    w = scores.gather(1, ids); w /= w.sum(-1, keepdim=True) + 1e-20; w = w * scale
After:

    logits = linear(x, W_router)
    w, ids = torch.ops.trtllm.moe_routing(logits, k, "softmax" | "sigmoid", renormalize,
                                          G, TG, bias, scale)              # fp32, int32
    out = torch.ops.trtllm.fused_moe(x, W13, W2, w, ids)

W13 [E, 2I, H] and W2 [E, H, I] are HF's 3-D `gate_up_proj` / `down_proj` as they are (no copy),
or per-expert gate/up/down weights stacked once here as constant inputs; after the first call
the model's per-expert parameters become views of the stacks, so the weights are held once.

How a block is found, whatever its form (the routing's matchers: passes/moe_match.py): from each top-k of softmax or sigmoid scores (the
routing: softmax -> topk matched exactly, fp32 softmax and top-k over the last dim, the
renormalisation and the cast the only other ops; the sigmoid routing's parameters read off
its graph, then the routing run once on random logits beside `moe_routing_ref`, its ids and
weights compared in any order), the expert computation is the region of the graph that reads the
routing's ids and weights and ends in one tensor `out` of x's shape through which every later
use passes (in-place ops such as `index_add_` are followed as new versions of their tensor).
The region may read only x, the routing's ids and weights, parameters and sizes. Its expert
weights are taken as HF's two 3-D tensors, or as per-expert `down(silu(gate(a)) * up(a))`
linears in graph order; then the region is run once on random tokens beside `fused_moe_ref`,
and only a region that agrees is replaced (both in passes/moe_check.py). A block that fails
any step is left as captured, with a warning and a note in `summary()` naming it and why:
never replaced on a guess.

FP8 experts (QuantConfig FP8 algos: `ctx.quantization.experts`, trtllm/quantization/fp8_linears.py):
HF's 3-D weights are then placeholders, and the block becomes `trtllm.fused_moe_fp8` over the
FP8 weights and scales (constant inputs). With `ctx.expert_load` (trtllm/expert_load.py) each
block also gets `trtllm.count_expert_load(topk_ids, counts)` after its routing.

Differences within rounding: the op's routing weights stay fp32 (HF Qwen/OLMoE cast them to
the model dtype), and the kernel rounds the expert activations once (see kernels/fused_moe.py).
Not matched today: other routings (DeepSeek-V2's group_limited_greedy, top-k before the
softmax), experts with biases or another activation than SiLU, and HF's `eager` experts (a
Python loop over `nonzero` that dynamo cannot capture in one graph; models/hf.py switches
them to `batched_mm`). Top-k nodes of other inputs (DeepSeek's per-group top-2) are not
routings and pass silently.
"""
from __future__ import annotations

import functools
import operator
import warnings

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

import trtllm.expert_load  # noqa: F401  (registers torch.ops.trtllm.count_expert_load)
import trtllm.kernels.fused_moe  # noqa: F401  (registers torch.ops.trtllm.fused_moe, moe_routing)
import trtllm.kernels.fused_moe_fp8  # noqa: F401  (registers torch.ops.trtllm.fused_moe_fp8)
import trtllm.kernels.moe_routing  # noqa: F401
from trtllm.passes.context import PassContext
from trtllm.passes.match import describe, kind, module_path, mutates, value
from trtllm.passes.moe_check import check_numerics, expert_weights
from trtllm.passes.moe_match import (
    TOLERANCE,
    NotMatched,
    Routing,
    descendants,
    read_versions,
    routing_scores,
    sigmoid_routing,
    softmax_routing,
)


def fuse_moe(graph: fx.Graph, ctx: PassContext) -> int:
    """Each block is looked for in its window of the graph: from the end of the block before
    (or the graph's start) to the next routing's top-k, which reads this block's output.
    What nodes read is computed once for the whole graph (a node's reads outside the fused
    blocks do not change when one is replaced): per block over the whole graph, the 48
    blocks of a Qwen3-30B-A3B-deep model took 5.6 s of the passes' 8.4 s (cProfile, CPU)."""
    matches = 0
    erased: set[fx.Node] = set()
    nodes = list(graph.nodes)
    reads = read_versions(nodes)
    readers: dict[fx.Node, set[fx.Node]] = {n: set() for n in nodes}  # version -> nodes reading it
    for n, versions in reads.items():
        for v in versions.values():
            readers[v].add(n)
    topks = [n for n in nodes if kind(n) == "topk" and routing_scores(n) is not None]  # not DeepSeek's per group
    start = None  # the window's first node is the one after it (None: the graph's first)
    for i, topk in enumerate(topks):
        if topk in erased:
            continue
        scores = routing_scores(topk)
        end = next((t for t in topks[i + 1:] if t not in erased), None)
        try:
            routing = softmax_routing(topk) if kind(scores) == "softmax" else sigmoid_routing(topk, scores, ctx)
            done, start = _fuse(graph, ctx, routing, _window(graph, start, end), reads, readers)
            erased |= done
            matches += 1
        except NotMatched as e:
            note = f"fuse_moe: the MoE routing {describe(topk)}: {e}"
            warnings.warn(f"trtllm.compile: {note}; the block runs unfused")
            ctx.notes.append(note)
    return matches


def _window(graph: fx.Graph, start: fx.Node | None, end: fx.Node | None) -> list[fx.Node]:
    """The nodes after `start` (from the first if None) up to `end` (excluded; None: the last)."""
    n, window = (start.next if start is not None else next(iter(graph.nodes))), []
    while n is not end and n.op != "root":
        window.append(n)
        n = n.next
    return window


def _fuse(graph: fx.Graph, ctx: PassContext, routing: Routing, nodes: list[fx.Node], reads, readers
          ) -> tuple[set[fx.Node], fx.Node]:
    """Replace the block `routing` starts, looked for among `nodes` (its window, fuse_moe);
    returns the nodes erased and the last node added."""
    order = {n: i for i, n in enumerate(nodes)}
    seeds = {routing.ids, routing.weights}
    after_routing = descendants(nodes, reads, seeds) - set(routing.chain)  # DeepSeek gathers at the ids
    ids_v = value(routing.ids)
    for out in [n for n in nodes if n in after_routing]:
        ov = value(out)
        if not isinstance(ov, torch.Tensor) or ov.dim() != ids_v.dim() or _dims(ov)[:-1] != _dims(ids_v)[:-1]:
            continue
        region = _region(nodes, reads, readers, after_routing, seeds, out)
        if region is not None:
            break
    else:
        raise NotMatched("no expert computation found after it: no tensor of the tokens' shape through which "
                         "every use of the routing passes, reading only the hidden states, the routing and weights")
    for seed in seeds:
        if any(u not in region and u not in routing.chain for u in seed.users):
            raise NotMatched(f"the routing's {seed.name} is read outside the expert computation")
    x, params, sizes = _region_inputs(region, seeds, _dims(ids_v)[:-1], ctx)
    xv, outv = value(x), value(out)
    if _dims(outv) != _dims(xv) or xv.dtype not in TOLERANCE:
        raise NotMatched(f"the expert computation's output {out.name} is not of its input {x.name}'s shape")
    if max(order.get(x, -1), order.get(routing.logits, -1)) > order[out]:  # -1: before the window
        raise NotMatched("the hidden states or the router logits come after the expert computation")
    for n in region:
        if mutates(n) and n.args[0] not in region:
            raise NotMatched(f"{describe(n)} writes into a tensor made outside the expert computation")
    experts = expert_weights(graph, ctx, region, params, xv, value(routing.logits).shape[-1])
    where = module_path(out) or out.name
    check_numerics(region, out, x, routing, params, sizes, experts, ctx, where)

    if experts.fp8 is not None:
        q = experts.fp8
        fp8_weights = [ctx.inputs.add_constant(f"{out.name}_moe_{name}", t) for name, t in
                       (("w13_fp8", q.w13), ("w2_fp8", q.w2), ("w13_scale", q.w13_scale), ("w2_scale", q.w2_scale))]
    counts = None
    if ctx.expert_load is not None:  # trtllm/expert_load.py: this block's tokens per expert (made outside fake mode)
        counter = ctx.expert_load.counter(where, value(routing.logits).shape[-1], ctx.inputs.tensor(experts.w13).device)
        counts = ctx.inputs.add_constant(f"{out.name}_expert_load", counter)
    fake_mode = xv.fake_mode
    with graph.inserting_before(out), fake_mode:
        logits = routing.logits
        if value(logits).dim() != 2:
            logits = _node(graph, "call_method", "reshape", (logits, -1, value(logits).shape[-1]), out)
        routed = _node(graph, "call_function", torch.ops.trtllm.moe_routing.default, routing.op_args(logits), out)
        topk_weights = _node(graph, "call_function", operator.getitem, (routed, 0), out)
        topk_ids = _node(graph, "call_function", operator.getitem, (routed, 1), out)
        if counts is not None:
            _node(graph, "call_function", torch.ops.trtllm.count_expert_load.default, (topk_ids, counts), out)
        x2d = x if xv.dim() == 2 else _node(graph, "call_method", "reshape", (x, -1, xv.shape[-1]), out)
        if experts.fp8 is None:
            fused = _node(graph, "call_function", torch.ops.trtllm.fused_moe.default,
                          (x2d, experts.w13, experts.w2, topk_weights, topk_ids), out)
        else:  # kernels/fused_moe_fp8.py over the FP8 weights and scales (constants; the placeholders go unread)
            fused = _node(graph, "call_function", torch.ops.trtllm.fused_moe_fp8.default,
                          (x2d, *fp8_weights, topk_weights, topk_ids), out)
        if xv.dim() != 2:
            fused = _node(graph, "call_method", "view_as", (fused, x), out)
        if outv.dtype != xv.dtype:  # e.g. Mixtral sums its fp32-weighted experts in fp32
            fused = _node(graph, "call_method", "to", (fused, outv.dtype), out)
    for user in [u for u in nodes if u not in region and u.op != "placeholder"]:
        for a in list(user.all_input_nodes):
            if a in region:  # _region checked: it reads `out`'s final version
                user.replace_input_with(a, fused)
    for n in reversed(nodes):
        if n in region:
            graph.erase_node(n)
    for n in reversed(routing.chain):  # all read only inside the chain and the region now erased
        graph.erase_node(n)
    if experts.per_expert is not None:
        ctx.after_first_call.append(functools.partial(
            share_stacked_storage, experts.per_expert, ctx.inputs.tensor(experts.w13), ctx.inputs.tensor(experts.w2)))
    return region | set(routing.chain), fused


def _node(graph: fx.Graph, op: str, target, args: tuple, like: fx.Node) -> fx.Node:
    """A new node with `like`'s meta and its example value computed on fake tensors."""
    new = graph.create_node(op, target, args)
    new.meta.update(like.meta)
    fake_mode = value(like).fake_mode
    fake_args = [value(a) if isinstance(a, fx.Node) else a for a in args]
    fake_args = [fake_mode.from_tensor(a, static_shapes=True)  # a constant input added by this pass
                 if isinstance(a, torch.Tensor) and not isinstance(a, FakeTensor) else a for a in fake_args]
    if op == "call_method":
        new.meta["example_value"] = getattr(fake_args[0], target)(*fake_args[1:])
    else:
        new.meta["example_value"] = target(*fake_args)
    return new


def _dims(t: torch.Tensor) -> tuple[str, ...]:
    """A tensor's sizes as strings, so symbolic sizes compare without guarding on them."""
    return tuple(str(d) for d in t.shape)


def _region(nodes, reads, readers, after_routing, seeds, out) -> set[fx.Node] | None:
    """The expert computation ending at `out`, or None if it does not close there."""
    below = descendants(nodes, reads, {out})
    region = {n for n in after_routing if n not in below} | {out}
    tokens = _dims(value(next(iter(seeds))))[:-1]
    for n in reversed(nodes):  # what only the region reads (weight views, zeros_like(x), x repeated k times),
        # except a tensor of the tokens' shape made from other values: the hidden states it reads
        if (n not in region and n not in seeds and n.op not in ("placeholder", "output") and readers[n]
                and readers[n] <= region and (_is_factory(n) or not _of_tokens(n, tokens))):
            region.add(n)
    for n in region:  # closed: what is read outside is `out` (its last version), nothing else
        if any(user not in region and reads.get(user, {}).get(n, n) is not out for user in n.users):
            return None
    return region


# ops whose output's values do not depend on their tensor arguments' values (only shapes)
_FACTORIES = {torch.zeros_like, torch.empty_like, torch.ones_like, torch.full_like, torch.zeros, torch.empty,
              torch.ones, torch.full, torch.arange}


def _is_factory(n: fx.Node) -> bool:
    return ((n.op == "call_function" and n.target in _FACTORIES)
            or (n.op == "call_method" and n.target in ("new_zeros", "new_empty", "new_ones", "new_full")))


def _of_tokens(n: fx.Node, tokens: tuple[str, ...]) -> bool:
    v = value(n)
    return isinstance(v, torch.Tensor) and v.is_floating_point() and _dims(v)[:-1] == tokens


def _region_inputs(region, seeds, tokens: tuple[str, ...], ctx) -> tuple[fx.Node, list[fx.Node], list[fx.Node]]:
    """(the hidden states: the one input of the tokens' leading sizes, the parameters, the size
    nodes) the region reads besides the routing."""
    hidden, params, sizes, others = [], [], [], []
    for n in region:
        for a in n.all_input_nodes:
            if a in region or a in seeds or a in hidden or a in params or a in sizes or a in others:
                continue
            v = value(a)
            if isinstance(v, torch.SymInt):
                sizes.append(a)
            elif isinstance(v, torch.Tensor) and _dims(v)[:-1] == tokens:
                hidden.append(a)
            elif ctx.inputs.tensor(a) is not None:
                params.append(a)
            else:
                others.append(a)
    if len(hidden) != 1 or others:
        raise NotMatched(f"the expert computation reads {[n.name for n in hidden + others]} besides the routing "
                         "and parameters (one hidden-states tensor expected)")
    return hidden[0], params, sizes


def share_stacked_storage(per_expert, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Point each expert's gate, up, down Parameters at views of the stacked W13 [E, 2I, H] and
    W2 [E, H, I], so the model holds the expert weights once, not twice."""
    with torch.no_grad():
        for e, (gate, up, down) in enumerate(per_expert):
            inter = gate.shape[0]
            for p, view in ((gate, w13[e, :inter]), (up, w13[e, inter:]), (down, w2[e])):
                if isinstance(p, torch.nn.Parameter):
                    p.data = view
