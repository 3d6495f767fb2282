"""SamplingParams(prompt_logprobs=k): each prompt token's log-probability given its prefix
equals HF transformers' log_softmax of the prompt (fp32), batched with requests that do
not ask, with prefix reuse on (a cached prefix is bypassed, not scored wrong), with
chunked prefill splitting the prompt, and through preemption; the top-k alternatives are
HF's top-k."""
import pickle

import pytest
import torch

from tests.models.checkpoints import hf_model
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, ConfigError, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.runtime.outputs import new_output
from trtllm.runtime.wire import StepDeltas
from trtllm.sampling_params import SamplingParams

PROMPTS = [list(range(60, 100)), [5, 17, 99, 3, 250, 31, 8], [9], list(range(60, 90)) + [7, 7, 7]]
TOL = 2e-4


@pytest.fixture(scope="module")
def checkpoint(checkpoint):  # conftest's tiny Llama, with a tokenizer
    make_tokenizer(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def hf_logprobs(checkpoint):
    model = hf_model(checkpoint)
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in PROMPTS]  # [S, V]


def small_llm(path, reuse=True, **build):
    return LLM(str(path), dtype="float32",
               kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=build.pop("kv_tokens", 2048),
                                             enable_block_reuse=reuse),
               build_config=BuildConfig(**{"max_batch_size": 4, "max_num_tokens": 256, "max_seq_len": 64, **build}))


def check(outputs, expected, k):
    for prompt, out, ref in zip(PROMPTS, outputs, expected):
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        for i in range(1, len(prompt)):
            entry, token = got[i], prompt[i]
            assert next(iter(entry)) == token  # the prompt token first
            assert abs(entry[token] - ref[i - 1, token].item()) < TOL, (i, entry[token], ref[i - 1, token])
            values, ids = ref[i - 1].topk(k)
            top = {t: v for t, v in entry.items() if t != token}
            assert set(top) <= set(ids.tolist()) and len(top) >= k - 1
            for t, v in top.items():
                assert abs(v - ref[i - 1, t].item()) < TOL
            # each a Logprob too (TensorRT-LLM's / vLLM's .logprob and .rank): the prompt token's
            # rank over the whole vocabulary, the others' their place in the top-k
            assert entry[token].logprob == float(entry[token])
            assert entry[token].rank == (ref[i - 1] > ref[i - 1, token]).sum().item() + 1
            assert [v.rank for v in top.values()] == sorted(v.rank for v in top.values())
            assert all(v.rank == ids.tolist().index(t) + 1 for t, v in top.items())


@pytest.mark.parametrize("reuse", [False, True])
def test_prompt_logprobs_equal_hf_log_softmax(checkpoint, hf_logprobs, reuse):
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    plain = SamplingParams(max_tokens=2, temperature=0.0)
    with small_llm(checkpoint, reuse=reuse) as llm:
        # requests that do not ask ride in the same steps and fill the prefix cache
        llm.generate(PROMPTS, plain, use_tqdm=False)
        outs = llm.generate(PROMPTS + PROMPTS, [params] * 4 + [plain] * 4, use_tqdm=False)
        check(outs[:4], hf_logprobs, 3)
        assert all(o.prompt_logprobs is None for o in outs[4:])
        if reuse:  # the plain requests took their prefixes from the cache; those asking did not
            assert [o.num_cached_tokens for o in outs[:4]] == [0, 0, 0, 0]
            assert outs[4].num_cached_tokens == 32
        # the first output token is what greedy gives after the prompt
        assert [o.outputs[0].token_ids[0] for o in outs[:4]] == [r[-1].argmax().item() for r in hf_logprobs]


def test_prompt_logprobs_with_chunked_prefill_and_preemption(checkpoint, hf_logprobs):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    # 8 tokens a step: the 40-token prompt in five chunks; a pool of 5 blocks preempts
    with small_llm(checkpoint, max_num_tokens=8, kv_tokens=80) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
    check(outs, hf_logprobs, 1)


def test_a_logprob_is_a_float_with_its_rank_across_the_process_pipe():
    from trtllm.runtime.outputs import Logprob, logprob_entry
    entry = logprob_entry(7, -2.5, [(3, -0.5), (7, -2.5)])  # the chosen token second in the top list
    assert entry == {7: -2.5, 3: -0.5} and list(entry) == [7, 3]
    assert (entry[7].rank, entry[3].rank) == (2, 1) and entry[3].logprob == -0.5
    assert logprob_entry(9, -4.0, [(3, -0.5)])[9].rank is None  # outside the top list: not known
    assert logprob_entry(9, -4.0, [], chosen_rank=5)[9].rank == 5
    back = pickle.loads(pickle.dumps(entry))
    assert type(back[7]) is Logprob and back[7].rank == 2 and back[7] + 1 == -1.5


def test_prompt_logprobs_cross_the_process_pipe_once():
    """StepDeltas (what the engine process sends) carry them with the first tokens, and
    again at the end, not with every streamed step."""
    params = SamplingParams(prompt_logprobs=0)
    engine, client = new_output("r", None, [1, 2, 3], params), new_output("r", None, [1, 2, 3], params)
    engine.prompt_logprobs[1:] = [{2: -1.5}, {3: -0.25}]
    sizes = []
    for step, finished in enumerate([False, False, True]):
        c = engine.outputs[0]
        c.token_ids.append(step)
        c.token_ids_diff = [step]
        engine.finished = finished
        d = pickle.loads(pickle.dumps(StepDeltas.of([engine])))
        sizes.append(d.prompt_logprobs[0] is not None)
        d.apply(0, client)
    assert sizes == [True, False, True]
    assert client.prompt_logprobs == [None, {2: -1.5}, {3: -0.25}]


@pytest.mark.parametrize("value", [-1, 21, True, 1.5])
def test_bad_prompt_logprobs_are_refused(value):
    with pytest.raises(ConfigError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
