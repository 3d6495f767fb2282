"""Run HF transformers `*ForCausalLM` models under the compilable-model contract.

`HFCausalLM(model)` is `forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]`.
It switches the model to the "trtllm" attention implementation, registered through
HF's public `AttentionInterface`: plain causal SDPA on [B, H, S, D] with GQA, no mask
(and no mask function registered, so HF builds none), which `trtllm.compile` turns
into paged attention. Padding masks are not part of the contract.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel

from trtllm.models.llama import sliding_window_mask


def trtllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, **kwargs):
    """HF attention-interface function: query [B, Hq, S, D], key/value [B, Hkv, S, D]."""
    gqa = query.shape[1] != key.shape[1]
    s = query.shape[2]
    # Eagerly a sliding window that bites is a banded mask; under trtllm.compile the
    # paged attention op applies it (the pass reads the config's windows).
    if sliding_window and s > sliding_window and not torch.compiler.is_compiling():
        band = sliding_window_mask(s, sliding_window, query.device)  # [S, S]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=band, scale=scaling, enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous(), None  # [B, S, Hq, D]


AttentionInterface.register("trtllm", trtllm_attention)


class HFCausalLM(nn.Module):
    def __init__(self, model: PreTrainedModel):
        super().__init__()
        model.set_attn_implementation("trtllm")
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits
