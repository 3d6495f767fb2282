"""The engine's pipeline micro-batches (Engine.set_pipeline_depth), in one process: with two
in flight, no sequence is in two at once, the sequences are shared out between them, and the
greedy tokens are those of one step at a time, with chunked prefill and preemption on."""
from __future__ import annotations

from tests.parallel.test_llm_pipeline_parallel import PARAMS, PROMPTS, checkpoint
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.build_engine import build_engine


def _generate(path, depth: int, seen: list | None = None) -> tuple[dict, object]:
    engine = build_engine(str(path), dtype="float32", device="cpu",
                          kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=80),
                          build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=32))
    if depth > 1:
        engine.set_pipeline_depth(depth)
        execute = engine.runner.execute

        def recorded(scheduled):
            step = execute(scheduled)
            in_flight = [{seq for seq, _ in s.scheduled} for s in engine._in_flight]
            mine = {seq for seq, _ in scheduled}
            assert all(not (mine & other) for other in in_flight), "a sequence in two micro-batches at once"
            seen.append((len(in_flight) + 1, len(scheduled)))
            return step

        engine.runner.execute = recorded
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(str(i), prompt, PARAMS)
    tokens = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
    return tokens, engine


def test_micro_batches_in_flight_give_the_tokens_of_one_step_at_a_time(tmp_path):
    path = checkpoint("llama31", tmp_path)
    expected, _ = _generate(path, 1)
    for depth in (2, 3):
        seen = []
        got, engine = _generate(path, depth, seen)
        assert got == expected, depth
        assert engine.scheduler.num_preemptions > 0
        assert max(n for n, _ in seen) == depth  # as many micro-batches in flight as asked
        assert max(size for _, size in seen) < len(PROMPTS)  # the four sequences shared out
        assert not engine._in_flight and not engine.scheduler.in_flight
