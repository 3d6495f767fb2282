"""Rope on q and k right before paged attention moves into the attention op.

Before (after fuse_rotary; q and k of one layer rotated with the same tables):

    qr = torch.ops.trtllm.rotary(q, cos, sin, interleaved)      # q [B, Hq, S, D]
    kr = torch.ops.trtllm.rotary(k, cos, sin, interleaved)      # k [B, Hkv, S, D]
    o = torch.ops.trtllm.attention(qr, kr, v, layer, scale, window, softcap, slopes)
After:

    o = torch.ops.trtllm.attention(q, k, v, layer, scale, window, softcap, slopes, cos, sin, interleaved)

The decode kernel rotates q and the new key as it loads them (kernels/paged_attention:
decode.py, tiles.load_rope), so a decode step runs one launch a layer where it ran three;
prefill calls rotate q and k with the rotary kernel first, as before. At batch 1 the two
rotary launches took 78 µs of a 3,457 µs FP8 step on the H200 (bench/RESULTS.md, decode-step
profile, 2026-12-04). A rotary output read by anything else (or rotated with other tables
than its partner's) stays as it is; so does a QK-norm's fused rms_norm_rotary.
"""
from __future__ import annotations

import torch
import torch.fx as fx

import trtllm.attention_context  # noqa: F401  (registers torch.ops.trtllm.attention)
import trtllm.kernels.rotary  # noqa: F401  (registers torch.ops.trtllm.rotary)
from trtllm.passes.context import PassContext
from trtllm.passes.match import arg


def _rope_args(node) -> tuple | None:
    """(x, cos, sin, interleaved) of a rotary node read only by one consumer, else None."""
    if not (isinstance(node, fx.Node) and node.target is torch.ops.trtllm.rotary.default and len(node.users) == 1):
        return None
    return node.args[0], arg(node, 1, "cos"), arg(node, 2, "sin"), arg(node, 3, "interleaved", False)


def fuse_rotary_attention(graph: fx.Graph, ctx: PassContext) -> int:
    matches = 0
    for attn in [n for n in graph.nodes if n.target is torch.ops.trtllm.attention.default]:
        if len(attn.args) != 8 or attn.kwargs:  # already carries rope, or not as replace_sdpa made it
            continue
        q, k = _rope_args(attn.args[0]), _rope_args(attn.args[1])
        if q is None or k is None or q[1:] != k[1:]:
            continue
        rotated = attn.args[:2]
        attn.args = (q[0], k[0], *attn.args[2:], *q[1:])
        for node in rotated:
            graph.erase_node(node)
        matches += 1
    return matches
