"""SamplingParams: bad values refused one line per field (no pydantic dump), vLLM's top_k=-1."""
import pytest

from trtllm.config import ConfigError
from trtllm.sampling_params import SamplingParams


def test_top_k_minus_one_means_no_limit():
    assert SamplingParams(top_k=-1).top_k == 0 == SamplingParams().top_k
    with pytest.raises(ConfigError, match=r"^SamplingParams.top_k=-2: must be greater than or equal to 0$"):
        SamplingParams(top_k=-2)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty",
                                   "presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_not_finite_is_named_as_such(field, value):
    with pytest.raises(ConfigError) as e:
        SamplingParams(**{field: value})
    assert str(e.value) == f"SamplingParams.{field}={value!r}: must be a finite number"


def test_one_line_per_problem_and_rules_across_fields():
    with pytest.raises(ConfigError) as e:
        SamplingParams(max_tokens=0, temperature=-1, bogus=1)
    assert str(e.value).splitlines() == ["SamplingParams.max_tokens=0: must be greater than 0",
                                         "SamplingParams.temperature=-1: must be greater than or equal to 0",
                                         "SamplingParams.bogus=1: unknown option"]
    with pytest.raises(ConfigError, match=r"^SamplingParams: min_tokens \(5\) exceeds max_tokens \(2\)$"):
        SamplingParams(min_tokens=5, max_tokens=2)
    params = SamplingParams()
    with pytest.raises(ConfigError, match=r"^SamplingParams.top_p=1.5: must be less than or equal to 1$"):
        params.top_p = 1.5


def test_beam_search_and_best_of_spellings():
    assert SamplingParams(beam_width=4).num_beams == 4 and SamplingParams(beam_width=4).is_beam_search
    trt = SamplingParams(use_beam_search=True, best_of=4, n=2)
    assert (trt.num_beams, trt.num_sequences, trt.n) == (4, 4, 2)
    assert SamplingParams(use_beam_search=True, n=3).num_beams == 3  # best_of defaults to n
    sampled = SamplingParams(n=2, best_of=5)
    assert (sampled.is_beam_search, sampled.num_sequences, sampled.reads_logits) == (False, 5, True)
    assert not SamplingParams(n=2).reads_logits
    assert SamplingParams(beam_width=2, early_stopping=1).early_stopping is True  # TensorRT-LLM's int spelling
    assert SamplingParams(early_stopping=0).early_stopping is False
    assert SamplingParams(beam_width=2, early_stopping="never").early_stopping == "never"
    for bad, why in [(dict(beam_width=2, best_of=3), r"beam_width \(2\) and best_of \(3\) name two beam widths"),
                     (dict(n=3, best_of=2), r"best_of \(2\) must be >= n \(3\)"),
                     (dict(use_beam_search=True, best_of=2, n=2, repetition_penalty=1.2),
                      "repetition_penalty with beam search is not supported"),
                     # each penalty by its own name (presence_penalty was refused as repetition_penalty)
                     (dict(use_beam_search=True, best_of=2, presence_penalty=1.0),
                      ": presence_penalty with beam search is not supported"),
                     (dict(use_beam_search=True, best_of=2, frequency_penalty=-1.0),
                      ": frequency_penalty with beam search is not supported"),
                     (dict(beam_width=2, early_stopping="sometimes"), "early_stopping")]:
        with pytest.raises(ValueError, match=why):
            SamplingParams(**bad)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
@pytest.mark.parametrize("value", [True, False])
def test_logprob_counts_are_numbers_not_bools(field, value):
    # True passed as 1 top alternative, False as 0 (logprobs on): a count is asked for by number
    with pytest.raises(ConfigError, match=rf"^SamplingParams.{field}={value}: must be a number of top alternatives"):
        SamplingParams(**{field: value})
    assert getattr(SamplingParams(**{field: 0}), field) == 0


def test_stop_strings_without_detokenizing_are_refused():
    # the output text is where stop strings are found: without it they were silently never matched
    with pytest.raises(ConfigError, match="stop strings with detokenize=False are not supported"):
        SamplingParams(stop=["\n"], detokenize=False)
    assert SamplingParams(stop_token_ids=[3], detokenize=False).stop_token_ids == [3]


@pytest.mark.parametrize("fields, named", [(dict(length_penalty=0.5), "length_penalty"),
                                           (dict(early_stopping=True), "early_stopping"),
                                           (dict(n=2, best_of=4, early_stopping="never", length_penalty=2.0),
                                            "length_penalty and early_stopping")])
def test_beam_scoring_without_beam_search_is_refused(fields, named):
    # they were accepted and changed nothing: a sampled request (best_of too) ranks by cumulative logprob
    with pytest.raises(ConfigError, match=rf"^SamplingParams: {named} appl(y|ies) to beam search only"):
        SamplingParams(**fields)
    assert SamplingParams(**{"best_of": 4, **fields, "use_beam_search": True}).is_beam_search


@pytest.mark.parametrize("field", ["stop", "bad", "stop_token_ids", "bad_token_ids"])
def test_none_lists_are_empty_as_tensorrt_llm_types_them(field):
    # TensorRT-LLM's SamplingParams types these Optional (None: none); stop_token_ids=None and
    # bad_token_ids=None were refused as "must be a valid list" while stop=None and bad=None passed
    assert getattr(SamplingParams(**{field: None}), field) == []


@pytest.mark.parametrize("field, default", [("min_tokens", "0"), ("min_p", "0.0"), ("early_stopping", "False")])
def test_tensorrt_llms_unset_none_is_refused_saying_what_the_default_is(field, default):
    # TensorRT-LLM types these Optional, None for unset: "must be a valid integer" did not say why
    with pytest.raises(ConfigError, match=rf"^SamplingParams.{field}=None: None \(TensorRT-LLM's 'unset'\) is not "
                                          rf"taken: leave {field} out for its default, {default}"):
        SamplingParams(**{field: None})


@pytest.mark.parametrize("fields", [{}, {"temperature": None}, {"top_k": None, "top_p": None},
                                    {"temperature": None, "top_k": None, "top_p": None, "seed": 3}])
def test_temperature_top_k_top_p_all_unset_is_greedy_as_in_tensorrt_llm(fields):
    # TensorRT-LLM's rule (its SamplingParams.params_imply_greedy_decoding): SamplingParams() sampled at
    # temperature 1.0 here, vLLM's default, where a TensorRT-LLM user gets the argmax
    p = SamplingParams(**fields)
    assert p.greedy and (p.temperature, p.top_k, p.top_p) == (0.0, 0, 1.0)


@pytest.mark.parametrize("fields, expected", [({"top_k": 50}, (1.0, 50, 1.0)), ({"top_p": 0.9}, (1.0, 0, 0.9)),
                                              ({"temperature": 0.7, "top_k": None}, (0.7, 0, 1.0)),
                                              ({"top_p": 0.5, "temperature": None}, (1.0, 0, 0.5))])
def test_one_of_them_set_leaves_the_others_neutral(fields, expected):
    p = SamplingParams(**fields)
    assert not p.greedy and (p.temperature, p.top_k, p.top_p) == expected


def test_min_p_alone_samples():  # newer TensorRT-LLM counts it among the sampling settings too
    assert not SamplingParams(min_p=0.1).greedy and SamplingParams(min_p=0.1).temperature == 1.0


def test_top_p_zero_is_greedy_and_none_assigned_is_neutral():
    assert SamplingParams(top_p=0.0).greedy  # TensorRT-LLM's; vLLM refuses 0
    p = SamplingParams(temperature=0.5, top_k=7)
    p.temperature, p.top_k = None, None
    assert (p.temperature, p.top_k, p.top_p) == (1.0, 0, 1.0) and not p.greedy
