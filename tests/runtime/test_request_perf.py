"""SamplingParams(return_perf_metrics=True): each completion's times, engine steps, KV blocks and
draft acceptance (TensorRT-LLM's RequestPerfMetrics), through the engine thread and the wire."""
from __future__ import annotations

import pytest

from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.runtime.speculative.config import DraftTargetDecodingConfig
from trtllm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def checkpoint(checkpoint):  # conftest's tiny Llama, with a tokenizer
    make_tokenizer(checkpoint)
    return checkpoint


def small_llm(path, **kw):
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
               build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=128), **kw)


def check_times(m):
    t = m.timing_metrics
    assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.last_token_time


def test_times_steps_and_prefix_blocks(checkpoint):
    prompt = list(range(3, 43))  # 40 tokens: 3 blocks of 16, the first 2 full
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, return_perf_metrics=True)
    with small_llm(checkpoint) as llm:
        assert llm.generate(prompt, SamplingParams(max_tokens=2), use_tqdm=False).outputs[0].request_perf_metrics \
            is None  # not asked
        llm.generate([9, 9, 9], SamplingParams(max_tokens=2), use_tqdm=False)
        first, again = (llm.generate(p, params, use_tqdm=False).outputs[0] for p in ([50] + prompt[1:], prompt))
    for c in (first, again):
        m = c.request_perf_metrics
        check_times(m)
        assert m.last_iter - m.first_iter == len(c.token_ids) - 1  # a token a step, the prompt in one
        assert m.kv_cache_metrics.num_total_allocated_blocks == 3  # 45 tokens
        assert (m.speculative_decoding.total_draft_tokens, m.speculative_decoding.acceptance_rate) == (0, 0.0)
    assert first.request_perf_metrics.first_iter < again.request_perf_metrics.first_iter
    cold, warm = first.request_perf_metrics.kv_cache_metrics, again.request_perf_metrics.kv_cache_metrics
    assert (cold.num_reused_blocks, cold.num_missed_blocks, cold.num_new_allocated_blocks) == (0, 3, 3)
    assert (warm.num_reused_blocks, warm.num_missed_blocks, warm.num_new_allocated_blocks) == (2, 1, 1)
    assert warm.kv_cache_hit_rate == pytest.approx(2 / 3) and cold.kv_cache_hit_rate == 0.0


def test_every_completion_and_beam_gets_its_metrics(checkpoint):
    with small_llm(checkpoint, max_beam_width=2) as llm:
        sampled = llm.generate([5, 6, 7], SamplingParams(n=2, max_tokens=4, temperature=1.0, seed=1,
                                                          return_perf_metrics=True), use_tqdm=False)
        beams = llm.generate([5, 6, 7], SamplingParams(use_beam_search=True, n=2, best_of=2, max_tokens=4,
                                                        return_perf_metrics=True), use_tqdm=False)
    for c in sampled.outputs + beams.outputs:
        m = c.request_perf_metrics
        check_times(m)
        assert m.kv_cache_metrics.num_total_allocated_blocks >= 1
        assert m.last_iter - m.first_iter == 3 and m.timing_metrics.first_token_time < m.timing_metrics.last_token_time


def test_draft_acceptance(checkpoint):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, return_perf_metrics=True)
    draft = DraftTargetDecodingConfig(max_draft_len=3, speculative_model_dir=str(checkpoint))  # itself: all accepted
    with small_llm(checkpoint, speculative_config=draft) as llm:
        c = llm.generate([7, 8, 9, 10], params, use_tqdm=False).outputs[0]
    spec = c.request_perf_metrics.speculative_decoding
    assert c.num_draft_tokens > 0
    assert (spec.total_draft_tokens, spec.total_accepted_draft_tokens) == (c.num_draft_tokens,
                                                                           c.num_accepted_draft_tokens)
    assert spec.acceptance_rate == pytest.approx(c.num_accepted_draft_tokens / c.num_draft_tokens) == 1.0


def test_a_preempted_request_counts_the_prefix_hits_of_its_first_scheduling(checkpoint):
    # 4 different prompts of 20 tokens (1 full block), 40 tokens each, in a pool of 6 blocks: preempted ones
    # come back to find their own blocks cached, which are no prefix hit of their prompt
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, return_perf_metrics=True)
    with LLM(str(checkpoint), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=96),
             build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64)) as llm:
        outs = llm.generate([[i + 3] * 20 for i in range(4)], params, use_tqdm=False)
        assert llm.engine_stats().num_preemptions > 0
    for out in outs:
        kv = out.outputs[0].request_perf_metrics.kv_cache_metrics
        assert (kv.num_reused_blocks, kv.num_missed_blocks, kv.kv_cache_hit_rate) == (0, 2, 0.0)
        assert kv.num_total_allocated_blocks == kv.num_new_allocated_blocks == 4
