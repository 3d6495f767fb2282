"""One step of beam search for every group whose rows have come (runtime/beams.py says how beams
run in the engine): the device work for all groups of one width in one batched call
(`select_beams`), then the bookkeeping as numpy over the groups (`_advance`), Python only for
the hypotheses that finish and the forks."""
from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from trtllm.runtime.beams import NEG32, BeamGroup
from trtllm.runtime.sequence import Sequence


class QueuedSearch(NamedTuple):
    """The search's device work of one (width, keep) bucket, queued behind a decode-graph step
    before the host waits for it (`queue_search`); its result read back once done."""
    groups: list[BeamGroup]
    vocab: int
    keep: int
    host: Tensor                        # [G, 2 * keep] int64: pinned, filled once `done`
    done: torch.cuda.Event | None       # None on the CPU: `host` is the result

    def read(self) -> tuple[np.ndarray, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        return _read_select(self.host.numpy(), self.keep)


def queue_search(to_sample: list[Sequence], logits: Tensor) -> dict[tuple[int, int], QueuedSearch]:
    """`select_beams` of every group whose rows this step holds, queued on the device behind
    the step's kernels and copied back without waiting, so it runs as the step ends rather than
    after the host has woken, read the picks and dispatched its ~10 ops. `step_groups` uses a
    bucket's result when the same groups are ready there (a failed row makes a group not ready:
    the bucket is then searched again). Call only before anything changes a group's scores or
    its beams' outputs (it reads both)."""
    rows_of: dict[BeamGroup, dict[Sequence, int]] = {}
    for i, seq in enumerate(to_sample):
        if seq.beam is not None:
            rows_of.setdefault(seq.beam, {})[seq] = i
    ready = [g for g, rows in rows_of.items() if not g.done and all(b in rows for b in g.needed())]
    queued = {}
    for (k, keep), gs in _by_shape(ready).items():
        index = [rows_of[g][b] for g in gs for b in g.row_beams()]
        both = _launch_select(logits, index, gs, keep)
        done = None
        if both.is_cuda:
            host = torch.empty(both.shape, dtype=both.dtype, pin_memory=True)
            host.copy_(both, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        else:
            host = both
        queued[k, keep] = QueuedSearch(gs, logits.shape[-1], min(keep, k * logits.shape[-1]), host, done)
    return queued


def step_groups(groups: list[BeamGroup], block_manager,
                queued: dict[tuple[int, int], QueuedSearch] | None = None) -> list[BeamGroup]:
    """One search step of each group whose rows have all come: the device work batched
    (`select_beams`: one gather, log-softmax and top-k for all groups of one width,
    [G * k, V] -> [G, keep], one copy to the host; `queued` holds it already where
    `queue_search` launched it for the same groups), the bookkeeping too (`_advance`: numpy
    over [G, keep], Python only for hypotheses that finish and for the forks). The groups
    whose search ended."""
    ended = []
    for (k, keep), gs in _by_shape([g for g in groups if g.ready]).items():
        q = (queued or {}).get((k, keep))
        if q is not None and q.groups == gs:
            values, flat = q.read()
            vocab = q.vocab
        else:
            rows = [row for g in gs for row in g.candidates()]
            source = rows[0][0]
            if all(t is source for t, _ in rows):  # one step's rows (always, beams run in lockstep): one gather
                logits, index = source, [i for _, i in rows]
            else:
                logits, index = torch.stack([t[i] for t, i in rows]), list(range(len(rows)))
            vocab = logits.shape[-1]
            values, flat = _read_select(_launch_select(logits, index, gs, keep).cpu().numpy(), min(keep, k * vocab))
        ended += _advance(gs, values, flat, vocab, block_manager)
    return ended


def _by_shape(groups: list[BeamGroup]) -> dict[tuple[int, int], list[BeamGroup]]:
    """Groups by (width, keep), each bucket in the order given."""
    shapes = defaultdict(list)
    for g in groups:
        shapes[g.width, g.keep].append(g)
    return shapes


def _launch_select(logits: Tensor, index: list[int], gs: list[BeamGroup], keep: int) -> Tensor:
    """`select_beams`'s device part for the groups `gs` (one width) whose rows are logits[index]."""
    k = gs[0].width
    # HF's min_new_tokens: the stop ids cannot end a beam yet
    masked = [(i, t) for i, g in enumerate(gs) if len(g.beams[0].output_token_ids) < g.params.min_tokens
              for t in g.stop_ids]
    # the step's rows in their own order (beams are most of a beam step's batch): no gather
    in_order = index == list(range(logits.shape[0]))
    return _select_on_device(logits, None if in_order else _to_device(torch.tensor(index), logits.device),
                             _to_device(torch.from_numpy(np.stack([g.scores for g in gs])), logits.device),
                             min(keep, k * logits.shape[-1]), masked or None)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A host tensor on `device` without waiting for the stream (a pageable copy to the GPU waits
    for the work queued before it: queue_search's would wait for the step it follows)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def select_beams(logits: Tensor, index: Tensor | None, scores: Tensor, keep: int,
                 masked: list[tuple[int, int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The search's device work for G groups of width k, in one batched pass, no loop over groups:

        logp[g, j]   = log_softmax(float(logits[index[g * k + j]]))     [G, k, V]
        logp[g, :, t] = -inf  for each (g, t) in `masked`               (min_tokens: stop ids)
        acc[g]        = (logp[g] + scores[g, :, None]).flatten()        [G, k * V]
        values, flat  = topk(acc, keep)                                 [G, keep] each

    logits [N, V] (any float dtype: the step's rows), index [G * k] int64 (a beam's row;
    the leader's k times at a group's first step; None: the rows in order, N = G * k),
    scores [G, k] fp32 (the running beams' summed log-probabilities). HF's `_beam_search`
    arithmetic, op for op (log_softmax in fp32, then the add), so the same scores and the same
    order (equal ones by flat index: torch.topk leaves ties in an order of its own). Returns numpy arrays on the
    host (values fp32, flat indices int64: parent = flat // V, token = flat % V): the
    step's one device-to-host copy (one tensor, one wait)."""
    return _read_select(_select_on_device(logits, index, scores, keep, masked).cpu().numpy(), keep)


def _select_on_device(logits: Tensor, index: Tensor | None, scores: Tensor, keep: int,
                      masked: list[tuple[int, int]] | None) -> Tensor:
    """select_beams up to its copy to the host: [G, 2 * keep] int64, the values' fp32 bits
    beside the flat indices (one tensor: one copy, one wait)."""
    G, k = scores.shape
    rows = logits if index is None else logits.index_select(0, index)
    if rows.shape[0] != G * k:
        what = f"index {tuple(index.shape)}" if index is not None else f"logits {tuple(logits.shape)}"
        raise ValueError(f"{what} does not match scores {tuple(scores.shape)}: one row per beam")
    vocab = logits.shape[-1]
    logp = rows.float().log_softmax(-1).view(G, k, vocab)
    if masked:
        g, t = zip(*masked)
        logp[_to_device(torch.tensor(g), logp.device), :, _to_device(torch.tensor(t), logp.device)] = float("-inf")
    # The group's best `keep` of k * V are among its rows' best `keep` each (a row's score is
    # one constant added to all of it), so the top-k runs per row and then over k * keep
    # candidates: the same values, added as above (the one-stage select took 0.34 ms on the H100
    # at V = 128,256, bench/probes/beam_step.py; the top-k's share of it was not timed apart).
    per_row = min(keep, vocab)
    row_values, row_tokens = torch.topk(logp, per_row)  # [G, k, per_row] each
    acc = (row_values + scores[:, :, None]).view(G, k * per_row)
    values, j = torch.topk(acc, keep)  # j = parent * per_row + the rank in its row
    flat = (j // per_row) * vocab + row_tokens.view(G, k * per_row).gather(1, j)
    return torch.cat((values.view(torch.int32).to(torch.int64), flat), 1)


def _read_select(both: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """(values fp32, flat int64) [G, keep] from the copied-back [G, 2 * keep], equal values in
    the order of their flat index (torch.topk's own tie order is unspecified, and the two-stage
    one ranks them by row first): bf16 logits tie often."""
    values, flat = both[:, :keep].astype(np.int32).view(np.float32), both[:, keep:]
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
    running = values + hit.astype(np.float32) * NEG32
    nxt = np.argsort(-running, axis=1, kind="stable")[:, :k]
    scores = np.take_along_axis(running, nxt, 1)

    # those ending among the first k join the finished ones if they rank among the best k
    just = hit & (np.arange(keep) < k)
    early = np.array([g.params.early_stopping is True for g in gs])
    improvable = np.array([g.improvable for g in gs])
    real = np.stack([g.finished_real for g in gs])
    length = np.array([np.float32((c + 1) ** g.params.length_penalty) for c, g in zip(cur, gs)], dtype=np.float32)
    cand = values / length[:, None]
    cand = cand + (real.all(1) & early).astype(np.float32)[:, None] * NEG32
    cand = cand + (~improvable).astype(np.float32)[:, None] * NEG32
    cand = cand + (~just).astype(np.float32) * NEG32
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
    worst = np.where(real, finished_scores.min(1, keepdims=True), NEG32)
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
