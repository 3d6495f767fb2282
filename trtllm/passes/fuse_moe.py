"""Mixture-of-experts blocks become `trtllm.moe_routing` + `trtllm.fused_moe`.

Before (transformers 5.17's Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE as dynamo captures them,
with HF's default `grouped_mm` experts; or a plain-PyTorch MoE with a loop over experts):

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
After:

    logits = linear(x, W_router)
    w, ids = torch.ops.trtllm.moe_routing(logits, k, "softmax", renormalize)     # fp32, int32
    out = torch.ops.trtllm.fused_moe(x, W13, W2, w, ids)

W13 [E, 2I, H] and W2 [E, H, I] are HF's 3-D `gate_up_proj` / `down_proj` as they are (no copy),
or per-expert gate/up/down weights stacked once here as constant inputs; after the first call
the model's per-expert parameters become views of the stacks, so the weights are held once.

How a block is found, whatever its form: from each `softmax -> topk` (the routing, matched
exactly: fp32 softmax over the last dim, top-k over the last dim, the renormalisation and the
cast the only other ops), the expert computation is the region of the graph that reads the
routing's ids and weights and ends in one tensor `out` of x's shape through which every later
use passes (in-place ops such as `index_add_` are followed as new versions of their tensor).
The region may read only x, the routing's ids and weights, parameters and sizes. Its expert
weights are taken as HF's two 3-D tensors, or as per-expert `down(silu(gate(a)) * up(a))`
linears in graph order. Then, since a graph region cannot be proven equal to the op by its
shape alone (a gate/up interleaving, a transposed layout, another activation look alike), the
region is run once here, on random tokens with random distinct expert ids and the real weights,
beside `fused_moe_ref`: only a region that agrees (relative error 1e-3 in fp32, 3e-2 in
bf16/fp16) is replaced. A block that fails any step is left as captured, with a warning and a
note in `summary()` naming it and why: never replaced on a guess.

Differences within rounding: the op's routing weights stay fp32 (HF Qwen/OLMoE cast them to
the model dtype), and the kernel rounds the expert activations once (see kernels/fused_moe.py).
Not matched today: sigmoid / grouped routing (DeepSeek-V3), experts with biases or another
activation than SiLU, and HF's `eager` experts (a Python loop over `nonzero` that dynamo
cannot capture in one graph; HF's default `grouped_mm` and `batched_mm` are captured).
"""
from __future__ import annotations

import functools
import operator
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

import trtllm.kernels.fused_moe  # noqa: F401  (registers torch.ops.trtllm.fused_moe, moe_routing)
import trtllm.kernels.moe_routing  # noqa: F401
from trtllm.kernels.fused_moe import fused_moe_ref
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, is_float32_cast, kind, module_path, mutates, value

_TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


class NotMatched(Exception):
    """Why a block is left as captured."""


@dataclass
class Routing:
    topk: fx.Node
    logits: fx.Node        # the router's logits [.., E], before any cast
    top_k: int
    renormalize: bool
    ids: fx.Node           # topk's indices [.., k]
    weights: fx.Node       # the routing weights as the experts read them [.., k]
    chain: list[fx.Node]   # the nodes from the logits (excluded) to ids and weights, in graph order


@dataclass
class Experts:
    w13: fx.Node           # [E, 2I, H] graph input
    w2: fx.Node            # [E, H, I] graph input
    per_expert: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # (gate, up, down) if stacked


def fuse_moe(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for topk in [n for n in graph.nodes if kind(n) == "topk"]:
        try:
            routing = _routing(topk)
            _fuse(graph, ctx, routing)
            matches += 1
        except NotMatched as e:
            note = f"fuse_moe: the MoE routing {describe(topk)}: {e}"
            warnings.warn(f"trtllm.compile: {note}; the block runs unfused")
            ctx.notes.append(note)
    return matches


def _routing(topk: fx.Node) -> Routing:
    """The routing ending at `topk`, matched op for op."""
    probs, top_k = arg(topk, 0, "input"), arg(topk, 1, "k")
    if topk.op == "call_method":
        probs, top_k = topk.args[0], arg(topk, 1, "k")
    dim, largest = topk.kwargs.get("dim", topk.args[2] if len(topk.args) > 2 else -1), topk.kwargs.get("largest", True)
    pv = value(probs)
    if not isinstance(top_k, int) or largest is not True or pv is None or dim not in (-1, pv.dim() - 1):
        raise NotMatched("not a top-k of the largest over the last dim with a constant k")
    if kind(probs) != "softmax":
        raise NotMatched(f"top-k of {kind(probs) or probs.target} (only softmax scores are matched: sigmoid / "
                         "grouped routing such as DeepSeek-V3's is not)")
    if len(probs.users) != 1:
        raise NotMatched("the softmax scores are read besides the top-k")
    sdim = probs.kwargs.get("dim", probs.args[1] if len(probs.args) > 1 else None)
    if sdim not in (-1, pv.dim() - 1) or pv.dtype != torch.float32:
        raise NotMatched("softmax not over the last dim in fp32")
    logits, chain = probs.args[0], [probs, topk]
    if is_float32_cast(logits) and len(logits.users) == 1:
        chain.insert(0, logits)
        logits = logits.args[0]
    lv = value(logits)
    if not isinstance(lv, torch.Tensor) or lv.dtype not in _TOLERANCE:
        raise NotMatched("router logits are not a float tensor")
    getitems = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
    if set(getitems) != {0, 1} or len(topk.users) != 2:
        raise NotMatched("top-k values and indices are not read as two outputs")
    weights, ids = getitems[0], getitems[1]
    chain += [weights, ids]
    renormalize = False
    while True:  # the weights' chain: renormalisation, then a cast, each read only by the next
        users = list(weights.users)
        if len(users) == 2 and not renormalize:
            div = next((u for u in users if u.target in (operator.truediv, operator.itruediv, torch.div)), None)
            total = next((u for u in users if kind(u) == "sum"), None)
            if div is None or total is None or div.args[0] is not weights or div.args[1] is not total:
                break
            if len(total.users) != 1 or not _sums_last_dim_keepdim(total, value(weights).dim()):
                break
            weights, renormalize = div, True
            chain += [total, div]
        elif len(users) == 1 and kind(users[0]) in ("to", "float", "type_as") and users[0].args[0] is weights:
            weights = users[0]
            chain.append(weights)
        else:
            break
    return Routing(topk, logits, top_k, renormalize, ids, weights, chain)


def _sums_last_dim_keepdim(total: fx.Node, ndim: int) -> bool:
    dim = total.kwargs.get("dim", total.args[1] if len(total.args) > 1 else None)
    keepdim = total.kwargs.get("keepdim", total.args[2] if len(total.args) > 2 else False)
    return dim in (-1, ndim - 1, (-1,), [-1]) and keepdim is True


def _fuse(graph: fx.Graph, ctx: PassContext, routing: Routing) -> None:
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    reads = _read_versions(nodes)
    readers: dict[fx.Node, set[fx.Node]] = {n: set() for n in nodes}  # version -> nodes reading it
    for n, versions in reads.items():
        for v in versions.values():
            readers[v].add(n)
    seeds = {routing.ids, routing.weights}
    after_routing = _descendants(nodes, reads, seeds)
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
        if any(u not in region for u in seed.users):
            raise NotMatched(f"the routing's {seed.name} is read outside the expert computation")
    x, params, sizes = _region_inputs(region, seeds, _dims(ids_v)[:-1], ctx)
    xv, outv = value(x), value(out)
    if _dims(outv) != _dims(xv) or xv.dtype not in _TOLERANCE:
        raise NotMatched(f"the expert computation's output {out.name} is not of its input {x.name}'s shape")
    if max(order[x], order[routing.logits]) > order[out]:
        raise NotMatched("the hidden states or the router logits come after the expert computation")
    for n in region:
        if mutates(n) and n.args[0] not in region:
            raise NotMatched(f"{describe(n)} writes into a tensor made outside the expert computation")
    experts = _expert_weights(graph, ctx, region, params, xv, value(routing.logits).shape[-1])
    where = module_path(out) or out.name
    _check_numerics(region, out, x, routing, params, sizes, experts, ctx, where)

    fake_mode = xv.fake_mode
    with graph.inserting_before(out), fake_mode:
        logits = routing.logits
        if value(logits).dim() != 2:
            logits = _node(graph, "call_method", "reshape", (logits, -1, value(logits).shape[-1]), out)
        routed = _node(graph, "call_function", torch.ops.trtllm.moe_routing.default,
                       (logits, routing.top_k, "softmax", routing.renormalize), out)
        topk_weights = _node(graph, "call_function", operator.getitem, (routed, 0), out)
        topk_ids = _node(graph, "call_function", operator.getitem, (routed, 1), out)
        x2d = x if xv.dim() == 2 else _node(graph, "call_method", "reshape", (x, -1, xv.shape[-1]), out)
        fused = _node(graph, "call_function", torch.ops.trtllm.fused_moe.default,
                      (x2d, experts.w13, experts.w2, topk_weights, topk_ids), out)
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


def _read_versions(nodes: list[fx.Node]) -> dict[fx.Node, dict[fx.Node, fx.Node]]:
    """For each node, the version of each input it reads: the input itself, or the last
    in-place op on it before this node (`out.index_add_(...)` makes a new version of `out`)."""
    latest: dict[fx.Node, fx.Node] = {}
    reads = {}
    for n in nodes:
        reads[n] = {a: latest.get(a, a) for a in n.all_input_nodes}
        if mutates(n) and isinstance(n.args[0], fx.Node):
            latest[n.args[0]] = n
    return reads


def _descendants(nodes, reads, roots: set[fx.Node]) -> set[fx.Node]:
    """Nodes that read (a version of) `roots`' outputs, transitively; the roots excluded."""
    found = set(roots)
    for n in nodes:
        if n not in found and any(v in found for v in reads[n].values()):
            found.add(n)
    return found - roots


def _region(nodes, reads, readers, after_routing, seeds, out) -> set[fx.Node] | None:
    """The expert computation ending at `out`, or None if it does not close there."""
    below = _descendants(nodes, reads, {out})
    region = {n for n in after_routing if n not in below} | {out}
    for n in reversed(nodes):  # what only the region reads (weight views, zeros_like(x), x repeated k times)
        if (n not in region and n not in seeds and n.op not in ("placeholder", "output") and readers[n]
                and readers[n] <= region):
            region.add(n)
    for n in region:  # closed: what is read outside is `out` (its last version), nothing else
        if any(user not in region and reads[user][n] is not out for user in n.users):
            return None
    return region


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


def _expert_weights(graph, ctx, region, params, xv, num_experts) -> Experts:
    """W13 [E, 2I, H] and W2 [E, H, I] from the region's parameters."""
    tensors = {p: ctx.inputs.tensor(p) for p in params}
    hidden = xv.shape[-1]
    if len(params) == 2 and all(t.dim() == 3 for t in tensors.values()):  # HF's gate_up_proj, down_proj
        for w13, w2 in (params, params[::-1]):
            a, b = tensors[w13], tensors[w2]
            if (a.shape[0] == b.shape[0] == num_experts and a.shape[2] == hidden and b.shape[1] == hidden
                    and a.shape[1] == 2 * b.shape[2] and a.dtype == b.dtype == xv.dtype
                    and a.stride(-1) == 1 and b.stride(-1) == 1):
                return Experts(w13, w2, None)
        raise NotMatched(f"3-D expert weights of shapes {[tuple(t.shape) for t in tensors.values()]} are not "
                         f"[E={num_experts}, 2I, H={hidden}] and [E, H, I] of the model's dtype")
    triples = []  # per expert: down(silu(gate(a)) * up(a)), in graph order
    linears = [n for n in graph.nodes if n in region and kind(n) == "linear"]
    for down in linears:
        h = down.args[0]
        if kind(h) != "mul" or len(h.args) != 2:
            continue
        act = next((a for a in h.args if kind(a) == "silu"), None)
        up = h.args[1] if h.args[0] is act else h.args[0]
        gate = act.args[0] if act is not None else None
        if kind(gate) != "linear" or kind(up) != "linear" or not _same_value(gate.args[0], up.args[0]):
            continue
        triples.append((gate, up, down))
    used = [lin for t in triples for lin in t]
    if (not triples or len(triples) != num_experts or sorted(used, key=id) != sorted(linears, key=id)
            or len(params) != 3 * num_experts):
        raise NotMatched(f"expert weights of no recognised layout: {len(params)} parameters "
                         f"{sorted({tuple(t.shape) for t in tensors.values()})}, {len(triples)} of {num_experts} "
                         "experts found as down(silu(gate(a)) * up(a)) without biases")
    per_expert = []
    for lins in triples:
        ws = [ctx.inputs.tensor(arg(lin, 1, "weight")) for lin in lins]
        if any(w is None or w.dtype != xv.dtype for w in ws) or any(arg(lin, 2, "bias") is not None for lin in lins):
            raise NotMatched("an expert linear has a bias or a weight computed in the graph")
        per_expert.append(tuple(ws))
    gates, ups, downs = zip(*per_expert)
    if len({w.shape for w in gates + ups}) != 1 or len({w.shape for w in downs}) != 1:
        raise NotMatched("the experts' linears differ in shape")
    name = triples[0][2].name
    w13 = torch.stack([torch.cat([g.detach(), u.detach()]) for g, u in zip(gates, ups)])  # [E, 2I, H]
    w2 = torch.stack([d.detach() for d in downs])  # [E, H, I]
    return Experts(ctx.inputs.add_constant(f"{name}_moe_w13", w13), ctx.inputs.add_constant(f"{name}_moe_w2", w2),
                   per_expert)


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """One node, or two nodes computing the same thing from the same inputs (`x[tok]` twice)."""
    return a is b or (a.op == b.op == "call_function" and a.target == b.target and a.args == b.args
                      and a.kwargs == b.kwargs)


def _check_numerics(region, out, x, routing, params, sizes, experts, ctx, where) -> None:
    """Run the region on random tokens and ids with the real weights beside fused_moe_ref."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs = [x, routing.ids, routing.weights, *params, *sizes]
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    for n in [n for n in out.graph.nodes if n in region]:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[out])
    module = fx.GraphModule(torch.nn.Module(), graph)

    xv, idv, wv = value(x), value(routing.ids), value(routing.weights)
    w13, w2 = ctx.inputs.tensor(experts.w13), ctx.inputs.tensor(experts.w2)
    dev, num_experts = w13.device, w13.shape[0]
    shape = tuple(_hint(d) for d in xv.shape)
    tokens, top_k = shape[:-1], idv.shape[-1]
    g = torch.Generator(device=dev).manual_seed(0)
    x_real = torch.randn(shape, generator=g, device=dev).to(xv.dtype)
    ids = torch.rand((*tokens, num_experts), generator=g, device=dev).argsort(dim=-1)[..., :top_k]
    weights = torch.rand((*tokens, top_k), generator=g, device=dev)
    args = [x_real, ids.to(idv.dtype), weights.to(wv.dtype), *(ctx.inputs.tensor(p) for p in params),
            *(_hint(value(s)) for s in sizes)]
    try:
        with torch.no_grad():
            got = module(*args).float().reshape(-1, shape[-1])
    except Exception as e:  # the region needs what random ids cannot give it: not provable here
        raise NotMatched(f"the expert computation at {where} could not be run on random ids "
                         f"({type(e).__name__}: {e})") from None
    want = fused_moe_ref(x_real.reshape(-1, shape[-1]), w13, w2, weights.reshape(-1, top_k).to(wv.dtype),
                         ids.reshape(-1, top_k).to(torch.int32)).float()
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not err <= _TOLERANCE[xv.dtype]:
        raise NotMatched(f"the expert computation at {where} differs from fused_moe's (relative error {err:.3g} on "
                         "random tokens: another activation, weight layout or combine)")


def _hint(d) -> int:
    """A size's value in the example inputs (a symbolic size's hint)."""
    if isinstance(d, int):
        return d
    hint = d.node.hint
    if hint is None:
        raise NotMatched(f"a size of the expert computation ({d}) is data-dependent outside it")
    return int(hint)


def share_stacked_storage(per_expert, w13: torch.Tensor, w2: torch.Tensor) -> None:
    """Point each expert's gate, up, down Parameters at views of the stacked W13 [E, 2I, H] and
    W2 [E, H, I], so the model holds the expert weights once, not twice."""
    with torch.no_grad():
        for e, (gate, up, down) in enumerate(per_expert):
            inter = gate.shape[0]
            for p, view in ((gate, w13[e, :inter]), (up, w13[e, inter:]), (down, w2[e])):
                if isinstance(p, torch.nn.Parameter):
                    p.data = view

