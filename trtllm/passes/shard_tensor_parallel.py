"""Tensor parallelism: each rank keeps its slice of every attention and MLP block and the
blocks' outputs are summed across ranks (Megatron-LM's split). Runs only when compiled with
`tensor_parallel=TensorParallel(...)` (trtllm/parallel/tensor_parallel.py); else no match.

Before (one decoder layer's attention; the MLP likewise: gate/up column, down row):

    q = linear(x, Wq).view(B, S, H, D)        # Wq [H*D, hidden]
    k = linear(x, Wk).view(B, S, KVH, D)      # Wk [KVH*D, hidden]; v likewise
    y = attention(q.transpose(1, 2), k..., v...).transpose(1, 2).reshape(B, S, H*D)
    out = linear(y, Wo, bo)                   # Wo [hidden, H*D]
After, on rank r of P:

    q = linear(x, Wq[r-th H/P heads]).view(B, S, H/P, D)       # column-parallel
    k = linear(x, Wk[r-th KVH/P heads]).view(B, S, KVH/P, D)   # (one replicated head if KVH < P)
    y = attention(...).reshape(B, S, H/P*D)                    # this rank's heads only
    out = wait_tensor(all_reduce(linear(y, Wo[:, r-th H/P*D columns]), "sum")) + bo   # row-parallel

Column-parallel linears are the ones HF names q_proj, k_proj, v_proj, gate_proj, up_proj
(COLUMN_PARALLEL); row-parallel, o_proj and down_proj (ROW_PARALLEL), when they read a split
activation. The split is followed from each column linear through the ops between it and
the row linear (passes/tp_split.py): views/reshapes get their head count (or width) divided, transposes, rope,
QK-norm (a reduction over head_dim, not the split dim), SiLU and the attention op keep it;
an op that would mix the split dim (a reduction over it, a slice of it, the graph output)
is a CompileError naming the node. The norms stay whole on every rank (replicated); the
embedding and LM head are split by vocabulary (passes/shard_vocab_parallel.py), the MoE experts
by passes/shard_experts.py. The pass runs before fuse_parallel_linears, which then fuses each
rank's slices: a layer's q/k/v (and gate/up) slices are made adjacent in one buffer, so the
fused weight is a view of them, not a second copy.

Model-native fused projections (FUSED_COLUMN_PARALLEL: Phi-3's qkv_proj [Wq; Wk; Wv] and
gate_up_proj [W_gate; W_up]) are split into their parts first, when the model slices the
output along its last dim into exactly those parts, in order (`qkv[..., :nq]`, `.chunk(2, -1)`):

    qkv = linear(x, Wqkv); q = qkv[..., :nq]; k = qkv[..., nq:nq + nkv]; v = qkv[..., nq + nkv:]
becomes (then split as q_proj / k_proj / v_proj, each part's rows read from Wqkv at its offset)

    q = linear(x, Wqkv[q rows]); k = linear(x, Wqkv[k rows]); v = linear(x, Wqkv[v rows])
Any other fused layout (BLOOM's and Falcon's interleaved query_key_value, W_pack, c_attn) is
refused by name.

The all-reduce is torch.distributed's functional collective (torch.ops._c10d_functional),
which Inductor compiles; the bias of a row-parallel linear is added once, after it.

With `TensorParallel(quant_algo=...)` (QuantConfig's online FP8) each slice is quantized instead:
one rank's FP8 quantization of the whole weight, sliced (quantization/fp8_slices.py), entered
in the model's Fp8Linears with a placeholder of its local shape, which quantize_linears (next)
turns into an FP8 GEMM. With LoRA slots (`ctx.lora`) each split linear LoRA targets records the
rank's part of its adapters (LoraSlots.shard: B's rows of a column-parallel linear, A's
columns of a row-parallel one; apply_lora, later, wraps the local linears). A pre-quantized checkpoint's FP8 linears (Fp8Linears.unloaded: the rank
left them unloaded) are sliced as stored, their scales with them, and entered the same way.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch
import torch.fx as fx

from trtllm.contract import CompileError
from trtllm.parallel.tensor_parallel import head_range
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, kind, module_path, value
from trtllm.passes.tp_split import RESHAPES, propagate, set_local_value
from trtllm.quantization.fp8_slices import rank_fp8_slice

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
KV_PROJECTIONS = ("k_proj", "v_proj")
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj", "query_key_value", "W_pack", "c_attn")
# fused projection -> its parts, in row order (the parts of qkv_proj: H, KVH and KVH heads)
FUSED_COLUMN_PARALLEL = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def shard_tensor_parallel(graph: fx.Graph, ctx: PassContext) -> int:
    tp = ctx.tensor_parallel
    if tp is None or tp.size == 1:
        return 0
    shapes = {n: tuple(value(n).shape) for n in graph.nodes if isinstance(value(n), torch.Tensor)}  # global
    split: dict[fx.Node, tuple[int, int]] = {}  # node -> (split dim counted from the end, local size)
    columns: dict[fx.Node, list[tuple[fx.Node, tuple]]] = defaultdict(list)  # input -> (linear, its W's slice)
    matches = 0
    erased: set[fx.Node] = set()  # the fused projections' slices, replaced by their parts' linears
    for node in list(graph.nodes):
        if node in erased:
            continue
        if kind(node) == "linear":
            leaf = module_path(node).rpartition(".")[2]
            if leaf in FUSED_PROJECTIONS:
                if tp.quant_algo is not None:
                    raise CompileError(f"{describe(node)}: FP8 slices of a model-native fused projection ({leaf}) "
                                       "are not made under tensor parallelism yet")
                for part, part_leaf, offset in _split_fused(graph, node, leaf, erased):
                    shapes[part] = tuple(value(part).shape)
                    columns[part.args[0]].append(
                        (part, _shard_column(part, part_leaf, tp, ctx, shapes, split, _weight_name(node, ""), offset)))
                    matches += 1
                continue
            if node.args[0] in split:
                if leaf not in ROW_PARALLEL:
                    raise CompileError(f"{describe(node)}: reads a tensor-parallel split activation but is not a "
                                       f"row-parallel linear ({', '.join(ROW_PARALLEL)})")
                _shard_row(graph, node, split[node.args[0]], tp, ctx)
                matches += 1
            elif leaf in COLUMN_PARALLEL:
                columns[node.args[0]].append((node, _shard_column(node, leaf, tp, ctx, shapes, split)))
                matches += 1
            continue
        if any(a in split for a in node.all_input_nodes):
            propagate(node, split, shapes)
    for linears in columns.values():  # one buffer per input: fuse_parallel_linears' fused W is a view
        fp8 = [(linear, part) for linear, part in linears if _is_fp8(part[0], ctx)]
        for linear, (name, weight, start, length) in fp8:  # FP8 slices: quantize_linears stacks them
            _set_weight(linear, _fp8_weight(linear, name, weight, 0, start, length, ctx))
        done = {linear for linear, _ in fp8}
        rest = [(linear, part) for linear, part in linears if linear not in done]
        if rest:
            _add_adjacent_weights(rest, ctx)
    # that nothing reads a weight this rank did not load is checked once every pass has run
    # (compile.py: fuse_moe and shard_experts, split_lm_head and shard_vocab_parallel come later)
    return matches


def _weight_name(linear: fx.Node, what: str) -> str:
    return f"{module_path(linear)}.{what}"  # what = "": the prefix of its tensors' names


def _split_fused(graph: fx.Graph, node: fx.Node, leaf: str, erased: set) -> list[tuple[fx.Node, str, int]]:
    """A fused projection as one linear a part (module docstring): [(the part's linear, the
    part's name in FUSED_COLUMN_PARALLEL, its first row in the fused weight)]."""
    names = FUSED_COLUMN_PARALLEL.get(leaf)
    slices = _last_dim_slices(node) if names is not None else None
    if slices is None or len(slices) != len(names) or [a for _, a, _ in slices] != \
            [0, *(a + n for _, a, n in slices[:-1])] or sum(n for _, _, n in slices) != value(node).shape[-1]:
        raise CompileError(f"{describe(node)}: a model-native fused projection ({leaf}) is split by tensor parallelism "
                           f"only as {' | '.join(FUSED_COLUMN_PARALLEL)} sliced along its last dim into "
                           "its parts, in order (separate q/k/v and gate/up projections are split too)")
    parts = []
    for (piece, offset, _), name in zip(slices, names):
        with graph.inserting_before(piece):
            linear = graph.call_function(node.target, node.args, dict(node.kwargs))
        linear.meta.update(node.meta)
        v = value(piece)
        with v.fake_mode:
            linear.meta["example_value"] = v.new_empty(v.shape)  # contiguous: its own GEMM's output
        piece.replace_all_uses_with(linear)
        parts.append((linear, name, offset))
    for piece, _, _ in slices:
        for dead in (piece, *[a for a in piece.all_input_nodes if a is not node]):  # a chunk's getitem, then it
            if not dead.users and dead not in erased:
                graph.erase_node(dead)
                erased.add(dead)
    graph.erase_node(node)
    erased.add(node)
    return parts


def _last_dim_slices(node: fx.Node) -> list[tuple[fx.Node, int, int]] | None:
    """[(the node that is the part, its first feature, its features)] in order, if every use of
    `node` is a slice of its last dim (`x[..., a:b]`) or a `chunk(n, -1)`'s piece; else None."""
    width, found = value(node).shape[-1], []
    for user in node.users:
        if kind(user) == "getitem" and isinstance(user.args[1], tuple) and len(user.args[1]) == 2 \
                and user.args[1][0] is Ellipsis and isinstance(user.args[1][1], slice) and user.args[1][1].step is None:
            start, stop, _ = user.args[1][1].indices(width)
            found.append((user, start, stop - start))
        elif user.op == "call_method" and user.target == "chunk" and len(user.args) in (2, 3) \
                and arg(user, 2, "dim", 0) in (-1, value(node).dim() - 1) and width % user.args[1] == 0:
            size = width // user.args[1]
            for piece in user.users:
                if kind(piece) != "getitem" or not isinstance(piece.args[1], int):
                    return None
                found.append((piece, piece.args[1] * size, size))
        else:
            return None
    return sorted(found, key=lambda f: f[1])


def _shard_column(node: fx.Node, leaf: str, tp, ctx: PassContext, shapes, split, fused_name: str | None = None,
                  offset: int = 0) -> tuple:
    """Slice the rows of a column-parallel linear; return its local weight's (name, full weight,
    first row, rows) (the weights of one input are read into one buffer, later). A fused
    projection's part (`fused_name` "<module path>.", its first row `offset`) reads its rows
    of the fused weight."""
    weight = _weight(node, ctx)
    rows = value(node).shape[-1] if fused_name is not None else weight.shape[0]
    heads, head_dim = _heads(node, rows, shapes)
    try:
        first, count = head_range(heads, tp.size, tp.rank, kv=leaf in KV_PROJECTIONS)
    except ValueError:
        what = f"{heads} heads" if head_dim > 1 else f"{rows} output features"
        raise CompileError(f"{describe(node)}: {what} do not divide among tensor_parallel_size={tp.size}"
                           + (" (nor divide it, as replicated KV heads must)" if leaf in KV_PROJECTIONS else "")
                           ) from None
    start, length = offset + first * head_dim, count * head_dim
    prefix = fused_name or _weight_name(node, "")
    if ctx.lora is not None and ctx.lora.targets(module_path(node)):  # its adapters' B rows: these outputs
        ctx.lora.shard(module_path(node), 0, start, length, weight.shape[0])  # (a fused one's: each part's)
    bias_node = arg(node, 2, "bias")
    if bias_node is not None:
        bias = ctx.inputs.tensor(bias_node)
        if bias is None:
            raise CompileError(f"{describe(node)}: its bias is not a graph input; cannot split it")
        b = ctx.inputs.add_constant(f"{node.name}_tp_bias", tp.weight_slice(f"{prefix}bias", bias, 0, start, length))
        if len(node.args) > 2:
            node.args = (*node.args[:2], b, *node.args[3:])
        else:
            node.kwargs = {**node.kwargs, "bias": b}
    if length != rows:  # else a replicated (single) KV head: the output is whole
        split[node] = (-1, length)
        set_local_value(node, shapes[node], -1, length)
    return f"{prefix}weight", weight, start, length


def _weight(linear: fx.Node, ctx: PassContext) -> torch.Tensor:
    """The linear's whole weight (or this rank's stand-in of it), a 2-D graph input."""
    weight = ctx.inputs.tensor(arg(linear, 1, "weight"))
    if weight is None or weight.dim() != 2:
        raise CompileError(f"{describe(linear)}: its weight is not a 2-D graph input; cannot split it")
    if ctx.quantization is not None and id(weight) in ctx.quantization.by_placeholder():
        raise CompileError(f"{describe(linear)}: its weight is already FP8-quantized whole; under tensor parallelism "
                           "each rank quantizes its slice (TensorParallel(quant_algo=...), as LLM(..., quant_config=...) "
                           "does)")
    return weight


def _is_fp8(name: str, ctx: PassContext) -> bool:
    """Whether the weight `name` is sliced as FP8: QuantConfig's online FP8 quantizes every split
    linear; a pre-quantized checkpoint's FP8 linears are those the rank left unloaded."""
    return ctx.tensor_parallel.quant_algo is not None or (
        ctx.quantization is not None and name.removesuffix(".weight") in ctx.quantization.unloaded)


def _fp8_weight(linear: fx.Node, name: str, weight: torch.Tensor, dim: int, start: int, length: int,
                ctx: PassContext) -> fx.Node:
    """This rank's FP8 slice of the linear's weight, entered in the model's quantization description
    (quantize_linears turns the linear over its placeholder into an FP8 GEMM): the placeholder's node."""
    if ctx.quantization is None:
        raise CompileError(f"{describe(linear)}: TensorParallel(quant_algo=...) but the model has no FP8 "
                           "description (Fp8Linears) to enter its slices in")
    try:
        q = rank_fp8_slice(ctx.tensor_parallel, name, weight, dim, start, length,
                           ctx.quantization.unloaded.get(name.removesuffix(".weight")))
    except ValueError as e:
        raise CompileError(f"{describe(linear)}: {e}") from None
    path = module_path(linear)  # a fused projection's parts: one entry a part, by its rows
    key = f"{path}[{start}:{start + length}]" if path.rpartition(".")[2] in FUSED_PROJECTIONS else path
    ctx.quantization.linears[key] = q
    return ctx.inputs.add_constant(f"{linear.name}_tp_fp8_weight", q.placeholder)


def _set_weight(linear: fx.Node, weight: fx.Node) -> None:
    if len(linear.args) > 1:
        linear.args = (linear.args[0], weight, *linear.args[2:])
    else:
        linear.kwargs = {**linear.kwargs, "weight": weight}


def _heads(linear: fx.Node, rows: int, shapes) -> tuple[int, int]:
    """(heads, head_dim) from the view that splits this linear's output into heads; for a
    linear whose output is not viewed as heads (gate/up), (rows, 1)."""
    for user in linear.users:
        if kind(user) in RESHAPES and user in shapes:
            shape = shapes[user]
            if len(shape) == len(shapes[linear]) + 1 and all(isinstance(s, int) for s in shape[-2:]) \
                    and shape[-2] * shape[-1] == rows:
                return shape[-2], shape[-1]
    return rows, 1


def _add_adjacent_weights(linears: list[tuple[fx.Node, tuple]], ctx: PassContext) -> None:
    tp = ctx.tensor_parallel
    key = ("adjacent", *((name, start, length) for _, (name, _, start, length) in linears))
    buffer = tp.made(key, lambda: torch.cat([tp.read(name, w, 0, start, length)
                                             for _, (name, w, start, length) in linears]))
    start = 0
    for node, _ in linears:
        rows = value(node).shape[-1]  # the local output features
        view = buffer[start: start + rows]
        start += rows
        _set_weight(node, ctx.inputs.add_constant(f"{node.name}_tp_weight", view))


def _shard_row(graph: fx.Graph, node: fx.Node, split_in: tuple[int, int], tp, ctx: PassContext) -> None:
    """Slice the columns of a row-parallel linear, all-reduce its output, then add its bias."""
    dim, local = split_in
    weight = _weight(node, ctx)
    if dim != -1 or local * tp.size != weight.shape[1]:
        raise CompileError(f"{describe(node)}: its input is split {local} of {weight.shape[1]} features on dim "
                           f"{dim}; a row-parallel linear needs an even split of its last dim")
    name = _weight_name(node, "weight")
    if ctx.lora is not None and ctx.lora.targets(module_path(node)):  # its adapters' A columns: these inputs
        ctx.lora.shard(module_path(node), 1, tp.rank * local, local, weight.shape[1])
    if _is_fp8(name, ctx):  # an FP8 slice: quantize_linears makes the partial an FP8 GEMM
        w = _fp8_weight(node, name, weight, 1, tp.rank * local, local, ctx)
    else:
        w = ctx.inputs.add_constant(f"{node.name}_tp_weight", tp.weight_slice(name, weight, 1, tp.rank * local, local))
    bias = arg(node, 2, "bias")
    out = value(node)
    with graph.inserting_before(node):
        partial = graph.call_function(torch._C._nn.linear, (node.args[0], w, None))
        reduced = graph.call_function(torch.ops._c10d_functional.all_reduce.default, (partial, "sum", tp.group_name))
        done = graph.call_function(torch.ops._c10d_functional.wait_tensor.default, (reduced,))
        result = graph.call_function(operator.add, (done, bias)) if bias is not None else done
    for n in (partial, reduced, done, result):
        n.meta.update(node.meta)
        n.meta["example_value"] = out
    node.replace_all_uses_with(result)
    graph.erase_node(node)
