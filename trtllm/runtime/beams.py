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
  advances them without a token, and `step_groups` picks the continuations of all groups of
  one width at once (`select_beams`: one log-softmax + top-k over [groups, k * V] on the
  device, one copy back; `_advance`: the bookkeeping as numpy over the groups), then
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

from collections import defaultdict

import numpy as np
import torch
from torch import Tensor

from trtllm.runtime.outputs import CompletionOutput
from trtllm.runtime.sampler import argmax_serves
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
                 eos_token_ids: list[int], max_seq_len: int, tokenizer=None, lora_request=None, multimodal=None):
        self.params, self.width = params, params.num_beams
        self.prompt_len = len(prompt_token_ids)
        self.max_new = min(params.max_tokens, max_seq_len - self.prompt_len)  # the length limit
        self.stop_ids = sorted({*([] if params.ignore_eos else params.eos_ids(eos_token_ids)), *params.stop_token_ids})
        self.keep = max(2, 1 + len(self.stop_ids)) * self.width  # HF's beams_to_keep
        self.tokenizer = tokenizer if params.detokenize else None
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
    @property
    def ready(self) -> bool:
        """Every beam the next step needs has its logits row."""
        need = self.beams if self.started else self.beams[:1]
        return not self.done and all(b in self.rows for b in need)

    def candidates(self) -> list[tuple[Tensor, int]]:
        """This step's k logits rows, as (logits, index) (the leader's k times at the first
        step: HF's k copies of the prompt); `step_groups` applies `min_tokens`."""
        return [self.rows[b] for b in self.beams] if self.started else [self.rows[self.beams[0]]] * self.width

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
        if token in self.stop_ids:
            return token, True
        if self.params.stop and self.tokenizer is not None:
            text = _text(self.tokenizer, outputs + [token], self.params.skip_special_tokens)
            span = find_stop_span(text, self.params.stop, 0)
            if span is not None:
                return text[span[0]:span[1]], True
        return (None, False) if cur + 1 >= self.max_new else None

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
    (`select_beams`: one gather, log-softmax and top-k for all groups of one width,
    [G * k, V] -> [G, keep], one copy to the host), the bookkeeping too (`_advance`: numpy
    over [G, keep], Python only for hypotheses that finish and for the forks). The groups
    whose search ended."""
    shapes = defaultdict(list)
    for g in groups:
        if g.ready:
            shapes[g.width, g.keep].append(g)
    ended = []
    for (k, keep), gs in shapes.items():
        rows = [row for g in gs for row in g.candidates()]
        source = rows[0][0]
        if all(t is source for t, _ in rows):  # one step's rows (always, beams run in lockstep): one gather
            logits, index = source, [i for _, i in rows]
        else:
            logits, index = torch.stack([t[i] for t, i in rows]), list(range(len(rows)))
        vocab = logits.shape[-1]
        # HF's min_new_tokens: the stop ids cannot end a beam yet
        masked = [(i, t) for i, g in enumerate(gs) if len(g.beams[0].output_token_ids) < g.params.min_tokens
                  for t in g.stop_ids]
        values, flat = select_beams(logits, torch.tensor(index, device=logits.device),
                                    torch.from_numpy(np.stack([g.scores for g in gs])).to(logits.device),
                                    min(keep, k * vocab), masked or None)
        ended += _advance(gs, values, flat, vocab, block_manager)
    return ended


def select_beams(logits: Tensor, index: Tensor, scores: Tensor, keep: int,
                 masked: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The search's device work for G groups of width k, in one batched pass, no loop over groups:

        logp[g, j]   = log_softmax(float(logits[index[g * k + j]]))     [G, k, V]
        logp[g, :, t] = -inf  for each (g, t) in `masked`               (min_tokens: stop ids)
        acc[g]        = (logp[g] + scores[g, :, None]).flatten()        [G, k * V]
        values, flat  = topk(acc, keep)                                 [G, keep] each

    logits [N, V] (any float dtype: the step's rows), index [G * k] int64 (a beam's row;
    the leader's k times at a group's first step), scores [G, k] fp32 (the running beams'
    summed log-probabilities). HF's `_beam_search` arithmetic, op for op (log_softmax in
    fp32, then the add), so the same scores and the same order (equal ones by flat index:
    torch.topk leaves ties in an order of its own). Returns numpy arrays on the
    host (values fp32, flat indices int64: parent = flat // V, token = flat % V): the
    step's one device-to-host copy (two tensors, one wait)."""
    G, k = scores.shape
    if index.shape != (G * k,):
        raise ValueError(f"index {tuple(index.shape)} does not match scores {tuple(scores.shape)}: one row per beam")
    vocab = logits.shape[-1]
    logp = logits.index_select(0, index).float().log_softmax(-1).view(G, k, vocab)
    if masked:
        g, t = zip(*masked)
        logp[torch.tensor(g, device=logp.device), :, torch.tensor(t, device=logp.device)] = float("-inf")
    # The group's best `keep` of k * V are among its rows' best `keep` each (a row's score is
    # one constant added to all of it), so the top-k runs per row and then over k * keep
    # candidates: the same values, added as above (one top-k over [G, k * V] took most of a
    # 0.34 ms step on the H100 at V = 128,256, bench/probes/beam_step.py).
    per_row = min(keep, vocab)
    row_values, row_tokens = torch.topk(logp, per_row)  # [G, k, per_row] each
    acc = (row_values + scores[:, :, None]).view(G, k * per_row)
    values, j = torch.topk(acc, keep)  # j = parent * per_row + the rank in its row
    flat = (j // per_row) * vocab + row_tokens.view(G, k * per_row).gather(1, j)
    values, flat = values.cpu().numpy(), flat.cpu().numpy()
    # equal values in the order of their flat index, as one top-k over [G, k * V] gives them
    # (torch's on the CPU; the two-stage one ranks them by row first): bf16 logits tie often
    order = np.lexsort((flat, -values), axis=-1)
    return np.take_along_axis(values, order, -1), np.take_along_axis(flat, order, -1)


def _advance(gs: list[BeamGroup], values: np.ndarray, flat: np.ndarray, vocab: int, block_manager) -> list[BeamGroup]:
    """One step of the search of G groups of one width k, from the top `keep` of scores +
    log-probabilities over each group's k * V continuations (values [G, keep] fp32, flat
    indices [G, keep]; best first, `select_beams`). The groups whose search is over.

    As numpy over all G groups at once, float32 throughout as HF computes it (the same
    scores, the same order): the best k continuations that do not end run on; those that end
    (a stop id, a stop string, the length limit) and rank among the first k join the
    finished ones if they rank among the best k of them; then HF's stopping rule. Python
    runs per group only to make finished hypotheses and fork the beams."""
    G, keep = values.shape
    k = gs[0].width
    parents, tokens = flat // vocab, flat % vocab
    cur = [len(g.beams[0].output_token_ids) for g in gs]  # tokens every running beam of a group has
    stops = np.full((G, max(1, max(len(g.stop_ids) for g in gs))), -1, dtype=np.int64)
    for i, g in enumerate(gs):
        stops[i, :len(g.stop_ids)] = g.stop_ids
    at_limit = np.array([c + 1 >= g.max_new for c, g in zip(cur, gs)])
    hit = (tokens[:, :, None] == stops[:, None, :]).any(-1) | at_limit[:, None]
    for i, g in enumerate(gs):
        if g.params.stop and g.tokenizer is not None:  # stop strings: the text of each candidate
            hit[i] = [g._ends(g.beams[p].output_token_ids, t, cur[i]) is not None
                      for p, t in zip(parents[i].tolist(), tokens[i].tolist())]

    # the best k continuations that do not end run on
    running = values + hit.astype(np.float32) * _NEG32
    nxt = np.argsort(-running, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(running, nxt, 1)

    # those ending among the first k join the finished ones if they rank among the best k
    just = hit & (np.arange(keep) < k)
    early = np.array([g.params.early_stopping is True for g in gs])
    improvable = np.array([g.improvable for g in gs])
    real = np.stack([g.finished_real for g in gs])
    length = np.array([np.float32((c + 1) ** g.params.length_penalty) for c, g in zip(cur, gs)], dtype=np.float32)
    cand = values / length[:, None]
    cand = cand + (real.all(1) & early).astype(np.float32)[:, None] * _NEG32
    cand = cand + (~improvable).astype(np.float32)[:, None] * _NEG32
    cand = cand + (~just).astype(np.float32) * _NEG32
    merged = np.concatenate((np.stack([g.finished_scores for g in gs]), cand), axis=1)
    top = np.argsort(-merged, axis=1, kind="stable")[:, :k]
    real = np.take_along_axis(np.concatenate((real, just), axis=1), top, 1)
    finished_scores = np.take_along_axis(merged, top, 1)

    # HF's stopping rule, at the new length cur + 1 (early_stopping="never": at the longest
    # possible one when length_penalty > 0)
    best_length = np.array([np.float32((g.max_new if g.params.early_stopping == "never" and g.params.length_penalty > 0.0
                                        else c + 1) ** g.params.length_penalty) for c, g in zip(cur, gs)],
                           dtype=np.float32)
    best = scores[:, 0] / best_length
    worst = np.where(real, finished_scores.min(1, keepdims=True), _NEG32)
    improvable &= (best[:, None] > worst).any(1)
    done = ~improvable | (real.all(1) & early) | hit.all(1)

    ended = []
    rows = zip(gs, parents.tolist(), tokens.tolist(), top.tolist(), nxt.tolist(), improvable.tolist(), done.tolist())
    for i, (g, par, tok, top_i, nxt_i, improvable_i, done_i) in enumerate(rows):
        g.rows.clear()
        history = g._histories(par) if g.params.return_generation_logits else None
        if any(j >= k for j in top_i):  # a new finished hypothesis
            g.finished = [g.finished[j] if j < k else g._hypothesis(par[j - k], tok[j - k], float(values[i, j - k]),
                                                                     cur[i], None if history is None else history[j - k])
                          for j in top_i]
        g.finished_real, g.finished_scores = real[i], finished_scores[i]
        g.scores, g.improvable, g.started = scores[i], improvable_i, True
        if done_i:
            g.done = True
            ended.append(g)
            continue
        g._fork(block_manager, [g.beams[par[j]] for j in nxt_i], [tok[j] for j in nxt_i])
        if history is not None:
            g.logit_rows = [history[j] for j in nxt_i]
    return ended


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
