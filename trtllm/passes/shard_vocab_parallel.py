"""Vocabulary-parallel embedding and LM head: rank r of P keeps rows [r*V/P, (r+1)*V/P) of each
(its slice of the vocabulary). Runs only when compiled with `tensor_parallel=TensorParallel(...)`
of more than one rank; else no match. It runs after split_lm_head, which takes the head out of
the graph.

Before:                                   After, on rank r (Vl = V/P, first = r*Vl):

    e = embedding(ids, W_emb)  # [.., H]      local = ids - first
                                               inside = (local >= 0) & (local < Vl)
                                               e = embedding(local * inside, W_emb[first:first+Vl])
                                               e = wait_tensor(all_reduce(e * inside[..., None], "sum"))
    logits = linear(h, W_head) # [.., V]      logits = all_gather_last_dim(linear(h, W_head[first:first+Vl]))

Each token id is inside exactly one rank's slice: the other ranks add zeros, so the sum is the
row. The head: each rank computes its V/P logits, and an all-gather along the vocabulary puts
them side by side in rank order ([P*N, Vl] gathered, then laid out [N, P*Vl]). The head split
out of the graph (split_lm_head's `ctx.lm_head`, applied by CompiledModel on the chosen rows)
gets its slice and the gather as `LMHead.gather`; a head left in the graph (a linear named
lm_head) is rewritten there. Tied embeddings (the head's weight the embedding's tensor) share
one slice. Final logit soft-capping is elementwise: applied after the gather as before.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F

from trtllm.contract import CompileError
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, kind, module_path, value

_EMBEDDINGS = (F.embedding, torch.embedding)


def all_gather_last_dim(x: torch.Tensor, size: int, group_name: str) -> torch.Tensor:
    """[..., Vl] on each of `size` ranks -> [..., size*Vl], rank 0's columns first."""
    gathered = torch.ops._c10d_functional.all_gather_into_tensor.default(x.contiguous(), size, group_name)
    gathered = torch.ops._c10d_functional.wait_tensor.default(gathered)  # [size*N, ..., Vl]
    return gathered.unflatten(0, (size, -1)).movedim(0, -2).flatten(-2)


def shard_vocab_parallel(graph: fx.Graph, ctx: PassContext) -> int:
    tp = ctx.tensor_parallel
    if tp is None or tp.size == 1:
        return 0
    matches = 0
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in _EMBEDDINGS]:
        _shard_embedding(graph, node, tp, ctx)
        matches += 1
    for node in [n for n in graph.nodes if kind(n) == "linear" and module_path(n).rpartition(".")[2] == "lm_head"]:
        _shard_head_in_graph(graph, node, tp, ctx)
        matches += 1
    if ctx.lm_head is not None:
        head = ctx.lm_head
        local = _vocab_slice(f"{head.name}.weight", head.weight, tp, head.name or "the LM head")
        bias = None if head.bias is None else _vocab_slice(f"{head.name}.bias", head.bias, tp, head.name)
        ctx.lm_head = dataclasses.replace(head, weight=local, bias=bias, gather=_Gather(tp.size, tp.group_name))
        matches += 1
    return matches


@dataclasses.dataclass(frozen=True)
class _Gather:
    """The LM head's all-gather of its vocabulary slices (LMHead.gather)."""
    size: int
    group_name: str

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return all_gather_last_dim(logits, self.size, self.group_name)


def _vocab_slice(name: str, weight: torch.Tensor, tp, where: str) -> torch.Tensor:
    vocab = weight.shape[0]
    if vocab % tp.size:
        raise CompileError(f"{where}: vocab_size={vocab} does not divide among tensor_parallel_size={tp.size} "
                           "(the embedding and the LM head are split by vocabulary)")
    per = vocab // tp.size
    # keyed by the tensor: a tied head (the embedding's Parameter) reuses the embedding's slice
    return tp.made(("vocab", id(weight)), lambda: tp.read(name, weight, 0, tp.rank * per, per))


def _node(graph: fx.Graph, target, args: tuple, like: fx.Node, example) -> fx.Node:
    n = graph.call_function(target, args)
    n.meta.update(like.meta)
    n.meta["example_value"] = example
    return n


def _shard_embedding(graph: fx.Graph, node: fx.Node, tp, ctx: PassContext) -> None:
    ids, weight_node = node.args[0], arg(node, 1, "weight")
    weight = ctx.inputs.tensor(weight_node)
    if node.target is torch.embedding:  # aten order: (weight, indices)
        ids, weight_node = weight_node, ids
        weight = ctx.inputs.tensor(weight_node)
    if weight is None or weight.dim() != 2:
        raise CompileError(f"{describe(node)}: the embedding's weight is not a 2-D graph input; cannot split it")
    if node.target is F.embedding and arg(node, 3, "max_norm") is not None:
        raise CompileError(f"{describe(node)}: an embedding with max_norm (it renormalises rows in place) is not "
                           "split by vocabulary")
    local = _vocab_slice(f"{module_path(node)}.weight", weight, tp, describe(node))
    per, first = local.shape[0], tp.rank * local.shape[0]
    w = ctx.inputs.add_constant(f"{node.name}_vocab_weight", local)
    out, idv = value(node), value(ids)
    with idv.fake_mode:
        ids_example, mask_example = idv.new_empty(idv.shape), idv.new_empty(idv.shape, dtype=torch.bool)
        rows_example = out.new_empty(out.shape)
        keep_example = mask_example.unsqueeze(-1)
    with graph.inserting_before(node):
        shifted = _node(graph, torch.sub, (ids, first), ids, ids_example)
        above = _node(graph, torch.ge, (shifted, 0), ids, mask_example)
        below = _node(graph, torch.lt, (shifted, per), ids, mask_example)
        inside = _node(graph, torch.logical_and, (above, below), ids, mask_example)
        local_ids = _node(graph, torch.mul, (shifted, inside), ids, ids_example)
        rows = _node(graph, F.embedding, (local_ids, w), node, rows_example)
        keep = _node(graph, torch.unsqueeze, (inside, -1), ids, keep_example)
        masked = _node(graph, torch.mul, (rows, keep), node, rows_example)
        reduced = _node(graph, torch.ops._c10d_functional.all_reduce.default, (masked, "sum", tp.group_name), node,
                        out)
        done = _node(graph, torch.ops._c10d_functional.wait_tensor.default, (reduced,), node, out)
    node.replace_all_uses_with(done)
    graph.erase_node(node)


def _shard_head_in_graph(graph: fx.Graph, node: fx.Node, tp, ctx: PassContext) -> None:
    weight = ctx.inputs.tensor(arg(node, 1, "weight"))
    bias_node = arg(node, 2, "bias")
    if weight is None or weight.dim() != 2 or (bias_node is not None and ctx.inputs.tensor(bias_node) is None):
        raise CompileError(f"{describe(node)}: the LM head's weight is not a 2-D graph input; cannot split it")
    name = module_path(node)
    w = ctx.inputs.add_constant(f"{node.name}_vocab_weight", _vocab_slice(f"{name}.weight", weight, tp, describe(node)))
    b = None
    if bias_node is not None:
        b = ctx.inputs.add_constant(f"{node.name}_vocab_bias", _vocab_slice(
            f"{name}.bias", ctx.inputs.tensor(bias_node), tp, describe(node)))
    out = value(node)
    with out.fake_mode:
        partial_example = out.new_empty((*out.shape[:-1], out.shape[-1] // tp.size))
    with graph.inserting_before(node):
        partial = _node(graph, torch._C._nn.linear, (node.args[0], w, b), node, partial_example)
        gathered = _node(graph, all_gather_last_dim, (partial, tp.size, tp.group_name), node, out)
    node.replace_all_uses_with(gathered)
    graph.erase_node(node)

