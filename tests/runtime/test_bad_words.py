"""SamplingParams.bad / bad_token_ids (TensorRT-LLM's banned words and tokens): a banned token
is never generated, a banned word's tokens never appear in a row, greedy or sampled, alone or
beside requests without bans; what cannot be honoured is refused by name. Also the other
TensorRT-LLM fields that mask or shape tokens: no_repeat_ngram_size (equal to HF generate's),
truncate_prompt_tokens and add_special_tokens."""
import pytest
import torch
from transformers import AutoTokenizer

from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, ConfigError, KvCacheConfig
from trtllm.models.loader import load_model
from trtllm.runtime.llm import LLM
from trtllm.runtime.sampling_masks import banned
from trtllm.runtime.sequence import Sequence
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], list(range(60, 80))]
NEW = 12


@pytest.fixture(scope="module")
def checkpoint(checkpoint):  # conftest's tiny Llama, with a tokenizer
    make_tokenizer(checkpoint)
    return checkpoint


@pytest.fixture(scope="module")
def llm(checkpoint):
    with LLM(str(checkpoint), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=2048),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64, max_beam_width=2)) as engine:
        yield engine


def ids(llm, prompts, **params):
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW, ignore_eos=True, **params), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


def contains(seq: list[int], part: tuple) -> bool:
    return any(tuple(seq[i:i + len(part)]) == part for i in range(len(seq) - len(part) + 1))


def test_banned_tokens_are_never_generated(llm):
    base = ids(llm, PROMPTS, temperature=0.0)
    banned = sorted({base[0][0], base[0][3], base[1][1]})
    got = ids(llm, PROMPTS, temperature=0.0, bad_token_ids=banned)
    for row in got:
        assert not set(row) & set(banned), (row, banned)
    assert got[0][0] != base[0][0]
    # sampled rows too, and a request without bans in the same batch is untouched
    sampled = llm.generate(PROMPTS, [SamplingParams(max_tokens=NEW, ignore_eos=True, seed=3, bad_token_ids=banned),
                                     SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=0.0)],
                           use_tqdm=False)
    assert not set(sampled[0].outputs[0].token_ids) & set(banned)
    assert sampled[1].outputs[0].token_ids == base[1]


def test_a_banned_word_never_appears_and_the_callers_params_stay_as_given(llm, checkpoint):
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    base = ids(llm, PROMPTS[:1], temperature=0.0)[0]
    # a word the unbanned greedy output contains, of at least two tokens
    word = next(w for i in range(len(base) - 1)
                if len(tok.encode(w := tok.decode(base[i:i + 2]), add_special_tokens=False)) >= 2
                and contains(base, tuple(tok.encode(w, add_special_tokens=False))))
    seq = tuple(tok.encode(word, add_special_tokens=False))
    params = SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=0.0, bad=word)
    got = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    assert not contains(PROMPTS[0][-(len(seq) - 1):] + got, seq), (word, seq, got)
    assert got != base
    assert params.bad == [word] and params._bad_word_ids is None


def test_banned_tails_match_across_the_prompt():
    seq = Sequence("r", [1, 2, 3], SamplingParams(), output_token_ids=[4])
    assert banned(seq, ((9,), (4, 7), (3, 4, 8), (2, 4, 6), (1, 2, 3, 4, 5), (0, 1, 2, 3, 4, 6))) == (9, 7, 8, 5)
    assert banned(Sequence("r", [1], SamplingParams()), ((1, 5), (0, 1, 5))) == (5,)


def test_what_cannot_be_honoured_is_refused(llm):
    with pytest.raises(ConfigError, match="bad"):
        SamplingParams(bad="")
    with pytest.raises(ConfigError, match="bad_token_ids"):
        SamplingParams(bad_token_ids=[-1])
    with pytest.raises(ConfigError, match="bad_token_ids with beam search"):
        SamplingParams(beam_width=2, bad_token_ids=[3])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[5, 6]], SamplingParams(bad_token_ids=[10**6]), use_tqdm=False)
    assert SamplingParams(bad="x").bad == ["x"]


def test_banned_words_need_a_tokenizer(checkpoint):
    module = load_model(checkpoint, dtype=torch.float32, device="cpu")  # a module: no tokenizer
    with LLM(module, kv_cache_config=KvCacheConfig(max_tokens=512),
             build_config=BuildConfig(max_batch_size=2, max_num_tokens=32, max_seq_len=32)) as engine:
        with pytest.raises(ValueError, match="needs a tokenizer"):
            engine.generate([[5, 6]], SamplingParams(max_tokens=3, bad="hello", detokenize=False), use_tqdm=False)
        out = engine.generate([[5, 6]], SamplingParams(max_tokens=3, bad_token_ids=[7], detokenize=False),
                              use_tqdm=False)
        assert 7 not in out[0].outputs[0].token_ids


def test_a_row_with_every_token_banned_fails_by_name_and_others_go_on(llm):
    everything = list(range(512))
    with pytest.raises(Exception, match="bad_token_ids"):
        llm.generate(PROMPTS, [SamplingParams(max_tokens=4, ignore_eos=True, bad_token_ids=everything),
                               SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0)], use_tqdm=False)
    assert len(ids(llm, PROMPTS, temperature=0.0)[1]) == NEW
    assert vars(llm.engine_stats())["blocks_used"] == 0


def test_bans_hold_under_speculative_decoding(checkpoint, llm):
    from trtllm.runtime.speculative.config import NGramDecodingConfig
    repetitive = [[7, 8, 9, 10] * 4, [5, 17, 5, 17, 5, 17, 5]]
    base = ids(llm, repetitive, temperature=0.0)
    banned = sorted({base[0][0], base[1][2]})
    with LLM(str(checkpoint), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=2048),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64),
             speculative_config=NGramDecodingConfig(max_draft_len=3, max_matching_ngram_size=2)) as spec:
        got = ids(spec, repetitive, temperature=0.0, bad_token_ids=banned)
        plain = ids(spec, repetitive, temperature=0.0)
    assert plain == base  # the speculative engine is exact without bans
    for row in got:
        assert not set(row) & set(banned), (row, banned)
    assert got == ids(llm, repetitive, temperature=0.0, bad_token_ids=banned)  # and with them


@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_repeat_ngram_size_matches_hf_generate(llm, checkpoint, n):
    from tests.models.checkpoints import hf_model
    model = hf_model(checkpoint)
    prompts = [[7, 8, 9, 7, 8, 10], [5, 17, 99, 3, 250, 31, 8]]
    got = ids(llm, prompts, temperature=0.0, no_repeat_ngram_size=n)
    for prompt, row in zip(prompts, got):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, no_repeat_ngram_size=n,
                                  min_new_tokens=NEW, pad_token_id=0)[0, len(prompt):].tolist()
        assert row == want, (n, prompt)
        full = prompt + row
        for end in range(len(prompt), len(full)):  # no generated token completes an n-gram seen before
            gram = tuple(full[end - n + 1:end + 1])
            assert gram not in {tuple(full[i:i + n]) for i in range(end - n + 1)}, (n, end)
    if n == 1:
        assert ids(llm, prompts, temperature=0.0) != got  # the rule changed something here


def test_prompt_truncation_and_special_tokens(llm):
    from trtllm.runtime.tokenizer import tokenize_prompt
    prompt = list(range(60, 90))
    out = llm.generate([prompt], SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.0, truncate_prompt_tokens=5),
                       use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-5:]
    assert out.outputs[0].token_ids == ids(llm, [prompt[-5:]], temperature=0.0)[0][:6]

    class Recording:
        def encode(self, text, add_special_tokens=True):
            return [1, 2, 3] if add_special_tokens else [2, 3]

    assert tokenize_prompt(Recording(), "hi", SamplingParams(add_special_tokens=False)) == ("hi", [2, 3])
    assert tokenize_prompt(Recording(), "hi", SamplingParams(truncate_prompt_tokens=2)) == ("hi", [2, 3])
    assert tokenize_prompt(Recording(), "hi") == ("hi", [1, 2, 3])
    with pytest.raises(ConfigError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_end_id_ends_a_request_in_place_of_the_models_eos(llm):
    base = ids(llm, PROMPTS[:1], temperature=0.0)[0]
    end = base[3]
    outs = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=NEW, temperature=0.0, end_id=end, pad_id=0),
                        use_tqdm=False)[0].outputs[0]
    assert outs.finish_reason == "stop" and outs.stop_reason is None  # an EOS, as the model's: no stop_reason
    assert outs.token_ids == base[:base.index(end) + 1]
    # min_tokens masks the request's end token, not only the model's EOS (without ignore_eos: under it the
    # end token ends nothing, and min_tokens leaves it alone)
    held = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=NEW, temperature=0.0, end_id=end, min_tokens=NEW),
                        use_tqdm=False)[0].outputs[0].token_ids
    assert end not in held[:NEW - 1] and held != base
    # beam search stops its beams on it too
    beams = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=NEW, beam_width=2, end_id=end), use_tqdm=False)[0]
    assert all(c.token_ids.count(end) <= 1 and (end not in c.token_ids or c.token_ids[-1] == end)
               for c in beams.outputs)
    with pytest.raises(ValueError, match="end_id"):
        llm.generate([[5, 6]], SamplingParams(end_id=10**6), use_tqdm=False)


def test_embedding_bias_is_added_to_the_logits(llm):
    base = ids(llm, PROMPTS, temperature=0.0)
    bias = torch.zeros(512)
    bias[77] = 1e4  # wins every step
    got = llm.generate(PROMPTS, [SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=0.0, embedding_bias=bias),
                                 SamplingParams(max_tokens=NEW, ignore_eos=True, temperature=0.0)], use_tqdm=False)
    assert got[0].outputs[0].token_ids == [77] * NEW
    assert got[1].outputs[0].token_ids == base[1]  # its batch mate without a bias is untouched
    small = ids(llm, PROMPTS[:1], temperature=0.0, embedding_bias=torch.full((512,), 3.0))[0]
    assert small == base[0]  # a constant shift changes no argmax
    with pytest.raises(ValueError, match="embedding_bias has shape"):
        llm.generate([[5, 6]], SamplingParams(embedding_bias=torch.zeros(7)), use_tqdm=False)
    for bad in (torch.tensor([float("nan")] * 512), [0.0] * 512, torch.zeros(2, 512)):
        with pytest.raises(ConfigError, match="embedding_bias"):
            SamplingParams(embedding_bias=bad)
    with pytest.raises(ConfigError, match="embedding_bias with beam search"):
        SamplingParams(beam_width=2, embedding_bias=torch.zeros(512))
    with pytest.raises(ConfigError, match="exclude_input_from_output"):
        SamplingParams(exclude_input_from_output=False)
