"""LLM(path, tensor_parallel_size=2) on CPU (gloo): a worker process holds rank 1, each rank
loads only its slices, greedy tokens are those of one rank (fp32) with chunked prefill and
preemption; bad sizes are refused before any process starts; a killed rank fails the requests
naming it, and shutdown leaves no process behind."""
from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, SamplingParams
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.outputs import RequestError
from trtllm.runtime.speculative.config import (
    DraftTargetDecodingConfig,
    EagleDecodingConfig,
    MTPDecodingConfig,
    NGramDecodingConfig,
)

PROMPTS = [[5, 17, 33, 9, 100, 42, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4, 5], list(range(200, 214))]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def checkpoint(family: str, tmp_path):
    path = write_checkpoint(family, tmp_path / family, vocab_size=512)
    make_tokenizer(path)
    return path


def small_llm(path, *, max_num_tokens=64, max_tokens=1024, **kwargs) -> LLM:
    # max_num_tokens below a prompt's length: chunked prefill; a small pool: preemption
    return LLM(str(path), dtype="float32", device="cpu",
               kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=max_tokens),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=max_num_tokens, max_seq_len=32), **kwargs)


def greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_two_ranks_give_one_ranks_tokens_each_loading_its_slices_and_a_killed_rank_is_named(tmp_path):
    path = checkpoint("llama31", tmp_path)
    with small_llm(path, max_num_tokens=8, max_tokens=64) as llm:
        expected = greedy(llm)
        whole = sum(p.numel() * p.element_size() for p in llm.compiled.module.parameters())
    # prompts of 14, 3 and 14 tokens (chunked prefill: 8 tokens a step) fill 3 of 4 blocks of 16; two
    # then cross into a second block while decoding: one is preempted
    llm = small_llm(path, max_num_tokens=8, max_tokens=64, tensor_parallel_size=2)
    try:
        assert greedy(llm) == expected
        assert llm.engine_stats().num_preemptions > 0
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
        # the split weights (every linear of the layers; embedding and head by vocabulary) are half,
        # the norms whole
        layer_linears = 2 * 4 * (64 * 64 + 64 * 32 * 2 + 64 * 64 + 3 * 64 * 128)
        vocab = 2 * 4 * 512 * 64
        assert loaded == [whole - (layer_linears + vocab) // 2] * 2
        (worker,) = llm.compiled.tensor_parallel.workers.processes.values()
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(RequestError, match="tensor-parallel rank 1 died"):
            greedy(llm)
    finally:
        started = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - started < 15


@pytest.mark.slow
def test_two_ranks_give_one_ranks_tokens_on_qwen3(tmp_path):
    path = checkpoint("qwen3", tmp_path)
    with small_llm(path, max_num_tokens=8) as llm:
        expected = greedy(llm)
    with small_llm(path, max_num_tokens=8, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected


def test_beam_search_on_two_ranks_gives_one_ranks_beams(tmp_path):
    # beams fork sequences: their copy-on-write blocks are copied in every rank's cache
    path = checkpoint("llama31", tmp_path)
    params = SamplingParams(beam_width=2, n=2, max_tokens=6, ignore_eos=True)
    beams = dict(build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=32, max_beam_width=2))

    def run(llm):
        return [[(b.token_ids, round(b.cumulative_logprob, 4)) for b in o.outputs]
                for o in llm.generate(PROMPTS[:2], params, use_tqdm=False)]
    with LLM(str(path), dtype="float32", device="cpu", kv_cache_config=KvCacheConfig(tokens_per_block=16,
                                                                                       max_tokens=256), **beams) as llm:
        expected = run(llm)
    with LLM(str(path), dtype="float32", device="cpu", kv_cache_config=KvCacheConfig(tokens_per_block=16,
                                                                                       max_tokens=256),
             tensor_parallel_size=2, **beams) as llm:
        workers, copied = llm.compiled.tensor_parallel.workers, []
        send = workers.copy_blocks
        workers.copy_blocks = lambda pairs: (copied.extend(pairs), send(pairs))  # a spy on this instance
        assert run(llm) == expected
        assert copied  # the forks' shared partial blocks were copied on write, rank 1's too


@pytest.mark.usefixtures("reference_ops_in_this_test")
def test_speculative_decoding_on_two_ranks_gives_one_ranks_tokens(tmp_path):
    # n-gram lookup and a draft model (the target itself, whole on rank 0: every draft accepted)
    # propose on rank 0; both ranks verify. Repetitive prompts, so the lookup finds drafts; a
    # small pool, so a sequence is preempted mid-speculation; 8-token steps chunk the prefills.
    path = checkpoint("llama31", tmp_path)
    prompts = [[5, 6, 7, 8] * 3 + [5, 6], [3, 4, 5] * 3, list(range(200, 214))]

    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def run(llm):
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        return out, vars(llm.engine_stats())
    with small_llm(path, max_num_tokens=8, max_tokens=64) as llm:
        expected, _ = run(llm)
    for proposer in (NGramDecodingConfig(max_draft_len=4),
                     DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(path))):
        with small_llm(path, max_num_tokens=8, max_tokens=64, tensor_parallel_size=2,
                       speculative_config=proposer) as llm:
            got, stats = run(llm)
            assert got == expected, type(proposer).__name__
            assert stats["spec_accepted_tokens"] > 0 and stats["num_preemptions"] > 0, stats


@pytest.mark.usefixtures("reference_ops_in_this_test")
def test_eagle3_on_two_ranks_proposes_as_one_rank(tmp_path):
    """The demo model's trained head (tools/train_eagle3_head.py) on rank 0 reads the target's
    states and its whole embedding (rank 0 holds half the vocabulary's rows): the tokens and the
    accepted drafts are one rank's; a broken stash or embedding would accept ~none."""
    from trtllm.demo import HELDOUT_SAMPLE, demo_model_path, read_entries
    from trtllm.runtime.tokenizer import load_tokenizer
    model = demo_model_path()
    prompts = [ids[:16] for ids in load_tokenizer(str(model))(read_entries(model / HELDOUT_SAMPLE)[:3])["input_ids"]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    config = EagleDecodingConfig(max_draft_len=3, speculative_model_dir=str(model / "eagle3"))
    runs = {}
    for tp in (1, 2):
        with LLM(str(model), dtype="float32", device="cpu", tensor_parallel_size=tp, speculative_config=config,
                 kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512),
                 build_config=BuildConfig(max_batch_size=4, max_num_tokens=16, max_seq_len=64)) as llm:
            runs[tp] = ([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)],
                        vars(llm.engine_stats())["spec_accepted_tokens"])
    assert runs[2] == runs[1]
    assert runs[2][1] > len(prompts) * 10  # ~1.5-2 drafts accepted a step of a trained head


def test_speculation_tensor_parallelism_cannot_run_is_refused_before_any_process_starts(tmp_path):
    path = checkpoint("llama31", tmp_path)
    with pytest.raises(ValueError, match="tensor_parallel_size=2 with MTPDecodingConfig is not supported yet"):
        small_llm(path, tensor_parallel_size=2, speculative_config=MTPDecodingConfig(max_draft_len=2))
    with pytest.raises(ValueError, match="pipeline_parallel_size=2 with EagleDecodingConfig is not supported yet"):
        small_llm(path, tensor_parallel_size=2, pipeline_parallel_size=2,
                  speculative_config=EagleDecodingConfig(max_draft_len=2, speculative_model_dir=str(tmp_path)))


@pytest.mark.parametrize("kwargs,why", [
    (dict(tensor_parallel_size=3), "num_attention_heads=4 does not divide among tensor_parallel_size=3"),
    (dict(tensor_parallel_size=8), "num_attention_heads=4 does not divide among tensor_parallel_size=8"),
    (dict(tensor_parallel_size=0), "tensor_parallel_size must be a positive integer, got 0"),
])
def test_sizes_that_do_not_divide_are_refused_before_any_process_starts(tmp_path, kwargs, why):
    path = checkpoint("llama31", tmp_path)
    with pytest.raises(ValueError, match=why):
        small_llm(path, **kwargs)


@pytest.mark.parametrize("family", ["phi3", "phi3_partial"])  # a sliding window; partial rotary with a tied head
def test_phi3_fused_projections_split_into_their_parts_on_two_ranks(tmp_path, family):
    # qkv_proj [Wq; Wk; Wv] and gate_up_proj [W_gate; W_up]: each rank reads its rows of every part
    path = checkpoint(family, tmp_path)
    with small_llm(path, max_num_tokens=8, max_tokens=64) as llm:
        expected = greedy(llm)
        params = dict(llm.compiled.module.named_parameters())
    with small_llm(path, max_num_tokens=8, max_tokens=64, tensor_parallel_size=2) as llm:
        assert greedy(llm) == expected
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
    whole = sum(p.numel() * p.element_size() for p in params.values())
    norms = sum(p.numel() * p.element_size() for n, p in params.items() if "norm" in n)
    assert loaded == [(whole - norms) // 2 + norms] * 2  # every linear split, the fused ones too; norms whole


def test_a_module_in_memory_is_refused(tmp_path):
    from trtllm.models.loader import load_model
    model = load_model(checkpoint("llama31", tmp_path), dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="takes a checkpoint directory"):
        LLM(model, tensor_parallel_size=2)


@pytest.mark.slow
def test_a_hung_rank_fails_the_step_after_the_collective_timeout_naming_it(tmp_path, monkeypatch):
    from trtllm.parallel import process_group
    monkeypatch.setattr(process_group, "COLLECTIVE_TIMEOUT_S", 20.0)  # above a first-call compilation here
    llm = small_llm(checkpoint("qwen3", tmp_path), tensor_parallel_size=2)
    try:
        greedy(llm)  # every rank has compiled
        (worker,) = llm.compiled.tensor_parallel.workers.processes.values()
        os.kill(worker.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RequestError, match="tensor-parallel rank 1 did not join a collective within 20 s"):
            greedy(llm)
        assert time.monotonic() - started < 60
    finally:
        llm.shutdown()
