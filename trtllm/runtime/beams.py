"""Beam search: a request's k beams are k sequences that share KV blocks and fork copy-on-write.

    SamplingParams(beam_width=k, n<=k)  or TensorRT-LLM's  SamplingParams(use_beam_search=True, best_of=k, n<=k)
    with length_penalty, early_stopping (True | False | "never"), stop, stop_token_ids, min_tokens, max_tokens

The search is HF transformers' `generate(num_beams=k, do_sample=False, length_penalty,
early_stopping, num_return_sequences=n)`, step for step (transformers 5.x `_beam_search`):
each step every running beam's log_softmax(logits) is added to its score (the sum of its
tokens' log-probabilities), the best `keep = max(2, 1 + #stop ids) * k` continuations of all
k * V are taken; those that end (a stop token, a stop string, the length limit) and rank
among the first k become finished hypotheses, scored score / len(tokens) ** length_penalty,
of which the best k are kept; the best k that do not end are the next running beams. The
search ends when early_stopping=True and k hypotheses are finished; or when no running beam
can beat the worst of k finished ones (early_stopping=False: judged at the current length;
"never": at the longest possible one when length_penalty > 0); or at the length limit. The
outputs are the n best hypotheses, best first, each with its `cumulative_logprob`.

How it runs in the engine (kept out of the scheduler and sampler but for a few lines):
- `BeamGroup` holds the request's k `Sequence`s (`seq.beam` points back at it). Only the
  first beam, the leader, is queued; admitted (with slots for all k), it prefills the prompt
  while the others are parked: running, no blocks, nothing to compute
  (num_computed_tokens == num_tokens, which the scheduler skips).
- A step computes logits for every running beam like any decode (in the same batch, in the
  decode CUDA graphs: the graph sees k more sequences). The engine takes the beams' rows
  out of the sampler's hands (`take_beam_rows`; a decode-graph step of beams and greedy rows runs no
  sampler: the graph's NaN/Inf flags and picks serve, `graph_picks_serve`), the scheduler's `update`
  advances them without a token, and `step_groups` (runtime/beam_search.py) picks the continuations of all groups of
  one width at once (`select_beams`: one log-softmax + top-k over [groups, k * V] on the
  device, one copy back, queued behind a decode-graph step before the host waits for it:
  `queue_search`; `_advance`: the bookkeeping as numpy over the groups), then
  `fork`s: each new beam takes its parent's tokens and a reference to each of its parent's
  blocks (block_manager.fork), plus its new token (a beam that continues itself keeps its
  own). When a beam next writes into a block another
  beam holds (the partial last one), the block manager gives it a copy first
  (copy-on-write); full blocks stay shared for the rest of the search.
- Preemption takes a group whole: its blocks are freed and it starts again from its prompt
  (the search is deterministic, so it finds the same beams; the finished ones are found
  again too). A group that alone fills the pool ends as if at its length limit.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from trtllm.runtime.outputs import CompletionOutput
from trtllm.runtime.sampler import argmax_serves
from trtllm.runtime.sequence import Sequence, SequenceStatus
from trtllm.runtime.tokenizer import IncrementalDetokenizer, find_stop_span, special_stop_tokens
from trtllm.sampling_params import SamplingParams

NEG = -1.0e9  # HF's score of an impossible beam
NEG32 = np.float32(NEG)


class Hypothesis:
    """A finished beam: its tokens, the sum of their log-probabilities, why it ended."""

    __slots__ = ("tokens", "cumulative_logprob", "stop_reason", "stopped", "logits")

    def __init__(self, tokens: list[int], cumulative_logprob: float, stop_reason, stopped: bool,
                 logits: list[Tensor] | None = None):
        self.tokens, self.cumulative_logprob = tokens, cumulative_logprob
        self.stop_reason, self.stopped = stop_reason, stopped
        self.logits = logits  # return_generation_logits: the row each token was picked from


class BeamGroup:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], max_seq_len: int, tokenizer=None, lora_request=None, multimodal=None):
        self.params, self.width = params, params.num_beams
        self.prompt_len = len(prompt_token_ids)
        self.max_new = min(params.max_tokens, max_seq_len - self.prompt_len)  # the length limit
        self.stop_ids = sorted({*([] if params.ignore_eos else params.eos_ids(eos_token_ids)), *params.stop_token_ids})
        self.keep = max(2, 1 + len(self.stop_ids)) * self.width  # HF's beams_to_keep
        self.tokenizer = tokenizer if params.detokenize else None
        self.special_stops = special_stop_tokens(self.tokenizer, params)  # stop strings matched as their token
        # every beam carries the request's adapter (the scheduler pins it for each) and its images (the
        # leader's prefill splices them; a beam's block hashes start from them, as the leader's do)
        self.beams = [Sequence(request_id, list(prompt_token_ids), params, index=i, lora_request=lora_request,
                               multimodal=multimodal) for i in range(self.width)]
        for b in self.beams:
            b.beam = self
        self.rows: dict[Sequence, tuple[Tensor, int]] = {}  # beam -> (a step's logits, its row)
        # return_generation_logits: each running beam's rows so far, and this step's raw row (CPU)
        self.logit_rows: list[list[Tensor]] = [[] for _ in self.beams]
        self.step_logits: dict[Sequence, Tensor] = {}
        self.done = False
        self._reset()

    def _reset(self) -> None:
        k = self.width
        self.scores = np.full(k, NEG, dtype=np.float32)  # running beams' summed logprobs
        self.scores[0] = 0.0  # only the first beam's continuations count at the first step
        self.started = False  # the first step has run (the followers have tokens)
        self.rows.clear()
        self.logit_rows = [[] for _ in range(k)]
        self.step_logits.clear()
        self.finished_scores = np.full(k, NEG, dtype=np.float32)  # length-penalised
        self.finished_real = np.zeros(k, dtype=bool)
        self.finished: list[Hypothesis | None] = [None] * k
        self.improvable = True  # HF's is_early_stop_heuristic_unsatisfied

    # -- the scheduler's side ----------------------------------------------------------
    def park_followers(self) -> list[Sequence]:
        """The beams after the leader, running with nothing to compute until the leader's
        first step forks them (the scheduler admits them with it)."""
        followers = self.beams[1:]
        for b in followers:
            b.status, b.num_computed_tokens = SequenceStatus.RUNNING, b.num_tokens
        return followers

    def restart(self) -> Sequence:
        """After preemption (every beam's blocks freed): back to the prompt; the leader, to queue."""
        for b in self.beams:
            b.output_token_ids.clear()
            b.status, b.num_computed_tokens = SequenceStatus.WAITING, 0
        self._reset()
        return self.beams[0]

    # -- the engine's side -------------------------------------------------------------
    def needed(self) -> list[Sequence]:
        """The beams whose logits rows a search step needs (the leader alone at the first)."""
        return self.beams if self.started else self.beams[:1]

    def row_beams(self) -> list[Sequence]:
        """Whose row each of the step's k candidates rows is (the leader's k times at the
        first step: HF's k copies of the prompt)."""
        return self.beams if self.started else [self.beams[0]] * self.width

    @property
    def ready(self) -> bool:
        """Every beam the next step needs has its logits row."""
        return not self.done and all(b in self.rows for b in self.needed())

    def candidates(self) -> list[tuple[Tensor, int]]:
        """This step's k logits rows, as (logits, index), in `row_beams` order; `step_groups`
        applies `min_tokens`."""
        return [self.rows[b] for b in self.row_beams()]

    def _hypothesis(self, parent: int, token: int, cumulative_logprob: float, cur: int,
                    logits: list[Tensor] | None) -> Hypothesis:
        """Beam `parent`'s tokens + `token` as a finished hypothesis (it ends: a stop id or
        string, or the length limit)."""
        outputs = self.beams[parent].output_token_ids
        reason, stopped = self._ends(outputs, token, cur) or (None, False)
        return Hypothesis(outputs + [token], cumulative_logprob, reason, stopped, logits)

    def _histories(self, parents: list[int]) -> list[list[Tensor]]:
        """Each candidate's generation logits: its parent's, then the row its token came from
        (at the first step, the leader's: every beam's row is a copy of it)."""
        rows = self.step_logits
        leader = rows.get(self.beams[0])
        out = [self.logit_rows[p] + [rows.get(self.beams[p], leader)] for p in parents]
        rows.clear()
        return out

    def _ends(self, outputs: list[int], token: int, cur: int) -> tuple | None:
        """(stop reason, stopped) if `outputs + [token]` ends: a stop token or string ((reason,
        True)), or the length limit ((None, False)); else None."""
        if token in self.stop_ids:  # the EOS (the model's or end_id) is no stop_reason, as OutputBuilder's
            return (token if token in self.params.stop_token_ids else None), True
        tokens = outputs + [token]
        if len(tokens) >= self.params.min_tokens:  # min_tokens holds stop strings off, as OutputBuilder's
            if token in self.special_stops:
                return self.special_stops[token], True
            if self.params.stop and self.tokenizer is not None:
                text, checked = self._text(tokens)
                span = find_stop_span(text, self.params.stop, checked)
                if span is not None:
                    return text[span[0]:span[1]], True
        return (None, False) if cur + 1 >= self.max_new else None

    def _text(self, ids: list[int]) -> tuple[str, int]:
        """(the text of output tokens, where stop strings are looked for in it), as the engine's
        incremental detokenizer and OutputBuilder make them for a sampled completion: decoded after
        the prompt's last tokens, so that a SentencePiece first "▁word" keeps its space (without the
        prompt, a beam's text lost it where a sampled completion's of the same tokens kept it); matches
        ending past the text of the first min_tokens - 1 tokens (min_tokens holds stop strings off:
        vLLM's rule), that text counted without an unfinished last character. One decoding pass."""
        detok = IncrementalDetokenizer(self.tokenizer, self.beams[0].prompt_token_ids, self.params.skip_special_tokens)
        held, checked = self.params.min_tokens - 1, 0
        for i, t in enumerate(ids):
            if i == held:
                checked = len(detok.text)
            detok.append(t)
        if 0 < held >= len(ids):
            checked = len(detok.text)
        detok.flush()
        return detok.text, checked

    def _fork(self, block_manager, parents: list[Sequence], tokens: list[int]) -> None:
        """The next running beams: beam j becomes parents[j] + tokens[j], sharing its blocks.
        A beam that continues itself keeps its blocks and its token list (appended to in
        place); only the others are re-pointed (block_manager.fork), after their parents'
        tokens are copied."""
        moved = [(b, p) for b, p in zip(self.beams, parents) if p is not b]
        state = {b: (list(p.output_token_ids), p.num_computed_tokens) for b, p in moved}
        if moved:
            block_manager.fork([b for b, _ in moved], [p for _, p in moved])
        for b, t in zip(self.beams, tokens):
            if b in state:
                out, b.num_computed_tokens = state[b]
                b.output_token_ids = out + [t]
            else:
                b.output_token_ids.append(t)

    def end_early(self) -> None:
        """The group can go no further (its beams alone fill the KV pool): the running beams
        count as hypotheses, as at the length limit."""
        if self.done:
            return
        self.done = True
        lp = self.params.length_penalty
        for b, score in zip(self.beams, self.scores.tolist()):
            if not b.output_token_ids or score <= NEG / 2:
                continue
            s = np.float32(score) / np.float32(len(b.output_token_ids) ** lp)
            worst = int(np.argmin(self.finished_scores))
            if s > self.finished_scores[worst]:
                self.finished[worst] = Hypothesis(list(b.output_token_ids), score, None, False,
                                                  self.logit_rows[b.index] or None)
                self.finished_scores[worst], self.finished_real[worst] = s, True
        order = _top(self.finished_scores, self.width)
        self.finished = [self.finished[i] for i in order]
        self.finished_scores, self.finished_real = self.finished_scores[order], self.finished_real[order]

    def results(self) -> list[CompletionOutput]:
        """The n best hypotheses, best first, as completions."""
        out = []
        for i, hyp in enumerate(h for h, real in zip(self.finished, self.finished_real.tolist()) if real):
            if i == self.params.n:
                break
            text = ""
            if self.tokenizer is not None:
                stop_token = hyp.stopped and not isinstance(hyp.stop_reason, str) \
                    and not self.params.include_stop_str_in_output
                # a stop token's text left out, as OutputBuilder's
                text, checked = self._text(hyp.tokens[:-1] if stop_token else hyp.tokens)
                span = find_stop_span(text, self.params.stop, checked) if isinstance(hyp.stop_reason, str) else None
                if span is not None:
                    text = text[:span[1] if self.params.include_stop_str_in_output else span[0]]
                elif isinstance(hyp.stop_reason, str) and self.params.include_stop_str_in_output:
                    text += hyp.stop_reason  # a special token's, left out of the text (special_stop_tokens)
            out.append(CompletionOutput(i, text, list(hyp.tokens), "stop" if hyp.stopped else "length",
                                        hyp.stop_reason, cumulative_logprob=hyp.cumulative_logprob,
                                        generation_logits=torch.stack(hyp.logits) if hyp.logits else None))
        return out


def _top(x: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest, largest first (the first on ties)."""
    return np.argsort(-x, kind="stable")[:k].tolist()


def take_beam_rows(to_sample: list[Sequence], logits: Tensor, sampled: dict) -> list[BeamGroup]:
    """Hand the beams' rows of a step's logits [len(to_sample), V] to their groups (as
    (logits, row): no device work here; `select_beams` reads them), and take them out of
    `sampled` (the sampler's token for a beam means nothing). The groups that got rows."""
    groups = {}
    for i, seq in enumerate(to_sample):
        if seq.beam is not None and seq in sampled:
            seq.beam.rows[seq] = (logits, i)
            del sampled[seq]
            groups[id(seq.beam)] = seq.beam
    return list(groups.values())


def graph_picks_serve(seqs: list[Sequence]) -> bool:
    """A decode-graph step with beams needs no sampler: every row is a beam whose logits go
    nowhere but the search (no generation or context logits returned; the sampler's token
    would be dropped), or a row whose token is the graph's own argmax pick
    (sampler.argmax_serves, and no grammar: its picks would need re-making). The graph's
    NaN/Inf flags then serve every row. False for a step without beams (the engine's own rule)."""
    others, beams = [], False
    for seq in seqs:
        p = seq.sampling_params
        if seq.beam is None:
            others.append(seq)
        elif p.return_generation_logits or p.return_context_logits:
            return False
        else:
            beams = True
    return beams and all(s.guide is None for s in others) and argmax_serves(others)
