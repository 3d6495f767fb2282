"""Page multi-head latent attention (DeepSeek-V2/V3): cache the latent, not expanded K/V.

Before (HF's DeepseekV2/V3Attention through our interface, transformers 5.17; or a
plain-PyTorch MLA written the obvious way, with `torch.cat` for the key):

    kv = F.linear(latent, kv_b_weight)                   # latent [B, 1, S, R] -> [B, 1, S, H*(dn+dv)]
    kv = kv.view(B, S, H, dn + dv).transpose(1, 2)       # (view / reshape / transpose, any order)
    k_nope, v = torch.split(kv, [dn, dv], dim=-1)
    k = k_nope.new_empty(...); k[..., :dn].copy_(k_nope); k[..., dn:].copy_(k_rope.expand(-1, H, -1, -1))
        # or: k = torch.cat([k_nope, k_rope.expand(-1, H, -1, -1)], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)   # [B, H, S, dv]
After:

    out = torch.ops.trtllm.mla_attention(q_nope, q_rope, latent, k_rope, kv_b_weight, layer=i, scale=s)

and the expansion (kv_b_proj's GEMM over the new tokens, the split, the key's copies) is
removed: the op writes [latent, k_rope] into the latent cache and expands or absorbs
itself (trtllm/mla_attention.py). Runs first, where replace_sdpa_with_paged_attention would
otherwise page the expanded K/V. Acts only on a model whose probe found latent attention
(AttentionSpec.latent); there, an SDPA not spelled as above is refused by name, and so are
what the op cannot do: tensor parallelism, LoRA, an FP8-quantized kv_b_proj (QuantConfig FP8 leaves it
in the model dtype: quantization/fp8_linears.quantizable_linears).
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.mla_attention  # noqa: F401  (registers torch.ops.trtllm.mla_attention)
from trtllm.contract import CompileError
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg, describe, eliminate_dead_code, kind, value

_RESHAPES = {"view", "reshape", "transpose", "contiguous"}
_SPLITS = (torch.split, torch.functional.split)


def place_mla_attention(graph: fx.Graph, ctx: PassContext) -> int:
    if not ctx.attention.latent:
        return 0
    matches = 0
    for position, node in enumerate([n for n in graph.nodes if kind(n) == "sdpa"]):
        if ctx.tensor_parallel is not None:
            raise CompileError(f"{describe(node)}: multi-head latent attention with tensor parallelism is not "
                               "supported (the latent cache and kv_b_proj are not sharded by heads yet)")
        if ctx.lora is not None:
            raise CompileError(f"{describe(node)}: LoRA with multi-head latent attention is not supported "
                               "(kv_b_proj is folded into the MLA op, where no adapter reaches it)")
        found = _match(node)
        if isinstance(found, str):
            raise CompileError(f"{describe(node)}: multi-head latent attention not spelled as "
                               f"place_mla_attention expects ({found}), so its latent cannot be paged")
        q_nope, q_rope, latent, k_rope, weight, copies = found
        if ctx.quantization is not None and id(ctx.inputs.tensor(weight)) in ctx.quantization.by_placeholder():
            raise CompileError(f"{describe(node)}: an FP8-quantized kv_b_proj with multi-head latent attention "
                               "is not supported (the MLA op reads kv_b_proj's weight in the model dtype)")
        scale = node.kwargs.get("scale", arg(node, 6, "scale"))
        if scale is None:
            scale = value(node.args[0]).shape[-1] ** -0.5
        if isinstance(scale, fx.Node):
            raise CompileError(f"{describe(node)}: SDPA scale must be a constant, got a traced value")
        layer = ctx.attention.index(node, position)
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.trtllm.mla_attention.default,
                                      (q_nope, q_rope, latent, k_rope, weight, layer, float(scale)))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for copy in copies:  # the key's in-place fills: fx's dead-code elimination keeps them
            graph.erase_node(copy)
        matches += 1
    eliminate_dead_code(graph)
    return matches


def _match(sdpa: fx.Node):
    """(q_nope, q_rope, latent, k_rope, kv_b_weight placeholder, the key's copy_ nodes), or
    why the SDPA is not MLA's expanded attention."""
    q, k, v = sdpa.args[:3]
    if arg(sdpa, 3, "attn_mask") is not None or arg(sdpa, 5, "is_causal", False) is not True:
        return "not causal SDPA without a mask"
    if kind(q) != "cat" or len(q.args[0]) != 2:
        return "the query is not torch.cat([q_nope, q_rope], -1)"
    q_nope, q_rope = q.args[0]
    if kind(v) != "getitem" or v.args[1] != 1 or not _is_split(v.args[0]):
        return "the value is not the second part of a split of kv_b_proj's output"
    split = v.args[0]
    source = split.args[0]
    while kind(source) in _RESHAPES:
        source = source.args[0]
    if kind(source) != "linear" or arg(source, 2, "bias") is not None:
        return "the split's input is not a bias-free linear (kv_b_proj) of the latent"
    latent, weight = source.args[0], source.args[1]
    if weight.op != "placeholder":
        return "kv_b_proj's weight is not a graph input"
    key = _key_parts(k, sdpa)
    if isinstance(key, str):
        return key
    k_nope, k_rope_expanded, copies = key
    if not (kind(k_nope) == "getitem" and k_nope.args == (split, 0)):
        return "the key's first part is not the split's first part"
    if not (k_rope_expanded.op == "call_method" and k_rope_expanded.target == "expand"):
        return "the key's rope part is not the shared rope key expanded over the heads"
    k_rope = k_rope_expanded.args[0]
    heads = value(q_nope).shape[1]
    if value(weight).shape[0] % heads or value(latent).shape[-1] != value(weight).shape[1]:
        return "kv_b_proj's weight does not map the latent to heads x (dn + dv)"
    return q_nope, q_rope, latent, k_rope, weight, copies


def _is_split(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    dim = arg(node, 2, "dim", 0)
    is_split = (node.op == "call_function" and node.target in _SPLITS) or \
        (node.op == "call_method" and node.target == "split")
    return is_split and dim in (-1, value(node.args[0]).dim() - 1)


def _key_parts(k: fx.Node, sdpa: fx.Node):
    """(k_nope, expanded k_rope, copy_ nodes to erase) of `cat([k_nope, k_rope], -1)` or of
    HF's `new_empty` filled by two slice copies."""
    if kind(k) == "cat" and len(k.args[0]) == 2:
        return (*k.args[0], [])
    if not (k.op == "call_method" and k.target == "new_empty"):
        return "the key is neither torch.cat([k_nope, k_rope], -1) nor new_empty filled by two copies"
    parts, copies = {}, []
    for user in k.users:
        if user is sdpa:
            continue
        if not (kind(user) == "getitem" and len(user.users) == 1):
            return "the key is read before it is filled"
        (copy,) = user.users
        index = user.args[1]
        if not (copy.op == "call_method" and copy.target == "copy_" and isinstance(index, tuple)
                and index[0] is Ellipsis and isinstance(index[1], slice)):
            return "the key's slices are not filled by copy_"
        parts[index[1].start or 0] = copy.args[1]
        copies.append(copy)
    if len(parts) != 2:
        return "the key is not filled by exactly two copies"
    (_, k_nope), (_, k_rope) = sorted(parts.items())
    return k_nope, k_rope, copies
