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
  out of the sampler's hands (`take_beam_rows`), the scheduler's `update` advances them
  without a token, and `BeamGroup.step` picks the continuations, then `fork`s: each new beam
  takes its parent's tokens and a reference to each of its parent's blocks
  (block_manager.fork), plus its new token. When a beam next writes into a block another
  beam holds (the partial last one), the block manager gives it a copy first
  (copy-on-write); full blocks stay shared for the rest of the search.
- Preemption takes a group whole: its blocks are freed and it starts again from its prompt
  (the search is deterministic, so it finds the same beams; the finished ones are found
  again too). A group that alone fills the pool ends as if at its length limit.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from trtllm.runtime.outputs import CompletionOutput
from trtllm.runtime.sequence import Sequence, SequenceStatus
from trtllm.runtime.tokenizer import IncrementalDetokenizer, find_stop_span
from trtllm.sampling_params import SamplingParams

NEG = -1.0e9  # HF's score of an impossible beam
_NEG32 = np.float32(NEG)


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
                 eos_token_ids: list[int], max_seq_len: int, tokenizer=None):
        self.params, self.width = params, params.num_beams
        self.prompt_len = len(prompt_token_ids)
        self.max_new = min(params.max_tokens, max_seq_len - self.prompt_len)  # the length limit
        self.stop_ids = sorted({*([] if params.ignore_eos else eos_token_ids), *params.stop_token_ids})
        self.keep = max(2, 1 + len(self.stop_ids)) * self.width  # HF's beams_to_keep
        self.tokenizer = tokenizer if params.detokenize else None
        self.beams = [Sequence(request_id, list(prompt_token_ids), params, index=i) for i in range(self.width)]
        for b in self.beams:
            b.beam = self
        self.rows: dict[Sequence, tuple[Tensor, int]] = {}  # beam -> (a step's log-softmax rows, its row)
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
    @property
    def ready(self) -> bool:
        """Every beam the next step needs has its logits row."""
        need = self.beams if self.started else self.beams[:1]
        return not self.done and all(b in self.rows for b in need)

    def candidates(self) -> list[tuple[Tensor, int]]:
        """This step's k log-probability rows, as (rows, index) (the leader's k times at the
        first step: HF's k copies of the prompt); `step_groups` applies `min_tokens`."""
        return [self.rows[b] for b in self.beams] if self.started else [self.rows[self.beams[0]]] * self.width

    def advance(self, values: np.ndarray, index: np.ndarray, vocab: int, block_manager) -> bool:
        """One step of the search from the top `keep` of scores + log-probabilities over all
        k * V continuations (values, flat indices; best first). True when the search is over."""
        k, params = self.width, self.params
        self.rows.clear()
        cur = len(self.beams[0].output_token_ids)  # tokens every running beam has
        parents, tokens = (index // vocab).tolist(), (index % vocab).tolist()
        ends = [self._ends(self.beams[p].output_token_ids, t, cur) for p, t in zip(parents, tokens)]
        hit = np.array([e is not None for e in ends])
        history = self._histories(parents) if self.params.return_generation_logits else [None] * len(parents)

        # the best k continuations that do not end run on
        running = values + hit.astype(np.float32) * _NEG32
        nxt = _top(running, k)

        # those ending among the first k join the finished ones if they rank among the best k
        # (float32 throughout, as HF computes it: the same scores, the same order)
        just = hit & (np.arange(len(ends)) < k)
        cand = values / np.float32((cur + 1) ** params.length_penalty)
        cand = cand + np.float32(bool(self.finished_real.all()) and params.early_stopping is True) * _NEG32
        cand = cand + np.float32(not self.improvable) * _NEG32
        cand = cand + (~just).astype(np.float32) * _NEG32
        merged = np.concatenate((self.finished_scores, cand))
        top = _top(merged, k)
        finished = []
        for i in top:
            if i < k:
                finished.append(self.finished[i])
            else:
                j = i - k
                p, (reason, stopped) = self.beams[parents[j]], ends[j] or (None, False)
                finished.append(Hypothesis(p.output_token_ids + [tokens[j]], float(values[j]), reason, stopped,
                                           history[j]))
        self.finished_real = np.concatenate((self.finished_real, just))[top]
        self.finished, self.finished_scores = finished, merged[top]

        self.scores = running[nxt]
        self.started = True
        # HF's stopping rule, at the new length cur + 1
        never = params.early_stopping == "never" and params.length_penalty > 0.0
        best = self.scores[0] / np.float32((self.max_new if never else cur + 1) ** params.length_penalty)
        worst = np.where(self.finished_real, self.finished_scores.min(), _NEG32)
        self.improvable = self.improvable and bool((best > worst).any())
        all_done = bool(self.finished_real.all()) and params.early_stopping is True
        if not self.improvable or all_done or bool(hit.all()):
            self.done = True
            return True
        self._fork(block_manager, [self.beams[parents[j]] for j in nxt], [tokens[j] for j in nxt])
        if self.params.return_generation_logits:
            self.logit_rows = [history[j] for j in nxt]
        return False

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
        if token in self.stop_ids:
            return token, True
        if self.params.stop and self.tokenizer is not None:
            text = _text(self.tokenizer, outputs + [token], self.params.skip_special_tokens)
            span = find_stop_span(text, self.params.stop, 0)
            if span is not None:
                return text[span[0]:span[1]], True
        return (None, False) if cur + 1 >= self.max_new else None

    def _fork(self, block_manager, parents: list[Sequence], tokens: list[int]) -> None:
        """The next running beams: beam j becomes parents[j] + tokens[j], sharing its blocks."""
        outputs = [list(p.output_token_ids) for p in parents]
        computed = [p.num_computed_tokens for p in parents]
        block_manager.fork(self.beams, parents)
        for b, out, t, c in zip(self.beams, outputs, tokens, computed):
            b.output_token_ids = out + [t]
            b.num_computed_tokens = c

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
                text = _text(self.tokenizer, hyp.tokens, self.params.skip_special_tokens)
                if isinstance(hyp.stop_reason, str):
                    span = find_stop_span(text, self.params.stop, 0)
                    text = text[:span[1] if self.params.include_stop_str_in_output else span[0]]
            out.append(CompletionOutput(i, text, list(hyp.tokens), "stop" if hyp.stopped else "length",
                                        hyp.stop_reason, cumulative_logprob=hyp.cumulative_logprob,
                                        generation_logits=torch.stack(hyp.logits) if hyp.logits else None))
        return out


def _text(tokenizer, ids: list[int], skip_special_tokens: bool) -> str:
    """The text of output tokens, as the engine's incremental detokenizer makes it."""
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens)
    return "".join(detok.append(t) for t in ids) + detok.flush()


def _top(x: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest, largest first (the first on ties)."""
    return np.argsort(-x, kind="stable")[:k].tolist()


def step_groups(groups: list[BeamGroup], block_manager) -> list[BeamGroup]:
    """One search step of each group whose rows have all come: the device work batched
    (one top-k for all groups of one width: [G, k * V] -> [G, keep], one copy to the host),
    the bookkeeping per group on the host. The groups whose search ended."""
    shapes = defaultdict(list)
    for g in groups:
        if g.ready:
            shapes[g.width, g.keep].append(g)
    ended = []
    for (k, keep), gs in shapes.items():
        rows = [row for g in gs for row in g.candidates()]
        source = rows[0][0]
        if all(t is source for t, _ in rows):  # one step's rows (always, beams run in lockstep): one gather
            index = torch.tensor([i for _, i in rows], device=source.device)
            logp = source.index_select(0, index).view(len(gs), k, -1)
        else:
            logp = torch.stack([t[i] for t, i in rows]).view(len(gs), k, -1)
        vocab = logp.shape[-1]
        masked = [i for i, g in enumerate(gs) if len(g.beams[0].output_token_ids) < g.params.min_tokens]
        if masked:
            logp = logp.clone()
            for i in masked:  # HF's min_new_tokens: the stop ids cannot end a beam yet
                logp[i, :, gs[i].stop_ids] = float("-inf")
        scores = torch.from_numpy(np.stack([g.scores for g in gs])).to(logp.device)
        acc = (logp + scores[:, :, None]).view(len(gs), k * vocab)
        values, index = torch.topk(acc, min(keep, k * vocab))
        values, index = values.cpu().numpy(), index.cpu().numpy()
        for i, g in enumerate(gs):
            if g.advance(values[i], index[i], vocab, block_manager):
                ended.append(g)
    return ended


def take_beam_rows(to_sample: list[Sequence], logits: Tensor, sampled: dict) -> list[BeamGroup]:
    """Move the beams' rows of a step's logits [len(to_sample), V] into their groups, as
    fp32 log-softmax (one batched op), and out of `sampled` (the sampler's token for a beam
    means nothing). The groups that got rows."""
    rows = [i for i, s in enumerate(to_sample) if s.beam is not None and s in sampled]
    if not rows:
        return []
    logp = logits[torch.tensor(rows, device=logits.device)].float().log_softmax(-1)
    groups = {}
    for i, r in enumerate(rows):
        seq = to_sample[r]
        seq.beam.rows[seq] = (logp, i)
        del sampled[seq]
        groups[id(seq.beam)] = seq.beam
    return list(groups.values())
