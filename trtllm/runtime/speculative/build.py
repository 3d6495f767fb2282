"""`build_speculative`: a speculative config to the engine's `SpeculativeDecoder`
(runtime/build_engine.py calls it before sizing the target's KV pool, so that a draft
model's weights and its own pool are in memory before the target takes what is left).

A draft model's pool: `KvCacheConfig.max_tokens` tokens when given (the target holds no
more), else every sequence at max_seq_len, capped on a GPU at a tenth of the free memory;
plus k + one block of slack a sequence. Its blocks are never shared (no prefix reuse). A
sequence the draft pool cannot hold is not speculated.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from trtllm.compile import compile as trtllm_compile
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.kv_budget import blocks_in
from trtllm.runtime.model_runner import ModelRunner
from trtllm.runtime.speculative.config import (
    DraftTargetDecodingConfig,
    EagleDecodingConfig,
    MTPDecodingConfig,
    NGramDecodingConfig,
    SpeculativeDecodingConfig,
)
from trtllm.runtime.speculative.decoder import SpeculativeDecoder
from trtllm.runtime.speculative.draft_model import DraftModelProposer

DRAFT_GPU_MEMORY_FRACTION = 0.1  # of the free memory, at most, for the draft's KV pool


def check_speculative_config(config) -> None:
    """Refuse what is not built, by name, before any loading."""
    if config is None:
        return
    if isinstance(config, EagleDecodingConfig):
        raise ValueError("EAGLE-3 speculative decoding (EagleDecodingConfig) is not supported yet; use "
                         "DraftTargetDecodingConfig (a draft model) or NGramDecodingConfig")
    if isinstance(config, MTPDecodingConfig):
        raise ValueError("MTP speculative decoding (MTPDecodingConfig) is not supported yet; use "
                         "DraftTargetDecodingConfig (a draft model) or NGramDecodingConfig")
    if not isinstance(config, (NGramDecodingConfig, DraftTargetDecodingConfig, SpeculativeDecodingConfig)):
        raise TypeError("speculative_config must be NGramDecodingConfig, DraftTargetDecodingConfig or "
                        f"SpeculativeDecodingConfig, got {type(config).__name__}")


def build_speculative(config, *, vocab_size: int, eos_token_ids: list[int], max_num_seqs: int,
                      max_num_tokens: int, max_seq_len: int, block_size: int, kv_max_tokens: int | None,
                      device: torch.device, dtype: torch.dtype | None, enable_cuda_graph: bool,
                      compile_options: dict | None) -> SpeculativeDecoder:
    check_speculative_config(config)
    if isinstance(config, NGramDecodingConfig):
        return SpeculativeDecoder(config.max_draft_len, max_seq_len, vocab_size, eos_token_ids,
                                  max_matching_ngram_size=config.max_matching_ngram_size,
                                  verify_cuda_graphs=config.verify_cuda_graphs)
    if isinstance(config, SpeculativeDecodingConfig):
        config = config.as_draft_target()
    source = config.speculative_model_dir
    if isinstance(source, nn.Module):
        module = source
    else:
        from trtllm.models.loader import load_model
        module = load_model(source, dtype=dtype, device=device)
    compiled = trtllm_compile(module, **(compile_options or {}), block_size=block_size)
    draft_vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if draft_vocab is not None and draft_vocab != vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_vocab} tokens) differs from the target's "
                         f"({vocab_size}): a draft model must share the target's tokenizer")
    k = config.max_draft_len
    tokens = kv_max_tokens if kv_max_tokens is not None else max_num_seqs * max_seq_len
    blocks = math.ceil(tokens / block_size) + max_num_seqs * (math.ceil(k / block_size) + 1)
    if compiled.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compiled.device)
        blocks = min(blocks, blocks_in(free * DRAFT_GPU_MEMORY_FRACTION, compiled, block_size))
    if blocks < math.ceil(max_seq_len / block_size):
        raise ValueError(f"the draft model's KV pool holds {blocks} blocks, fewer than one sequence of "
                         f"max_seq_len={max_seq_len} needs")
    runner = ModelRunner(compiled, num_blocks=blocks, block_size=block_size, max_num_tokens=max_num_tokens,
                         max_num_seqs=max_num_seqs, max_model_len=max_seq_len, enable_cuda_graph=enable_cuda_graph)
    draft = DraftModelProposer(runner, BlockManager(blocks, block_size, enable_block_reuse=False),
                               max_num_tokens, vocab_size, eos_token_ids)
    return SpeculativeDecoder(k, max_seq_len, vocab_size, eos_token_ids, draft=draft,
                              verify_cuda_graphs=config.verify_cuda_graphs)
