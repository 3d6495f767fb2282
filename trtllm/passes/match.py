"""The small vocabulary passes match on.

Dynamo graphs spell one operation several ways (`torch.add`, `operator.add`,
`Tensor.add`; `F.linear` as `torch._C._nn.linear`; methods as `call_method` nodes).
`kind(node)` names the operation once, so a pass reads `kind(n) == "rsqrt"`.
"""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

import trtllm.traced_sdpa  # noqa: F401  (registers torch.ops.trtllm.scaled_dot_product_attention)

_FUNCTION_KINDS: dict[Any, str] = {
    torch._C._nn.linear: "linear",
    F.linear: "linear",
    torch._C._nn.scaled_dot_product_attention: "sdpa",
    F.scaled_dot_product_attention: "sdpa",
    # as models/attention.py's causal_attention is traced (dynamo may record the packet)
    torch.ops.trtllm.scaled_dot_product_attention.default: "sdpa",
    torch.ops.trtllm.scaled_dot_product_attention: "sdpa",
    operator.add: "add", torch.add: "add",
    operator.mul: "mul", torch.mul: "mul",
    operator.truediv: "div", torch.div: "div",
    torch.tanh: "tanh",
    operator.neg: "neg", torch.neg: "neg",
    operator.getitem: "getitem",
    operator.pow: "pow", torch.pow: "pow",
    torch.rsqrt: "rsqrt",
    torch.mean: "mean",
    torch.cat: "cat", torch.concat: "cat",
    torch.unsqueeze: "unsqueeze",
    F.silu: "silu",
    torch.repeat_interleave: "repeat_interleave",
    torch.softmax: "softmax", F.softmax: "softmax",
    torch.topk: "topk",
    torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    torch.sum: "sum",
}

_METHOD_KINDS = {"add", "mul", "div", "tanh", "neg", "pow", "rsqrt", "mean", "unsqueeze", "to", "float",
                 "type_as", "repeat_interleave", "view", "reshape", "transpose", "contiguous",
                 "softmax", "topk", "sum", "sigmoid"}


def kind(node: Any) -> str | None:
    """The operation a node performs, in the passes' vocabulary, or None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_function":
        try:
            return _FUNCTION_KINDS.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method" and node.target in _METHOD_KINDS:
        return node.target
    return None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument `index` (positional) or `name` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def value(node: Any) -> Any:
    """The example value dynamo recorded for a node (a FakeTensor, an int, ...)."""
    return node.meta.get("example_value", node.meta.get("val")) if isinstance(node, fx.Node) else node


def module_path(node: fx.Node) -> str:
    """Dotted path of the innermost module that produced `node` ('' if unknown)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # dynamo spells `model.layers[0]` as "L['self'].model.layers[0]" or "G['m'].model..."
    for prefix in ("L['self'].", "L['self']", "L['fn'].", "self."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path.replace("[", ".").replace("]", "").replace("'", "")


def describe(node: fx.Node) -> str:
    """How a node is named in warnings and errors: its name and the module it sits in."""
    where = module_path(node)
    return f"{node.name} ({kind(node) or node.target}" + (f" in {where})" if where else ")")


def is_float32_cast(node: Any) -> bool:
    """`x.float()` or `x.to(torch.float32)`."""
    k = kind(node)
    if k == "float":
        return True
    return k == "to" and (torch.float32 in node.args[1:] or node.kwargs.get("dtype") == torch.float32)



def mutates(node: fx.Node) -> bool:
    """An in-place op on its first argument: `x.index_add_(...)`, `x[i] = v`, `x /= y`."""
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op != "call_function":
        return False
    if node.target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv):
        return True
    name = getattr(node.target, "__name__", "")
    return name.endswith("_") and not name.endswith("__")


def eliminate_dead_code(graph: fx.Graph) -> None:
    """graph.eliminate_dead_code, keeping in-place ops: fx counts a method call as pure, and
    would drop `out.index_add_(0, idx, src)` (unused: later reads name `out`)."""
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or mutates(n))
