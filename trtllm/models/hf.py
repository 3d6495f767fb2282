"""Run HF transformers `*ForCausalLM` models under the compilable-model contract.

`HFCausalLM(model)` is `forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]`.
It switches the model to the "trtllm" attention implementation, registered through
HF's public `AttentionInterface`: plain causal SDPA on [B, H, S, D] with GQA, no mask
(and no mask function registered, so HF builds none), which `trtllm.compile` turns
into paged attention. Padding masks are not part of the contract.

What an attention layer asks of the interface besides q, k, v is read, never dropped:
`scaling` (Granite, Gemma's `query_pre_attn_scalar`) becomes SDPA's scale,
`sliding_window` the layer's window and `softcap` its logit soft-capping (Gemma-2's
attn_logit_softcapping): the paged kernels apply both; eagerly models/attention.py's
`causal_attention` does. Anything else the paged kernels do not honour today
(`unhonoured`: a mask, dropout, attention sinks `s_aux`, any other extra argument) makes
an eager call raise `UnsupportedAttention`, and `trtllm.compile`'s probe a CompileError
naming the layer and the feature. Models whose attention does not go through the
interface at all (GPT-J, Falcon in transformers 5: by path our models/falcon.py runs it) are
refused by name by the probe.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
from transformers import AttentionInterface, PreTrainedModel

from trtllm.models.attention import causal_attention
from trtllm.models.checkpoint_tensors import check_finite
from trtllm.quantization.fp8_linears import fp8_linears_of

# Arguments HF passes through to every attention function that do not change the
# attention itself (they serve HF's own kv cache and flash-attention varlen paths).
_PASSED_THROUGH = {"position_ids", "use_cache", "cache_position", "output_attentions", "past_key_value",
                   "past_key_values", "layer_idx", "output_router_logits"}


class UnsupportedAttention(ValueError):
    """An attention layer asks for a feature the paged kernels do not honour."""


@dataclass(frozen=True)
class AttentionCall:
    """What one attention layer asked of the interface, as the probe records it."""
    layer: int | None
    module: str           # the HF attention module's class
    window: int           # 0 = full causal attention
    softcap: float        # logit soft-capping, 0.0 = none
    unhonoured: tuple[str, ...]
    latent_dim: int = 0   # multi-head latent attention's cached row, kv_lora_rank + qk_rope_head_dim; 0 = not MLA


_recording: list[AttentionCall] | None = None


def unhonoured(attention_mask, dropout, sliding_window, softcap, kwargs: dict) -> list[str]:
    """The features of one attention call the paged kernels do not honour today."""
    found = []
    if softcap is not None and not (isinstance(softcap, (int, float)) and 0 < softcap < float("inf")):
        found.append(f"softcap={softcap!r} (the kernels take one finite positive logit cap per layer)")
    if attention_mask is not None:
        found.append("an attention mask (the paged kernels apply plain causal attention only)")
    if dropout not in (0, 0.0, None):
        found.append(f"attention dropout={dropout} (inference only)")
    if sliding_window is not None and not (isinstance(sliding_window, int) and sliding_window > 0):
        found.append(f"sliding_window={sliding_window!r} (the kernels take one positive window per layer)")
    if kwargs.get("is_causal", True) is not True:
        found.append("non-causal attention (is_causal=False)")
    for name, value in kwargs.items():
        if name not in _PASSED_THROUGH and name != "is_causal" and value is not None:
            found.append(f"the attention argument {name!r} (e.g. sinks `s_aux`), which the kernels would drop")
    return found


def trtllm_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     sliding_window=None, softcap=None, **kwargs):
    """HF attention-interface function: query [B, Hq, S, D], key/value [B, Hkv, S, D]."""
    if not torch.compiler.is_compiling():  # compile()'s probe ran this eagerly first
        refused = unhonoured(attention_mask, dropout, sliding_window, softcap, kwargs)
        latent = mla_latent_dim(module)
        if key.shape[-1] != value.shape[-1] and not latent:
            refused.append(f"values {value.shape[-1]} wide but keys {key.shape[-1]} (the paged cache holds K and V "
                           "of one head_dim; only DeepSeek-V2/V3's multi-head latent attention, with kv_b_proj, "
                           "pages them differently)")
        if latent and (sliding_window or softcap):
            refused.append("a sliding window or soft-capping with multi-head latent attention (the MLA kernels "
                           "take neither)")
        layer = getattr(module, "layer_idx", None)
        if _recording is not None:
            cap = float(softcap) if isinstance(softcap, (int, float)) else 0.0  # a bad one is refused
            _recording.append(AttentionCall(layer, type(module).__name__, sliding_window or 0, cap, tuple(refused),
                                            latent))
        elif refused:
            raise UnsupportedAttention(f"attention layer {layer} ({type(module).__name__}): {refused[0]}")
    # Eagerly the window (a banded mask where it bites) and the soft-capping are applied
    # here; under trtllm.compile the paged attention op applies them (the probe recorded
    # each layer's window and softcap).
    out = causal_attention(query, key, value, scale=scaling, window=sliding_window or 0, softcap=softcap or 0.0)
    return out.transpose(1, 2).contiguous(), None  # [B, S, Hq, D]


def mla_latent_dim(module) -> int:
    """kv_lora_rank + qk_rope_head_dim for DeepSeek-V2/V3's attention (keys and values made
    from a cached latent by kv_b_proj: passes/place_mla_attention.py pages the latent), else 0."""
    rank, rope = getattr(module, "kv_lora_rank", None), getattr(module, "qk_rope_head_dim", None)
    if isinstance(getattr(module, "kv_b_proj", None), nn.Linear) and isinstance(rank, int) and isinstance(rope, int):
        return rank + rope
    return 0


AttentionInterface.register("trtllm", trtllm_attention)


class HFCausalLM(nn.Module):
    def __init__(self, model: PreTrainedModel):
        super().__init__()
        model.set_attn_implementation("trtllm")
        experts = getattr(model.config, "_experts_implementation", None)
        fp8 = fp8_linears_of(model)
        if ((experts == "eager" or (experts == "grouped_mm" and fp8 is not None and fp8.experts))
                and model._can_set_experts_implementation()):
            # HF's eager experts loop over `nonzero(...)` hits: dynamo cannot capture that in one
            # graph (fullgraph). batched_mm computes the same experts in one graph, which
            # passes/fuse_moe.py then replaces (HF's default, grouped_mm, is captured as it is,
            # except over FP8 experts: torch's grouped_mm refuses their placeholder weights,
            # stride 0, in the contract's eager probe run).
            model.set_experts_implementation("batched_mm")
        self.model = model
        self.config = model.config

    @contextlib.contextmanager
    def record_attention_calls(self):
        """While inside, eager attention calls are recorded (not refused) into the list yielded."""
        global _recording
        previous, _recording = _recording, []
        try:
            yield _recording
        finally:
            _recording = previous

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, position_ids=positions, use_cache=False).logits


def is_mtp_tensor(config, name: str) -> bool:
    """A DeepSeek-V3 multi-token-prediction layer's tensor: `model.layers.{n}.*` for the
    `num_nextn_predict_layers` layers after the last decoder layer. Skipped when loading (HF's
    module does not build them; speculative decoding with MTP is not built, and is refused by
    name in runtime/speculative)."""
    first, count = getattr(config, "num_hidden_layers", 0), getattr(config, "num_nextn_predict_layers", 0) or 0
    parts = name.split(".")
    return (len(parts) > 3 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
            and first <= int(parts[2]) < first + count)


def load_hf_module(path, dtype: torch.dtype, device: torch.device) -> PreTrainedModel:
    """The HF `*ForCausalLM` of checkpoint directory `path` (a family with no model file of
    ours), its safetensors weights loaded by transformers (never pickles, never
    `trust_remote_code`); any tensor missing, unexpected or of the wrong shape raises, but
    DeepSeek-V3's multi-token-prediction layers, which are skipped (`is_mtp_tensor`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}/config.json: transformers cannot build this model without "
                         f"trust_remote_code ({str(e).splitlines()[0]})") from None
    model_cls = AutoModelForCausalLM._model_mapping.get(type(config), None)
    if model_cls is None:
        raise ValueError(f"{path}/config.json: model_type {config.model_type!r} is not a causal LM "
                         "transformers can build (trtllm runs decoder-only causal LMs)")
    model, info = model_cls.from_pretrained(path, dtype=dtype, use_safetensors=True, trust_remote_code=False,
                                            attn_implementation="eager", output_loading_info=True,
                                            ignore_mismatched_sizes=True)  # reported below, naming the tensors
    info["unexpected_keys"] = [k for k in info.get("unexpected_keys", ()) if not is_mtp_tensor(config, k)]
    wrong = {k: v for k, v in info.items() if v}
    if wrong:
        raise ValueError(f"{path}: the checkpoint does not match {model_cls.__name__}: {wrong}")
    for name, weight in model.named_parameters():
        check_finite(weight, name, str(path))
    return model.to(device).eval().requires_grad_(False)
