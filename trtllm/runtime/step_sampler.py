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
ALL_MASKED = ("no token is left to sample: SamplingParams.bad / bad_token_ids (with the grammar "
              "or min_tokens, if any) mask every one")


@dataclass
class SampledStep:
    tokens: dict[Sequence, int | list[int]] = field(default_factory=dict)
    logprobs: dict[Sequence, tuple] = field(default_factory=dict)
    failed: dict[Sequence, str] = field(default_factory=dict)
    logits_rows: list[tuple[Sequence, torch.Tensor]] = field(default_factory=list)


class StepSampler:
    def __init__(self, logits_hooks: LogitsHooks, eos_token_ids: list[int]):
        self.sampler = Sampler()
        self.logits_hooks, self.eos_token_ids = logits_hooks, eos_token_ids

    def sample(self, launched: LaunchedStep, picks_serve: bool, speculative=None) -> SampledStep:
        """Waits for the step; each sequence's token (see the module docstring). A row with
        NaN or Inf logits, or one whose every token is masked, fails alone."""
        seqs = launched.to_sample
        if not seqs:
            return SampledStep()
        # a decode-graph step of beams (and greedy rows): the beams' rows go to the search
        # (take_beam_rows); the graph's picks and NaN/Inf flags serve (runtime/beams.py)
        picks_serve = picks_serve or launched.picks is not None and graph_picks_serve(seqs)
        # the grammar bitmasks are filled on the host while the GPU computes the logits
        hooks = None if picks_serve else self.logits_hooks.prepare(seqs)
        # Without hooks (which may read logits on the host) the sampler's ~20 small kernels are
        # queued now, behind the step's: launched after the wait, each left the GPU idle for its
        # launch (~0.9 ms after a 2,048-token prefill graph on the H100, 2026-12-06 profile).
        early = None if picks_serve or hooks is not None or launched.num_rows is not None \
            or not launched.logits_in_stream_order else self._run(launched)
        launched.wait()
        if launched.num_rows is not None:  # a verify step: runtime/speculative
            tokens, logprobs, failed = speculative.sample(launched, self.sampler)
            return SampledStep(tokens, logprobs, failed)
        step = SampledStep()
        if picks_serve:
            tokens, finite = launched.picks.tolist()  # picked inside the decode graph
            if all(finite):  # the usual step: no row failed, none wants logprobs
                step.tokens = dict(zip(seqs, tokens))
                return step
            chosen, top = None, None
        else:
            out = early if early is not None else self._run(launched, hooks, step.failed)
            tokens, finite = out.token_ids.tolist(), out.finite.tolist()
            if out.all_masked is not None:
                step.failed.update((seq, ALL_MASKED) for seq, m in zip(seqs, out.all_masked.tolist()) if m)
            chosen, top = out.host_logprobs()
        for i, seq in enumerate(seqs):
            if not finite[i]:
                step.failed.setdefault(seq, NAN_LOGITS)
            if seq in step.failed:  # fails alone; finished before update: its blocks stay unpublished
                continue
            step.tokens[seq] = tokens[i]
            p = seq.sampling_params
            k = p.logprobs
            if k is not None or p.num_sequences > p.n and not p.is_beam_search:  # best_of ranks by them
                step.logprobs[seq] = (chosen[i], top[i][:k] if top is not None and k else [])
            if p.return_generation_logits or p.return_context_logits and not seq.output_token_ids:
                step.logits_rows.append((seq, launched.logits[i]))
        return step

    def _run(self, launched: LaunchedStep, hooks=None, failed: dict | None = None) -> SamplerOutput:
        """The sampler over the step's logits, queued on the device; the hooks' per-sequence
        failures into `failed`. (Never a step with one launched after it: that replay may
        reuse these logits.)"""
        logits = launched.logits
        batch = SamplingBatch.build(launched.to_sample, logits.shape[-1], logits.device, self.eos_token_ids)
        if hooks is not None:
            failed.update(hooks.apply(logits, batch))  # logits processors in place; the bitmask into batch
        return self.sampler(logits, batch)
