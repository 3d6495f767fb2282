"""`build_speculative`: a speculative config to the engine's `SpeculativeDecoder`
(runtime/build_engine.py calls it before sizing the target's KV pool, so that a draft
model's weights and its own pool are in memory before the target takes what is left).

A draft model's pool: `KvCacheConfig.max_tokens` tokens when given (the target holds no
more), else every sequence at max_seq_len, capped on a GPU at a tenth of the free memory;
plus k + one block of slack a sequence. Its blocks are never shared (no prefix reuse). A
sequence the draft pool cannot hold is not speculated.

An EAGLE-3 head (EagleDecodingConfig, runtime/speculative/eagle3.py) is such a draft model
whose pool (and the stores of hidden states beside it and the target's) waits for the
target's pool: `SpeculativeDecoder.attach_target(slots)` makes them.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn

from trtllm.compile import CompiledModel, compile as trtllm_compile
from trtllm.hidden_states import HiddenStash, HiddenStatesContext
from trtllm.models.eagle3 import Eagle3Draft, input_embedding, load_eagle3
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
from trtllm.runtime.speculative.eagle3 import Eagle3Inputs

DRAFT_GPU_MEMORY_FRACTION = 0.1  # of the free memory, at most, for the draft's KV pool


def check_speculative_config(config) -> None:
    """Refuse what is not built, by name, before any loading."""
    if config is None:
        return
    if isinstance(config, MTPDecodingConfig):
        raise ValueError("MTP speculative decoding (MTPDecodingConfig) is not supported yet; use "
                         "EagleDecodingConfig, DraftTargetDecodingConfig (a draft model) or NGramDecodingConfig")
    if isinstance(config, EagleDecodingConfig):
        if config.speculative_model_dir is None:
            raise ValueError("EagleDecodingConfig needs speculative_model_dir: the EAGLE-3 head's directory")
        if not config.eagle3_one_model:
            raise ValueError("EagleDecodingConfig(eagle3_one_model=False) (the head as a separate engine) is not "
                             "supported: the head runs beside the target in one engine")
        return
    if not isinstance(config, (NGramDecodingConfig, DraftTargetDecodingConfig, SpeculativeDecodingConfig)):
        raise TypeError("speculative_config must be NGramDecodingConfig, DraftTargetDecodingConfig, "
                        f"SpeculativeDecodingConfig or EagleDecodingConfig, got {type(config).__name__}")


def build_speculative(config, *, vocab_size: int, eos_token_ids: list[int], max_num_seqs: int,
                      max_num_tokens: int, max_seq_len: int, block_size: int, kv_max_tokens: int | None,
                      device: torch.device, dtype: torch.dtype | None, enable_cuda_graph: bool,
                      compile_options: dict | None, target: CompiledModel | None = None) -> SpeculativeDecoder:
    """The decoder; `target`: the target's compiled model, not yet called (an EAGLE-3 head
    makes it stash hidden states)."""
    check_speculative_config(config)
    if isinstance(config, EagleDecodingConfig):
        return _build_eagle3(config, target, vocab_size=vocab_size, eos_token_ids=eos_token_ids,
                             max_num_seqs=max_num_seqs, max_num_tokens=max_num_tokens, max_seq_len=max_seq_len,
                             block_size=block_size, kv_max_tokens=kv_max_tokens, dtype=dtype,
                             enable_cuda_graph=enable_cuda_graph, compile_options=compile_options)
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
    blocks = _draft_blocks(compiled, config.max_draft_len, max_num_seqs, max_seq_len, block_size, kv_max_tokens)
    runner = _draft_runner(compiled, blocks, max_num_seqs, max_num_tokens, max_seq_len, block_size, enable_cuda_graph)
    draft = DraftModelProposer(runner, BlockManager(blocks, block_size, enable_block_reuse=False),
                               max_num_tokens, vocab_size, eos_token_ids)
    return SpeculativeDecoder(config.max_draft_len, max_seq_len, vocab_size, eos_token_ids, draft=draft,
                              verify_cuda_graphs=config.verify_cuda_graphs)


def _draft_blocks(compiled: CompiledModel, k: int, max_num_seqs: int, max_seq_len: int, block_size: int,
                  kv_max_tokens: int | None) -> int:
    """The draft's pool (module docstring)."""
    tokens = kv_max_tokens if kv_max_tokens is not None else max_num_seqs * max_seq_len
    blocks = math.ceil(tokens / block_size) + max_num_seqs * (math.ceil(k / block_size) + 1)
    if compiled.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(compiled.device)
        blocks = min(blocks, blocks_in(free * DRAFT_GPU_MEMORY_FRACTION, compiled, block_size))
    if blocks < math.ceil(max_seq_len / block_size):
        raise ValueError(f"the draft model's KV pool holds {blocks} blocks, fewer than one sequence of "
                         f"max_seq_len={max_seq_len} needs")
    return blocks


def _draft_runner(compiled: CompiledModel, blocks: int, max_num_seqs: int, max_num_tokens: int, max_seq_len: int,
                  block_size: int, enable_cuda_graph: bool, **runner_options) -> ModelRunner:
    return ModelRunner(compiled, num_blocks=blocks, block_size=block_size, max_num_tokens=max_num_tokens,
                       max_num_seqs=max_num_seqs, max_model_len=max_seq_len, enable_cuda_graph=enable_cuda_graph,
                       **runner_options)


def _build_eagle3(config: EagleDecodingConfig, target: CompiledModel | None, *, vocab_size: int,
                  eos_token_ids: list[int], max_num_seqs: int, max_num_tokens: int, max_seq_len: int,
                  block_size: int, kv_max_tokens: int | None, dtype: torch.dtype | None, enable_cuda_graph: bool,
                  compile_options: dict | None) -> SpeculativeDecoder:
    """An EAGLE-3 head's decoder: the head loaded and compiled, the target made to stash the
    states the head reads (fc in its graph); its runner and stores wait for `attach_target`,
    once the target's pool is sized (SpeculativeDecoder.attach_target)."""
    if target is None:
        raise ValueError("EAGLE-3 needs the target's compiled model")
    if target.attention.latent:
        raise ValueError("EAGLE-3 over multi-head latent attention (DeepSeek-V2/V3) is not supported")
    source = config.speculative_model_dir
    dtype = dtype or target.attention.dtype
    head = source if isinstance(source, Eagle3Draft) else load_eagle3(source, target.module, dtype, target.device)
    hc = head.config
    if config.eagle3_layers_to_capture is not None:  # a copy: a head given as a module keeps its own
        hc = dataclasses.replace(hc, aux_layers=tuple(sorted(config.eagle3_layers_to_capture)))
    if hc.vocab_size != vocab_size:
        raise ValueError(f"the EAGLE-3 head's vocabulary ({hc.vocab_size} tokens) differs from the target's "
                         f"({vocab_size})")
    hidden = input_embedding(target.module).embedding_dim
    if hc.target_hidden_size != hidden:
        raise ValueError(f"the EAGLE-3 head reads target states of {hc.target_hidden_size}, the target's are {hidden}")
    layers = hc.target_layers(target.attention.num_layers)
    target.set_hidden_stash(HiddenStash(layers, hidden, combine=head.fc.weight.detach().to(target.attention.dtype)))
    compiled = trtllm_compile(head, **(compile_options or {}), block_size=block_size,
                              hidden_stash=HiddenStash((0,), hc.hidden_size))
    k = config.max_draft_len
    eagle = Eagle3Inputs(hc.hidden_size, compiled.attention.dtype, compiled.device, block_size, max_num_tokens,
                         head.draft_to_target, vocab_size)
    proposer = DraftModelProposer(None, None, max_num_tokens, vocab_size, eos_token_ids, eagle=eagle)

    def attach(target_slots: int) -> HiddenStatesContext:
        blocks = _draft_blocks(compiled, k, max_num_seqs, max_seq_len, block_size, kv_max_tokens)
        target_ctx, draft_ctx = eagle.attach(target_slots, blocks * block_size)
        proposer.runner = _draft_runner(compiled, blocks, max_num_seqs, max_num_tokens, max_seq_len, block_size,
                                        enable_cuda_graph, hidden_states=draft_ctx, pick_map=eagle.draft_to_target)
        proposer.block_manager = BlockManager(blocks, block_size, enable_block_reuse=False)
        return target_ctx

    return SpeculativeDecoder(k, max_seq_len, vocab_size, eos_token_ids, draft=proposer,
                              verify_cuda_graphs=config.verify_cuda_graphs, attach_target=attach)
