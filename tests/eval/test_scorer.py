"""The Scorer: log-likelihoods from prompt logprobs equal HF's, greedy flags right, greedy
generation equals HF generate, and sequences longer than the engine takes are refused by
name before anything runs."""
import pytest
import torch

from tests.eval.conftest import hf_loglikelihood
from trtllm.eval.scorer import EvalInputError


def test_encode_pair_gives_trailing_spaces_to_the_continuation(scorer):
    ctx, cont = scorer.encode_pair("The quick brown ", "fox")
    assert ctx == scorer.encode("The quick brown")
    assert ctx + cont == scorer.encode("The quick brown fox")
    empty_ctx, cont = scorer.encode_pair("", "hello")
    assert empty_ctx == [scorer.tokenizer.eos_token_id]  # no bos in this tokenizer: eos starts
    assert cont == scorer.encode("hello", special=False)


def test_loglikelihoods_equal_hf_and_flag_greedy_continuations(scorer, hf):
    ctx = scorer.encode("Hello world, the quick brown")
    with torch.no_grad():
        greedy = hf.generate(torch.tensor([ctx]), max_new_tokens=4, do_sample=False)[0, len(ctx):].tolist()
    other = [(greedy[0] + 1) % 400] + greedy[1:]
    pairs = [(ctx, greedy), (ctx, other), scorer.encode_pair("", "fox jumps"),
             scorer.encode_pair("Café crème", " brûlée, déjà vu")]
    got = scorer.loglikelihoods(pairs)
    for (c, x), (ll, _) in zip(pairs, got):
        assert ll == pytest.approx(hf_loglikelihood(hf, c, x), abs=1e-3)
    assert [g for _, g in got[:2]] == [True, False]


def test_generate_is_hf_greedy(scorer, hf):
    prompt = scorer.encode("The lazy dog")
    with torch.no_grad():
        ids = hf.generate(torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    expected = scorer.tokenizer.decode(ids[0, len(prompt):].tolist(), skip_special_tokens=True)
    assert scorer.generate([prompt], stop=[], max_tokens=6) == [expected]


def test_lengths_over_the_engines_limit_are_refused_before_anything_runs(scorer):
    # max_seq_len = max_input_len = 256: a scored sequence (one token generated after) is 255 at most
    ok = ([1] * 5, [1] * 5)
    with pytest.raises(EvalInputError, match=r"request 1 has 300 tokens, more than the engine takes "
                                             r"\(max_input_len=256\)"):
        scorer.loglikelihoods([ok, ([1] * 100, [1] * 200)])
    with pytest.raises(EvalInputError, match=r"request 0 has 256 tokens.*\(max_seq_len=256 with 1 token generated"):
        scorer.loglikelihoods([([1], [1] * 255), ok])
    with pytest.raises(EvalInputError, match=r"prompt 0 has 230 tokens.*max_seq_len=256 with 32 tokens generated"):
        scorer.generate([[1] * 230], stop=[], max_tokens=32)
    assert scorer.llm.engine_stats().num_running == 0 and scorer.llm.engine_stats().num_waiting == 0
