"""What `trtllm.compile` accepts, and what it learns from a model before tracing it.

A compilable model is `forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]`,
written as for B whole sequences, with attention as causal
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` (GQA through `enable_gqa=True`
or `repeat_interleave`): no mask, no dropout, no cache. Run eagerly it is the reference.
HF `*ForCausalLM` models are put under the contract by models/hf.py (`contract_module`).

`probe_attention` runs the model once, eagerly, on two tokens: it refuses attention it
cannot page (`unpageable`, the same rule replace_sdpa_with_paged_attention applies to the
traced graph) before any tracing, and returns the `AttentionSpec` the KV cache is sized by.
An HF model also reports what each layer asked of the attention interface
(models/hf.py): its sliding window is taken from there (what HF itself applies), and a
feature the paged kernels do not honour (soft-capping, sinks, a mask) is a CompileError
naming the layer and the feature.
"""
from __future__ import annotations

import contextlib
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
        from trtllm.models.hf import HFCausalLM, UnsupportedAttention
        try:
            return HFCausalLM(model)
        except UnsupportedAttention as e:
            raise CompileError(str(e)) from None
    return model


def model_path(module: nn.Module) -> str:
    """Which path a model (under the contract) takes, as summary() names it."""
    inner = getattr(module, "model", None)
    if type(module).__name__ == "HFCausalLM":
        return (f"HF module {type(inner).__name__} (transformers' own forward, attention through "
                "trtllm's interface, models/hf.py)")
    if type(module).__module__.startswith("trtllm.models."):
        return f"model file of ours: {type(module).__module__}.{type(module).__name__}"
    return f"plain module {type(module).__module__}.{type(module).__name__}"


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
    shape; the windows come from what an HF model's layers asked for, else its config."""
    refuse_softcaps(model)
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    record = getattr(model, "record_attention_calls", None)  # HF models (models/hf.py)
    with torch.no_grad(), _RecordSDPA() as rec, (record() if record else contextlib.nullcontext([])) as calls:
        try:
            model(ids, torch.arange(2, device=device)[None])
        except CompileError:
            if record is None or calls:
                raise
        if record is not None and not calls:  # e.g. GPT-J, Falcon: their own attention code
            raise CompileError(f"{type(model.model).__name__} is refused: its attention does not go through HF's "
                               "AttentionInterface, so trtllm cannot page it (and has no model file of its own "
                               "for this family)")
    for i, call in enumerate(calls):
        if call.unhonoured:
            raise CompileError(f"attention layer {call.layer if call.layer is not None else i} ({call.module}): "
                               f"{'; '.join(call.unhonoured)}: the paged attention kernels do not honour it, "
                               "and dropping it would give wrong output")
    if not rec.keys:
        raise CompileError("the model calls no F.scaled_dot_product_attention: nothing to page")
    shapes = {(k.shape[1], k.shape[3], k.dtype) for k in rec.keys}
    if len(shapes) != 1:
        raise CompileError(f"attention layers differ in kv heads/head dim/dtype: {sorted(map(str, shapes))}")
    (heads, dim, dtype), = shapes
    if calls and len(calls) != len(rec.keys):
        raise CompileError(f"{len(rec.keys)} SDPA calls but {len(calls)} through HF's attention interface: "
                           "some attention bypasses the interface")
    windows = [c.window for c in calls] if calls else layer_windows(model, len(rec.keys))
    return AttentionSpec(len(rec.keys), heads, dim, dtype, tuple(windows))


def refuse_softcaps(model: nn.Module) -> None:
    """A model file of ours asks for attention logit soft-capping through `config.layer_softcaps`
    (models/gemma.py, Gemma-2): the paged kernels do not apply it yet, so it is refused, not dropped."""
    softcaps = list(getattr(getattr(model, "config", None), "layer_softcaps", None) or [])
    capped = [i for i, cap in enumerate(softcaps) if cap]
    if capped:
        raise CompileError(f"attention layer {capped[0]}: attention logit soft-capping "
                           f"(config.layer_softcaps[{capped[0]}]={softcaps[capped[0]]}): the paged attention "
                           "kernels do not support it yet, and dropping it would give wrong output")


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
