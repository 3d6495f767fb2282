"""What a model says of itself where its config does not: the vocabulary size (the
engine's sampler width, and what a draft model must share with its target) and the end
tokens.

    vocab_size_of(module, compiled) -> int          config.vocab_size, lm_head, else one forward
    eos_token_ids_of(module, tokenizer) -> list[int]
"""
from __future__ import annotations

import torch
import torch.nn as nn


def vocab_size_of(module: nn.Module, compiled) -> int:
    """config.vocab_size, else the head's out_features, else the logits' width of one eager
    forward of one token (what the model itself says; a tokenizer may count otherwise)."""
    size = getattr(getattr(module, "config", None), "vocab_size", None)
    if size is None:
        size = getattr(getattr(module, "lm_head", None), "out_features", None)
    if size is None:
        zeros = torch.zeros((1, 1), dtype=torch.long, device=compiled.device)
        with torch.no_grad():
            size = compiled.module(zeros, zeros).shape[-1]
    return int(size)


def eos_token_ids_of(module: nn.Module, tokenizer) -> list[int]:
    ids = getattr(getattr(module, "config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    return [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
