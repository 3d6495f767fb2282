"""What an MoE block's expert computation is, for passes/fuse_moe.py: its weights, then a proof.

`expert_weights` reads W13 [E, 2I, H] and W2 [E, H, I] off the region's parameters: HF's two
3-D tensors as they are (or the FP8 experts whose placeholders they are), or per-expert
`down(silu(gate(a)) * up(a))` linears in graph order, stacked once as constant inputs.

`check_numerics` then runs the region once, on a few random tokens (CHECK_TOKENS) with random distinct expert ids
and the real weights (random ones of their shapes where the real ones cannot be read: a
tensor-parallel rank's unloaded stand-ins, FP8 placeholders), beside `fused_moe_ref`: only a
region that agrees (moe_match.TOLERANCE: relative error 1e-3 in fp32, 3e-2 in bf16/fp16) is
replaced, since a region cannot be proven equal to the op by its shape alone (a gate/up
interleaving, a transposed layout, another activation look alike). Either raises `NotMatched`
saying why.
"""
from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
import torch.fx as fx

from trtllm.kernels.fused_moe import fused_moe_ref
from trtllm.parallel.tensor_parallel import is_unloaded
from trtllm.passes.match import arg, kind, value
from trtllm.passes.moe_match import TOLERANCE, NotMatched, size_hint, subgraph
from trtllm.quantization.fp8_linears import Fp8Experts

# tokens the check runs (per symbolic token size): enough for random ids to reach many experts.
# Not the example inputs' count: a region that gathers each slot's expert weights (the traced
# form of models/qwen3_moe.py) would hold T * k expert copies, 384 GiB for Qwen3-30B-A3B at
# the H200 bench's 8,192 tokens.
CHECK_TOKENS = 16


@dataclass
class Experts:
    w13: fx.Node           # [E, 2I, H] graph input
    w2: fx.Node            # [E, H, I] graph input
    per_expert: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None  # (gate, up, down) if stacked
    fp8: Fp8Experts | None = None  # w13, w2 are the placeholders of these FP8 experts (QuantConfig FP8)


def expert_weights(graph, ctx, region, params, xv, num_experts) -> Experts:
    """W13 [E, 2I, H] and W2 [E, H, I] from the region's parameters."""
    tensors = {p: ctx.inputs.tensor(p) for p in params}
    hidden = xv.shape[-1]
    fp8 = ctx.quantization.experts_by_placeholder() if ctx.quantization is not None else {}
    if len(params) == 2 and all(t.dim() == 3 for t in tensors.values()):  # HF's gate_up_proj, down_proj
        for w13, w2 in (params, params[::-1]):
            a, b = tensors[w13], tensors[w2]
            if (a.shape[0] == b.shape[0] == num_experts and a.shape[2] == hidden and b.shape[1] == hidden
                    and a.shape[1] == 2 * b.shape[2] and a.dtype == b.dtype == xv.dtype
                    and all(t.stride(-1) == 1 or is_unloaded(t) or id(t) in fp8 for t in (a, b))):
                if id(a) in fp8 or id(b) in fp8:
                    q = fp8.get(id(a))
                    if q is None or q.placeholders != (a, b):
                        raise NotMatched("FP8 expert weights that are not one block's gate_up_proj and down_proj")
                    return Experts(w13, w2, None, q)
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
    fp8_linears = ctx.quantization.by_placeholder() if ctx.quantization is not None else {}
    per_expert = []
    for lins in triples:
        ws = [ctx.inputs.tensor(arg(lin, 1, "weight")) for lin in lins]
        if any(id(w) in fp8_linears for w in ws):
            raise NotMatched("per-expert FP8 linears: the fused FP8 experts take transformers' 3-D expert weights "
                             "only; these experts run as FP8 linears, one per expert")
        if any(w is None or w.dtype != xv.dtype for w in ws) or any(arg(lin, 2, "bias") is not None for lin in lins):
            raise NotMatched("an expert linear has a bias or a weight computed in the graph")
        per_expert.append(tuple(ws))
    gates, ups, downs = zip(*per_expert)
    if len({w.shape for w in gates + ups}) != 1 or len({w.shape for w in downs}) != 1:
        raise NotMatched("the experts' linears differ in shape")
    name = triples[0][2].name
    w13 = ctx.inputs.made_constant(f"{name}_moe_w13", gates + ups, tag="moe_w13", make=lambda: torch.stack(
        [torch.cat([g.detach(), u.detach()]) for g, u in zip(gates, ups)]))  # [E, 2I, H]
    w2 = ctx.inputs.made_constant(f"{name}_moe_w2", downs, tag="moe_w2",
                                  make=lambda: torch.stack([d.detach() for d in downs]))  # [E, H, I]
    return Experts(w13, w2, per_expert)


def _same_value(a: fx.Node, b: fx.Node) -> bool:
    """One node, or two nodes computing the same thing from the same inputs (`x[tok]` twice)."""
    return a is b or (a.op == b.op == "call_function" and a.target == b.target and a.args == b.args
                      and a.kwargs == b.kwargs)


def check_numerics(region, out, x, routing, params, sizes, experts, ctx, where) -> None:
    """Run the region on random tokens and ids with the real weights beside fused_moe_ref."""
    inputs = [x, routing.ids, routing.weights, *params, *sizes]
    module = subgraph([n for n in out.graph.nodes if n in region], inputs, out)

    xv, idv, wv = value(x), value(routing.ids), value(routing.weights)
    w13, w2 = ctx.inputs.tensor(experts.w13), ctx.inputs.tensor(experts.w2)
    dev, num_experts = w13.device, w13.shape[0]
    real = {p: ctx.inputs.tensor(p) for p in params}
    if experts.fp8 is not None or any(is_unloaded(t) for t in real.values()):
        # a tensor-parallel rank did not load the experts (passes/shard_experts.py reads its own
        # later), or they are FP8 placeholders (what the region computes on them is NaN): the
        # region's layout is checked on random weights of their shapes instead, never on zeros
        if experts.per_expert is not None:
            raise NotMatched("per-expert weights this rank did not load (only HF's 3-D expert weights are split "
                             "by expert parallelism)")
        gw = torch.Generator(device=dev).manual_seed(1)
        real = {p: torch.randn(t.shape, generator=gw, device=dev).to(t.dtype) * 0.1 for p, t in real.items()}
        w13, w2 = real[experts.w13], real[experts.w2]
    fewer = _fewer_tokens(xv.shape[:-1])
    shape = tuple(_size(d, fewer) for d in xv.shape)
    tokens, top_k = shape[:-1], idv.shape[-1]
    g = torch.Generator(device=dev).manual_seed(0)
    x_real = torch.randn(shape, generator=g, device=dev).to(xv.dtype)
    ids = torch.rand((*tokens, num_experts), generator=g, device=dev).argsort(dim=-1)[..., :top_k]
    weights = torch.rand((*tokens, top_k), generator=g, device=dev)
    args = [x_real, ids.to(idv.dtype), weights.to(wv.dtype), *(real[p] for p in params),
            *(_size(value(s), fewer) for s in sizes)]
    try:
        with torch.no_grad():
            got = module(*args).float().reshape(-1, shape[-1])
    except Exception as e:  # the region needs what random ids cannot give it: not provable here
        raise NotMatched(f"the expert computation at {where} could not be run on random ids "
                         f"({type(e).__name__}: {e})") from None
    want = fused_moe_ref(x_real.reshape(-1, shape[-1]), w13, w2, weights.reshape(-1, top_k).to(wv.dtype),
                         ids.reshape(-1, top_k).to(torch.int32)).float()
    err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
    if not err <= TOLERANCE[xv.dtype]:
        raise NotMatched(f"the expert computation at {where} differs from fused_moe's (relative error {err:.3g} on "
                         "random tokens: another activation, weight layout or combine)")


def _fewer_tokens(token_sizes) -> dict:
    """symbol -> CHECK_TOKENS (or its hint if smaller) for each symbol in the token sizes."""
    return {sym: sympy.Integer(min(size_hint(d), CHECK_TOKENS)) for d in token_sizes if isinstance(d, torch.SymInt)
            for sym in d.node.expr.free_symbols}


def _size(d, fewer: dict) -> int:
    """A size with the token symbols set to `fewer`, the others to their hints."""
    if isinstance(d, int) or not fewer:
        return size_hint(d)
    expr = sympy.sympify(d.node.expr).xreplace(fewer)
    if expr.free_symbols:
        size_hint(d)  # a data-dependent size: refused there
        expr = expr.xreplace(d.node.shape_env.var_to_val)
    return int(expr)
