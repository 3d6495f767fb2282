"""How a tensor-parallel split flows through the ops between a column-parallel linear and
the row-parallel one that closes it (passes/shard_tensor_parallel.py's bookkeeping).

`split[node] = (dim, local)`: node's output is split on `dim` (counted from the end) and this
rank holds `local` of it. `propagate(node, split, shapes)` records a node's split from its
inputs' and rewrites its shape arguments to the local sizes: views/reshapes get the split
size divided, transposes/unsqueezes move the dim, elementwise ops, slices off the split dim,
reductions over other dims, concatenations along other dims and the attention op (split by
heads) keep it. Anything else, or one of those that would mix the split dim, is a
CompileError naming the node.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

from trtllm.contract import CompileError
from trtllm.passes.match import arg, describe, kind, value

# ops that keep a split on any dim, each operand broadcast against the others
_ELEMENTWISE_KINDS = {"add", "mul", "div", "neg", "tanh", "pow", "rsqrt", "silu", "float", "to", "type_as",
                      "contiguous"}
_ELEMENTWISE_FUNCTIONS = {operator.sub, torch.sub, F.gelu, torch.sigmoid, F.relu, torch.exp}
RESHAPES = {"view", "reshape"}
_ATTENTION_TARGETS = ("trtllm.attention", "scaled_dot_product_attention")


def set_local_value(node: fx.Node, shape: tuple, dim: int, local: int) -> None:
    """The node's recorded example value, at its local size (later passes read shapes)."""
    v = value(node)
    local_shape = list(shape)
    local_shape[dim] = local
    with v.fake_mode:
        node.meta["example_value"] = v.new_empty(tuple(local_shape))


def _refuse(node: fx.Node, why: str):
    raise CompileError(f"{describe(node)}: {why} under tensor parallelism (the split activation comes from a "
                       "column-parallel linear)")


def propagate(node: fx.Node, split: dict, shapes: dict) -> None:
    """Record how `node`'s output is split, given its inputs' splits; rewrite its shape args."""
    if node.op == "output":
        _refuse(node, "a split activation reaches the graph output")
    k = kind(node)
    target = str(node.target)
    if node.op == "call_function" and any(t in target for t in _ATTENTION_TARGETS):
        _attention(node, split)
    elif k in _ELEMENTWISE_KINDS or (node.op == "call_function" and node.target in _ELEMENTWISE_FUNCTIONS):
        _elementwise(node, split, shapes)
    elif k in RESHAPES or (node.op == "call_function" and node.target is torch.reshape):
        _reshape(node, split, shapes)
    elif k == "transpose" or (node.op == "call_function" and node.target is torch.transpose):
        _transpose(node, split, shapes)
    elif k == "unsqueeze":
        _unsqueeze(node, split, shapes)
    elif k == "mean" or (node.op == "call_method" and node.target == "sum") or node.target is torch.sum:
        _reduction(node, split, shapes)
    elif k == "getitem":
        _getitem(node, split, shapes)
    elif k == "cat":
        _cat(node, split, shapes)
    else:
        _refuse(node, "an op not known to keep a split activation split")
    if node in split:
        set_local_value(node, shapes[node], *split[node])


def _ndim(node, shapes) -> int:
    return len(shapes[node])


def _elementwise(node: fx.Node, split: dict, shapes: dict) -> None:
    splits = {split[a] for a in node.all_input_nodes if a in split}
    if len(splits) != 1:
        _refuse(node, f"operands split differently ({sorted(splits)})")
    (dim, local), = splits
    for a in node.all_input_nodes:
        if a not in split and a in shapes:
            shape = shapes[a]
            if len(shape) >= -dim and shape[dim] != 1:
                _refuse(node, f"a whole operand {a.name} of shape {list(shape)} meets a split one")
    split[node] = (dim, local)


def _reshape(node: fx.Node, split: dict, shapes: dict) -> None:
    x = node.args[0]
    dim, local = split[x]
    in_shape, out_shape = shapes[x], shapes[node]
    whole = in_shape[dim]
    trailing = 1
    for s in in_shape[len(in_shape) + dim:]:
        if not isinstance(s, int):
            _refuse(node, f"a reshape of the split dim with symbolic sizes {list(in_shape)}")
        trailing *= s
    product, out_dim = 1, None
    for j in range(-1, -len(out_shape) - 1, -1):
        if not isinstance(out_shape[j], int):
            break
        product *= out_shape[j]
        if product == trailing:
            out_dim = j
            break
    if out_dim is None or (out_shape[out_dim] * local) % whole:
        _refuse(node, f"a reshape {list(in_shape)} -> {list(out_shape)} that does not keep dim {dim}'s split")
    out_local = out_shape[out_dim] * local // whole
    sizes_in_tuple = len(node.args) == 2 and isinstance(node.args[1], (tuple, list))
    sizes = list(node.args[1] if sizes_in_tuple else node.args[1:])
    if not sizes and "shape" in node.kwargs:
        _refuse(node, "a reshape with its shape as a keyword")
    i = len(sizes) + out_dim
    if sizes[i] != -1:
        if not isinstance(sizes[i], int):
            _refuse(node, f"a reshape whose split size is computed ({sizes[i]})")
        sizes[i] = out_local
    node.args = (x, tuple(sizes)) if sizes_in_tuple else (x, *sizes)
    split[node] = (out_dim, out_local)


def _transpose(node: fx.Node, split: dict, shapes: dict) -> None:
    x, a, b = node.args[0], arg(node, 1, "dim0"), arg(node, 2, "dim1")
    n = _ndim(x, shapes)
    dim, local = split[x]
    a, b = a % n - n, b % n - n
    split[node] = (b if dim == a else a if dim == b else dim, local)


def _unsqueeze(node: fx.Node, split: dict, shapes: dict) -> None:
    x = node.args[0]
    n = _ndim(x, shapes)
    dim, local = split[x]
    d = arg(node, 1, "dim") % (n + 1)
    position = n + dim  # from the start, in the input
    split[node] = (position + (d <= position) - (n + 1), local)


def _reduction(node: fx.Node, split: dict, shapes: dict) -> None:
    x = node.args[0]
    n = _ndim(x, shapes)
    dim, local = split[x]
    dims = arg(node, 1, "dim")
    if dims is None:
        _refuse(node, "a reduction over every dim, the split one too")
    dims = [d % n - n for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if dim in dims:
        _refuse(node, f"a reduction over the split dim {dim}")
    keepdim = arg(node, 2, "keepdim", False)
    split[node] = (dim if keepdim else dim + sum(d > dim for d in dims), local)


def _getitem(node: fx.Node, split: dict, shapes: dict) -> None:
    x, index = node.args
    n = _ndim(x, shapes)
    dim, local = split[x]
    index = index if isinstance(index, tuple) else (index,)
    if not all(i is Ellipsis or isinstance(i, slice) for i in index) or sum(i is Ellipsis for i in index) > 1:
        _refuse(node, f"an index {index} other than slices")
    if Ellipsis in index:
        e = index.index(Ellipsis)
        index = index[:e] + (slice(None),) * (n - len(index) + 1) + index[e + 1:]
    index = index + (slice(None),) * (n - len(index))
    if index[n + dim] != slice(None):
        _refuse(node, f"a slice {index[n + dim]} of the split dim")
    split[node] = (dim, local)


def _cat(node: fx.Node, split: dict, shapes: dict) -> None:
    tensors = arg(node, 0, "tensors")
    splits = {split.get(t) for t in tensors}
    if len(splits) != 1 or None in splits:
        _refuse(node, "a concatenation of split and whole tensors")
    (dim, local), = splits
    n = _ndim(tensors[0], shapes)
    if arg(node, 1, "dim", 0) % n - n == dim:
        _refuse(node, "a concatenation along the split dim")
    split[node] = (dim, local)


def _attention(node: fx.Node, split: dict) -> None:
    q, k, v = node.args[:3]
    if q not in split or split[q][0] != -3:
        _refuse(node, "attention whose queries are not split by heads")
    for t in (k, v):
        if t in split and split[t][0] != -3:
            _refuse(node, f"attention whose {t.name} is split on dim {split[t][0]}, not its heads")
    split[node] = split[q]
