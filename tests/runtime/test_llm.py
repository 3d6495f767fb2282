"""The LLM API end to end on tiny random checkpoints: greedy output identical to HF
transformers' generate, under block reuse, chunked prefill and preemption; bad input
fails alone; streaming, stop strings, seeds."""
import asyncio
import time

import numpy as np
import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, ConfigError, KvCacheConfig
from trtllm.runtime.client_protocol import EngineClient
from trtllm.runtime.llm import LLM
from trtllm.runtime.outputs import RequestError
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9]]
NEW = 10


@pytest.fixture(scope="module", params=["llama31", "qwen3", "mistral"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_checkpoint(request.param, path, vocab_size=512)
    make_tokenizer(path)
    return path


def hf_greedy(path, prompt):
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(llm, prompts=PROMPTS):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def small_llm(path, **build):
    kv = build.pop("kv", KvCacheConfig(tokens_per_block=16, max_tokens=4096))
    return LLM(str(path), dtype="float32", kv_cache_config=kv,
               build_config=BuildConfig(**{"max_batch_size": 8, "max_num_tokens": 64, "max_seq_len": 64, **build}))


def test_greedy_matches_hf_with_reuse_chunking_and_preemption(checkpoint):
    expected = [hf_greedy(checkpoint, p) for p in PROMPTS]
    with small_llm(checkpoint) as llm:
        assert greedy(llm) == expected
        assert greedy(llm) == expected  # second run: prompts' full blocks come from the prefix cache
        assert llm.block_manager.prefix_hit_rate > 0
    with small_llm(checkpoint, max_batch_size=2, max_num_tokens=4) as llm:  # chunked prefill
        assert greedy(llm) == expected
    # 4 blocks of 16 tokens for 4 sequences needing 2 each: some must be preempted
    with small_llm(checkpoint, max_seq_len=32, kv=KvCacheConfig(tokens_per_block=16, max_tokens=64)) as llm:
        assert greedy(llm) == expected
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0


@pytest.fixture(scope="module")
def llama_llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("llm")
    write_checkpoint("llama31", path, vocab_size=512)
    make_tokenizer(path)
    with small_llm(path) as llm:
        yield llm


@pytest.mark.parametrize("bad, why", [([], "the prompt is empty"),
                                      ([3, 9999], "prompt token id 9999 is outside the vocabulary"),
                                      (list(range(100)), "more than max_input_len"),
                                      ("hi \udcff", "lone UTF-16 surrogate")])
def test_a_bad_prompt_raises_at_submission_naming_its_index_and_none_runs(llama_llm, bad, why):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    with pytest.raises(ValueError, match=rf"^prompt 1: .*{why}"):
        llama_llm.generate([[1, 2, 3], bad, [4, 5]], params, use_tqdm=False)
    if bad:  # one prompt, no index ([] alone is an empty batch)
        with pytest.raises(ValueError, match=rf"^(?!prompt \d).*{why}"):
            llama_llm.generate(bad, params, use_tqdm=False)
    assert not llama_llm.has_unfinished()  # none of the batch was submitted
    outs = llama_llm.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)  # the engine goes on
    assert [len(o.outputs[0].token_ids) for o in outs] == [5, 5] and all(o.error is None for o in outs)
    llama_llm.block_manager.check_invariants()


def test_prompt_plus_max_tokens_over_max_seq_len_raises(llama_llm):
    with pytest.raises(ValueError, match=r"prompt \(30 tokens\) \+ max_tokens \(40\) exceeds max_seq_len=64"):
        llama_llm.generate([1] * 30, SamplingParams(max_tokens=40), use_tqdm=False)


def test_a_batch_size_no_machine_holds_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"max_batch_size=1000000000000 .*cannot be allocated: lower max_batch_size"):
        LLM(build_config=BuildConfig(max_batch_size=10**12))


def test_stop_token_ids_outside_the_vocabulary_are_refused(llama_llm):
    """A stop id the model can never sample would never stop anything: refused, not ignored."""
    with pytest.raises(ConfigError, match=r"stop_token_ids=\[-5\]: .*token ids are >= 0"):
        SamplingParams(stop_token_ids=[-5])
    with pytest.raises(ValueError, match=r"prompt 1: SamplingParams.stop_token_ids: 512 is outside the vocabulary "
                                         r"\[0, 512\)"):
        llama_llm.generate([[1, 2], [3]], [SamplingParams(), SamplingParams(stop_token_ids=[7, 512])], use_tqdm=False)
    assert not llama_llm.has_unfinished()
    out = llama_llm.generate([1, 2], SamplingParams(max_tokens=4, stop_token_ids=[511]), use_tqdm=False)
    assert out.error is None


@pytest.mark.parametrize("model", [5, {"model": "path"}, b"path"])
def test_a_model_of_another_type_is_named(model):
    with pytest.raises(TypeError, match=rf"model must be a checkpoint directory .*, got {type(model).__name__}$"):
        LLM(model)


def test_token_ids_as_numpy_arrays_and_tensors(llama_llm):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = llama_llm.generate([[1, 2, 3], [4, 5, 6]], params, use_tqdm=False)
    for prompts in (np.array([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 2, 3], [4, 5, 6]]),
                    [np.array([1, 2, 3]), torch.tensor([4, 5, 6])]):
        got = llama_llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    one = llama_llm.generate(np.array([1, 2, 3], dtype=np.int32), params, use_tqdm=False)
    assert one.outputs[0].token_ids == want[0].outputs[0].token_ids
    with pytest.raises(TypeError, match="a prompt is a string or a list of token ids"):
        llama_llm.generate(np.array([1.0, 2.0]), params, use_tqdm=False)
    with pytest.raises(TypeError, match="prompt 1: .* got a list holding float 2.5"):
        llama_llm.generate([[1, 2], [1, 2.5]], params, use_tqdm=False)  # the element named, none runs


def test_tensorrt_llms_text_and_tokens_prompt_dicts(llama_llm):
    # TextPrompt {"prompt": ...} and TokensPrompt {"prompt_token_ids": ...}: a dict without images was
    # "a prompt is a string or a list of token ids"
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    want = llama_llm.generate([[1, 2, 3], [4, 5]], params, use_tqdm=False)
    got = llama_llm.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert llama_llm.generate({"prompt_token_ids": [1, 2, 3]}, params, use_tqdm=False).outputs[0].token_ids == \
        want[0].outputs[0].token_ids
    if llama_llm.tokenizer is not None:
        text = llama_llm.generate("Hello world", params, use_tqdm=False)
        assert llama_llm.generate({"prompt": "Hello world"}, params, use_tqdm=False).prompt_token_ids == \
            text.prompt_token_ids
    for bad, words in [({"prompt_token_ids": [1, 2.5]}, r"got keys \['prompt_token_ids'\] holding other types"),
                       ({"prompt": "a", "query": "b"}, r"got keys \['prompt', 'query'\]$")]:
        with pytest.raises(TypeError, match=r"a dict prompt is \{'prompt': text\}.*" + words):
            llama_llm.generate(bad, params, use_tqdm=False)
    assert not llama_llm.has_unfinished()


def test_abandoned_stream_is_aborted_and_frees_its_blocks(llama_llm):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for close in (lambda it: it.close(), lambda it: None):  # closed, or dropped (garbage)
        it = llama_llm.generate([1, 2, 3], params, streaming=True)
        first = next(it)
        assert not first.finished
        close(it)
        del it
        deadline = time.monotonic() + 10
        while llama_llm.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not llama_llm.has_unfinished(), "the abandoned stream kept running"
    stats = vars(llama_llm.engine_stats())
    assert stats["num_running"] == 0 and stats["blocks_used"] == 0
    llama_llm.block_manager.check_invariants()


def test_a_duplicate_request_id_fails_alone(llama_llm):
    assert isinstance(llama_llm, EngineClient)  # what the server calls
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)

    async def go():
        first = llama_llm.generate_async([1, 2, 3], params, request_id="same")
        again = llama_llm.generate_async([4, 5], params, request_id="same")
        return await first.aresult(), await again.aresult()

    first, again = asyncio.run(go())
    assert first.error is None and len(first.outputs[0].token_ids) == 20
    assert "already in flight" in again.error and again.outputs[0].finish_reason == "error"
    assert again.prompt_token_ids == [4, 5]


def test_streaming_ends_in_the_same_text_and_stop_strings_cut_exactly(llama_llm):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    whole = llama_llm.generate("the quick brown fox", params, use_tqdm=False).outputs[0]
    parts = list(llama_llm.generate("the quick brown fox", params, streaming=True))
    assert parts[-1].finished and "".join(p.outputs[0].text_diff for p in parts) == whole.text
    assert parts[-1].outputs[0].token_ids == whole.token_ids
    text = whole.text
    assert len(text) >= 6, text
    stop = text[3:6]
    cut = llama_llm.generate("the quick brown fox", params.model_copy(update={"stop": [stop]}),
                             use_tqdm=False).outputs[0]
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop
    # min_tokens holds stop strings off as it does EOS and stop ids (vLLM's rule): none is looked
    # for in the text of the first min_tokens tokens
    held = llama_llm.generate("the quick brown fox", params.model_copy(update={"stop": [stop], "min_tokens": 12}),
                              use_tqdm=False).outputs[0]
    assert held.token_ids == whole.token_ids and held.finish_reason == "length"


def test_a_stop_tokens_text_is_left_out_unless_include_stop_str_in_output(llama_llm):
    """vLLM's rule (TensorRT-LLM drops the token itself): the text ends before the stop token,
    as it does before a stop string; the token stays in token_ids."""
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    whole = llama_llm.generate("the quick brown fox", params, use_tqdm=False).outputs[0]
    texts = [llama_llm.generate("the quick brown fox", params.model_copy(update={"max_tokens": k}),
                                use_tqdm=False).outputs[0].text for k in range(1, 9)]
    k = next(k for k in range(1, 8) if texts[k] != texts[k - 1] and whole.token_ids.index(whole.token_ids[k]) == k)
    stop = whole.token_ids[k]  # first seen at k, and its token adds text
    for how, reason in (({"stop_token_ids": [stop]}, stop), ({"end_id": stop, "ignore_eos": False}, None)):
        cut = llama_llm.generate("the quick brown fox", params.model_copy(update=how), use_tqdm=False).outputs[0]
        assert (cut.token_ids, cut.text, cut.finish_reason, cut.stop_reason) == \
            (whole.token_ids[:k + 1], texts[k - 1], "stop", reason), how  # an EOS (end_id) is no stop_reason
        parts = list(llama_llm.generate("the quick brown fox", params.model_copy(update=how), streaming=True))
        assert "".join(p.outputs[0].text_diff for p in parts) == cut.text
        kept = llama_llm.generate("the quick brown fox", params.model_copy(
            update={**how, "include_stop_str_in_output": True}), use_tqdm=False).outputs[0]
        assert kept.text == texts[k] and kept.token_ids == cut.token_ids


def test_a_stop_string_that_is_a_skipped_special_token_stops_at_it(llama_llm):
    """skip_special_tokens leaves "<|im_end|>" out of the text, so as a stop string it never
    matched and the request ran on to max_tokens; it is matched as its token."""
    end = llama_llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    bias = torch.zeros(512)
    bias[end] = 100.0  # the model says <|im_end|> at every step
    params = SamplingParams(max_tokens=4, stop=["x", "<|im_end|>"], embedding_bias=bias)
    out = llama_llm.generate([1, 2], params, use_tqdm=False).outputs[0]
    assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == ([end], "", "stop", "<|im_end|>")
    parts = list(llama_llm.generate([1, 2], params, streaming=True))
    assert parts[-1].outputs[0].stop_reason == "<|im_end|>" and parts[-1].outputs[0].token_ids == [end]
    kept = llama_llm.generate([1, 2], params.model_copy(update={"include_stop_str_in_output": True}),
                              use_tqdm=False).outputs[0]
    assert (kept.text, kept.stop_reason) == ("<|im_end|>", "<|im_end|>")
    held = llama_llm.generate([1, 2], params.model_copy(update={"min_tokens": 2}), use_tqdm=False).outputs[0]
    assert held.token_ids == [end, end] and held.stop_reason == "<|im_end|>"  # min_tokens holds it off
    # a character's first bytes, then <|im_end|>: they end the text as at an EOS (flushed, not dropped)
    tok = llama_llm.tokenizer
    first = next(t for t in range(256, 512) if tok.decode([t]).endswith("\ufffd") and tok.decode([t]) != "\ufffd")

    def first_then_end(req_id, logits, token_ids, stream_ptr, client_id):
        logits[..., first if len(token_ids[0]) == 2 else end] = 1e4

    part = llama_llm.generate([1, 2], SamplingParams(max_tokens=4, stop=["<|im_end|>"], logits_processor=first_then_end),
                              use_tqdm=False).outputs[0]
    assert (part.token_ids, part.text) == ([first, end], tok.decode([first])), part
    shown = llama_llm.generate([1, 2], params.model_copy(update={"skip_special_tokens": False}),
                               use_tqdm=False).outputs[0]  # in the text: matched there, as before
    assert (shown.token_ids, shown.text, shown.stop_reason) == ([end], "", "<|im_end|>")


def test_stream_interval_sends_fewer_larger_outputs(llama_llm, tmp_path):
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, n=2, logprobs=1)
    every = list(llama_llm.generate("the quick brown fox", params, streaming=True))
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="stream_interval"):
        LLM(str(tmp_path), stream_interval=0)
    with LLM(str(tmp_path), dtype="float32", stream_interval=5, kv_cache_config=KvCacheConfig(max_tokens=4096),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64)) as llm:
        parts = list(llm.generate("the quick brown fox", params, streaming=True))
    # tokens 1 (at once), 6, 11, then the end: 4 outputs instead of 12
    assert [len(p.outputs[0].token_ids) for p in parts] == [1, 6, 11, 12]
    for i in range(2):
        assert "".join(p.outputs[i].text_diff for p in parts) == every[-1].outputs[i].text
        assert sum((p.outputs[i].token_ids_diff for p in parts), []) == every[-1].outputs[i].token_ids
        assert len(parts[-1].outputs[i].logprobs) == 12


def test_seed_reproducible_and_n_completions(llama_llm):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=50, seed=7, n=3, logprobs=2)
    a = llama_llm.generate([1, 2, 3], params, use_tqdm=False)
    b = llama_llm.generate([[9, 9], [1, 2, 3]], params, use_tqdm=False)[1]  # another batch mate
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    for o in a.outputs:
        assert len(o.logprobs) == 8 and all(next(iter(d)) == t for d, t in zip(o.logprobs, o.token_ids))
        for d, t in zip(o.logprobs, o.token_ids):  # TensorRT-LLM's / vLLM's Logprob fields on each float
            assert all(v.logprob == float(v) for v in d.values())
            ranked = sorted((v for v in d.values() if v.rank is not None), key=lambda v: v.rank)
            assert [v.rank for v in ranked] == [1, 2] and ranked[0] >= ranked[1]  # the top 2, in order
            assert (d[t].rank is None) == (len(d) == 3)  # the sampled token outside them: rank not known


def test_nan_logits_fail_that_request_alone(tmp_path):
    import torch.nn as nn

    from trtllm.models.loader import load_model

    model = load_model(write_checkpoint("llama31", tmp_path, vocab_size=512), dtype=torch.float32, device="cpu")

    class Poisoned(nn.Module):  # NaN logits wherever token 13 is in the input
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, model.config

        def forward(self, input_ids, positions):
            logits = self.inner(input_ids, positions)
            return torch.where((input_ids == 13)[..., None], float("nan"), logits)

    llm = LLM(Poisoned(), kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
              build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64))
    with llm:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        with pytest.raises(RequestError, match=r"^prompt 1: the model produced NaN or Inf logits") as failure:
            llm.generate([[1, 2, 3], [5, 13]], params, use_tqdm=False)
        ok, bad = failure.value.outputs
        assert failure.value.failed == [1]
        assert ok.outputs[0].finish_reason == "length" and len(ok.outputs[0].token_ids) == 4
        assert bad.outputs[0].finish_reason == "error"
        with pytest.raises(RequestError, match="NaN or Inf"):  # one prompt: raised, not an empty output
            llm.generate([5, 13], params)
        with pytest.raises(RequestError, match="NaN or Inf"):  # streaming: raised after the last output
            for _ in llm.generate([5, 13], params, streaming=True):
                pass
        assert llm.generate([1, 2, 3], params).outputs[0].token_ids == ok.outputs[0].token_ids  # it goes on
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0


def test_a_generate_batch_reaches_the_engine_whole_and_bad_params_submit_nothing(llama_llm):
    engine = llama_llm.engine
    seen, real_step = [], engine.step

    def step():
        seen.append(len(engine.requests))
        return real_step()
    engine.step = step
    try:
        prompts = [[i + 1, i + 2, i + 3] for i in range(6)]
        outs = llama_llm.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True),
                                  use_tqdm=False)
        assert seen[0] == 6  # the first step saw every request of the call
        assert all(len(o.outputs[0].token_ids) == 3 for o in outs)
        seen.clear()
        with pytest.raises(TypeError, match="sampling_params"):
            llama_llm.generate([[1, 2], [3, 4]], [SamplingParams(max_tokens=3), "greedy"], use_tqdm=False)
        assert not engine.has_unfinished() and seen == []  # the good one was not submitted either
    finally:
        engine.step = real_step


@pytest.mark.timeout(120)
def test_calls_after_shutdown_raise_at_once(tmp_path):
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with small_llm(tmp_path) as llm:
        assert len(llm.generate([1, 2], params, use_tqdm=False).outputs[0].token_ids) == 3
    for call in (lambda: llm.generate([1, 2], params, use_tqdm=False),
                 lambda: llm.generate([1, 2], params, streaming=True),
                 lambda: asyncio.run(llm.generate_async([1, 2], params).aresult())):
        start = time.monotonic()
        with pytest.raises(RuntimeError, match="shut down"):
            call()
        assert time.monotonic() - start < 1.0


def test_chat_applies_the_checkpoints_template_and_get_stats(tmp_path):
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path, chat_template="{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
                                           "{% if add_generation_prompt %}<assistant>{% endif %}")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with small_llm(tmp_path) as llm:
        messages = [{"role": "user", "content": "hi"}]
        want = llm.generate("<user>hi<assistant>", params, use_tqdm=False)
        got = llm.chat(messages, params, use_tqdm=False)
        assert got.prompt == "<user>hi<assistant>" and got.outputs[0].token_ids == want.outputs[0].token_ids
        two = llm.chat([messages, messages], params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in two] == [want.outputs[0].token_ids] * 2
        stats = vars(llm.engine_stats())
        assert stats["blocks_total"] == llm.block_manager.num_blocks and stats["num_running"] == 0
        with pytest.raises(ValueError, match=r"get_stats\(\) needs LLM\(enable_iter_perf_stats=True\)"):
            llm.get_stats()


def test_cache_salt_keeps_cached_prefixes_apart(tmp_path):
    # TensorRT-LLM's generate(cache_salt=...): was a TypeError
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)
    prompt, params = list(range(3, 43)), SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    with small_llm(tmp_path, kv=KvCacheConfig(tokens_per_block=16, max_tokens=1024), max_beam_width=2) as llm:
        def cached(**kw):
            return llm.generate(prompt, params, use_tqdm=False, **kw).num_cached_tokens

        assert (cached(cache_salt="a"), cached(cache_salt="a"), cached(cache_salt="b"), cached()) == (0, 32, 0, 0)
        assert cached() == 32 and cached(cache_salt="b") == 32
        outs = llm.generate([prompt, prompt], params, use_tqdm=False, cache_salt=["a", "c"])
        assert [o.num_cached_tokens for o in outs] == [32, 0]
        # vLLM's spelling, the salt in the prompt dict
        assert llm.generate({"prompt_token_ids": prompt, "cache_salt": "c"}, params, use_tqdm=False).num_cached_tokens \
            == 32
        with pytest.raises(ValueError, match="two cache salts"):
            llm.generate({"prompt_token_ids": prompt, "cache_salt": "c"}, params, use_tqdm=False, cache_salt="d")
        # the dict's None is no salt of its own: generate's applies (was refused as two salts)
        assert llm.generate({"prompt_token_ids": prompt, "cache_salt": None}, params, use_tqdm=False,
                            cache_salt="c").num_cached_tokens == 32
        beams = SamplingParams(use_beam_search=True, n=2, best_of=2, max_tokens=2)
        assert llm.generate(prompt, beams, use_tqdm=False, cache_salt="a").num_cached_tokens == 32
        for kw, error, words in [(dict(cache_salt=3), TypeError, "cache_salt must be a string, got int"),
                                 (dict(cache_salt=""), ValueError, "cache_salt must be 1..1024 characters, got 0"),
                                 # (a lone surrogate failed the engine step it was hashed in, with its neighbours)
                                 (dict(cache_salt="a\ud800"), ValueError, "cache_salt must be valid Unicode"),
                                 (dict(cache_salt=["a"] * 3), ValueError, "3 cache_salts for 1 prompts")]:
            with pytest.raises(error, match=words):
                llm.generate([prompt], params, use_tqdm=False, **kw)
        with pytest.raises(ValueError, match="one cache_salt, not a list"):
            llm.generate(prompt, params, streaming=True, cache_salt=["a"])
        llm.block_manager.check_invariants()


def test_tensorrt_llms_iteration_stats(tmp_path):
    # get_stats() was engine_stats() as a dict: TensorRT-LLM's returns the iterations since the last call
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    with LLM(str(tmp_path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512),
             max_seq_len=64, enable_iter_perf_stats=True, iter_stats_max_iterations=3) as llm:
        assert llm.get_stats(timeout=2) == []
        llm.generate([[5, 6, 7], [8, 9]], params, use_tqdm=False)
        stats = llm.get_stats()
        assert [s["iter"] for s in stats] == [2, 3, 4]  # 4 steps (both prompts, then 3 decodes), the last 3 kept
        assert all(s["inflightBatchingStats"]["numScheduledRequests"] == 2 for s in stats)
        assert all(s["iterLatencyMS"] > 0 and s["kvCacheStats"]["maxNumBlocks"] == llm.block_manager.num_blocks
                   for s in stats)
        assert stats[-1]["numActiveRequests"] == 0 and stats[-1]["kvCacheStats"]["tokensPerBlock"] == 16
        assert llm.get_stats() == []  # drained

        async def drain():
            return [s async for s in llm.get_stats_async()]

        llm.generate([5, 6], params, use_tqdm=False)
        assert [s["iter"] for s in asyncio.run(drain())] == [6, 7, 8]
    for kwargs, error, words in [
        (dict(iter_stats_max_iterations=5), ValueError, "iter_stats_max_iterations needs enable_iter_perf_stats=True"),
        (dict(enable_iter_perf_stats=True, iter_stats_max_iterations=0), ValueError,
         "iter_stats_max_iterations must be an integer >= 1, got 0"),
        (dict(enable_iter_perf_stats="yes"), TypeError, "enable_iter_perf_stats must be True or False"),
    ]:
        with pytest.raises(error, match=words):
            LLM(str(tmp_path), **kwargs)


def test_chat_adds_no_second_bos_to_a_template_that_writes_one(tmp_path):
    """Llama 3's template writes the BOS, and its tokenizer adds one to text: the chat prompt has
    it once, as the server's (it had two: the rendered text was tokenized with add_special_tokens)."""
    from tokenizers import processors
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path, chat_template="<|im_start|>{% for m in messages %}{{ m.content }}{% endfor %}")
    with small_llm(tmp_path) as llm:
        tok = llm.tokenizer
        bos = tok.convert_tokens_to_ids("<|im_start|>")
        tok._tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A",
                                                                      special_tokens=[("<|im_start|>", bos)])
        hi = tok.encode("hi", add_special_tokens=False)
        assert tok.encode("hi") == [bos] + hi  # text gets a BOS
        messages = [{"role": "user", "content": "hi"}]
        out = llm.chat(messages, SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
        assert out.prompt_token_ids == [bos] + hi
        assert [o.prompt_token_ids for o in llm.chat([messages, messages], None, use_tqdm=False)] == [[bos] + hi] * 2
        asked = llm.chat(messages, SamplingParams(max_tokens=2, add_special_tokens=True), use_tqdm=False)
        assert asked.prompt_token_ids == [bos, bos] + hi  # add_special_tokens given: as asked


def test_vocabulary_size_from_one_forward_when_nothing_names_it(tmp_path):
    import types

    import torch.nn as nn

    from trtllm.models.loader import load_model

    model = load_model(write_checkpoint("llama31", tmp_path, vocab_size=512), dtype=torch.float32, device="cpu")

    class Renamed(nn.Module):  # no config.vocab_size, no lm_head attribute
        def __init__(self):
            super().__init__()
            self.inner, self.config = model, types.SimpleNamespace(eos_token_id=None)

        def forward(self, input_ids, positions):
            return self.inner(input_ids, positions)

    with LLM(Renamed(), kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
             build_config=BuildConfig(max_batch_size=4, max_num_tokens=64, max_seq_len=64)) as llm:
        assert llm.engine.vocab_size == 512
        with pytest.raises(ValueError, match="prompt token id 600 is outside the vocabulary"):
            llm.generate([1, 600], SamplingParams(max_tokens=2), use_tqdm=False)


def test_tensorrt_llms_top_level_limits_and_config_dicts(tmp_path):
    # LLM(max_batch_size=..., max_num_tokens=..., max_seq_len=...) and dict configs, as TensorRT-LLM 1.x's
    # LlmArgs take them: both were TypeErrors
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)
    with LLM(str(tmp_path), dtype="float32", max_batch_size=3, max_num_tokens=16, max_seq_len=48, max_beam_width=2,
             kv_cache_config={"tokens_per_block": 16, "max_tokens": 256}, backend="pytorch") as llm:
        assert (llm.engine.scheduler.max_num_seqs, llm.engine.scheduler.max_num_tokens, llm.limits.max_seq_len) == \
            (3, 16, 48)
        assert llm.block_manager.num_blocks == 16
    for kwargs, error, words in [
        (dict(max_batch_size=4, build_config=BuildConfig(max_batch_size=8)), ValueError,
         r"two values for one limit: max_batch_size=4 and build_config\.max_batch_size=8"),
        (dict(build_config=[4]), TypeError, r"build_config must be a BuildConfig \(or a dict of its fields\), got list"),
        (dict(kv_cache_config={"max_tokenz": 4}), ValueError, r"KvCacheConfig\.max_tokenz=4: unknown option"),
        (dict(trust_remote_code=True), ValueError, "trust_remote_code=True is not supported"),
        (dict(backend="tensorrt"), ValueError, "backend='tensorrt': trtllm's one backend is 'pytorch'"),
        (dict(guided_decoding_backend="llguidance"), ValueError,
         "guided_decoding_backend='llguidance': trtllm's structured output is xgrammar's"),
        (dict(tokenizer_mode="slow"), ValueError, "tokenizer_mode='slow': trtllm loads the checkpoint's fast"),
        (dict(revision="main"), ValueError, "revision='main': trtllm reads local checkpoint directories only"),
        (dict(tokenizer_revision="v2"), ValueError, "tokenizer_revision='v2': trtllm reads local checkpoint"),
        (dict(load_format="dummy"), ValueError, "load_format='dummy': trtllm loads the checkpoint's weights"),
        (dict(enable_lora=1), TypeError, "enable_lora must be True or False, got 1"),
        (dict(enable_chunked_prefill="no"), TypeError, "enable_chunked_prefill must be True or False, got 'no'"),
    ]:
        with pytest.raises(error, match=words):
            LLM(str(tmp_path), dtype="float32", **kwargs)


def test_tensorrt_llms_chunked_prefill_guided_backend_and_enable_lora(tmp_path):
    # TensorRT-LLM's enable_chunked_prefill (its default False), guided_decoding_backend="xgrammar" and
    # enable_lora=True, as its examples write them: TypeErrors before
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(tmp_path)
    kw = dict(dtype="float32", max_batch_size=4, max_num_tokens=32, max_seq_len=96,
              kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=512))
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [list(range(3, 43)), [5, 6, 7]]  # the first over max_num_tokens: chunked, or refused unchunked
    with LLM(str(tmp_path), **kw) as llm:
        expected = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    with LLM(str(tmp_path), enable_chunked_prefill=False, guided_decoding_backend="xgrammar", enable_lora=True,
             tokenizer_mode="auto", load_format="auto", **kw) as llm:
        assert not llm.engine.scheduler.enable_chunked_prefill and llm.engine.adapters is not None
        with pytest.raises(ValueError, match=r"exceeds max_num_tokens \(32\) and chunked prefill is off"):
            llm.generate(prompts[0], params, use_tqdm=False)
        assert llm.generate(prompts[1], params, use_tqdm=False).outputs[0].token_ids == expected[1]
        assert llm.generate(prompts[0][:24], params, use_tqdm=False).outputs[0].token_ids  # fits in one step
        llm.block_manager.check_invariants()


def test_skip_tokenizer_init_runs_token_ids_without_a_tokenizer(tmp_path):
    # TensorRT-LLM's skip_tokenizer_init: a checkpoint without tokenizer files was "no tokenizer in ..."
    write_checkpoint("llama31", tmp_path, vocab_size=512)
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    with LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_seq_len=64,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=128)) as llm:
        assert llm.tokenizer is None
        out = llm.generate([5, 17, 99], params, use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 3
        with pytest.raises(ValueError, match="a text prompt needs a tokenizer"):
            llm.generate("hi", params, use_tqdm=False)
    make_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="skip_tokenizer_init=True with a tokenizer: give one or the other"):
        LLM(str(tmp_path), skip_tokenizer_init=True, tokenizer=str(tmp_path))
