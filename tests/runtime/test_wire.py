"""The wire's StepDeltas: what the engine process sends each step grows the client's copy of
each request into the engine's own output, through pickling, merged or not."""
import pickle

from trtllm.runtime.engine_stats import EngineStats
from trtllm.runtime.outputs import failed_output, new_output
from trtllm.runtime.wire import AbortRequest, AddRequest, StepDeltas, Stop
from trtllm.sampling_params import SamplingParams


def grow(out, token: int) -> None:
    """What the engine does to its output in a step: a token per completion, then emit's diffs."""
    for c in out.outputs:
        c.token_ids.append(token + c.index)
        c.text += f"<{token + c.index}>"
        if c.logprobs is not None:
            c.logprobs.append({token + c.index: -0.5, 1: -2.0})
            c.cumulative_logprob += -0.5
        c.token_ids_diff, c.text_diff = [token + c.index], f"<{token + c.index}>"


def sent(outputs, stats=None) -> StepDeltas:
    return pickle.loads(pickle.dumps(StepDeltas.of(outputs, stats)))


def test_deltas_grow_the_clients_copies_into_the_engines_outputs():
    params_a, params_b = SamplingParams(n=2, logprobs=1), SamplingParams()
    engine = [new_output("a", "hi", [1, 2], params_a), new_output("b", None, [3], params_b)]
    client = [new_output("a", "hi", [1, 2], params_a), new_output("b", None, [3], params_b)]
    for step in range(3):
        for out in engine:
            grow(out, 10 * step)
        d = sent(engine, EngineStats(num_running=3))
        assert d.stats.num_running == 3 and d.request_ids == ["a", "b"] and d.starts == [0, 2]
        for row, out in enumerate(client):
            d.apply(row, out)
    # the last request finishes by a stop token; "a" gets nothing new
    engine[1].outputs[0].finish_reason, engine[1].outputs[0].stop_reason = "stop", 20
    engine[1].finished, engine[1].num_cached_tokens = True, 1
    engine[1].outputs[0].token_ids_diff, engine[1].outputs[0].text_diff = [], ""
    sent([engine[1]]).apply(0, client[1])
    for e, c in zip(engine, client):
        assert (c.finished, c.error, c.num_cached_tokens) == (e.finished, e.error, e.num_cached_tokens)
        for ec, cc in zip(e.outputs, c.outputs):
            assert (cc.text, cc.token_ids, cc.logprobs, cc.cumulative_logprob, cc.finish_reason, cc.stop_reason) \
                == (ec.text, ec.token_ids, ec.logprobs, ec.cumulative_logprob, ec.finish_reason, ec.stop_reason)
            # never cleared: the diffs hold every delta merged
            assert cc.text_diff == cc.text and cc.token_ids_diff == cc.token_ids


def test_a_failure_ends_the_copy_and_keeps_its_tokens():
    params = SamplingParams(n=2)
    engine, client = new_output("r", None, [1], params), new_output("r", None, [1], params)
    grow(engine, 5)
    sent([engine]).apply(0, client)
    sent([failed_output("r", 2, "the engine process exited")]).apply(0, client)
    assert client.finished and client.error == "the engine process exited"
    assert [c.finish_reason for c in client.outputs] == ["error", "error"]
    assert [c.token_ids for c in client.outputs] == [[5], [6]]


def test_messages_pickle_as_themselves():
    for msg in (AddRequest("r", [1, 2], SamplingParams(max_tokens=3), "hi", True), AbortRequest("r"), Stop()):
        assert pickle.loads(pickle.dumps(msg)) == msg


def test_speculative_counts_reach_the_client_when_a_completion_finishes():
    params = SamplingParams(n=2)
    engine, client = new_output("s", None, [1], params), new_output("s", None, [1], params)
    grow(engine, 5)
    engine.outputs[0].finish_reason = "length"
    engine.outputs[0].num_draft_tokens, engine.outputs[0].num_accepted_draft_tokens = 8, 6
    engine.outputs[0].num_verify_steps = 3
    sent([engine]).apply(0, client)
    first, second = client.outputs
    assert (first.num_draft_tokens, first.num_accepted_draft_tokens, first.num_verify_steps) == (8, 6, 3)
    assert first.acceptance_length == 3.0
    assert (second.num_verify_steps, second.acceptance_length) == (0, 0.0)


def test_perf_metrics_reach_the_client_when_a_completion_finishes():
    from trtllm.runtime.request_perf import PerfRecorder
    from trtllm.runtime.sequence import Sequence
    params = SamplingParams(n=2, return_perf_metrics=True)
    engine, client = new_output("p", None, [1], params), new_output("p", None, [1], params)
    grow(engine, 5)
    seq = Sequence("p", [1], params, block_table=[7])
    recorder = PerfRecorder(block_size=16)
    recorder.token(seq, iteration=4)
    engine.outputs[0].finish_reason, engine.outputs[0].request_perf_metrics = "length", recorder.metrics(seq)
    sent([engine]).apply(0, client)
    first, second = client.outputs
    assert first.request_perf_metrics == engine.outputs[0].request_perf_metrics
    assert (first.request_perf_metrics.first_iter, first.request_perf_metrics.kv_cache_metrics.num_missed_blocks) \
        == (4, 1)
    assert second.request_perf_metrics is None
