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
    with pytest.raises(ConfigError, match=r"^SamplingParams.top_p=0: must be greater than 0$"):
        params.top_p = 0
