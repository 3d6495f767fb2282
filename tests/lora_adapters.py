"""Test helper: PEFT LoRA adapters for the tiny test checkpoints, written by the `peft` package
itself, with random non-zero A and B (peft initialises B to zero: the adapter would be a no-op).

    write_adapter(base_dir, out_dir, r=8, targets=[...], seed=0, model=None, **peft_options) -> the peft model
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.models.checkpoints import hf_model


def write_adapter(base_dir: Path, out_dir: Path, r: int = 8, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                  "gate_proj", "up_proj", "down_proj"), seed: int = 0, lora_alpha: int | None = None,
                  scale: float = 0.15, model=None, **options):
    """`targets`: module names, or one regular expression (peft's) over module paths; `model`: the
    HF model to adapt (default: the causal LM of `base_dir`, e.g. a vision-language model's own)."""
    from peft import LoraConfig, get_peft_model
    model = model if model is not None else hf_model(base_dir)
    config = LoraConfig(r=r, lora_alpha=lora_alpha if lora_alpha is not None else 2 * r,
                        target_modules=targets if isinstance(targets, str) else list(targets), lora_dropout=0.0,
                        **options)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()


def peft_greedy(peft_model, prompt: list[int], new: int) -> list[int]:
    with torch.no_grad():
        out = peft_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False)
    return out[0, len(prompt):].tolist()
