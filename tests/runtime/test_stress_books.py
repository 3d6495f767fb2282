"""A seeded randomized stress of the engine's books under load: one `LLM` with a small KV pool
(preemption), chunked prefill and the prefix cache takes a random mix through `generate_async`
(streaming or not) and `generate(streaming=True)` on threads: greedy and seeded sampling, n > 1,
best_of, beam search, stop strings and stop token ids, min_tokens, logprobs, prompt logprobs,
shared prefixes; requests are aborted mid-stream (llm.abort, a cancelled reader task, a closed
or dropped iterator, an abort before admission), and bad requests (refused at submission, a
duplicate id, an unknown id's abort) come in between. Afterwards: every request not aborted
finished sensibly, greedy and seeded outputs equal the same request alone on a fresh engine, the
KV books balance with no block used, nothing is left in flight, and the engine still serves."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from tests.runtime.test_model_runner import EagerGraph, add_prefill_graphs
from tests.runtime.test_overlap_scheduler import count_ahead
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig, SamplingParams, SchedulerConfig
from trtllm.runtime.cuda_graphs import cuda_graph_batch_sizes
from trtllm.runtime.speculative.config import NGramDecodingConfig

VOCAB = 512
BASE = [(7 * i + 3) % 400 + 50 for i in range(40)]  # shared prefixes: 16-token blocks of it


MODES = ["plain", "ngram", "overlap", "no_evict", "interval"]


def _engine(checkpoint, mode: str = "plain") -> LLM:
    """"ngram": n-gram speculation; "overlap": decode and prefill steps through the CUDA-graph
    stand-ins of test_model_runner, so the overlap scheduler launches decode steps ahead, as on a
    GPU; "no_evict": GUARANTEED_NO_EVICT; "interval": stream_interval=3."""
    options = {}
    if mode == "ngram":
        options["speculative_config"] = NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2)
    if mode == "no_evict":
        options["scheduler_config"] = SchedulerConfig(capacity_scheduler_policy="GUARANTEED_NO_EVICT")
    if mode == "interval":
        options["stream_interval"] = 3
    llm = LLM(str(checkpoint), dtype="float32", **options,
              kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=192),
              build_config=BuildConfig(max_batch_size=6, max_num_tokens=64, max_seq_len=96, max_beam_width=3))
    if mode == "overlap":
        runner = llm.engine.runner
        for b in cuda_graph_batch_sizes(runner.meta.max_num_seqs):
            g = EagerGraph(runner, b, VOCAB)
            runner.cuda_graphs.decode[b] = (g, g.logits, g.greedy)
        add_prefill_graphs(llm, 64)
    llm.launched_ahead = count_ahead(llm)  # one entry per step the overlap scheduler tried to launch ahead
    return llm


def _prompt(rng: random.Random):
    r = rng.random()
    if r < 0.25:
        return rng.choice(["Hello world", "The quick brown fox", "Café crème", "def f(x):", "日本語"])
    if r < 0.4:  # repeating: n-gram drafts find matches
        return [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 4))] * rng.randrange(3, 8)
    if r < 0.75:  # a shared prefix and a tail of its own
        return BASE[:rng.choice([16, 20, 33, 40])] + [rng.randrange(3, VOCAB) for _ in range(rng.randrange(0, 6))]
    return [rng.randrange(3, VOCAB) for _ in range(rng.randrange(1, 30))]


def _params(rng: random.Random, kinds=("greedy", "greedy", "sampled", "n", "best_of", "beam")) -> SamplingParams:
    """A base kind, then options mixed in independently (combinations are where books slip)."""
    kind = rng.choice(kinds)
    f = dict(max_tokens=rng.randrange(1, 40), ignore_eos=rng.random() < 0.7)
    seed = rng.randrange(1000)
    if kind == "greedy":
        f.update(temperature=0.0)
    elif kind == "sampled":
        f.update(temperature=0.9, top_k=rng.choice([0, 20]), top_p=rng.choice([1.0, 0.9]), seed=seed)
    elif kind == "n":
        f.update(temperature=0.8, seed=seed, n=rng.choice([2, 3]))
    elif kind == "best_of":
        f.update(temperature=0.8, seed=seed, n=rng.choice([1, 2]), best_of=3)
    else:
        w = rng.choice([2, 3])
        f.update(temperature=0.0, beam_width=w, n=rng.randrange(1, w + 1), max_tokens=rng.randrange(1, 12))
    if rng.random() < 0.3:
        f.update(stop=rng.sample(["e", "o", " ", "th", "é", "!", "\n"], 2), include_stop_str_in_output=rng.random() < 0.5)
    if rng.random() < 0.3:
        f.update(stop_token_ids=rng.sample(range(VOCAB), rng.choice([5, 40])))
    if rng.random() < 0.3:
        f.update(min_tokens=rng.randrange(1, 8))
    if rng.random() < 0.3:
        f.update(logprobs=rng.choice([0, 2]))
    if rng.random() < 0.2:
        f.update(prompt_logprobs=rng.choice([0, 2]))
    if rng.random() < 0.1:
        f.update(presence_penalty=0.5, repetition_penalty=1.2)
    if rng.random() < 0.1:
        f.update(bad_token_ids=rng.sample(range(VOCAB), 10))
    f["min_tokens"] = min(f.get("min_tokens", 0), f["max_tokens"])
    for drop in ("logprobs", "prompt_logprobs", "presence_penalty", "repetition_penalty", "bad_token_ids", "stop",
                 "min_tokens", None):  # options beam search (or the rest) refuses by name, left out
        try:
            return SamplingParams(**f)
        except ValueError:
            if drop is None:
                raise
            f.pop(drop, None)


def _bad(llm: LLM, rng: random.Random):
    """A request refused at submission (ValueError / TypeError)."""
    return rng.choice([
        lambda: llm.generate_async([VOCAB + 5], SamplingParams(max_tokens=2)),
        lambda: llm.generate_async([], SamplingParams(max_tokens=2)),
        lambda: llm.generate_async(BASE * 3, SamplingParams(max_tokens=2)),
        lambda: llm.generate_async(BASE, SamplingParams(max_tokens=90)),
        lambda: llm.generate_async([5, 6], SamplingParams(beam_width=4, temperature=0.0)),
        lambda: llm.generate_async([5, 6], SamplingParams(stop_token_ids=[VOCAB])),
        lambda: llm.generate_async([5, 6], "not params"),
    ])


class Record:
    def __init__(self, prompt, params, how):
        self.prompt, self.params, self.how = prompt, params, how
        self.last = None
        self.outputs = 0
        self.request_id = None
        self.diffs: dict[int, tuple[str, list[int]]] = {}  # completion index -> text and tokens streamed

    def take(self, out) -> None:
        """A streamed output: its diffs extend what came before, and its tokens only grow."""
        for c in out.outputs:
            text, tokens = self.diffs.get(c.index, ("", []))
            self.diffs[c.index] = (text + c.text_diff, tokens + list(c.token_ids_diff))
            assert list(c.token_ids[:len(tokens)]) == tokens or out.finished, (self.params, c, tokens)
        self.last, self.outputs = out, self.outputs + 1
        _check_partial(out)

    def check_diffs(self) -> None:
        """What was streamed adds up to the last output."""
        out = self.last
        for c in out.outputs if out is not None and out.finished else ():
            text, tokens = self.diffs.get(c.index, ("", []))
            assert (text, tokens) == (c.text, list(c.token_ids)), (self.how, self.params, c, text, tokens)


async def _read_async(llm, rec: Record, cut: int):
    streaming = rec.how != "async_whole"
    stream = llm.generate_async(rec.prompt, rec.params, streaming=streaming)
    rec.request_id = stream.request_id
    if rec.how == "abort_now":
        llm.abort(stream.request_id)
    async for out in stream:
        rec.take(out)
        if rec.how == "abort" and rec.outputs > cut and not out.finished:
            llm.abort(stream.request_id)
        if rec.how == "cancel" and rec.outputs > cut and not out.finished:
            llm.abort(stream.request_id)  # as the server does when its client goes
            raise asyncio.CancelledError
    return rec


def _read_sync(llm, rec: Record, cut: int):
    it = llm.generate(rec.prompt, rec.params, streaming=True)
    rec.request_id = it._stream.request_id
    for out in it:
        rec.take(out)
        if rec.how == "close" and rec.outputs > cut and not out.finished:
            it.close()
            break
        if rec.how == "drop" and rec.outputs > cut and not out.finished:
            break
    del it


def _check_partial(out) -> None:
    for c in out.outputs:
        assert c.finish_reason in (None, "stop", "length", "abort"), (out.request_id, c.finish_reason, out.error)


async def _drive(llm: LLM, rng: random.Random, num: int, kinds) -> list[Record]:
    records, tasks = [], []
    for _ in range(num):
        r = rng.random()
        if r < 0.1:
            try:
                _bad(llm, rng)()
            except (ValueError, TypeError):
                pass
            else:
                raise AssertionError("a bad request was taken")
        elif r < 0.14 and records and records[-1].request_id is not None:  # a duplicate id, maybe in flight
            dup = records[-1]
            stream = llm.generate_async([5, 6, 7], SamplingParams(max_tokens=2), request_id=dup.request_id)
            if dup.last is None or not dup.last.finished:  # refused unless the first ended meanwhile
                out = await stream.aresult()
                assert out.error is None or "already in flight" in out.error, out
        elif r < 0.17:
            llm.abort(f"no-such-request-{rng.randrange(99)}")
        else:
            how = rng.choice(["async", "async", "async", "async_whole", "abort", "abort_now", "cancel", "sync",
                              "close", "drop"])
            rec = Record(_prompt(rng), _params(rng, kinds), how)
            records.append(rec)
            if how in ("sync", "close", "drop"):
                tasks.append(asyncio.create_task(asyncio.to_thread(_read_sync, llm, rec, rng.randrange(0, 4))))
            else:
                tasks.append(asyncio.create_task(_read_async(llm, rec, rng.randrange(0, 4))))
        await asyncio.sleep(0 if rng.random() < 0.85 else 0.05)  # bursts: more than the pool holds at once
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for rec, res in zip(records, results):
        if isinstance(res, BaseException) and not (rec.how == "cancel" and isinstance(res, asyncio.CancelledError)):
            raise res
    return records


def _settle(llm: LLM, timeout: float = 20.0) -> None:
    """Wait until the engine holds no request (a dropped reader's request may still run)."""
    done = threading.Event()
    for _ in range(int(timeout / 0.01)):
        if not llm.has_unfinished() and not llm._loop._streams:
            done.set()
            break
        done.wait(0.01)
    assert done.is_set(), f"requests left in flight: {list(llm.engine.requests)}"


def _result(out):
    return [(list(c.token_ids), c.finish_reason, c.text) for c in out.outputs]


def _close_logprobs(a, b) -> bool:
    for ca, cb in zip(a.outputs, b.outputs):
        for x, y in zip(ca.logprobs or (), cb.logprobs or ()):
            if sorted(x) != sorted(y) or any(abs(x[t] - y[t]) > 1e-4 for t in x):
                return False
    for x, y in zip(a.prompt_logprobs or (), b.prompt_logprobs or ()):
        if (x is None) != (y is None) or (x and (sorted(x) != sorted(y) or any(abs(x[t] - y[t]) > 1e-4 for t in x))):
            return False
    return True


def _check_text(tokenizer, out, p: SamplingParams) -> None:
    """A completion's text is its tokens' (up to a stop string, cut there; a stop token's left out
    unless include_stop_str_in_output)."""
    for c in out.outputs:
        stop_token = c.finish_reason == "stop" and not isinstance(c.stop_reason, str) \
            and not p.include_stop_str_in_output
        whole = tokenizer.decode(list(c.token_ids[:-1] if stop_token else c.token_ids), skip_special_tokens=True)
        if isinstance(c.stop_reason, str):
            assert whole.startswith(c.text) and c.text.endswith(c.stop_reason) == p.include_stop_str_in_output \
                or c.stop_reason == "", (p, c, whole)
        else:
            assert c.text == whole, (out.request_id, p, c, whole)


def _check_finished(rec: Record) -> None:
    out, p = rec.last, rec.params
    assert out is not None and out.finished and out.error is None, (rec.how, p, out)
    assert len(out.outputs) == p.n, (p, out)
    for c in out.outputs:
        assert c.finish_reason in ("stop", "length"), (p, c)
        assert len(c.token_ids) <= p.max_tokens, (p, c)
        if c.finish_reason == "length":
            assert len(c.token_ids) == p.max_tokens or p.is_beam_search or \
                len(out.prompt_token_ids) + len(c.token_ids) >= 96, (p, c)
        if c.finish_reason == "stop" and not p.is_beam_search:
            assert len(c.token_ids) >= min(p.min_tokens, p.max_tokens), (p, c)
            if isinstance(c.stop_reason, int):
                assert c.token_ids[-1] == c.stop_reason in p.stop_token_ids, (p, c)
            elif c.stop_reason is None:  # the EOS
                assert not p.ignore_eos and c.token_ids[-1] not in p.stop_token_ids, (p, c)
            else:
                assert c.stop_reason in p.stop, (p, c)
        if p.logprobs is not None and not p.is_beam_search:
            assert len(c.logprobs) == len(c.token_ids), (p, c)
    if p.prompt_logprobs is not None:
        assert len(out.prompt_logprobs) == len(out.prompt_token_ids), (p, out)


def _deterministic(p: SamplingParams) -> bool:
    return p.temperature == 0.0 or p.seed is not None


def check_books(llm: LLM) -> None:
    _settle(llm)
    bm, engine = llm.block_manager, llm.engine
    bm.check_invariants()
    stats = vars(llm.engine_stats())
    assert stats["blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0, stats
    assert not engine.requests and not engine.beam_groups and engine._ahead is None
    assert not engine.scheduler.running and not engine.scheduler.waiting and not bm.pending_copies
    spec = engine.speculative
    if spec is not None and getattr(spec, "draft", None) is not None:
        spec.draft.block_manager.check_invariants()
        assert spec.draft.block_manager.num_used_blocks == 0


def stress(llm: LLM, ref: LLM, seed: int, num: int) -> dict:
    rng = random.Random(seed)
    # no speculation while a beam search or a best_of request (which reads logits) runs or waits:
    # the speculating engine gets the rest of the mix
    kinds = ("greedy", "greedy", "sampled", "n") if llm.engine.speculative is not None else \
        ("greedy", "greedy", "sampled", "n", "best_of", "beam")
    records = asyncio.run(_drive(llm, rng, num, kinds))
    check_books(llm)
    counts = {"done": 0, "aborted": 0, "compared": 0}
    for rec in records:
        rec.check_diffs()
        if rec.last is not None and rec.last.finished:
            _check_text(llm.tokenizer, rec.last, rec.params)
        aborted = rec.how in ("abort", "abort_now", "cancel", "close", "drop")
        if aborted and (rec.last is None or not rec.last.finished
                        or any(c.finish_reason == "abort" for c in rec.last.outputs)):
            counts["aborted"] += 1
            if rec.last is not None and rec.last.finished:
                assert all(c.finish_reason in ("abort", "stop", "length") for c in rec.last.outputs), rec.last
            continue
        _check_finished(rec)
        counts["done"] += 1
        if _deterministic(rec.params):
            alone = ref.generate(rec.prompt, rec.params, use_tqdm=False)
            assert _result(rec.last) == _result(alone), (rec.how, rec.params, _result(rec.last), _result(alone))
            assert _close_logprobs(rec.last, alone), (rec.params,)
            counts["compared"] += 1
    check_books(ref)
    # the engine still serves, and the same as before
    p = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert _result(llm.generate(BASE, p, use_tqdm=False)) == _result(ref.generate(BASE, p, use_tqdm=False))
    check_books(llm)
    return counts


@pytest.fixture(scope="module")
def stress_checkpoint(tmp_path_factory):
    path = write_checkpoint("llama31", tmp_path_factory.mktemp("stress"), vocab_size=VOCAB)
    make_tokenizer(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_random_load_keeps_the_books(stress_checkpoint, mode):
    with _engine(stress_checkpoint, mode) as llm, _engine(stress_checkpoint) as ref:
        counts = stress(llm, ref, seed=3, num=50)
        stats = vars(llm.engine_stats())
    # what the mix was for happened (how many requests an abort caught depends on timing: loose bounds)
    assert counts["done"] >= 8 and counts["compared"] >= 8 and counts["aborted"] >= 1, counts
    assert stats["num_preemptions"] > 0 or mode == "no_evict", stats
    assert stats["spec_verify_steps"] > 0 or mode != "ngram", stats
    assert sum(llm.launched_ahead) > 0 or mode != "overlap"


if __name__ == "__main__":  # python -m tests.runtime.test_stress_books SEED,SEED.. [NUM] [MODE]
    import os
    import sys
    import tempfile
    import time

    os.environ.setdefault("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    d = write_checkpoint("llama31", tempfile.mkdtemp(), vocab_size=VOCAB)
    make_tokenizer(d)
    mode = sys.argv[3] if len(sys.argv) > 3 else "plain"
    seeds = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else [0]
    num = int(sys.argv[2]) if len(sys.argv) > 2 else 40
    with _engine(d, mode) as llm, _engine(d) as ref:
        for s in seeds:
            t = time.time()
            print(s, stress(llm, ref, s, num), f"{time.time() - t:.1f}s", vars(llm.engine_stats()), flush=True)
