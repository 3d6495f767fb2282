"""LLM(path, pipeline_parallel_size=2) on CPU (gloo): stage 1 in a worker process, each rank
loading only its stage's layers; greedy tokens are those of one rank (fp32) with chunked
prefill, preemption and two micro-batches in flight; TP=2 x PP=2 likewise; bad sizes are
refused before any process starts; a killed rank fails the requests naming it, and shutdown
leaves no process behind."""
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
from trtllm.parallel.pipeline_parallel import partition_layers
from trtllm.runtime.outputs import RequestError

PROMPTS = [[5, 17, 33, 9, 100, 42, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4, 5], list(range(200, 214)), [60, 61]]
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def checkpoint(family: str, tmp_path, layers: int = 4):
    path = write_checkpoint(family, tmp_path / family, vocab_size=512, num_hidden_layers=layers)
    make_tokenizer(path)
    return path


def small_llm(path, *, max_num_tokens=8, max_tokens=80, **kwargs) -> LLM:
    # max_num_tokens below a prompt's length: chunked prefill; a small pool: preemption
    return LLM(str(path), dtype="float32", device="cpu",
               kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=max_tokens),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=max_num_tokens, max_seq_len=32), **kwargs)


def greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, PARAMS, use_tqdm=False)]


def test_two_stages_give_one_ranks_tokens_each_loading_its_layers_and_a_killed_rank_is_named(tmp_path):
    path = checkpoint("llama31", tmp_path)
    with small_llm(path) as llm:
        expected = greedy(llm)
        params = {n: p.numel() * p.element_size() for n, p in llm.compiled.module.named_parameters()}
        ids, positions = torch.tensor([PROMPTS[0][:5], PROMPTS[2][:5]]), torch.arange(5).expand(2, 5)
        whole = llm.compiled(ids, positions)  # whole sequences, outside the runtime
    llm = small_llm(path, pipeline_parallel_size=2)
    try:
        assert llm.compiled.pipeline.first_layer == 0 and llm.compiled.pipeline.end_layer == 2
        assert llm.engine.pipeline_depth == 2
        assert greedy(llm) == expected
        # a call outside the runtime waits for the last stage's logits itself
        torch.testing.assert_close(llm.compiled(ids, positions), whole, rtol=1e-5, atol=1e-5)
        assert llm.engine_stats().num_preemptions > 0
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
        layers = [sum(b for n, b in params.items() if f"layers.{i}." in n) for i in range(4)]
        embed = params["model.embed_tokens.weight"]
        assert loaded == [embed + layers[0] + layers[1], layers[2] + layers[3] + sum(params.values()) - embed
                          - sum(layers)]  # stage 1: its layers, the final norm and the head
        (worker,) = llm.compiled.tensor_parallel.workers.processes.values()
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(RequestError, match="parallel rank 1 died"):
            greedy(llm)
    finally:
        started = time.monotonic()
        llm.shutdown()
        assert time.monotonic() - started < 15


def test_two_by_two_ranks_give_one_ranks_tokens(tmp_path):
    path = checkpoint("qwen3", tmp_path)
    with small_llm(path) as llm:
        expected = greedy(llm)
    with small_llm(path, tensor_parallel_size=2, pipeline_parallel_size=2, pp_partition=[1, 3]) as llm:
        assert (llm.compiled.pipeline.first_layer, llm.compiled.pipeline.end_layer) == (0, 1)
        assert greedy(llm) == expected
        assert llm.engine_stats().num_preemptions > 0
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
        assert len(loaded) == 4 and loaded[0] == loaded[1] and loaded[2] == loaded[3]


@pytest.mark.usefixtures("reference_ops_in_this_test")
def test_phi3_on_two_by_two_ranks_gives_one_ranks_tokens(tmp_path):
    # its fused qkv_proj / gate_up_proj split into their parts (passes/shard_tensor_parallel.py)
    path = checkpoint("phi3", tmp_path)
    with small_llm(path) as llm:
        expected = greedy(llm)
    with small_llm(path, tensor_parallel_size=2, pipeline_parallel_size=2) as llm:
        assert greedy(llm) == expected


def test_beam_search_on_two_stages_gives_one_ranks_beams(tmp_path):
    # three groups of two beams over two micro-batches; the forks' copy-on-write blocks are
    # copied in every stage's cache
    path = checkpoint("llama31", tmp_path)
    params = SamplingParams(beam_width=2, n=2, max_tokens=6, ignore_eos=True)
    kwargs = dict(kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256),
                  build_config=BuildConfig(max_batch_size=6, max_num_tokens=64, max_seq_len=32, max_beam_width=2))

    def run(llm):
        return [[(b.token_ids, round(b.cumulative_logprob, 4)) for b in o.outputs]
                for o in llm.generate(PROMPTS[:3], params, use_tqdm=False)]
    with LLM(str(path), dtype="float32", device="cpu", **kwargs) as llm:
        expected = run(llm)
    with LLM(str(path), dtype="float32", device="cpu", pipeline_parallel_size=2, **kwargs) as llm:
        workers, copied = llm.compiled.tensor_parallel.workers, []
        send = workers.copy_blocks
        workers.copy_blocks = lambda pairs: (copied.extend(pairs), send(pairs))  # a spy on this instance
        assert run(llm) == expected
        assert copied
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0


@pytest.mark.usefixtures("reference_ops_in_this_test")
def test_speculative_decoding_on_two_stages_gives_one_ranks_tokens(tmp_path):
    # n-gram lookup and a draft model (the target itself, whole on rank 0: every draft accepted)
    # propose on rank 0 for the sequences no micro-batch holds; the stages verify. Repetitive
    # prompts, so the lookup finds drafts; a small pool, so a sequence is preempted mid-speculation.
    from trtllm.runtime.speculative.config import DraftTargetDecodingConfig, NGramDecodingConfig
    path = checkpoint("llama31", tmp_path)
    prompts = [[5, 6, 7, 8] * 3 + [5, 6], [3, 4, 5] * 3, list(range(200, 214)), [9, 10] * 4]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)

    def run(llm):
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)], vars(llm.engine_stats())
    with small_llm(path, max_tokens=64) as llm:
        expected, _ = run(llm)
    for proposer in (NGramDecodingConfig(max_draft_len=4),
                     DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(path))):
        with small_llm(path, max_tokens=64, pipeline_parallel_size=2, speculative_config=proposer) as llm:
            got, stats = run(llm)
            assert got == expected, type(proposer).__name__
            assert stats["spec_accepted_tokens"] > 0 and stats["num_preemptions"] > 0, stats


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gemma2", "qwen2"])  # LM heads tied to the embedding (Gemma's by default)
def test_two_stages_give_one_ranks_tokens_on_tied_families(tmp_path, family):
    path = checkpoint(family, tmp_path)
    with small_llm(path) as llm:
        expected = greedy(llm)
    with small_llm(path, pipeline_parallel_size=2) as llm:
        assert greedy(llm) == expected
        embed = llm.compiled.module.model.embed_tokens.weight
        loaded = llm.compiled.tensor_parallel.workers.loaded_bytes()
        assert min(loaded) > embed.numel() * embed.element_size()  # both stages hold the embedding


def test_layers_are_balanced_by_parameter_count():
    assert partition_layers([10] * 4, 2) == [(0, 2), (2, 4)]
    assert partition_layers([10] * 4, 2, first_extra=20) == [(0, 1), (1, 4)]
    assert partition_layers([10] * 5, 3, last_extra=10) == [(0, 2), (2, 4), (4, 5)]
    assert partition_layers([10] * 4, 2, partition=[3, 1]) == [(0, 3), (3, 4)]


@pytest.mark.parametrize("kwargs,why", [
    (dict(pipeline_parallel_size=5), "pipeline_parallel_size=5 is more stages than the model's num_hidden_layers=4"),
    (dict(pipeline_parallel_size=2, pp_partition=[2, 3]), r"pp_partition=\[2, 3\] sums to 5 layers; the model has "
                                                          "num_hidden_layers=4"),
    (dict(pipeline_parallel_size=2, pp_partition=[4]), r"pp_partition=\[4\] has 1 entries for pipeline_parallel_size=2"),
    (dict(pipeline_parallel_size=2, pp_partition=[4, 0]), "each stage needs a positive whole number of layers"),
    (dict(pp_partition=[2, 2]), "without pipeline_parallel_size > 1"),
    (dict(pipeline_parallel_size=0), "pipeline_parallel_size must be a positive integer, got 0"),
    (dict(pipeline_parallel_size=2, tensor_parallel_size=3), "num_attention_heads=4 does not divide among "
                                                             "tensor_parallel_size=3"),
])
def test_bad_sizes_are_refused_before_any_process_starts(tmp_path, kwargs, why):
    with pytest.raises(ValueError, match=why):
        small_llm(checkpoint("llama31", tmp_path), **kwargs)


@pytest.mark.parametrize("kwargs,why", [
    (dict(speculative_config="eagle3"), "pipeline_parallel_size=2 with EagleDecodingConfig is not supported"),
])
def test_features_a_pipeline_cannot_run_are_refused_by_name(tmp_path, kwargs, why):
    path = checkpoint("llama31", tmp_path)
    if kwargs.get("speculative_config") == "eagle3":
        from trtllm.runtime.speculative.config import EagleDecodingConfig
        kwargs["speculative_config"] = EagleDecodingConfig(max_draft_len=2, speculative_model_dir=str(tmp_path))
    with pytest.raises(ValueError, match=why):
        LLM(str(path), dtype="float32", device="cpu", pipeline_parallel_size=2, **kwargs)


@pytest.mark.slow
def test_a_hung_stage_fails_the_step_after_the_collective_timeout_naming_it(tmp_path, monkeypatch):
    from trtllm.parallel import process_group
    monkeypatch.setattr(process_group, "COLLECTIVE_TIMEOUT_S", 20.0)  # above a first-call compilation here
    llm = small_llm(checkpoint("llama31", tmp_path), pipeline_parallel_size=2)
    try:
        greedy(llm)  # every rank has compiled
        (worker,) = llm.compiled.tensor_parallel.workers.processes.values()
        os.kill(worker.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(RequestError, match="parallel rank 1 did not join a collective within 20 s"):
            greedy(llm)
        assert time.monotonic() - started < 60
    finally:
        llm.shutdown()

