"""The engine's pipeline micro-batches (Engine.set_pipeline_depth), in one process: with two
or three in flight, no sequence is in two at once, the sequences are shared out between them,
and the greedy tokens are those of one step at a time, with chunked prefill and preemption on."""
from __future__ import annotations

import pytest

from tests.parallel.test_llm_pipeline_parallel import PARAMS, PROMPTS, checkpoint
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.build_engine import build_engine


def _generate(engine, seen: list) -> dict:
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, PARAMS)
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return tokens


@pytest.mark.usefixtures("reference_ops_in_this_test")
def test_micro_batches_in_flight_give_the_tokens_of_one_step_at_a_time(tmp_path):
    # one engine (one compilation) for every depth; no prefix reuse, so each run schedules alike
    engine = build_engine(str(checkpoint("llama31", tmp_path)), dtype="float32", device="cpu",
                          kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=80, enable_block_reuse=False),
                          build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=32))
    execute, seen = engine.runner.execute, []

    def recorded(scheduled):
        step = execute(scheduled)
        mine = {seq for seq, _ in scheduled}
        assert all(not (mine & {seq for seq, _ in s.scheduled}) for s in engine.micro_batches.in_flight), \
            "a sequence in two micro-batches at once"
        seen.append((len(engine.micro_batches.in_flight) + 1, len(scheduled)))
        return step

    engine.runner.execute = recorded
    expected = _generate(engine, seen)
    assert max(n for n, _ in seen) == 1
    for depth in (2, 3):
        engine.set_pipeline_depth(depth)
        seen.clear()
        preemptions = engine.scheduler.num_preemptions
        assert _generate(engine, seen) == expected, depth
        assert engine.scheduler.num_preemptions > preemptions
        assert max(n for n, _ in seen) == depth  # as many micro-batches in flight as asked
        assert max(size for _, size in seen) < len(PROMPTS)  # the four sequences shared out
        assert not engine.micro_batches.in_flight and not engine.scheduler.in_flight
