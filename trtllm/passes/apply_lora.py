"""LoRA: the targeted linears get each token's adapter added, through fixed slots.

Which linears: those whose module path ends in one of the LoRA config's target modules
(`ctx.lora`, trtllm/lora_slots.py: q/k/v/o and gate/up/down by default), alone or as parts
of the GEMM fuse_parallel_linears made of them (found by the narrows of its output, which
carry the original linears' module paths). Before (after fuse_parallel_linears):

    qkv = linear(x, W_qkv, b_qkv)                                   # [.., Nq + Nk + Nv]
    q = narrow(qkv, -1, 0, Nq); k = narrow(qkv, -1, Nq, Nk); v = ...
    o = linear(y, Wo)
After:

    qkv0 = linear(x, W_qkv, b_qkv)
    h = torch.ops.trtllm.lora_shrink(x, A_qkv, slot_ids)            # [.., 3R]; A_qkv [S, 3R, K]
    qkv = torch.ops.trtllm.lora_expand(qkv0, h, B_qkv, slot_ids, [0, Nq, Nq, Nk, Nq+Nk, Nv])  # B_qkv [S, Nq+Nk+Nv, 3R],
                                                                    # block-diagonal: its blocks' rows
    q = narrow(qkv, -1, 0, Nq); ...
    o0 = linear(y, Wo)
    o = torch.ops.trtllm.lora_expand(o0, lora_shrink(y, A_o, slot_ids), B_o, slot_ids)

A_*, B_* and slot_ids are constant inputs: fixed-address tensors the runtime writes
adapters and each step's per-token slots into (so CUDA graphs hold). A token with slot -1
gets the linear's own output (expand copies it through). The linear itself is left as it
is, so later passes (use_gemv_linear, split_lm_head) still see it; the LM head and the
embedding are never targeted. Runs after quantize_linears and fuse_parallel_linears. An FP8
linear (quantize_linears' GEMM, its output's meta naming its input x) is wrapped alike: the
shrink reads x in the model's dtype, the expand adds to the FP8 GEMM's output.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.kernels.lora_sgmv  # noqa: F401  (registers torch.ops.trtllm.lora_shrink / lora_expand)
from trtllm.contract import CompileError
from trtllm.lora_slots import LoraPart
from trtllm.passes.context import PassContext
from trtllm.passes.match import describe, kind, module_path, value
from trtllm.passes.quantize_linears import LINEAR_INPUT


def _narrow_part(node: fx.Node, fused: fx.Node) -> LoraPart | None:
    """The part a narrow of the fused GEMM's output takes (None for any other use)."""
    if node.op != "call_function" or node.target is not torch.narrow or node.args[0] is not fused:
        return None
    dim, start, size = node.args[1:4]
    if dim != -1 or not isinstance(start, int) or not isinstance(size, int):
        return None
    return LoraPart(module_path(node), start, size)


def _parts(node: fx.Node, out_features: int) -> list[LoraPart]:
    """The targeted linears this linear node computes: itself, or the parts of a fused GEMM."""
    users = list(node.users)
    narrows = [_narrow_part(u, node) for u in users]
    if len(users) > 1 and all(narrows):
        parts = []
        for p in sorted(set(narrows), key=lambda p: p.start):
            if parts and parts[-1].path == p.path and parts[-1].start + parts[-1].size == p.start:
                # the parts of one fused projection (q/k/v of Phi-3's qkv_proj, split by tensor
                # parallelism, then fused again): one adapter's linear
                parts[-1] = LoraPart(p.path, parts[-1].start, parts[-1].size + p.size)
            else:
                parts.append(p)
        return parts
    return [LoraPart(module_path(node), 0, out_features)]


def apply_lora(graph: fx.Graph, ctx: PassContext) -> int:
    lora = ctx.lora
    if lora is None:
        return 0
    slot_ids = None
    matches = 0
    for node in list(graph.nodes):
        # a linear, or an FP8 GEMM's output (quantize_linears: the adapter's shrink reads the input
        # before its quantization, in the model's dtype, as peft's LoRA over a quantized layer does)
        x = node.args[0] if kind(node) == "linear" else node.meta.get(LINEAR_INPUT)
        if x is None:
            continue
        out = value(node)
        if out is None or value(x) is None:
            raise CompileError(f"{describe(node)}: a linear with no example value (LoRA needs its shape)")
        parts = [p for p in _parts(node, out.shape[-1]) if lora.targets(p.path)]
        if not parts:
            continue
        try:
            group = lora.group(parts, value(x).shape[-1], out.shape[-1], out.dtype)
        except ValueError as e:
            raise CompileError(f"{describe(node)}: {e}") from None
        if slot_ids is None:
            slot_ids = ctx.inputs.add_constant("lora_slot_ids", lora.slot_ids)
        stem = node.name
        a_node = ctx.inputs.add_constant(f"{stem}_lora_a", group.lora_a)
        b_node = ctx.inputs.add_constant(f"{stem}_lora_b", group.lora_b)
        xv = value(x)
        with graph.inserting_after(node):
            h = graph.call_function(torch.ops.trtllm.lora_shrink.default, (x, a_node, slot_ids))
            with xv.fake_mode:  # shape-only (symbolic sizes), as fuse_parallel_linears does
                h.meta["example_value"] = xv.new_empty((*xv.shape[:-1], group.lora_a.shape[1]))
        with graph.inserting_after(h):
            # where B's rank blocks are: the expand reads only them, not the zeros between
            blocks = [v for p in group.parts for v in (p.start, p.size)] if len(group.parts) > 1 else None
            added = graph.call_function(torch.ops.trtllm.lora_expand.default, (node, h, b_node, slot_ids, blocks))
            added.meta.update(node.meta)
        node.replace_all_uses_with(added, delete_user_cb=lambda user, added=added: user is not added)
        matches += 1
    return matches

