"""What `trtllm.compile` accepts, and what it learns from a model before tracing it.

A compilable model is `forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]`,
written as for B whole sequences, with attention as causal
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` (GQA through `enable_gqa=True`
or `repeat_interleave`): no mask, no dropout, no cache. Run eagerly it is the reference.
HF `*ForCausalLM` models are put under the contract by models/hf.py (`contract_module`).

`probe_attention` runs the model once, eagerly, on two tokens: it refuses attention it
cannot page (`unpageable`, the same rule replace_sdpa_with_paged_attention applies to the
traced graph) before any tracing, and returns the `AttentionSpec` the KV cache is sized by.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trtllm.models.llama import layer_windows_from_hf


class CompileError(RuntimeError):
    """A construct trtllm.compile refuses: the message names the node and module."""


@dataclass(frozen=True)
class AttentionSpec:
    """What the KV cache must hold, per model: found by running the model once."""
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    windows: tuple[int, ...]  # sliding window per layer, 0 = full causal attention


def unpageable(has_mask: bool, dropout_p, is_causal: bool, q_len) -> str | None:
    """Why an SDPA call cannot become paged causal attention, or None if it can."""
    if has_mask:
        return "SDPA with an attn_mask cannot become paged causal attention; call it with is_causal=True and no mask"
    if dropout_p not in (0, 0.0):
        return f"SDPA with dropout_p={dropout_p} (inference only)"
    if not is_causal and not (isinstance(q_len, int) and q_len == 1):
        return "non-causal SDPA over several queries; trtllm compiles causal decoders only"
    return None


def contract_module(model: nn.Module) -> nn.Module:
    """`model` under the contract: an HF PreTrainedModel wrapped by models/hf.py, any
    other module as it is."""
    from transformers import PreTrainedModel  # imported when a model is compiled: it is slow to load
    if isinstance(model, PreTrainedModel):
        from trtllm.models.hf import HFCausalLM
        return HFCausalLM(model)
    return model


class _RecordSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.keys: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.keys.append(args[1] if len(args) > 1 else kwargs["key"])
            self._check(*args, **kwargs)
        return func(*args, **kwargs)

    def _check(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        reason = unpageable(attn_mask is not None, dropout_p, is_causal, query.shape[-2])
        if reason is not None:  # refused at compile() time, before any tracing
            raise CompileError(f"attention layer {len(self.keys) - 1}: {reason}")


def probe_attention(model: nn.Module, device: torch.device) -> AttentionSpec:
    """Run `model` (under the contract) eagerly on two tokens and record every SDPA's key
    shape; the windows come from its config."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.no_grad(), _RecordSDPA() as rec:
        model(ids, torch.arange(2, device=device)[None])
    if not rec.keys:
        raise CompileError("the model calls no F.scaled_dot_product_attention: nothing to page")
    shapes = {(k.shape[1], k.shape[3], k.dtype) for k in rec.keys}
    if len(shapes) != 1:
        raise CompileError(f"attention layers differ in kv heads/head dim/dtype: {sorted(map(str, shapes))}")
    (heads, dim, dtype), = shapes
    return AttentionSpec(len(rec.keys), heads, dim, dtype, tuple(layer_windows(model, len(rec.keys))))


def layer_windows(model: nn.Module, num_layers: int) -> list[int]:
    """Sliding window per attention layer (0 = none): our LlamaConfig's `layer_windows`, or
    as HF's Mistral / Qwen2 / Qwen3 decide it from an HF config; none without a config."""
    config = getattr(model, "config", None)
    if config is None:
        return [0] * num_layers
    if hasattr(config, "layer_windows"):
        return list(config.layer_windows)
    if not hasattr(config, "to_dict"):
        return [0] * num_layers
    return layer_windows_from_hf(config.to_dict(), config.model_type, config.num_hidden_layers)
