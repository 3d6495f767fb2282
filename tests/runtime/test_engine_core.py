"""EngineCoreClient: the engine in its own process gives what LLM gives, and a bad
request, an abort, a duplicate id, a failed build or a dead core each end cleanly."""
import asyncio
import functools

import pytest

from tests.serve.server import write_model
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.build_engine import build_engine
from trtllm.runtime.client_protocol import EngineClient
from trtllm.runtime.engine_client import EngineCoreClient
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

OPTIONS = dict(dtype="float32", build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64),
               kv_cache_config=KvCacheConfig(max_tokens=4096))
PROMPTS = ["hello world", "the quick brown fox", "a"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("core_model"))


@pytest.fixture(scope="module")
def client(model_dir):
    # The core process inherits it: the ops' torch references. Restored after the module,
    # for the interpreter tests that run after it in this process.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TRITON_INTERPRET", "0")
        with EngineCoreClient(functools.partial(build_engine, str(model_dir), **OPTIONS),
                              tokenizer=str(model_dir), start_timeout=300) as c:
            yield c


async def _collect(stream):
    outs = [out async for out in stream]
    return outs


def test_same_outputs_as_llm_streaming_or_not(client, model_dir):
    greedy = SamplingParams(max_tokens=20, temperature=0.0)
    sampled = SamplingParams(max_tokens=12, temperature=1.0, seed=7, n=2, logprobs=2)
    with LLM(str(model_dir), **OPTIONS) as llm:
        ref = llm.generate(PROMPTS, greedy, use_tqdm=False)
        ref_sampled = llm.generate("hello", sampled, use_tqdm=False)

    async def go():
        streams = [client.generate_async(p, greedy, streaming=True) for p in PROMPTS]
        whole = [client.generate_async(p, greedy) for p in PROMPTS]
        got_sampled = await client.generate_async("hello", sampled).aresult()
        return [await _collect(s) for s in streams], [await s.aresult() for s in whole], got_sampled

    streamed, whole, got_sampled = asyncio.run(go())
    for r, outs, w in zip(ref, streamed, whole):
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        # each output's diffs hold everything since the one before (merged deltas included)
        assert "".join(o.outputs[0].text_diff for o in outs) == outs[-1].outputs[0].text
        assert sum((o.outputs[0].token_ids_diff for o in outs), []) == outs[-1].outputs[0].token_ids
        for got in (outs[-1], w):
            assert got.outputs[0].text == r.outputs[0].text
            assert got.outputs[0].token_ids == r.outputs[0].token_ids
            assert got.outputs[0].finish_reason == r.outputs[0].finish_reason
            assert got.prompt_token_ids == r.prompt_token_ids
        # growing snapshots: each output's text extends the previous one's
        texts = [o.outputs[0].text for o in outs]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
    for c, rc in zip(got_sampled.outputs, ref_sampled.outputs):
        assert c.token_ids == rc.token_ids  # a seed reproduces across processes
        assert len(c.logprobs) == len(c.token_ids)
        assert c.cumulative_logprob == pytest.approx(rc.cumulative_logprob, rel=1e-5)


def test_bad_request_abort_and_duplicate_end_alone(client):
    assert isinstance(client, EngineClient)  # what the server calls
    long = SamplingParams(max_tokens=40, ignore_eos=True)

    async def go():
        bad = client.generate_async([10**6], long)
        dup_a = client.generate_async("hello", long, streaming=True, request_id="same")
        dup_b = client.generate_async("hello", long, request_id="same")
        aborted = client.generate_async("hello", long, streaming=True)
        async for _ in aborted:
            client.abort(aborted.request_id)
        # ignore_eos: the tiny random model's greedy "hello" can end in EOS at step 3 when
        # it shares steps with dup_a (batch-dependent rounding; seen once in CI)
        good = client.generate_async("hello", SamplingParams(max_tokens=5, ignore_eos=True))
        return await bad.aresult(), await dup_a.aresult(), await dup_b.aresult(), aborted.last, await good.aresult()

    bad, dup_a, dup_b, aborted, good = asyncio.run(go())
    assert "outside the vocabulary" in bad.error and bad.outputs[0].finish_reason == "error"
    assert dup_a.error is None and len(dup_a.outputs[0].token_ids) == 40
    assert "already in flight" in dup_b.error
    assert aborted.outputs[0].finish_reason == "abort" and len(aborted.outputs[0].token_ids) < 40
    assert good.error is None and len(good.outputs[0].token_ids) == 5
    stats = client.engine_stats()
    assert stats.blocks_used == 0 and stats.num_running == 0 and not client.has_unfinished()
    with pytest.raises(ValueError, match="max_seq_len"):
        client.validate([1, 2, 3], SamplingParams(max_tokens=100))


def _nested(depth: int) -> dict:
    schema: dict = {"type": "object"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def test_a_request_that_cannot_be_sent_fails_alone(client):
    """A request pickle cannot write (here a guide nested past the recursion limit) fails by
    itself; the sender thread lives on, and requests queued with it or after it are served
    (it died, and every later request waited forever while the process looked alive)."""
    from trtllm.sampling_params import GuidedDecodingParams
    unsendable = SamplingParams(max_tokens=4, guided_decoding=GuidedDecodingParams(json=_nested(600)))

    async def go():
        bad = client.generate_async("hello", unsendable)
        beside = client.generate_async("hello", SamplingParams(max_tokens=3, ignore_eos=True))
        bad_out, beside_out = await bad.aresult(), await beside.aresult()
        later = await client.generate_async("hello", SamplingParams(max_tokens=5, ignore_eos=True)).aresult()
        return bad_out, beside_out, later

    bad, beside, later = asyncio.run(asyncio.wait_for(go(), 60))
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert "could not be sent to the engine process" in bad.error
    assert beside.error is None and len(beside.outputs[0].token_ids) == 3
    assert later.error is None and len(later.outputs[0].token_ids) == 5
    assert client.is_alive() and not client.has_unfinished()


def _unbuildable():
    raise ValueError("no such architecture: Frobnicator")


def test_a_failed_build_names_its_cause():
    with pytest.raises(RuntimeError, match="Frobnicator"):
        EngineCoreClient(_unbuildable, start_timeout=120)


def test_a_dead_core_fails_its_requests(model_dir):
    c = EngineCoreClient(functools.partial(build_engine, str(model_dir), **OPTIONS), tokenizer=str(model_dir),
                         start_timeout=300)

    async def go():
        stream = c.generate_async("hello", SamplingParams(max_tokens=50, ignore_eos=True), streaming=True)
        async for _ in stream:
            c._proc.kill()  # the core dies mid-request
        later = c.generate_async("hello", SamplingParams(max_tokens=5))
        return stream.last, await later.aresult()

    try:
        last, later = asyncio.run(asyncio.wait_for(go(), 60))
        assert last.finished and last.outputs[0].finish_reason == "error"
        assert last.error == "the engine process was killed by SIGKILL"
        assert later.error and not c.is_alive() and c.dead_reason() == last.error
    finally:
        c.shutdown(timeout=5)


def test_perf_metrics_cross_the_wire(client):
    params = SamplingParams(max_tokens=4, temperature=0.0, return_perf_metrics=True)

    async def go():
        return await client.generate_async(PROMPTS[0], params).aresult()

    out = asyncio.run(go())
    m = out.outputs[0].request_perf_metrics
    t = m.timing_metrics  # the engine process's monotonic clock
    assert t.arrival_time <= t.first_scheduled_time <= t.first_token_time <= t.last_token_time
    assert m.kv_cache_metrics.num_total_allocated_blocks >= 1 and m.first_iter <= m.last_iter


def test_cache_salt_crosses_the_wire(client):
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = [200 + i for i in range(40)]

    async def cached(salt):
        return (await client.generate_async(prompt, params, cache_salt=salt).aresult()).num_cached_tokens

    async def go():
        return [await cached(s) for s in ("x", "x", "y")]

    first, again, other = asyncio.run(go())
    assert first == other == 0 and again > 0
