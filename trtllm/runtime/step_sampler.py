"""`StepSampler`: a launched step's logits in, each sequence's next token out.

    step = step_sampler.sample(launched, picks_serve, speculative)
    step.tokens      # {seq: token} (or {seq: [tokens]} after a verify step)
    step.logprobs    # {seq: (chosen, top)} for those that asked (or best_of ranks)
    step.failed      # {seq: why}: the engine finishes these with "error"
    step.logits_rows # [(seq, row)]: return_generation_logits / return_context_logits copies

Which path serves a step:
- the decode graph's picks (greedy rows, beams): no sampler runs; the picks and the
  NaN/Inf flags come from the graph (`picks_serve`);
- a verify step (speculative decoding): the decoder's own acceptance (runtime/speculative);
- otherwise the sampler (runtime/sampler.py) over every row, the grammar bitmasks and
  logits processors (runtime/grammar.py) applied first.

This module only reads the step; finishing sequences and growing outputs is the engine's.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trtllm.runtime.beams import graph_picks_serve
from trtllm.runtime.grammar import LogitsHooks
from trtllm.runtime.model_runner import LaunchedStep
from trtllm.runtime.sampler import Sampler, SamplerOutput, SamplingBatch
from trtllm.runtime.sequence import Sequence

NAN_LOGITS = "the model produced NaN or Inf logits"


def nan_logits(seq: Sequence) -> str:
    """Why `seq` fails with NaN or Inf logits: under an adapter, the adapter's weights most likely."""
    if seq.lora_request is None:
        return NAN_LOGITS
    return f"{NAN_LOGITS} under LoRA adapter {seq.lora_request.lora_name!r} (its weights overflow?)"


ALL_MASKED = ("no token is left to sample: SamplingParams.bad / bad_token_ids (with the grammar "
              "or min_tokens, if any) mask every one")


@dataclass
class SampledStep:
    tokens: dict[Sequence, int | list[int]] = field(default_factory=dict)
    logprobs: dict[Sequence, tuple] = field(default_factory=dict)
    failed: dict[Sequence, str] = field(default_factory=dict)
    logits_rows: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)


@dataclass
class PendingSample:
    """What `StepSampler.launch` did before the step's wait."""
    picks_serve: bool
    hooks: object | None             # grammar.StepHooks, when a row has a grammar or a processor
    early: SamplerOutput | None      # the sampler, queued behind the step's kernels
    early_host: SamplerOutput | None = None  # its outputs copied to pinned host memory (CUDA) ...
    copied: torch.cuda.Event | None = None   # ... once this event has passed


class StepSampler:
    def __init__(self, logits_hooks: LogitsHooks, eos_token_ids: list[int]):
        self.sampler = Sampler()
        self.logits_hooks, self.eos_token_ids = logits_hooks, eos_token_ids

    def sample(self, launched: LaunchedStep, picks_serve: bool, speculative=None) -> SampledStep:
        """Waits for the step; each sequence's token (see the module docstring). A row with
        NaN or Inf logits, or one whose every token is masked, fails alone."""
        return self.finish(launched, self.launch(launched, picks_serve), speculative)

    def launch(self, launched: LaunchedStep, picks_serve: bool) -> PendingSample:
        """The part before the wait: the grammar's bitmasks filled on the host, and the
        sampler queued behind the step's kernels where nothing on the host reads the logits
        first."""
        seqs = launched.to_sample
        if not seqs:
            return PendingSample(picks_serve, None, None)
        # a decode-graph step of beams (and greedy rows): the beams' rows go to the search
        # (take_beam_rows); the graph's picks and NaN/Inf flags serve (runtime/beams.py)
        picks_serve = picks_serve or launched.picks is not None and graph_picks_serve(seqs)
        # the grammar bitmasks are filled on the host while the GPU computes the logits
        hooks = None if picks_serve else self.logits_hooks.prepare(seqs)
        # Without hooks (which may read logits on the host) the sampler's kernels are queued
        # now, behind the step's: launched after the wait, each left the GPU idle for its
        # launch (~0.9 ms after a 2,048-token prefill graph on the H100, 2026-12-06 profile).
        early = None if picks_serve or hooks is not None or launched.num_rows is not None \
            or not launched.logits_in_stream_order else self._run(launched)
        if early is not None and early.token_ids.is_cuda:  # read from the host once copied
            return PendingSample(picks_serve, hooks, early, *early.copy_to_host())
        return PendingSample(picks_serve, hooks, early)

    def next_step_tokens(self, launched: LaunchedStep, pending: PendingSample) -> torch.Tensor | None:
        """The device tensor the next decode step can gather its input ids from, by row, before
        this step's tokens reach the host (the overlap scheduler), or None. A sampled decode-graph
        step qualifies when its sampler is queued and no row's logits are read on the host (beams,
        returned logits, best_of): the next replay of the graph overwrites them."""
        if pending.early is None or launched.device_picks is None:
            return None
        last = None
        for seq in launched.to_sample:
            p = seq.sampling_params
            if p is not last:
                if p.reads_logits:
                    return None
                last = p
        return pending.early.token_ids

    def finish(self, launched: LaunchedStep, pending: PendingSample, speculative=None) -> SampledStep:
        """Waits for the step; the tokens `launch` began."""
        seqs, picks_serve, hooks, early = launched.to_sample, pending.picks_serve, pending.hooks, pending.early
        if not seqs:
            return SampledStep()
        launched.wait()
        if launched.num_rows is not None:  # a verify step: runtime/speculative
            tokens, logprobs, failed = speculative.sample(launched, self.sampler)
            return SampledStep(tokens, logprobs, failed)
        step = SampledStep()
        raw = {}  # returned rows a logits processor edits in place, copied before it runs
        if picks_serve:
            tokens, finite = launched.picks.tolist()  # picked inside the decode graph
            if all(finite):  # the usual step: no row failed, none wants logprobs
                step.tokens = dict(zip(seqs, tokens))
                return step
            chosen, top = None, None
        else:
            if pending.copied is not None:
                pending.copied.synchronize()  # not the stream: a step launched ahead may be behind it
                out = pending.early_host
            else:
                if hooks is not None:
                    raw = _rows_to_keep(seqs, launched.logits)
                out = early if early is not None else self._run(launched, hooks, step.failed)
            tokens, finite = out.token_ids.tolist(), out.finite.tolist()
            if out.all_masked is not None:
                step.failed.update((seq, ALL_MASKED) for seq, m in zip(seqs, out.all_masked.tolist()) if m)
            chosen, top = out.host_logprobs()
        for i, seq in enumerate(seqs):
            if not finite[i]:
                step.failed.setdefault(seq, nan_logits(seq))
            if seq in step.failed:  # fails alone; finished before update: its blocks stay unpublished
                continue
            step.tokens[seq] = tokens[i]
            p = seq.sampling_params
            k = p.logprobs
            if k is not None or p.num_sequences > p.n and not p.is_beam_search:  # best_of ranks by them
                step.logprobs[seq] = (chosen[i], top[i][:k] if top is not None and k else [])
            if _returns_row(seq):
                step.logits_rows.append((seq, raw.get(i, launched.logits[i])))
        return step

    def _run(self, launched: LaunchedStep, hooks=None, failed: dict | None = None) -> SamplerOutput:
        """The sampler over the step's logits, queued on the device; the hooks' per-sequence
        failures into `failed`. (Queued before any step launched after this one: that replay
        may reuse these logits.)"""
        logits = launched.logits
        batch = SamplingBatch.build(launched.to_sample, logits.shape[-1], logits.device, self.eos_token_ids)
        if hooks is not None:
            failed.update(hooks.apply(logits, batch))  # logits processors in place; the bitmask into batch
        return self.sampler(logits, batch)


def _returns_row(seq: Sequence) -> bool:
    """Whether `seq`'s logits row this step is returned: a generation_logits row, or the first
    token's (context_logits' last row)."""
    p = seq.sampling_params
    return p.return_generation_logits or p.return_context_logits and not seq.output_token_ids


def _rows_to_keep(seqs: list[Sequence], logits: torch.Tensor) -> dict[int, torch.Tensor]:
    """Copies of the returned rows that a logits processor is about to edit in place, by row: the
    logits returned are the model's (README). Taken after the edit, a processor's changes came back
    in generation_logits, and in context_logits' last row alone (the rows before it come from the
    prompt's pass, which no processor sees)."""
    return {i: logits[i].clone() for i, s in enumerate(seqs)
            if _returns_row(s) and (s.sampling_params.logits_processor is not None
                                    or s.sampling_params.apply_batched_logits_processor)}
