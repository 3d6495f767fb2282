"""Scoring through /v1/completions: `echo` with `logprobs` returns the prompt's tokens scored
(OpenAI's legacy layout: the first token's logprob null), `max_tokens=0` with echo the prompt
alone; the values are the offline engine's prompt logprobs; streamed, the echo chunk carries
them; and lm-eval's `local-completions` model computes loglikelihoods against the server that
equal the offline engine's."""
import json

import openai
import pytest

from tests.serve.server import BUILD, KV_MAX_TOKENS
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPT = [5, 17, 99, 3, 250, 31, 8]


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def offline(model_dir):
    """prompt ids -> the offline engine's prompt logprobs (top 2), the server's configuration."""
    with LLM(str(model_dir), dtype="float32", build_config=BuildConfig(**BUILD),
             kv_cache_config=KvCacheConfig(max_tokens=KV_MAX_TOKENS)) as llm:
        def score(ids: list[int]) -> list[dict | None]:
            params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
            return llm.generate([ids], params, use_tqdm=False)[0].prompt_logprobs
        yield score


def test_echo_with_logprobs_scores_the_prompt(client, offline):
    expected = offline(PROMPT)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=3, logprobs=2, echo=True,
                                    temperature=0.0, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(PROMPT) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for got, entry, tid in zip(lp.token_logprobs[1:len(PROMPT)], expected[1:], PROMPT[1:]):
        assert got == pytest.approx(entry[tid], abs=1e-4)
    for top, entry in zip(lp.top_logprobs[1:len(PROMPT)], expected[1:]):
        assert max(top.values()) == pytest.approx(max(entry.values()), abs=1e-4)  # keyed by text: ids may share one
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert out.choices[0].text.startswith("".join(lp.tokens[:len(PROMPT)])[:1])
    assert out.usage.prompt_tokens == len(PROMPT) and out.usage.completion_tokens == 3


def test_max_tokens_zero_with_echo_returns_the_prompt_alone(client, offline):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text == "Once upon a time" and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 0
    assert len(choice.logprobs.token_logprobs) == out.usage.prompt_tokens
    plain = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=0, echo=True)
    assert plain.choices[0].text == "Once upon a time" and plain.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=0)


def test_streamed_echo_chunk_carries_the_prompt_logprobs(client, offline):
    expected = offline(PROMPT)
    chunks = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=1, echo=True,
                                            stream=True, temperature=0.0, extra_body={"ignore_eos": True}))
    pieces = [c.choices[0] for c in chunks if c.choices]
    first = pieces[0].logprobs
    assert len(first.token_logprobs) == len(PROMPT) and first.token_logprobs[0] is None
    assert first.token_logprobs[1:] == pytest.approx([e[t] for e, t in zip(expected[1:], PROMPT[1:])], abs=1e-4)
    assert sum(len(p.logprobs.tokens) for p in pieces[1:] if p.logprobs) == 4
    whole = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, logprobs=1, echo=True,
                                      temperature=0.0, extra_body={"ignore_eos": True})
    assert "".join(p.text for p in pieces) == whole.choices[0].text
    # the completion's text_offset counts on from the echoed prompt, as the whole body's (it restarted at 0)
    assert [o for p in pieces if p.logprobs for o in p.logprobs.text_offset] == whole.choices[0].logprobs.text_offset
    only = list(client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, logprobs=1, echo=True,
                                          stream=True))
    texts = [c.choices[0].text for c in only if c.choices]
    assert "".join(texts) == whole.choices[0].text[:len(texts[0])] and only[-1].choices[0].finish_reason == "length"


def test_lm_eval_local_completions_against_the_server(server, model_dir, offline):
    """lm-eval's OpenAI-completions model (echo, logprobs=1, max_tokens=1) scores continuations
    against the server as the offline engine does."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model="tiny", tokenizer=str(model_dir),
                             tokenizer_backend="huggingface", max_retries=1, timeout=60)
    pairs = [("The quick brown fox", " jumps over"), ("Once upon a time", " there was")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    results = lm.loglikelihood(requests, disable_tqdm=True)
    assert len(results) == len(pairs)
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        ctx, cont = lm._encode_pair(context, continuation)  # the ids lm-eval sent
        whole = ctx + cont
        entries = offline(whole)
        want = sum(entries[p][whole[p]] for p in range(len(ctx), len(whole)))
        assert logprob == pytest.approx(want, abs=1e-3)
        assert greedy == all(entries[p][whole[p]] == max(entries[p].values()) for p in range(len(ctx), len(whole)))
    assert json.dumps(results)  # plain floats and bools
