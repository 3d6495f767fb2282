"""`SamplingParams`: how one request's tokens are chosen and when it stops.

Validated when made (and on assignment): a bad value raises `ConfigError` (a
`ValueError`), one line per bad field naming field, value and rule; NaN and infinities
are refused. Unknown fields are refused, so a typo never silently means "default".
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from trtllm.guided_decoding_params import GuidedDecodingParams
from trtllm.logits_processor import BatchedLogitsProcessor, LogitsProcessor  # noqa: F401 (their public home was here)
from trtllm.validated_config import ValidatedConfig

MAX_N = 16            # completions per request
MAX_LOGPROBS = 20     # top-k logprobs per token
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MIN_TEMPERATURE = 1e-5  # below this, logits / T may overflow fp32: treat as greedy (as vLLM)


class SamplingParams(ValidatedConfig):
    max_tokens: int = Field(32, gt=0, description="new tokens at most")
    min_tokens: int = Field(0, ge=0, description="EOS (unless ignore_eos: then it ends nothing) and stop tokens "
                            "are masked, and stop strings not looked for, until this many")
    # temperature, top_k and top_p all left unset (out, or None): greedy, TensorRT-LLM's rule (vLLM samples
    # at 1.0 there); one of them set, the others unset are neutral (1.0, no limit, 1.0). See _unset_is_greedy.
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy; unset with top_k and top_p: greedy")
    top_k: int = Field(0, ge=0, description="0 (or -1, vLLM's and the OpenAI server's spelling) = no limit; 1 = greedy")
    top_p: float = Field(1.0, ge=0.0, le=1.0, description="0 = greedy (TensorRT-LLM's rule)")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    n: int = Field(1, ge=1, le=MAX_N)
    # best_of: sampling, n of best_of completions by cumulative logprob; beam search (TensorRT-LLM's
    # use_beam_search=True), the beam width. beam_width=k is the manual's spelling of the same search.
    best_of: int | None = Field(None, ge=1, le=MAX_N, description="completions generated, n of them returned")
    use_beam_search: bool = False
    beam_width: int = Field(1, ge=1, le=MAX_N, description="> 1: beam search with this many beams")
    length_penalty: float = Field(1.0, description="beam search: a finished beam scores "
                                                   "cumulative_logprob / len(tokens) ** length_penalty")
    early_stopping: bool | Literal["never"] = Field(
        False, description='beam search: True stops at beam-width finished beams; False when no running beam '
                           'can beat them, estimated at the current length; "never" at the best possible length')
    return_context_logits: bool = Field(False, description="RequestOutput.context_logits [prompt_len, vocab]")
    return_generation_logits: bool = Field(False, description="CompletionOutput.generation_logits [tokens, vocab]")
    return_perf_metrics: bool = Field(False, description="CompletionOutput.request_perf_metrics: times, KV blocks "
                                      "and draft acceptance (runtime/request_perf.py)")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    prompt_logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="log-probability of each prompt token given its prefix, plus "
        "this many top alternatives (0: the token's own only); RequestOutput.prompt_logprobs")
    stop: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    stop_token_ids: list[int] = Field(default_factory=list)
    include_stop_str_in_output: bool = Field(False, description="the text keeps the stop string, or the stop "
                                             "token's (EOS, end_id, stop_token_ids) text, that ended it")
    # banned output (TensorRT-LLM's fields): token ids never generated, and words, each tokenized without
    # special tokens, whose last token is masked wherever the tokens so far end with the rest of it
    bad: list[str] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)
    bad_token_ids: list[int] = Field(default_factory=list)
    no_repeat_ngram_size: int | None = Field(
        None, ge=1, description="an n-gram of this size occurs at most once in prompt + output (HF's rule: a "
        "token that would repeat one is masked)")
    embedding_bias: Any = Field(None, description="a [vocab_size] float tensor added to every step's logits "
                                "before the rest of the sampling (TensorRT-LLM's field)")
    exclude_input_from_output: bool = Field(True, description="TensorRT-LLM's field; outputs never include the "
                                            "prompt (RequestOutput.prompt_token_ids has it)")
    end_id: int | None = Field(None, ge=0, description="this request's end-of-sequence token, in place of the "
                               "model's (TensorRT-LLM's field)")
    pad_id: int | None = Field(None, ge=0, description="accepted for TensorRT-LLM's API: outputs are lists of "
                               "their own lengths, nothing is padded")
    # the prompt (TensorRT-LLM's fields): a text prompt's special tokens (BOS), and left truncation
    add_special_tokens: bool = True
    truncate_prompt_tokens: int | None = Field(None, ge=1, description="keep only the prompt's last k tokens")
    ignore_eos: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    # structured output and user code on the logits (runtime/grammar.py)
    guided_decoding: GuidedDecodingParams | None = None
    logits_processor: Any = Field(
        None, description="TensorRT-LLM's LogitsProcessor: a callable (req_id, logits [1, 1, V], token_ids "
        "[[prompt + output]], stream_ptr, client_id) -> None that edits logits in place, or a list of them")
    apply_batched_logits_processor: bool = Field(
        False, description="run the LLM's batched_logits_processor on this request's logits")

    # the engine's tokenization of `bad` (with_bad_words); None until then
    _bad_word_ids: tuple[tuple[int, ...], ...] | None = PrivateAttr(default=None)

    @field_validator("stop", "bad", mode="before")
    @classmethod
    def _stop_as_list(cls, v):
        return [v] if isinstance(v, str) else ([] if v is None else v)

    @field_validator("stop", "bad")
    @classmethod
    def _stop_strings(cls, v):
        if any(not s or len(s) > MAX_STOP_STRING_LEN for s in v):
            raise ValueError(f"strings must be 1..{MAX_STOP_STRING_LEN} characters")
        return v

    @field_validator("bad_token_ids", "stop_token_ids", mode="before")
    @classmethod
    def _no_ids(cls, v):
        return [] if v is None else v  # TensorRT-LLM types them Optional[List[int]], None for none (as stop's)

    @field_validator("bad_token_ids", "stop_token_ids")
    @classmethod
    def _token_ids(cls, v):
        negative = [t for t in v if t < 0]
        if negative:
            raise ValueError(f"token ids are >= 0, got {negative}")
        return v

    def with_bad_words(self, encode) -> SamplingParams:
        """A copy with `bad` tokenized by encode(word) -> ids (without special tokens); the
        engine makes it when it admits the request. ValueError naming a word with no tokens."""
        words = []
        for word in self.bad:
            ids = tuple(encode(word))
            if not ids:
                raise ValueError(f"SamplingParams.bad: {word!r} encodes to no tokens")
            words.append(ids)
        copy = self.model_copy()
        copy._bad_word_ids = tuple(words)
        return copy

    def eos_ids(self, model_eos) -> list[int]:
        """The tokens that end this request: end_id when given, else the model's EOS ids."""
        return [self.end_id] if self.end_id is not None else list(model_eos)

    @property
    def bans(self) -> tuple[tuple[int, ...], ...]:
        """Banned token sequences: each bad token id alone, then each bad word's tokens. A
        sequence's last token is masked where the tokens so far end with the rest of it."""
        if self.bad and self._bad_word_ids is None:
            raise ValueError("SamplingParams.bad was not tokenized (with_bad_words): the engine does it")
        return tuple((t,) for t in self.bad_token_ids) + (self._bad_word_ids or ())

    @field_validator("logprobs", "prompt_logprobs", mode="before")
    @classmethod
    def _count_not_bool(cls, v):
        # True would pass as 1 alternative (False as 0: logprobs on): say what the number means instead
        if isinstance(v, bool):
            raise ValueError(f"must be a number of top alternatives (0: each token's own logprob only), not {v}")
        return v

    @field_validator("embedding_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        import torch
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
            raise ValueError("must be a 1-D float tensor of the vocabulary's size")
        if not bool(torch.isfinite(v).all()):
            raise ValueError("must be finite (mask tokens with bad_token_ids)")
        return v

    @field_validator("exclude_input_from_output")
    @classmethod
    def _outputs_exclude_the_prompt(cls, v):
        if not v:
            raise ValueError("False is not supported: outputs hold the new tokens only; the prompt's are "
                             "RequestOutput.prompt_token_ids")
        return v

    @field_validator("logits_processor")
    @classmethod
    def _callables(cls, v):
        if v is None:
            return v
        procs = list(v) if isinstance(v, (list, tuple)) else [v]
        if not procs or not all(callable(p) for p in procs):
            raise ValueError("must be a callable (a LogitsProcessor) or a non-empty list of them")
        return v
    @field_validator("early_stopping", mode="before")
    @classmethod
    def _early_stopping(cls, v):
        # TensorRT-LLM's int spelling: 1 stops at beam-width finished beams, 0 by the heuristic
        return {0: False, 1: True}.get(v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="before")
    @classmethod
    def _unset_is_greedy(cls, data):
        """TensorRT-LLM's SamplingParams types temperature, top_k and top_p Optional: all three unset
        is greedy there (min_p, which newer TensorRT-LLM counts too, set: sampled), and any one set
        leaves the others neutral (_unset_is_neutral). `SamplingParams()` sampled at temperature 1.0
        here (vLLM's default) where a TensorRT-LLM user expects the argmax. Resolved when made, so
        every reader sees numbers."""
        if isinstance(data, dict) and all(data.get(name) is None for name in ("temperature", "top_k", "top_p")) \
                and not data.get("min_p"):
            return {**data, "temperature": 0.0, "top_k": 0, "top_p": 1.0}
        return data

    @field_validator("temperature", "top_k", "top_p", mode="before")
    @classmethod
    def _unset_is_neutral(cls, v, info):
        # beside a set one when made, or assigned later
        return {"temperature": 1.0, "top_k": 0, "top_p": 1.0}[info.field_name] if v is None else v

    @field_validator("min_p", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty",
                     "length_penalty", "early_stopping", mode="before")
    @classmethod
    def _not_unset(cls, v, info):
        # TensorRT-LLM types these Optional, None for "unset": say so, and what leaving the field out gives here
        if v is None:
            default = cls.model_fields[info.field_name].default
            raise ValueError(f"None (TensorRT-LLM's 'unset') is not taken: leave {info.field_name} out for its "
                             f"default, {default!r}")
        return v

    @field_validator("top_k", mode="before")
    @classmethod
    def _no_limit(cls, v):
        return 0 if v == -1 and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _consistent(self):
        if self.guided_decoding is not None and self.end_id is not None:
            raise ValueError("end_id with guided_decoding is not supported: the grammar ends on the model's EOS")
        if self.guided_decoding is not None and self.min_tokens > 0:
            raise ValueError("min_tokens with guided_decoding is not supported: the grammar decides where the "
                             "output may end")
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be >= n ({self.n})")
        if self.beam_width > 1 and self.best_of not in (None, self.beam_width):
            raise ValueError(f"beam_width ({self.beam_width}) and best_of ({self.best_of}) name two beam widths")
        if self.is_beam_search:
            self._check_beam_search()
        else:  # they score finished beams; a sampled request (best_of too) ranks by cumulative logprob (vLLM's rule)
            unused = [name for name, on in (("length_penalty", self.length_penalty != 1.0),
                                            ("early_stopping", self.early_stopping is not False)) if on]
            if unused:
                raise ValueError(f"{' and '.join(unused)} {'apply' if len(unused) > 1 else 'applies'} to beam search "
                                 "only (beam_width > 1 or use_beam_search=True): without it nothing would change")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.stop and not self.detokenize:  # stop strings are looked for in the output text (vLLM's rule)
            raise ValueError("stop strings with detokenize=False are not supported: they are matched against the "
                             "output text, which is not made; use stop_token_ids")
        return self

    def _check_beam_search(self) -> None:
        """What beam search (runtime/beams.py) takes, by name. It scores the model's own
        log-probabilities: a temperature other than 1 or 0 (or unset), top-k/p, min-p and
        penalties would change them, and per-token logprobs are not kept along the beams."""
        k = self.num_beams
        if self.n > k:
            raise ValueError(f"n ({self.n}) exceeds the beam width ({k}): beam search returns at most "
                             "beam-width completions")
        if self.temperature not in (0.0, 1.0):
            raise ValueError(f"temperature {self.temperature} with beam search is not supported: beam search "
                             "scores the model's own log-probabilities (temperature 1 or 0, or unset)")
        refused = [name for name, on in (("top_k", self.top_k not in (0, 1)), ("top_p", self.top_p < 1.0),
                                         ("min_p", self.min_p > 0.0),
                                         ("repetition_penalty", self.repetition_penalty != 1.0),
                                         ("presence_penalty", self.presence_penalty != 0.0),
                                         ("frequency_penalty", self.frequency_penalty != 0.0),
                                         ("logprobs", self.logprobs is not None),
                                         ("prompt_logprobs", self.prompt_logprobs is not None),
                                         # structured output's fields (issue 23a, merged from another
                                         # branch): beams would need a grammar state per beam
                                         ("guided_decoding", self.guided_decoding is not None),
                                         ("bad", bool(self.bad)), ("bad_token_ids", bool(self.bad_token_ids)),
                                         ("no_repeat_ngram_size", self.no_repeat_ngram_size is not None),
                                         ("embedding_bias", self.embedding_bias is not None),
                                         ("logits_processor", self.logits_processor is not None),
                                         # (the LLM's batched one ran on a beam's rows in some steps and
                                         # not in others: a decode graph's step searches the raw logits)
                                         ("apply_batched_logits_processor", self.apply_batched_logits_processor))
                   if on]
        if refused:
            raise ValueError(f"{', '.join(refused)} with beam search is not supported (beam search is "
                             "deterministic and returns cumulative_logprob per beam)")

    @property
    def is_beam_search(self) -> bool:
        """Beam search: beam_width > 1, or TensorRT-LLM's use_beam_search (width best_of or n)."""
        return self.beam_width > 1 or self.use_beam_search

    @property
    def num_beams(self) -> int:
        """The beam width of a beam search request (1 otherwise)."""
        if self.beam_width > 1:
            return self.beam_width
        return (self.best_of or self.n) if self.use_beam_search else 1

    @property
    def num_sequences(self) -> int:
        """Sequences the engine runs for the request: the beams, or best_of samples."""
        return self.num_beams if self.is_beam_search else (self.best_of or self.n)

    @property
    def reads_logits(self) -> bool:
        """The engine reads this request's logits on the host each step (beam search, logits
        returned, best_of ranking by cumulative logprob): a decode graph's argmax never serves."""
        return self.is_beam_search or self.return_generation_logits or self.return_context_logits \
            or self.num_sequences > self.n

    @property
    def greedy(self) -> bool:
        """The token is the argmax of the (penalised) logits: the one definition the sampler
        and the engine's overlap scheduler read."""
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1 or self.top_p == 0.0

    @property
    def processes_logits(self) -> bool:
        """A grammar or user code changes the logits before the pick (runtime/grammar.py)."""
        return self.guided_decoding is not None or self.logits_processor is not None \
            or self.apply_batched_logits_processor

    @property
    def logits_processors(self) -> list:
        lp = self.logits_processor
        return [] if lp is None else list(lp) if isinstance(lp, (list, tuple)) else [lp]

    @property
    def penalised(self) -> bool:
        """A repetition, presence or frequency penalty changes the logits before the pick."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
