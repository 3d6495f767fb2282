"""`Sequence`: the state of one completion being generated (a request with n > 1
becomes n sequences sharing the prompt)."""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

from trtllm.lora_request import LoRARequest
from trtllm.sampling_params import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    index: int = 0                                   # which of the request's n completions
    seq_id: int = field(default_factory=lambda: next(_ids))
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0                     # tokens whose K/V are in the cache
    num_cached_tokens: int = 0                       # prompt tokens found in the prefix cache, at admission
    admitted: bool = False                           # blocks allocated once (a preempted sequence comes back)
    finish_reason: str | None = None                 # "stop" | "length" | "error" | "abort"
    error: str | None = None
    seed: int = 0                                    # the sampler's seed (drawn when not given)
    # prompt_logprobs: the logits at positions [0, prompt_logprob_end) score prompt tokens
    # 1 .. P-1 (P-1 when asked, on the request's first sequence; else 0), and the first
    # num_prompt_logprobs of them have been delivered (runtime/prompt_logprobs.py)
    prompt_logprob_end: int = 0
    num_prompt_logprobs: int = 0
    guide: object | None = None  # guided decoding: this sequence's xgrammar GrammarMatcher (runtime/grammar.py)
    # beam search: the runtime.beams.BeamGroup it is a beam of (Any: beams.py imports this file)
    beam: Any = None
    # speculative decoding (runtime/speculative): this step's draft tokens, which the step
    # verifies after the last known token (never part of token_ids); counts since admission
    draft_token_ids: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0            # draft tokens the target verified
    num_accepted_draft_tokens: int = 0   # ... and accepted
    num_verify_steps: int = 0            # steps that verified drafts
    lora_request: LoRARequest | None = None          # its LoRA adapter (runtime/adapters.py), None: the base
    # its images (runtime/multimodal_inputs.MultimodalData: spans, hashes, pixels), None: text only
    multimodal: Any = None
    perf: Any = None  # SamplingParams.return_perf_metrics: its runtime/request_perf.PerfRecorder
    cache_salt: str | None = None  # its request's: prefixes are shared only among requests of one salt

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, i: int) -> int:
        """token_ids[i] (0 <= i < num_tokens) without building the whole list."""
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[i] if i < p else self.output_token_ids[i - p]

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole prompt + output list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def prompt_logprobs_pending(self) -> bool:
        """Prompt logprobs are asked and not all delivered: the prompt must be computed, not
        taken from the prefix cache (block_manager's lookup skips it)."""
        return self.num_prompt_logprobs < self.prompt_logprob_end

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status, self.finish_reason, self.error = SequenceStatus.FINISHED, reason, error
