"""Whether Inductor compiles a graph, or the graph runs as the passes left it.

Inductor earns its compile time by fusing the elementwise and reduction work between kernels.
After our passes a Llama graph has none left in its layers: attention, the norms, rotary and
SiLU·mul are our kernels, the projections are cuBLAS GEMMs, and what remains is views and the
rope table of the positions. There, on the H200 (Llama-3.1-8B preset, bf16, 2026-12-04,
bench/probes/startup.py, one machine), Inductor cost 61 s of a cold start (`LLM(...)` 92.7 s
against 31.8) for the same speed: batch 1 234.5 tok/s both, batch 64 11,161 with Inductor
and 11,103 without, the same greedy tokens; the runtime's CUDA graphs remove the launch gaps
Inductor's wrapper would otherwise save.

A graph that still has work in its layers (LayerNorm and GELU in Falcon and GPT-2, Gemma's
GELU·up) is compiled, and so is one that calls another library's op. The line: at least one
compute op on hidden states per attention layer (`inductor_work`, `worth_inductor`). A cast to
the dtype a tensor already has is not work (torch returns the tensor): HF's MoE blocks end
with one, and counted they sent Qwen3-30B-A3B to Inductor (LLM(...) still compiling after
150 s on the H200; 62.5 s without, 2026-12-04). Not
measured end to end on such a model against the graph as is; Inductor stays where it was.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn.functional as F

# Targets that do no elementwise or reduction work Inductor could fuse: the GEMMs and gathers
# that run as library kernels (cuBLAS) under Inductor too, views and shape queries.
_NO_WORK_FUNCTIONS = {
    torch._C._nn.linear, F.linear, torch.matmul, operator.matmul, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
    F.embedding, torch.embedding,
    operator.getitem, getattr, torch.narrow, torch.unflatten, torch.flatten, torch.reshape, torch.transpose,
    torch.permute, torch.squeeze, torch.unsqueeze, torch.split, torch.chunk, torch.unbind, torch.select,
    torch.t, torch.Tensor.size, torch._check, torch._check_is_size,
}
_NO_WORK_METHODS = {
    "view", "reshape", "unflatten", "flatten", "narrow", "transpose", "permute", "squeeze", "unsqueeze", "split",
    "chunk", "unbind", "select", "size", "dim", "t", "expand", "expand_as", "view_as", "contiguous", "matmul",
    "__getitem__", "stride", "numel",
}


def inductor_work(graph: fx.Graph) -> list[str]:
    """The compute ops on hidden states left in `graph` that Inductor could fuse: every call
    downstream of an embedding or one of our ops (`torch.ops.trtllm.*`) that is none of those,
    nor a GEMM, a view or a shape query, and whose value is a tensor (not the SymInt arithmetic
    of a dynamic shape). The rope table, computed once a call from the positions alone (HF's
    with a matmul), is not work in the layers."""
    hidden: set[fx.Node] = set()
    work = []
    for node in graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        source = _makes_hidden(node)
        if not source and not any(a in hidden for a in node.all_input_nodes):
            continue
        hidden.add(node)
        value = node.meta.get("example_value", node.meta.get("val"))
        if source or (value is not None and not isinstance(value, torch.Tensor)):
            continue
        if _same_dtype_cast(node, value):  # HF's `.to(hidden_states.dtype)` after its MoE block: no kernel
            continue
        if node.op == "call_function" and node.target not in _NO_WORK_FUNCTIONS:
            is_op = isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))
            work.append(str(node.target).removesuffix(".default") if is_op else node.target.__name__)
        elif node.op == "call_method" and node.target not in _NO_WORK_METHODS:
            work.append(node.target)
    return work


def _same_dtype_cast(node: fx.Node, value) -> bool:
    """`x.to(dtype)` / `x.type(dtype)` / `torch.Tensor.to(x, ...)` whose result has x's dtype,
    device and shape: torch returns x itself, no kernel runs."""
    is_cast = (node.op == "call_method" and node.target in ("to", "type")) or (
        node.op == "call_function" and node.target is torch.Tensor.to)
    if not is_cast or not isinstance(value, torch.Tensor) or not node.args or not isinstance(node.args[0], fx.Node):
        return False
    source = node.args[0].meta.get("example_value", node.args[0].meta.get("val"))
    return (isinstance(source, torch.Tensor) and source.dtype == value.dtype and source.device == value.device
            and source.shape == value.shape)


def _makes_hidden(node: fx.Node) -> bool:
    """An embedding or one of our ops: what hidden states come out of."""
    if node.op != "call_function":
        return False
    if str(node.target).startswith("trtllm."):  # an OpOverload, a packet, or a custom_op as model code calls it
        return True
    return node.target in (F.embedding, torch.embedding)


def worth_inductor(work: list[str], num_layers: int) -> bool:
    """Inductor compiles a graph when its passes left work in the layers (`work`, from
    inductor_work): at least one compute op on hidden states per attention layer (the module
    docstring says why, with the figures), or any op of another library."""
    return len(work) >= max(num_layers, 1) or any(_is_foreign_op(name) for name in work)


def _is_foreign_op(name: str) -> bool:
    """Another library's op (`namespace.op`, not aten's): what it does under a CUDA-graph capture
    is not ours to know, and Inductor ran it before this choice existed. Run as is, HF
    DeepSeek-V3's MoE `transformers.grouped_mm_fallback` copied to the host inside a capture
    (tests/runtime/test_mla_gpu.py on the H200, 2026-12-04); under Inductor it passes."""
    return "." in name and not name.startswith("aten.")
