"""Prompt logprobs (`SamplingParams(prompt_logprobs=k)`): the log-probability of each prompt
token given the tokens before it, from the same forward pass that computes the prompt.

    RequestOutput.prompt_logprobs = [None, {t1: lp, top...}, ..., {t_{P-1}: lp, top...}]

The runtime computes logits only for the rows it samples (passes/split_lm_head.py). For a
sequence that asks, the model runner adds the rows of its chunk's positions p < P - 1
(position p's logits score prompt token p + 1; position P - 1's are the sampled row, which
scores the first output token) after the sampled rows, so the LM head runs on those
positions of those requests only, in the same call. `prompt_logprobs` below turns the
extra rows of a step, all spans batched, into each token's log-softmax value and the
top-k alternatives. Values are those of the model's own distribution (fp32 log-softmax
of the raw logits): no penalty, temperature or top-k/p applies to the prompt.

Chunked prefill: each chunk contributes its positions; the spans follow one another.
Prefix reuse: a cached prefix has no logits, so a sequence whose prompt logprobs are not
all delivered (`Sequence.prompt_logprobs_pending`) bypasses the prefix cache at lookup
(it still publishes its blocks for requests after it). Chosen over keeping logprobs
beside the cached blocks: the blocks hold K/V only, and logprobs per block would need
their own store and eviction; the cost is recomputing a shared prefix (e.g. a
multiple-choice question's context once per choice). Preemption: the delivered count
survives, so a recomputed prompt is not scored twice, and once all are delivered the
sequence may take its prefix from the cache again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from trtllm.runtime.outputs import Logprob, logprob_entry
from trtllm.runtime.sequence import Sequence

ROWS_PER_SLICE = 1024  # fp32 log-softmax of at most this many rows at a time: bounds the temporaries


@dataclass(slots=True)
class PromptSpan:
    """Rows of a step's prompt logits: positions [start, end) of `seq`, which score its
    prompt tokens start + 1 .. end."""
    seq: Sequence
    start: int
    end: int


def chunk_span(seq: Sequence, start: int, end: int) -> PromptSpan | None:
    """The positions of the chunk [start, end) whose logits score a prompt token not yet
    delivered; None if none (every sequence not asking, every decode)."""
    lo, hi = max(start, seq.num_prompt_logprobs), min(end, seq.prompt_logprob_end)
    return PromptSpan(seq, lo, hi) if lo < hi else None


@torch.no_grad()
def prompt_logprobs(logits: torch.Tensor, spans: list[PromptSpan]) -> list[list[dict[int, Logprob]]]:
    """logits [R, V], the spans' rows one after another (R = total span length) -> per span,
    per position, {prompt token: logprob, then up to k other top tokens: logprob}, k the
    span's `prompt_logprobs` (the token itself first, as `CompletionOutput.logprobs`), each
    a Logprob with its rank (the prompt token's counted over the whole vocabulary)."""
    rows = sum(s.end - s.start for s in spans)
    if logits.shape[0] != rows:
        raise ValueError(f"{logits.shape[0]} prompt-logit rows for spans of {rows} positions")
    targets = torch.tensor([t for s in spans for t in s.seq.prompt_token_ids[s.start + 1:s.end + 1]],
                           dtype=torch.long, device=logits.device)
    k = min(max(s.seq.sampling_params.prompt_logprobs for s in spans), logits.shape[-1])
    chosen, ranks, top_ids, top_values = [], [], [], []
    for a in range(0, rows, ROWS_PER_SLICE):
        logp = logits[a:a + ROWS_PER_SLICE].float().log_softmax(-1)
        picked = logp.gather(-1, targets[a:a + ROWS_PER_SLICE, None])
        chosen += picked[:, 0].tolist()
        ranks += ((logp > picked).sum(-1) + 1).tolist()  # 1: the most likely token
        if k:
            values, ids = logp.topk(k, dim=-1)
            top_ids += ids.tolist()
            top_values += values.tolist()
    tokens = targets.tolist()
    out, i = [], 0
    for s in spans:
        want, entries = s.seq.sampling_params.prompt_logprobs, []
        for _ in range(s.end - s.start):
            top = list(zip(top_ids[i][:want], top_values[i][:want])) if want else []
            entries.append(logprob_entry(tokens[i], chosen[i], top, ranks[i]))
            i += 1
        out.append(entries)
    return out


def deliver_prompt_logprobs(launched, requests: dict) -> None:
    """The step's prompt-logit rows, as logprobs, into their requests' outputs (before
    any output of this step is emitted: a prompt's last chunk samples its first token).
    `launched` is the step's runtime/launched_step.LaunchedStep; `requests` the engine's
    OutputBuilders by request id."""
    launched.wait()
    spans, rows, start = [], [], 0
    for span in launched.prompt_spans:
        end = start + span.end - span.start
        req = requests.get(span.seq.request_id)
        if req is not None and not span.seq.is_finished:
            if span.seq.sampling_params.return_context_logits:
                req.set_context_logits(span.start, launched.prompt_logits[start:end])
            if span.seq.sampling_params.prompt_logprobs is not None:
                spans.append(span)
                rows += range(start, end)
            span.seq.num_prompt_logprobs = span.end
        start = end
    if not spans:
        return
    logits = launched.prompt_logits if len(rows) == start else launched.prompt_logits[rows]
    for span, entries in zip(spans, prompt_logprobs(logits, spans)):
        requests[span.seq.request_id].set_prompt_logprobs(span.start, entries)
