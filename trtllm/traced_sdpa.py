"""SDPA as trtllm's own op while dynamo traces a model, so the capture asks nothing of its shapes.

    y = torch.ops.trtllm.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        # q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, Dv]: F.scaled_dot_product_attention's
        # arguments and result, which it computes when run

models/attention.py's `causal_attention` calls it while dynamo traces; the passes read it as SDPA
(passes/match.py), and replace_sdpa_with_paged_attention turns it into paged attention.

Dynamo runs every call of a capture on fake tensors, and aten's SDPA on CUDA then picks its backend
as it does when run (`_fused_sdp_choice_cuda`): cuDNN's `check_cudnn_tensor_shapes` compares the
token count with 1, a guard the dynamic capture does not hold for one token, so the batch-1 decode
graph's first call traced the whole model again (issue 19: a second dynamo trace of the 8B preset
in a 16.7 s warm start on the H200; docs/decisions/startup.md). This op's fake result is an empty
tensor of the output's shape and layout: no question about the dims. (A TorchFunctionMode mapping
every model's SDPA to it made dynamo trace the mode's hook on every op: a 32-layer capture 9.96 s
against 5.72 on the dev CPU.)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.library.custom_op("trtllm::scaled_dot_product_attention", mutates_args=())
def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention, in the layout of the fake below."""
    y = F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                       is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return y.transpose(1, 2).contiguous().transpose(1, 2)  # a no-op where SDPA gave that layout


@scaled_dot_product_attention.register_fake
def _(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    # [B, Hq, S, Dv] laid out as [B, S, Hq, Dv], as aten's fused kernels give it: a model's
    # `y.transpose(1, 2).reshape(B, S, H * D)` is then a view, which asks nothing of S
    B, H, S, _ = query.shape
    return query.new_empty((B, S, H, value.shape[-1])).transpose(1, 2)
