"""What crosses the pipes between `EngineCoreClient` (the server's process) and the engine
core process (trtllm/runtime/engine_core.py): pickled dataclasses, one kind per message.

    client -> core   a list per write of AddRequest | AbortRequest | Stop
    core -> client   Ready once (or BuildFailed, and the core exits); then a StepDeltas
                     after each step, and after the messages taken before it

`StepDeltas` carries what each changed request gained, not its whole output: the client
keeps each request's growing `RequestOutput` and applies them (`StepDeltas.apply`). It is
columnar, one list per field over the step's requests, because trtllm-serve streams a
delta per request per step (256 streams): dumps + loads of a step's 256 one-token deltas
take ~90 us as columns, ~150 as a tuple per request, ~450 as two slots
dataclasses each; applying them costs ~100 us either way (dev CPU, Python 3.11;
re-measure: time pickle.dumps / loads of `StepDeltas.of` 256 such outputs).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from trtllm.lora_request import LoRARequest
    from trtllm.runtime.engine import EngineLimits
    from trtllm.runtime.engine_stats import EngineStats
    from trtllm.runtime.outputs import RequestOutput
    from trtllm.sampling_params import SamplingParams


# -- client -> core ---------------------------------------------------------------------------
@dataclass(slots=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    streaming: bool = False  # an output every step (every stream_interval tokens), not only the last
    lora_request: LoRARequest | None = None  # its LoRA adapter (runtime/adapters.py), None: the base model
    multimodal: object | None = None  # its images (runtime/multimodal_inputs.MultimodalData), None: text only
    cache_salt: str | None = None  # prefix-cache isolation (runtime/block_manager.chain_root)


@dataclass(slots=True)
class AbortRequest:
    request_id: str


@dataclass(slots=True)
class Stop:
    """Abort what is in flight (finish_reason "abort") and exit."""


# -- core -> client ---------------------------------------------------------------------------
@dataclass(slots=True)
class Ready:
    limits: EngineLimits
    vocab_size: int
    has_tokenizer: bool
    stats: EngineStats
    image_token_id: int | None = None  # a multimodal model's image placeholder token, None: text only


@dataclass(slots=True)
class BuildFailed:
    error: str  # "<exception type>: <message>"


@dataclass(slots=True)
class StepDeltas:
    """What each request that changed gained since its previous output: per request,
    request_ids .. starts[r]; per completion (all n of each request, in index order,
    request r's from starts[r] on) the text and token ids it gained, its new logprob
    entries (None when it wants none or gained none), and its latest cumulative logprob,
    finish and stop reasons; per request, its prompt logprobs when they are new (with its
    first tokens) or it finished, else None. `stats`: the engine's counters after the step."""
    stats: EngineStats | None = None
    request_ids: list[str] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)
    num_cached_tokens: list[int] = field(default_factory=list)
    prompt_logprobs: list[list | None] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    token_ids: list[list[int]] = field(default_factory=list)
    logprobs: list[list[dict[int, float]] | None] = field(default_factory=list)
    cumulative_logprobs: list[float | None] = field(default_factory=list)
    finish_reasons: list[str | None] = field(default_factory=list)
    stop_reasons: list[int | str | None] = field(default_factory=list)
    # speculative decoding's per-completion counts (draft, accepted, verify steps), set once
    # the completion finished and speculated; else None
    spec_counts: list[tuple[int, int, int] | None] = field(default_factory=list)
    # SamplingParams.return_perf_metrics: per completion, its RequestPerfMetrics once it finished; else None
    perf_metrics: list = field(default_factory=list)

    @classmethod
    def of(cls, outputs: list[RequestOutput], stats: EngineStats | None = None) -> StepDeltas:
        """The deltas of outputs whose text_diff / token_ids_diff the engine just set
        (`Engine.step` with copy_outputs off): O(new tokens) whatever the length so far."""
        d = cls(stats)
        for out in outputs:
            d.request_ids.append(out.request_id)
            d.finished.append(out.finished)
            d.errors.append(out.error)
            d.num_cached_tokens.append(out.num_cached_tokens)
            d.prompt_logprobs.append(out.prompt_logprobs if out.prompt_logprobs is not None and (
                out.finished or 0 < len(out.outputs[0].token_ids) == len(out.outputs[0].token_ids_diff)) else None)
            d.starts.append(len(d.texts))
            for c in out.outputs:
                new = len(c.token_ids_diff)
                d.texts.append(c.text_diff)
                d.token_ids.append(c.token_ids_diff)
                d.logprobs.append(c.logprobs[len(c.logprobs) - new:] if c.logprobs is not None and new else None)
                d.cumulative_logprobs.append(c.cumulative_logprob)
                d.finish_reasons.append(c.finish_reason)
                d.stop_reasons.append(c.stop_reason)
                d.spec_counts.append((c.num_draft_tokens, c.num_accepted_draft_tokens, c.num_verify_steps)
                                     if c.num_verify_steps else None)
                d.perf_metrics.append(c.request_perf_metrics)
        return d

    def apply(self, row: int, out: RequestOutput) -> None:
        """Grow `out` (the client's copy of request `row`) by its delta. The diffs accumulate
        until the reader clears them (`RequestOutput.clear_diffs`), so merged deltas keep
        every piece."""
        out.finished, out.error, out.num_cached_tokens = self.finished[row], self.errors[row], \
            self.num_cached_tokens[row]
        if self.prompt_logprobs[row] is not None:
            out.prompt_logprobs = self.prompt_logprobs[row]
        for j, c in enumerate(out.outputs, self.starts[row]):
            text, ids, logprobs = self.texts[j], self.token_ids[j], self.logprobs[j]
            c.text += text
            c.token_ids += ids
            c.text_diff += text
            c.token_ids_diff = c.token_ids_diff + ids
            if logprobs:
                c.logprobs += logprobs
            c.cumulative_logprob, c.finish_reason, c.stop_reason = \
                self.cumulative_logprobs[j], self.finish_reasons[j], self.stop_reasons[j]
            if self.spec_counts[j] is not None:
                c.num_draft_tokens, c.num_accepted_draft_tokens, c.num_verify_steps = self.spec_counts[j]
            if self.perf_metrics[j] is not None:
                c.request_perf_metrics = self.perf_metrics[j]
