"""What generation returns: `RequestOutput` with one `CompletionOutput` per sequence
(TensorRT-LLM's LLM-API names)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from trtllm.runtime.request_perf import RequestPerfMetrics
    from trtllm.sampling_params import SamplingParams


class Logprob(float):
    """A token's logprob: the float itself, with TensorRT-LLM's and vLLM's fields, so both
    `lp[t] + 1.0` and `lp[t].logprob` / `lp[t].rank` read it. rank: 1 for the most likely
    token of its distribution; None where it is not known (a sampled token outside the
    top-k asked for: the ranks a generation step knows are its top list's)."""

    __slots__ = ("rank",)

    def __new__(cls, logprob: float, rank: int | None = None):
        self = super().__new__(cls, logprob)
        self.rank = rank
        return self

    @property
    def logprob(self) -> float:
        return float(self)

    def __reduce__(self):  # pickled across the engine process (runtime/wire.py) with its rank
        return Logprob, (float(self), self.rank)


def logprob_entry(token: int, chosen: float, top, chosen_rank: int | None = None) -> dict[int, Logprob]:
    """{token: its logprob, then the other top (id, logprob) pairs}, each a Logprob whose rank
    is its place in `top` (sorted, most likely first); `token`'s own where `top` holds it,
    else `chosen_rank`."""
    ranks = {t: i for i, (t, _) in enumerate(top, 1)}
    entry = {token: Logprob(chosen, ranks.get(token, chosen_rank))}
    entry.update((t, Logprob(v, ranks[t])) for t, v in top if t != token)
    return entry


@dataclass
class CompletionOutput:
    index: int
    text: str = ""                            # up to a stop string or stop token, which it holds only
                                              # with include_stop_str_in_output
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None          # "stop" | "length" | "error" | "abort"
    stop_reason: int | str | None = None      # the stop_token_ids id or stop string that ended it; None
                                              # for EOS or end_id (TensorRT-LLM's and vLLM's rule) or length
    logprobs: list[dict[int, Logprob]] | None = None  # per token: {token id: logprob}, chosen first
    cumulative_logprob: float | None = None
    text_diff: str = ""                       # text added since the previous streamed output
    token_ids_diff: list[int] = field(default_factory=list)
    # SamplingParams.return_generation_logits: the logits each token was sampled from,
    # [len(token_ids), vocab] on the CPU (set when the completion finishes)
    generation_logits: torch.Tensor | None = None
    # speculative decoding, set when the completion finishes: draft tokens verified, accepted,
    # and the steps that verified them (acceptance_length: tokens gained per such step)
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_verify_steps: int = 0
    # SamplingParams.return_perf_metrics: runtime/request_perf.RequestPerfMetrics, set when it finishes
    request_perf_metrics: RequestPerfMetrics | None = None

    @property
    def acceptance_length(self) -> float:
        """Tokens a verify step gained on average (accepted drafts + the target's own); 0: none ran."""
        return 1 + self.num_accepted_draft_tokens / self.num_verify_steps if self.num_verify_steps else 0.0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    error: str | None = None                  # why the request failed, if it did
    num_cached_tokens: int = 0                # prompt tokens served from the prefix cache
    # SamplingParams.prompt_logprobs: per prompt token {token id: logprob given the tokens
    # before it, then the top alternatives}; None for the first token (runtime/prompt_logprobs.py)
    prompt_logprobs: list[dict[int, float] | None] | None = None
    # SamplingParams.return_context_logits: the logits at every prompt position, [prompt_len,
    # vocab] on the CPU (row p predicts prompt token p + 1; the last, the first output token)
    context_logits: torch.Tensor | None = None

    def snapshot(self, text_lengths: list[int] | None = None) -> RequestOutput:
        """A copy the engine will not change further (texts cut to `text_lengths`).

        Runs for every streaming request every step, so it copies only what the engine
        goes on changing: the completions and their growing lists. `prompt_token_ids` is
        shared, never changed after the request is added (copying a 2k-token prompt would
        cost ~10 us per request per step; bench/probes/host_step.py times streaming steps);
        so is `prompt_logprobs`, complete before the first output token is."""
        outputs = []
        for i, c in enumerate(self.outputs):
            c = _shallow_copy(c)
            c.token_ids, c.token_ids_diff = list(c.token_ids), list(c.token_ids_diff)
            c.logprobs = list(c.logprobs) if c.logprobs is not None else None
            if text_lengths is not None:
                c.text = c.text[: text_lengths[i]]
            outputs.append(c)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs,
                             self.finished, self.error, self.num_cached_tokens, self.prompt_logprobs,
                             self.context_logits)

    def clear_diffs(self) -> None:
        for c in self.outputs:
            c.text_diff, c.token_ids_diff = "", []


class RequestError(RuntimeError):
    """A request that failed while it ran (a fault in a step, non-finite logits, ...):
    `LLM.generate` raises it instead of returning an output with no tokens. `outputs`
    are all the batch's RequestOutputs (the others finished normally), `failed` the
    indices of those that failed; the message names each with its cause."""

    def __init__(self, outputs: list[RequestOutput], failed: list[int], batch: bool = True):
        self.outputs, self.failed = outputs, failed
        lines = [f"prompt {i}: {outputs[i].error}" if batch else str(outputs[i].error) for i in failed]
        super().__init__("; ".join(lines))


def new_output(request_id: str, prompt: str | None, prompt_token_ids: list[int],
               params: SamplingParams) -> RequestOutput:
    """A request's output before its first token (the engine's, and the process client's copy)."""
    wants_logprobs = params.logprobs is not None
    return RequestOutput(request_id, prompt, prompt_token_ids, [
        CompletionOutput(i, logprobs=[] if wants_logprobs else None, cumulative_logprob=0.0 if wants_logprobs else None)
        for i in range(params.n)],
        prompt_logprobs=[None] * len(prompt_token_ids) if params.prompt_logprobs is not None else None)


def failed_output(request_id: str, n: int, error: str, prompt: str | None = None,
                  prompt_token_ids: list[int] | None = None) -> RequestOutput:
    """A request that ends with `error`: its n completions with finish_reason "error". The
    one shape of a failure, whoever fails it (the engine driver for a bad request or a
    crashed step, a front end for a duplicate id or an engine that is gone)."""
    return RequestOutput(request_id, prompt, list(prompt_token_ids or []),
                         [CompletionOutput(i, finish_reason="error") for i in range(n)], finished=True, error=error)


def _shallow_copy(c: CompletionOutput) -> CompletionOutput:
    """copy.copy(c) (every field, whatever fields there are) without copy's reduce
    protocol: ~1 us instead of ~5 on the dev CPU."""
    new = object.__new__(CompletionOutput)
    new.__dict__.update(c.__dict__)
    return new
