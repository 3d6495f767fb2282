"""`build_speculative`: a speculative config to the engine's `SpeculativeDecoder`
(runtime/build_engine.py calls it before sizing the target's KV pool, so that a draft
model's weights and its own pool are in memory before the target takes what is left).

A draft model's pool: `KvCacheConfig.max_tokens` tokens when given (the target holds no
more), else every sequence at max_seq_len, capped on a GPU at a tenth of the free memory;
plus k + one block of slack a sequence. Its blocks are never shared (no prefix reuse). A
sequence the draft pool cannot hold is not speculated.

An EAGLE-3 head (EagleDecodingConfig, runtime/speculative/eagle3.py) or DeepSeek-V3's MTP
layer (MTPDecodingConfig, models/deepseek_mtp.py) is such a draft model whose pool (and the
stores of hidden states beside it and the target's) waits for the target's pool:
`SpeculativeDecoder.attach_target(slots)` makes them.
"""
from __future__ import annotations

import dataclasses
import math
import os

import torch
import torch.nn as nn

from trtllm.compile import CompiledModel, CompileError, compile as trtllm_compile
from trtllm.hidden_states import HiddenStash, HiddenStatesContext
from trtllm.models.deepseek_mtp import MTPDraft, load_mtp
from trtllm.models.eagle3 import Eagle3Draft, input_embedding, load_eagle3
from trtllm.parallel.tensor_parallel import is_unloaded
from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.kv_budget import blocks_in
from trtllm.runtime.model_probe import vocab_size_of
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
from trtllm.runtime.tokenizer import TOKENIZER_FILES, load_tokenizer

DRAFT_GPU_MEMORY_FRACTION = 0.1  # of the free memory, at most, for the draft's KV pool


def check_speculative_config(config) -> None:
    """Refuse what is not built, by name, before any loading."""
    if config is None:
        return
    if isinstance(config, MTPDecodingConfig):
        _check_source(config, "speculative_model_dir", MTPDraft, "the MTP layer's checkpoint directory",
                      optional=True)
        if config.use_mtp_vanilla:
            raise ValueError("MTPDecodingConfig(use_mtp_vanilla=True) (a different MTP layer each draft step) is not "
                             "supported: the default MTP Eagle runs the checkpoint's first MTP layer for every draft")
        if not config.mtp_eagle_one_model:
            raise ValueError("MTPDecodingConfig(mtp_eagle_one_model=False) (the MTP layer as a separate engine) is not "
                             "supported: the layer runs beside the target in one engine")
        if config.use_relaxed_acceptance_for_thinking:
            raise ValueError("MTPDecodingConfig(use_relaxed_acceptance_for_thinking=True) is not supported: relaxed "
                             "acceptance keeps drafts the target would not have chosen (output not the target's)")
        return
    if isinstance(config, EagleDecodingConfig):
        if config.speculative_model_dir is None:
            raise ValueError("EagleDecodingConfig needs speculative_model_dir: the EAGLE-3 head's directory")
        _check_source(config, "speculative_model_dir", Eagle3Draft, "the EAGLE-3 head's directory")
        if not config.eagle3_one_model:
            raise ValueError("EagleDecodingConfig(eagle3_one_model=False) (the head as a separate engine) is not "
                             "supported: the head runs beside the target in one engine")
        return
    if not isinstance(config, (NGramDecodingConfig, DraftTargetDecodingConfig, SpeculativeDecodingConfig)):
        raise TypeError("speculative_config must be NGramDecodingConfig, DraftTargetDecodingConfig, "
                        "SpeculativeDecodingConfig, EagleDecodingConfig or MTPDecodingConfig, got "
                        f"{type(config).__name__}")
    if not isinstance(config, NGramDecodingConfig):
        field = "draft_model" if isinstance(config, SpeculativeDecodingConfig) else "speculative_model_dir"
        _check_source(config, field, nn.Module, "the draft model's checkpoint directory")


def _check_source(config, field: str, module_type: type, what: str, optional: bool = False) -> None:
    """A draft's source: a directory path or a module of `module_type` (a str() of anything else
    was read as a path, or failed deep in loading without the field's name)."""
    value = getattr(config, field)
    if (value is None and optional) or isinstance(value, (str, os.PathLike, module_type)):
        return
    raise TypeError(f"{type(config).__name__}.{field} must be {what} (a path) or a {module_type.__name__}, "
                    f"got {type(value).__name__}")


def build_speculative(config, *, vocab_size: int, eos_token_ids: list[int], max_num_seqs: int,
                      max_num_tokens: int, max_seq_len: int, block_size: int, kv_max_tokens: int | None,
                      device: torch.device, dtype: torch.dtype | None, enable_cuda_graph: bool,
                      compile_options: dict | None, target: CompiledModel | None = None,
                      target_dir=None, tokenizer=None) -> SpeculativeDecoder:
    """The decoder; `target`: the target's compiled model, not yet called (an EAGLE-3 head or
    an MTP layer makes it stash hidden states); `target_dir`: its checkpoint (MTP's layer is there);
    `tokenizer`: the target's, which a draft checkpoint's own tokenizer must equal."""
    check_speculative_config(config)
    if isinstance(config, (EagleDecodingConfig, MTPDecodingConfig)):
        sizes = dict(vocab_size=vocab_size, eos_token_ids=eos_token_ids, max_num_seqs=max_num_seqs,
                     max_num_tokens=max_num_tokens, max_seq_len=max_seq_len, block_size=block_size,
                     kv_max_tokens=kv_max_tokens, dtype=dtype, enable_cuda_graph=enable_cuda_graph,
                     compile_options=compile_options)
        if isinstance(config, MTPDecodingConfig):
            return _build_mtp(config, target, target_dir, **sizes)
        return _build_eagle3(config, target, **sizes)
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
        try:
            module = load_model(source, dtype=dtype, device=device)
        except (FileNotFoundError, NotADirectoryError) as e:  # the target's path is fine: say which checkpoint
            raise type(e)(f"the draft model (speculative_model_dir): {e}") from None
        except ValueError as e:  # a config.json that is not JSON, an architecture not served: whose
            raise ValueError(f"the draft model (speculative_model_dir): {e}") from None
    try:  # a module that is not a language model: named as the draft (the target compiled fine)
        compiled = trtllm_compile(module, **(compile_options or {}), block_size=block_size)
        draft_vocab = vocab_size_of(module, compiled)
    except torch.OutOfMemoryError:
        raise
    except (CompileError, TypeError, ValueError, RuntimeError) as e:
        raise (CompileError if isinstance(e, CompileError) else ValueError)(
            f"the draft model ({type(module).__name__}) is not a language model the engine can serve: {e}") from e
    if draft_vocab != vocab_size:
        raise ValueError(f"the draft model's vocabulary ({draft_vocab} tokens) differs from the target's "
                         f"({vocab_size}): a draft model must share the target's tokenizer")
    if not isinstance(source, nn.Module) and tokenizer is not None:
        check_draft_tokenizer(source, tokenizer)
    blocks = _draft_blocks(compiled, config.max_draft_len, max_num_seqs, max_seq_len, block_size, kv_max_tokens)
    runner = _draft_runner(compiled, blocks, max_num_seqs, max_num_tokens, max_seq_len, block_size, enable_cuda_graph)
    # a draft shorter than max_seq_len drafts up to its own length (GPT-2's position table ends there)
    draft_positions = getattr(getattr(module, "config", None), "max_position_embeddings", None)
    draft = DraftModelProposer(runner, BlockManager(blocks, block_size, enable_block_reuse=False),
                               max_num_tokens, vocab_size, eos_token_ids, max_positions=draft_positions)
    return SpeculativeDecoder(config.max_draft_len, max_seq_len, vocab_size, eos_token_ids, draft=draft,
                              verify_cuda_graphs=config.verify_cuda_graphs)


def check_draft_tokenizer(draft_dir, tokenizer) -> None:
    """A draft checkpoint with a tokenizer of its own must map every token to the target's id:
    the same vocabulary size with other ids would verify drafts of other tokens (a draft
    without tokenizer files is taken at its vocabulary size's word)."""
    if not any(os.path.isfile(os.path.join(draft_dir, name)) for name in TOKENIZER_FILES):
        return
    draft_vocab, target_vocab = load_tokenizer(str(draft_dir)).get_vocab(), tokenizer.get_vocab()
    if draft_vocab == target_vocab:
        return
    differs = sorted(set(draft_vocab.items()) ^ set(target_vocab.items()), key=lambda kv: kv[1])[0][0]
    raise ValueError(f"the draft model's tokenizer ({draft_dir}) differs from the target's: {differs!r} is "
                     f"id {draft_vocab.get(differs)} there and {target_vocab.get(differs)} in the target's; "
                     "a draft model must share the target's tokenizer")


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
                  dtype: torch.dtype | None, **sizes) -> SpeculativeDecoder:
    """An EAGLE-3 head's decoder: the head loaded, the target made to stash the states the
    head reads (fc in its graph)."""
    if target is None:
        raise ValueError("EAGLE-3 needs the target's compiled model")
    if target.attention.latent:
        raise ValueError("EAGLE-3 over multi-head latent attention (DeepSeek-V2/V3) is not supported; a DeepSeek-V3 "
                         "checkpoint drafts with its own MTP layer (MTPDecodingConfig)")
    source = config.speculative_model_dir
    dtype = dtype or target.attention.dtype
    head = source if isinstance(source, Eagle3Draft) else load_eagle3(source, target.module, dtype, target.device,
                                                                       _whole_embedding(target))
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
    stash = HiddenStash(layers, hidden, combine=head.fc.weight.detach().to(target.attention.dtype))
    return _hidden_state_draft(head, hc.hidden_size, stash, target, config, vocab_size=vocab_size, **sizes)


def _whole_embedding(target: CompiledModel) -> torch.Tensor | None:
    """The target's embedding weight read whole from its checkpoint where its module holds a
    stand-in (a tensor-parallel rank 0, which keeps its vocabulary rows only: the head on rank 0
    embeds every token id); None where the module holds it."""
    weight = input_embedding(target.module).weight
    if not is_unloaded(weight):
        return None
    name = next(n for n, p in target.module.named_parameters(remove_duplicate=False) if p is weight)
    return target.tensor_parallel.read_whole(name, weight)


def _build_mtp(config: MTPDecodingConfig, target: CompiledModel | None, target_dir, *, vocab_size: int,
               dtype: torch.dtype | None, **sizes) -> SpeculativeDecoder:
    """DeepSeek-V3's MTP layer as the draft: the target stashes the state leaving its last
    decoder layer, which the layer reads (models/deepseek_mtp.py)."""
    if target is None:
        raise ValueError("MTP needs the target's compiled model")
    source = config.speculative_model_dir if config.speculative_model_dir is not None else target_dir
    if source is None:
        raise ValueError("MTP reads its layer from the target's checkpoint directory: give LLM(model=path), or "
                         "MTPDecodingConfig(speculative_model_dir=path) for a target given as a module")
    dtype = dtype or target.attention.dtype
    draft = source if isinstance(source, MTPDraft) else load_mtp(source, target.module, dtype, target.device)
    hidden = input_embedding(target.module).embedding_dim
    if draft.config.vocab_size != vocab_size or draft.config.hidden_size != hidden:
        raise ValueError(f"the MTP layer ({draft.config.vocab_size} tokens, hidden {draft.config.hidden_size}) does "
                         f"not fit the target ({vocab_size} tokens, hidden {hidden})")
    last = draft.config.num_hidden_layers - 1
    if last != target.attention.num_layers - 1:
        raise ValueError(f"the MTP layer follows decoder layer {last}, the target has {target.attention.num_layers}")
    return _hidden_state_draft(draft, hidden, HiddenStash((last,), hidden), target, config, vocab_size=vocab_size,
                               **sizes)


def _hidden_state_draft(module: nn.Module, width: int, stash: HiddenStash, target: CompiledModel, config, *,
                        vocab_size: int, eos_token_ids: list[int], max_num_seqs: int, max_num_tokens: int,
                        max_seq_len: int, block_size: int, kv_max_tokens: int | None, enable_cuda_graph: bool,
                        compile_options: dict | None) -> SpeculativeDecoder:
    """A draft that reads the target's hidden states (an EAGLE-3 head, an MTP layer): the
    target stashes `stash`, the draft its own output (`width` wide); the draft's runner and
    the stores wait for `attach_target`, once the target's pool is sized."""
    target.set_hidden_stash(stash)
    compiled = trtllm_compile(module, **(compile_options or {}), block_size=block_size,
                              hidden_stash=HiddenStash((0,), width))
    k = config.draft_len if isinstance(config, MTPDecodingConfig) else config.max_draft_len
    eagle = Eagle3Inputs(width, compiled.attention.dtype, compiled.device, block_size, max_num_tokens,
                         module.draft_to_target, vocab_size)
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
