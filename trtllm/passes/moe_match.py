"""Finding a mixture-of-experts routing in a captured graph, for passes/fuse_moe.py.

From a top-k node: `routing_scores` (the softmax or sigmoid scores it picks from, or None: not
a routing), then `softmax_routing` (softmax -> topk, optional renormalisation and cast,
matched exactly) or `sigmoid_routing` (DeepSeek-V3's: parameters read off the graph, then run
once on random logits beside `moe_routing_ref`). Either gives a `Routing`, or raises
`NotMatched` saying why. Also the graph helpers fuse_moe shares: node versions through in-place
ops (`read_versions`), `descendants`, `subgraph` (a region as a module, to run it), `size_hint`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from trtllm.kernels.moe_routing import moe_routing_ref
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, is_float32_cast, kind, mutates, value

TOLERANCE = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 3e-2}


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
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    bias: fx.Node | None = None    # e_score_correction_bias [E], a graph input
    scale: float = 1.0             # routed_scaling_factor

    def op_args(self, logits: fx.Node) -> tuple:
        """torch.ops.trtllm.moe_routing's arguments."""
        return (logits, self.top_k, self.scoring, self.renormalize, self.n_group, self.topk_group, self.bias,
                self.scale)


def routing_scores(topk: fx.Node) -> fx.Node | None:
    """The softmax or sigmoid scores a top-k picks from (through DeepSeek's group mask and
    score-correction bias), or None: then it is not a routing top-k."""
    x = topk.args[0]
    if x.op == "call_method" and x.target == "masked_fill":
        x = x.args[0]
    if kind(x) == "add":
        x = next((a for a in x.args if kind(a) == "sigmoid"), x)
    return x if kind(x) in ("softmax", "sigmoid") else None


def softmax_routing(topk: fx.Node) -> Routing:
    """The routing ending at `topk`, matched op for op."""
    probs, top_k = arg(topk, 0, "input"), arg(topk, 1, "k")
    if topk.op == "call_method":
        probs, top_k = topk.args[0], arg(topk, 1, "k")
    dim, largest = topk.kwargs.get("dim", topk.args[2] if len(topk.args) > 2 else -1), topk.kwargs.get("largest", True)
    pv = value(probs)
    if not isinstance(top_k, int) or largest is not True or pv is None or dim not in (-1, pv.dim() - 1):
        raise NotMatched("not a top-k of the largest over the last dim with a constant k")
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
    if not isinstance(lv, torch.Tensor) or lv.dtype not in TOLERANCE:
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
            if len(total.users) != 1 or not sums_last_dim_keepdim(total, value(weights).dim()):
                break
            weights, renormalize = div, True
            chain += [total, div]
        elif len(users) == 1 and kind(users[0]) in ("to", "float", "type_as") and users[0].args[0] is weights:
            weights = users[0]
            chain.append(weights)
        else:
            break
    return Routing(topk, logits, top_k, renormalize, ids, weights, chain)


def sigmoid_routing(topk: fx.Node, scores: fx.Node, ctx: PassContext) -> Routing:
    """DeepSeek-V3's router: sigmoid scores, + score-correction bias for the choice, grouped
    top-k (groups scored by their 2 best, the topk_group best kept), weights gathered from the
    scores, renormalised (+1e-20), times routed_scaling_factor. Its ops vary more than softmax
    routing's, so the parameters are read off the graph and the routing is run once on random
    logits beside moe_routing_ref before it is trusted."""
    top_k = arg(topk, 1, "k")
    if not isinstance(top_k, int) or topk.kwargs.get("largest", True) is not True:
        raise NotMatched("not a top-k of the largest with a constant k")
    if len(topk.users) != 1 or next(iter(topk.users)).target is not operator.getitem \
            or next(iter(topk.users)).args[1] != 1:
        raise NotMatched("sigmoid routing whose top-k values are read (DeepSeek-V3 gathers the scores at the ids)")
    ids = next(iter(topk.users))
    gather = next((u for u in ids.users if _is_gather(u) and u.args[0] is scores), None)
    if gather is None:
        raise NotMatched("sigmoid routing without the scores gathered at the chosen ids")
    weights, renormalize, scale = gather, False, 1.0
    while True:  # renormalisation (sum, + eps, divide), scaling by a constant, casts
        users = list(weights.users)
        total = next((u for u in users if kind(u) == "sum"), None)
        div = next((u for u in users if u.target in (operator.truediv, operator.itruediv, torch.div)), None)
        if len(users) == 2 and not renormalize and total is not None and div is not None and div.args[0] is weights:
            denominator = div.args[1]
            if denominator is not total and not (kind(denominator) == "add" and total in denominator.args
                                                 and all(a is total or (isinstance(a, float) and a < 1e-6)
                                                         for a in denominator.args)):
                break
            weights, renormalize = div, True
        elif len(users) == 1 and kind(users[0]) == "mul" and any(isinstance(a, float) for a in users[0].args):
            scale *= next(a for a in users[0].args if isinstance(a, float))
            weights = users[0]
        elif len(users) == 1 and kind(users[0]) in ("to", "float", "type_as") and users[0].args[0] is weights:
            weights = users[0]
        else:
            break
    logits = scores.args[0]
    choice = topk.args[0].args[0] if topk.args[0].target == "masked_fill" else topk.args[0]
    bias = next((a for a in choice.args if a is not scores), None) if kind(choice) == "add" else None
    if bias is not None and (ctx.inputs.tensor(bias) is None or ctx.inputs.tensor(bias).dim() != 1):
        raise NotMatched("the score-correction bias is not a 1-D graph input")
    nodes = list(topk.graph.nodes)
    reads = read_versions(nodes)
    chain = _between(nodes, reads, logits, {ids, weights})
    groups = [value(n).shape[-2] for n in chain if n.op == "call_method" and n.target in ("view", "reshape")
              and n.args[0] is choice and value(n).dim() == 3]
    group_topks = [arg(n, 1, "k") for n in chain if kind(n) == "topk" and kind(n.args[0]) == "sum"]
    n_group = groups[0] if groups else 1
    topk_group = group_topks[0] if group_topks else 1
    if not (isinstance(n_group, int) and isinstance(topk_group, int)) or len(groups) > 1 or len(group_topks) > 1:
        raise NotMatched("the expert groups or the groups kept are not constants")
    for n in chain:
        if any(u not in chain and n not in (ids, weights) for u in n.users):
            raise NotMatched(f"the routing's {n.name} is read outside it")
    routing = Routing(topk, logits, top_k, renormalize, ids, weights, chain, "sigmoid", n_group, topk_group, bias, scale)
    _check_routing(routing, ctx)
    return routing


def _between(nodes, reads, start: fx.Node, ends: set[fx.Node]) -> list[fx.Node]:
    """The nodes on some path from `start` (excluded) to `ends` (included), versions followed."""
    below = descendants(nodes, reads, {start})
    above = set(ends)
    for n in reversed(nodes):
        if n in above:
            above.update(reads[n].values())
    return [n for n in nodes if n in below and n in above]


def _is_gather(n: fx.Node) -> bool:
    return (n.op == "call_method" and n.target == "gather") or (n.op == "call_function" and n.target is torch.gather)


def _check_routing(routing: Routing, ctx: PassContext) -> None:
    """The routing's ids and weights on random logits equal moe_routing_ref's (in any order)."""
    chain = set(routing.chain)
    inputs = [routing.logits] + sorted({a for n in routing.chain for a in n.all_input_nodes
                                        if a not in chain and a is not routing.logits}, key=lambda a: a.name)
    module = subgraph(routing.chain, inputs, (routing.ids, routing.weights))
    lv = value(routing.logits)
    shape = tuple(size_hint(d) for d in lv.shape)
    bias = ctx.inputs.tensor(routing.bias) if routing.bias is not None else None
    dev = bias.device if bias is not None else torch.device("cpu")
    for a in inputs[1:]:
        if ctx.inputs.tensor(a) is None and not isinstance(value(a), torch.SymInt):
            raise NotMatched(f"the routing reads {a.name} besides its logits and parameters")
        if ctx.inputs.tensor(a) is not None:
            dev = ctx.inputs.tensor(a).device
    g = torch.Generator(device=dev).manual_seed(0)
    logits = torch.randn(shape, generator=g, device=dev).to(lv.dtype)
    args = [logits, *(ctx.inputs.tensor(a) if ctx.inputs.tensor(a) is not None else size_hint(value(a))
                      for a in inputs[1:])]
    try:
        with torch.no_grad():
            ids, weights = module(*args)
        want_w, want_ids = moe_routing_ref(logits.reshape(-1, shape[-1]), routing.top_k, routing.scoring,
                                           routing.renormalize, routing.n_group, routing.topk_group, bias,
                                           routing.scale)
    except Exception as e:
        raise NotMatched(f"the routing could not be checked on random logits ({type(e).__name__}: {e})") from None
    ids, weights = ids.reshape(want_ids.shape).long(), weights.reshape(want_w.shape).float()
    order, want_order = ids.argsort(dim=-1), want_ids.long().argsort(dim=-1)
    same_ids = torch.equal(ids.gather(1, order), want_ids.long().gather(1, want_order))
    if not same_ids or not torch.allclose(weights.gather(1, order), want_w.gather(1, want_order),
                                          rtol=1e-4, atol=1e-6):
        raise NotMatched(f"the sigmoid routing differs from moe_routing's with n_group={routing.n_group}, "
                         f"topk_group={routing.topk_group}, renormalize={routing.renormalize}, "
                         f"scale={routing.scale} on random logits")


def subgraph(region_in_order: list[fx.Node], inputs: list[fx.Node], outputs) -> fx.GraphModule:
    """The nodes `region_in_order` as a module of `inputs` returning `outputs`."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in inputs:
        env[n] = graph.placeholder(n.name)
    for n in region_in_order:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs) if isinstance(outputs, tuple) else env[outputs])
    return fx.GraphModule(torch.nn.Module(), graph)


def sums_last_dim_keepdim(total: fx.Node, ndim: int) -> bool:
    dim = total.kwargs.get("dim", total.args[1] if len(total.args) > 1 else None)
    keepdim = total.kwargs.get("keepdim", total.args[2] if len(total.args) > 2 else False)
    return dim in (-1, ndim - 1, (-1,), [-1]) and keepdim is True


def read_versions(nodes: list[fx.Node]) -> dict[fx.Node, dict[fx.Node, fx.Node]]:
    """For each node, the version of each input it reads: the input itself, or the last
    in-place op on it before this node (`out.index_add_(...)` makes a new version of `out`)."""
    latest: dict[fx.Node, fx.Node] = {}
    reads = {}
    for n in nodes:
        reads[n] = {a: latest.get(a, a) for a in n.all_input_nodes}
        if mutates(n) and isinstance(n.args[0], fx.Node):
            latest[n.args[0]] = n
    return reads


def descendants(nodes, reads, roots: set[fx.Node]) -> set[fx.Node]:
    """Nodes that read (a version of) `roots`' outputs, transitively; the roots excluded."""
    found = set(roots)
    for n in nodes:
        if n not in found and any(v in found for v in reads[n].values()):
            found.add(n)
    return found - roots


def size_hint(d) -> int:
    """A size's value in the example inputs (a symbolic size's hint)."""
    if isinstance(d, int):
        return d
    hint = d.node.hint
    if hint is None:
        raise NotMatched(f"a size of the expert computation ({d}) is data-dependent outside it")
    return int(hint)
