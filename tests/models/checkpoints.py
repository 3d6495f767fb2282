"""Tiny random-weight HF checkpoints for tests (no downloads, no tokenizer).

    write_checkpoint(family, directory, **config_overrides) -> Path
    hf_model(directory) -> the HF *ForCausalLM, fp32, eager attention, eval

FAMILIES lists the families; each is hidden 64, 2 layers, 4 heads, vocab 128. Every
parameter is random (norm weights around 1, biases nonzero) so a misplaced tensor shows.
Other test files reuse these: `from tests.models.checkpoints import write_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)

# family -> (HF config class, HF model class, config kwargs)
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False)),
    # llama3 rope scaling with original_max_position_embeddings=32: with head_dim 16 and
    # theta 10000, wavelengths fall in all three branches (kept, blended, divided).
    "llama31": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                dict(num_key_value_heads=2, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    # sliding_window=5 bites for sequences longer than 5
    "mistral_swa": (transformers.MistralConfig, transformers.MistralForCausalLM,
                    dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # layer 0 full, layer 1 sliding (window 4)
    "qwen2_swa": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                  dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                       sliding_window=4, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    "mqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
            dict(num_key_value_heads=1, tie_word_embeddings=False)),
}


def hf_config(family: str, **overrides):
    config_cls, _, kwargs = FAMILIES[family]
    return config_cls(**{**_BASE, **kwargs, **overrides})


def make_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random HF model of `family` (fp32, eager attention, eval)."""
    _, model_cls, _ = FAMILIES[family]
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:  # norm weights
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def write_checkpoint(family: str, directory: str | Path, seed: int = 0, dtype: torch.dtype | None = None,
                     max_shard_size: str | int | None = None, **overrides) -> Path:
    """save_pretrained a random `family` model into `directory` (created); returns the path."""
    directory = Path(directory)
    model = make_hf_model(family, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF reference model of a checkpoint written by write_checkpoint."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager").eval()


def random_batch(vocab_size: int = 128, batch: int = 2, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    """input_ids [batch, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)
