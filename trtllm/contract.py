"""What `trtllm.compile` accepts, and what it learns from a model before tracing it.

A compilable model is `forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]`
(positions [3, B, S] for a model whose `config.position_axes` is 3: Qwen2.5-VL's M-RoPE,
temporal/height/width; the runtime then stages them, runtime/mrope_positions.py; every other
model keeps [B, S]), written as for B whole sequences, with attention as causal
`F.scaled_dot_product_attention(q, k, v, is_causal=True)` (GQA through `enable_gqa=True`
or `repeat_interleave`): no mask, no dropout, no cache. Run eagerly it is the reference.
HF `*ForCausalLM` models are put under the contract by models/hf.py (`contract_module`).

`probe_attention` runs the model once, eagerly, on two tokens: it refuses attention it
cannot page (`unpageable`, the same rule replace_sdpa_with_paged_attention applies to the
traced graph) before any tracing, and returns the `AttentionSpec` the KV cache is sized by,
with each layer's options the paged kernels apply: sliding window and logit soft-capping,
and the model's ALiBi slopes.
It runs the model inside `probing_attention()` (models/attention.py), so a layer that
calls `causal_attention` calls plain causal SDPA, as it will in the traced graph.
An HF model also reports what each layer asked of the attention interface
(models/hf.py): its window and softcap are taken from there (what HF itself applies), and
a feature the paged kernels do not honour (sinks, a mask) is a CompileError naming the
layer and the feature. Other models give them in their config: `layer_windows`,
`layer_softcaps` (one entry per attention layer), `alibi_slopes` (one per query head; our
BLOOM and MPT files). An HF config that asks for ALiBi without them is refused by name.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from trtllm.models.attention import probing_attention
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
    softcaps: tuple[float, ...]  # logit soft-capping per layer (softcap * tanh(x / softcap)), 0.0 = none
    # multi-head latent attention (DeepSeek-V2/V3, trtllm/mla_attention.py): the cache holds one
    # latent row per token (num_kv_heads 1, head_dim kv_lora_rank + qk_rope_head_dim) and no V
    latent: bool = False
    # ALiBi (BLOOM, MPT): the slope of each query head, the same on every layer; () = none
    alibi_slopes: tuple[float, ...] = ()


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


def adapter_module_path(model: nn.Module):
    """A LoRA adapter's module path (peft's, of the HF model it was trained on) -> the path of that
    linear in `model` under the contract: "model." + it inside the HF module's wrapper; a model
    file's `checkpoint_name` where its checkpoints name tensors otherwise (LLaVA's layouts); else
    the same path."""
    from transformers import PreTrainedModel
    if isinstance(model, PreTrainedModel):
        return lambda path: "model." + path
    rename = getattr(model, "checkpoint_name", None)
    if rename is not None:
        return lambda path: rename(path + ".weight").removesuffix(".weight")
    return None


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
        self.query_heads: list[int] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.keys.append(args[1] if len(args) > 1 else kwargs["key"])
            self.query_heads.append((args[0] if args else kwargs["query"]).shape[1])
            self._check(*args, **kwargs)
        return func(*args, **kwargs)

    def _check(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **_):
        reason = unpageable(attn_mask is not None, dropout_p, is_causal, query.shape[-2])
        if reason is not None:  # refused at compile() time, before any tracing
            raise CompileError(f"attention layer {len(self.keys) - 1}: {reason}")


def probe_attention(model: nn.Module, device: torch.device) -> AttentionSpec:
    """Run `model` (under the contract) eagerly on two tokens and record every SDPA's key
    shape; the windows and softcaps come from what an HF model's layers asked for, else its
    config."""
    ids = torch.zeros((1, 2), dtype=torch.long, device=device)
    record = getattr(model, "record_attention_calls", None)  # HF models (models/hf.py)
    with torch.no_grad(), probing_attention(), _RecordSDPA() as rec, \
            (record() if record else contextlib.nullcontext([])) as calls:
        try:
            model(ids, torch.arange(2, device=device)[None])
        except CompileError:
            if record is None or calls:
                raise
        if record is not None and not calls:  # e.g. GPT-J, Falcon: their own attention code
            alibi = " (and ALiBi, which only our BLOOM, MPT and Falcon model files give the kernels)" \
                if hf_alibi(model.config) else ""
            raise CompileError(f"{type(model.model).__name__} is refused: its attention{alibi} does not go through "
                               "HF's AttentionInterface, so trtllm cannot page it (and has no model file of its own "
                               "for this family)")
    if calls:
        refuse_hf_masks(model.config, calls)
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
    n = len(rec.keys)
    latent = latent_dim(model, calls)
    if latent:  # MLA: the expanded heads are the eager reference; the cache holds the latent
        return AttentionSpec(n, 1, latent, dtype, (0,) * n, (0.0,) * n, latent=True)
    windows = [c.window for c in calls] if calls else layer_windows(model, n)
    softcaps = [c.softcap for c in calls] if calls else layer_softcaps(model, n)
    for name, values in (("layer_windows", windows), ("layer_softcaps", softcaps)):
        if len(values) != n:
            raise CompileError(f"config.{name} has {len(values)} entries, the model {n} attention layers")
    bad = [(i, c) for i, c in enumerate(softcaps) if not (isinstance(c, (int, float)) and 0 <= c < float("inf"))]
    if bad:
        raise CompileError(f"attention layer {bad[0][0]}: softcap {bad[0][1]!r} (0 = none, else a finite cap > 0)")
    slopes = alibi_slopes(model, set(rec.query_heads), calls)
    if slopes and any(softcaps):
        raise CompileError("ALiBi with logit soft-capping: the paged attention kernels take one or the other")
    return AttentionSpec(n, heads, dim, dtype, tuple(windows), tuple(float(c) for c in softcaps),
                         alibi_slopes=slopes)


def refuse_hf_masks(config, calls: list) -> None:
    """Attention an HF module asks for through the mask it builds, which trtllm's interface
    never receives (it registers no mask function): chunked attention (Llama-4's
    `attention_chunk_size` on its `chunked_attention` layers) is refused naming the layers,
    rather than run as full causal attention."""
    types = list(getattr(config, "layer_types", None) or ())
    chunk = getattr(config, "attention_chunk_size", None)
    chunked = [c.layer if c.layer is not None else i for i, c in enumerate(calls)
               if c.layer is not None and c.layer < len(types) and types[c.layer] == "chunked_attention"]
    if chunked and chunk:
        raise CompileError(f"attention layers {chunked} ({calls[0].module}): chunked attention "
                           f"(attention_chunk_size={chunk}, HF's mask keeps each query to its own chunk of keys): "
                           "the paged attention kernels do not honour it, and dropping it would give wrong output")


def hf_alibi(config) -> bool:
    """Whether an HF config asks for ALiBi: BLOOM and MPT always, Falcon with `alibi`, MPT's
    `attn_config.alibi`."""
    attn = getattr(config, "attn_config", None)
    return (getattr(config, "model_type", None) in ("bloom", "mpt") or bool(getattr(config, "alibi", False))
            or bool(getattr(attn, "alibi", False)))


def alibi_slopes(model: nn.Module, query_heads: set[int], calls: list) -> tuple[float, ...]:
    """ALiBi's slope per query head (() = none): the config's `alibi_slopes` (a model file of
    ours). An HF module whose config asks for ALiBi is refused by name: its layers add the
    bias themselves, which paged attention would drop."""
    config = getattr(model, "config", None)
    if calls:
        if hf_alibi(config):
            raise CompileError(f"{type(model.model).__name__}: ALiBi, added by the HF module's own attention code, "
                               "would be dropped by paged attention (only our BLOOM, MPT and Falcon model files give "
                               "the kernels ALiBi slopes)")
        return ()
    slopes = tuple(float(s) for s in (getattr(config, "alibi_slopes", None) or ()))
    if not slopes:
        if hf_alibi(config) and not hasattr(config, "alibi_slopes"):
            raise CompileError(f"config asks for ALiBi ({getattr(config, 'model_type', '?')}) but names no "
                               "config.alibi_slopes (one per query head) for the paged attention kernels")
        return ()
    if query_heads != {len(slopes)}:
        raise CompileError(f"config.alibi_slopes has {len(slopes)} entries, the attention layers "
                           f"{sorted(query_heads)} query heads: ALiBi needs one slope per query head")
    return slopes


def latent_dim(model: nn.Module, calls: list) -> int:
    """Multi-head latent attention's row per token, kv_lora_rank + qk_rope_head_dim (0: not
    MLA): what HF's DeepSeek-V2/V3 layers told the interface (models/hf.py), else a config's
    `kv_lora_rank` and `qk_rope_head_dim` (a plain-PyTorch MLA, passes/place_mla_attention.py)."""
    if calls:
        dims = {c.latent_dim for c in calls}
        if len(dims) != 1:
            raise CompileError(f"attention layers mix multi-head latent attention and ordinary attention "
                               f"(latent rows {sorted(dims)}): one KV cache cannot hold both")
        return dims.pop()
    config = getattr(model, "config", None)
    rank, rope = getattr(config, "kv_lora_rank", None), getattr(config, "qk_rope_head_dim", None)
    return rank + rope if isinstance(rank, int) and isinstance(rope, int) else 0


def layer_softcaps(model: nn.Module, num_layers: int) -> list[float]:
    """Logit soft-capping per attention layer (0.0 = none): the config's `layer_softcaps`
    (a model file of ours), else none. A config that names HF's `attn_logit_softcapping`
    without `layer_softcaps` is refused: the model may cap eagerly, and which layers it caps
    is not ours to guess."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "layer_softcaps"):
        return list(config.layer_softcaps)
    if getattr(config, "attn_logit_softcapping", None):
        raise CompileError(f"config.attn_logit_softcapping={config.attn_logit_softcapping!r} but no "
                           "config.layer_softcaps: give the cap of each attention layer (0 = none) so the paged "
                           "attention kernels apply it")
    return [0.0] * num_layers


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
