"""`SamplingParams`: how one request's tokens are chosen and when it stops.

Validated when made (and on assignment): a bad value raises `ConfigError` (a
`ValueError`), one line per bad field naming field, value and rule; NaN and infinities
are refused. Unknown fields are refused, so a typo never silently means "default".
"""
from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from trtllm.config import ValidatedConfig

MAX_N = 16            # completions per request
MAX_LOGPROBS = 20     # top-k logprobs per token
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MIN_TEMPERATURE = 1e-5  # below this, logits / T may overflow fp32: treat as greedy (as vLLM)


class SamplingParams(ValidatedConfig):
    max_tokens: int = Field(32, gt=0, description="new tokens at most")
    min_tokens: int = Field(0, ge=0, description="EOS and stop tokens are masked until this many")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 (or -1, vLLM's and the OpenAI server's spelling) = no limit")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=MAX_N)
    beam_width: int = Field(1, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probability of each prompt token given its prefix, plus "
        "this many top alternatives (0: the token's own only); RequestOutput.prompt_logprobs")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, v):
        if any(not s or len(s) > MAX_STOP_STRING_LEN for s in v):
            raise ValueError(f"stop strings must be 1..{MAX_STOP_STRING_LEN} characters")
        return v

    @field_validator("prompt_logprobs", mode="before")
    @classmethod
    def _count_not_bool(cls, v):
        # True would pass as 1 alternative: say what the number means instead
        if isinstance(v, bool):
            raise ValueError(f"must be a number of top alternatives (0: each prompt token's own logprob only), "
                             f"not {v}")
        return v

    @field_validator("top_k", mode="before")
    @classmethod
    def _no_limit(cls, v):
        return 0 if v == -1 and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _consistent(self):
        if self.beam_width > 1:
            raise ValueError("beam_width > 1 (beam search) is not supported yet; use n for "
                             "several sampled completions")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        return self

    @property
    def greedy(self) -> bool:
        """The token is the argmax of the (penalised) logits: the one definition the sampler
        and the engine's overlap scheduler read."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1

    @property
    def penalised(self) -> bool:
        """A repetition, presence or frequency penalty changes the logits before the pick."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
