"""A command's `--model NAME_OR_DIR`: what it names, and what `LLM(...)` takes for it.

    spec = resolve_model("llama-3.1-8b")     # or a checkpoint directory, or "demo" (None: demo)
    spec.config                              # HF config.json values (read, or the preset's)
    spec.vocab_size, spec.max_position_embeddings
    spec.tokenizer()                         # the checkpoint's tokenizer, or None (presets)
    llm = LLM(**spec.llm_kwargs(dtype="auto"), build_config=...)

NAME_OR_DIR is, in this order: "demo" (the built-in demo model, trtllm/demo.py); an
existing directory (an HF checkpoint, loaded as `LLM(model=dir)` loads it); or a preset
of PRESETS: a real model's config.json values, built by our own model file where
models/loader.ARCHITECTURES names one (llama.py, qwen3_moe.py, mixtral.py), else (DeepSeek-V2-Lite)
by transformers' module as `LLM(model=dir)` would load it, with random weights in
the requested dtype on the device, so it runs at real shapes with nothing downloaded (its
tokens are noise; there is no tokenizer).
Anything else is an `UnknownModel` error: one that looks like a path says the directory
does not exist; a name lists the presets. Nothing here imports torch until a model is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from trtllm.models.checkpoint_config import TOKENIZER_FILES

DEMO = "demo"

_LLAMA3_ROPE = dict(rope_type="llama3", low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, torch_dtype="float32")

# name -> HF config.json values (as the published checkpoints' config.json has them)
PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, factor=8.0), tie_word_embeddings=False, bos_token_id=128000,
        eos_token_id=128001, torch_dtype="bfloat16"),
    "llama-3.2-1b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
        intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(_LLAMA3_ROPE, factor=32.0), tie_word_embeddings=True, bos_token_id=128000,
        eos_token_id=128001, torch_dtype="bfloat16"),
    "qwen3-8b": dict(
        architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
        intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=None, bos_token_id=151643, eos_token_id=151645,
        torch_dtype="bfloat16"),
    # MoE (models/qwen3_moe.py, mixtral.py; passes/fuse_moe.py fuses their blocks). 30.5B / 46.7B parameters.
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, use_sliding_window=False, sliding_window=None,
        bos_token_id=151643, eos_token_id=151645, torch_dtype="bfloat16"),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_theta=1000000.0, sliding_window=None, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        torch_dtype="bfloat16"),
    # DeepSeek-V2-Lite (15.7B, 2.4B active): multi-head latent attention (trtllm/mla_attention.py),
    # layer 0 dense, then 64 routed experts (top-6, softmax, not renormalised) + 2 shared
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1,
        moe_layer_freq=1, norm_topk_prob=False, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
        attention_bias=False, hidden_act="silu", tie_word_embeddings=False, bos_token_id=100000,
        eos_token_id=100001, torch_dtype="bfloat16"),
    # tiny shapes, fp32: for tests and trying the commands on a CPU in seconds
    "tiny-llama": dict(_TINY, architectures=["LlamaForCausalLM"], model_type="llama", head_dim=16),
    "tiny-qwen3": dict(_TINY, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32),
    "tiny-qwen3-moe": dict(_TINY, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", head_dim=16,
                           moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
    "tiny-deepseek-v2": dict(_TINY, architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                             num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                             num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                             qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, topk_method="greedy"),
    "tiny-mixtral": dict(_TINY, architectures=["MixtralForCausalLM"], model_type="mixtral", intermediate_size=32,
                         num_local_experts=4, num_experts_per_tok=2, sliding_window=None),
}


class UnknownModel(ValueError):
    """--model names nothing this machine has: no such directory, no such preset."""


@dataclass(frozen=True)
class ModelSpec:
    name: str            # as given
    kind: str            # "demo" | "directory" | "preset"
    path: Path | None    # the checkpoint directory (demo, directory)
    config: dict         # config.json values

    @property
    def vocab_size(self) -> int | None:
        return self.config.get("vocab_size")

    @property
    def max_position_embeddings(self) -> int | None:
        return self.config.get("max_position_embeddings")

    @property
    def has_tokenizer(self) -> bool:
        return self.path is not None and any((self.path / f).is_file() for f in TOKENIZER_FILES)

    def tokenizer(self):
        """The checkpoint's tokenizer (transformers), or None where there is none."""
        if not self.has_tokenizer:
            return None
        from trtllm.runtime.tokenizer import load_tokenizer
        return load_tokenizer(self.path)

    def llm_kwargs(self, dtype: str = "auto", device=None, seed: int = 0) -> dict:
        """`LLM(**kwargs)` for this model: model (a directory LLM loads with its tokenizer,
        or the module built or loaded here: a preset, or a directory without a tokenizer)
        and dtype. Presets draw their weights from `seed`."""
        if self.kind == "preset":
            return dict(model=build_preset(self.config, dtype, device, seed), dtype=dtype)
        if not self.has_tokenizer:  # LLM(model=dir) would look for its tokenizer
            from trtllm.models.loader import load_model
            return dict(model=load_model(self.path, dtype=None if dtype == "auto" else dtype, device=device),
                        dtype=dtype)
        return dict(model=str(self.path), dtype=dtype)

    def describe(self) -> dict:
        """For reports: what was run."""
        return {"name": self.name, "kind": self.kind, "path": str(self.path) if self.path else None,
                "config": self.config}


def resolve_model(name: str | None) -> ModelSpec:
    if name is None or name == DEMO:
        from trtllm.demo import demo_model_path
        path = demo_model_path()
        return ModelSpec(DEMO, "demo", path, _read_config(path))
    if os.path.isdir(name):
        return ModelSpec(name, "directory", Path(name), _read_config(Path(name)))
    preset = PRESETS.get(name.lower())
    if preset is not None:
        return ModelSpec(name, "preset", None, dict(preset))
    if os.sep in name or name.startswith((".", "~")) or os.path.exists(name):
        what = "is not a directory" if os.path.exists(name) else "does not exist"
        raise UnknownModel(f"checkpoint directory {name!r} {what}")
    raise UnknownModel(f"unknown model {name!r}: no such checkpoint directory, and not a preset "
                       f"(presets: {', '.join(PRESETS)}; or {DEMO!r}, the built-in demo model)")


def _read_config(path: Path) -> dict:
    from trtllm.models.checkpoint_config import read_config
    try:
        return read_config(path)
    except (FileNotFoundError, ValueError) as e:  # the commands' one error for a model argument
        raise UnknownModel(str(e)) from None


def build_preset(config: dict, dtype: str = "auto", device=None, seed: int = 0):
    """The model for `config` with random weights (norm weights ~1, matrices ~N(0, 1/fan_in),
    as bench/bench_e2e.py; fan_in = the last dim, also for 3-D expert weights), made directly
    in `dtype` on `device` (cuda if there is one): no fp32 copy, no host round trip. Our
    module where loader.ARCHITECTURES names our file, else transformers' module."""
    import torch

    from trtllm.models.loader import ARCHITECTURES

    dtypes = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    key = config.get("torch_dtype", "float32") if dtype == "auto" else dtype
    if key not in dtypes:
        raise ValueError(f"dtype must be one of auto, {', '.join(dtypes)}; got {dtype!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    ours = ARCHITECTURES.get((config.get("architectures") or [None])[0])
    if ours is not None:
        with torch.device("meta"):
            model = ours(ours.config_class.from_hf(config)).to(dtypes[key])
        model.to_empty(device=device)
        model.tie_weights()
    else:
        model = _hf_module(config, dtypes[key], device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.05, generator=generator)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=generator)
    if ours is not None:
        model.init_buffers(device)
    return model.eval().requires_grad_(False)


def _hf_module(config: dict, dtype, device):
    """transformers' *ForCausalLM for `config`, built on `device` in `dtype` (its rotary
    buffers computed there; the weights are overwritten by the caller)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    values = {k: v for k, v in config.items() if k not in ("model_type", "torch_dtype")}
    hf_config = AutoConfig.for_model(config["model_type"], **values)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype, attn_implementation="eager")
