"""`SpeculativeDecoder`: what the engine asks of speculative decoding, each step.

    decoder.propose(scheduler.running, waiting=scheduler.waiting)   # before schedule: drafts set
                                               # (under a pipeline: those no micro-batch holds)
    scheduled = scheduler.schedule()           # a decode with drafts computes 1 + k tokens
    launched = runner.execute(scheduled)       # its k + 1 logits rows (launched.num_rows)
    sampled, logprobs, failed = decoder.sample(launched, sampler)   # seq -> [tokens]
    scheduler.update(scheduled, sampled)       # accepted tokens in, rejected KV slots rolled back
    reason = append_tokens(req, seq, tokens)   # stop checks token by token; a stop cuts the run

Who speculates: a running sequence with one token left to compute (decoding), no
logprobs asked (its tokens' logprobs are not computed on the verify path: such a request
decodes one token a step), and room left: k = min(max_draft_len, max_tokens - outputs - 1,
max_seq_len - tokens - 1), so the step's 1..k+1 new tokens never pass max_tokens or
max_seq_len. Under verify CUDA graphs (`uniform_verify`) max_tokens does not shorten k: a
sequence near its end verifies max_draft_len drafts like the others, and the stop checks cut
its run at max_tokens (`append_tokens`); a shorter k would make the step ragged, which no
verify graph serves (bench_speculative's batch-32 row: a last step of 2 tokens each, 1.24 s
the first time, against 11.2 ms a graphed one, H200). Drafts past max_tokens count in neither
the draft nor the accepted totals. For the same reason, under verify graphs a sequence whose
n-gram lookup found nothing drafts its last token repeated while another sequence of the step
has drafts. Other sequences in the same step decode or prefill as always; their rows are
sampled by the ordinary sampler.

Back-off: a sequence whose drafts were all rejected MISSES_TO_BACK_OFF verify steps in a
row decodes without drafts for its next FIRST_BACK_OFF tokens, then tries again; each
back-off doubles, up to MAX_BACK_OFF tokens; an accepted draft resets it. Under verify CUDA
graphs (`uniform_verify`) a backed-off sequence drafts anyway while another sequence of the
step does, so the step keeps one draft length and its graph. A verify step
that gains one token costs the draft's k steps and a k + 1-token target pass (H200, an 8B
target at batch 1, 0% acceptance: 0.47x the plain target); backed off, the sequence costs
a plain decode step. Only which steps speculate changes: the output stays the target's.
The engine launches the next step ahead (the overlap scheduler) after a decode step
none of whose sequences speculates at the next (`speculates_next`).
"""
from __future__ import annotations

import itertools

import torch

from trtllm.hidden_states import HiddenStatesContext
from trtllm.runtime.model_runner import LaunchedStep
from trtllm.runtime.sampler import (
    Sampler,
    SamplingBatch,
    _finite_rows,
    argmax_serves,
    draw_tokens,
    greedy_picks,
    process_logits,
)
from trtllm.runtime.sequence import Sequence, SequenceStatus
from trtllm.runtime.speculative.draft_model import DraftModelProposer
from trtllm.runtime.speculative.ngram import propose_ngram
from trtllm.runtime.speculative.verify import greedy_accept, rejection_sample, verify_generator
from trtllm.runtime.step_sampler import nan_logits

MISSES_TO_BACK_OFF = 2  # verify steps in a row with no draft accepted
FIRST_BACK_OFF, MAX_BACK_OFF = 4, 64  # tokens decoded without drafts, doubling after each


class SpeculativeDecoder:
    def __init__(self, max_draft_len: int, max_seq_len: int, vocab_size: int, eos_token_ids: list[int], *,
                 max_matching_ngram_size: int | None = None, draft: DraftModelProposer | None = None,
                 verify_cuda_graphs: bool | None = None, attach_target=None):
        if (max_matching_ngram_size is None) == (draft is None):
            raise ValueError("a SpeculativeDecoder takes one proposer: an n-gram size or a draft model")
        self.max_draft_len, self.max_seq_len = max_draft_len, max_seq_len
        self.vocab_size, self.eos_token_ids = vocab_size, eos_token_ids
        self.max_matching_ngram_size, self.draft = max_matching_ngram_size, draft
        self.verify_cuda_graphs = verify_cuda_graphs  # build_engine captures them unless False (on a GPU)
        # verify steps replay graphs of every sequence verifying max_draft_len drafts (set by build_engine
        # once captured): every speculating sequence of a step then drafts max_draft_len (see propose)
        self.uniform_verify = False
        self._attach_target = attach_target  # an EAGLE-3 head's: see attach_target
        self._draft_probs: dict[Sequence, torch.Tensor] = {}
        # back-off (module docstring): seq -> [verify steps in a row with none accepted, the
        # next back-off in tokens, num_tokens from which it speculates again]
        self._back_off: dict[Sequence, list[int]] = {}
        # totals since start (EngineStats): draft tokens proposed and verified, accepted, verify rows
        self.num_draft_tokens = self.num_accepted_tokens = self.num_verify_steps = 0

    def attach_target(self, num_slots: int) -> HiddenStatesContext | None:
        """Once the target's pool of num_slots KV slots is sized: the hidden-state store its
        runner writes for an EAGLE-3 head (which gets its own runner and pool now), else None."""
        return self._attach_target(num_slots) if self._attach_target is not None else None

    # -- before the step ------------------------------------------------------------
    def draft_len(self, seq: Sequence, back_off: bool = True) -> int:
        """Drafts `seq` may verify at its next step (0: it decodes plainly); `back_off`: 0 while
        it is backed off."""
        if seq.status is not SequenceStatus.RUNNING or seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        p = seq.sampling_params
        if p.logprobs is not None:
            return 0
        if back_off and self._backed_off(seq):
            return 0
        room = self.max_seq_len - seq.num_tokens - 1
        if not self.uniform_verify:  # else drafts past max_tokens keep the step's graph (docstring)
            room = min(room, _output_room(seq))
        return max(0, min(self.max_draft_len, room))

    def _backed_off(self, seq: Sequence) -> bool:
        back_off = self._back_off.get(seq)
        return back_off is not None and seq.num_tokens < back_off[2]

    def propose(self, running: list[Sequence], in_flight: set[Sequence] | frozenset = frozenset(),
                waiting=()) -> None:
        """Set each running sequence's draft_token_ids ([] where it does not speculate), but
        those `in_flight` (pipeline parallelism: a micro-batch holds them, with their drafts,
        until its logits come back; runtime/micro_batches.py). `waiting`: the sequences the
        step's schedule may admit."""
        self._draft_probs = {seq: q for seq, q in self._draft_probs.items() if seq in in_flight}
        if self._back_off:  # forget the sequences that left
            live = set(running)
            for seq in [s for s in self._back_off if s not in live]:
                del self._back_off[seq]
        seqs, ks = [], []
        # a verify step samples its plain rows itself, without the engine's grammar bitmasks,
        # logits processors or beam search: while such a sequence runs, or waits (the schedule
        # after this may admit it and sample its first token), no step speculates (left: those
        # paths inside verify steps)
        engine_sampled = any(_needs_engine_sampling(s) for s in itertools.chain(running, waiting))
        candidates = []  # (sequence, k, backed off)
        for seq in running:
            if seq in in_flight:
                continue
            seq.draft_token_ids = []
            k = 0 if engine_sampled else self.draft_len(seq, back_off=False)
            if k > 0:
                candidates.append((seq, k, self._backed_off(seq)))
        # A step whose sequences verify different numbers of tokens runs outside the verify graphs
        # (cuda_graphs.verify_size): under them, a backed-off sequence drafts too while another one
        # does (a row more in the batched draft steps, k tokens more in a verify step that has them).
        # (H200, the demo model's EAGLE-3 head at batch 16, before: a round took ~21 ms against ~2.2 ms at batch 1)
        everyone = self.uniform_verify and any(not backed for _, _, backed in candidates)
        for seq, k, backed in candidates:
            if everyone or not backed:
                seqs.append(seq)
                ks.append(k)
        if self.draft is not None:
            live = {s.seq_id for s in running}
            if not seqs:  # still free the mirrors of sequences that left
                self.draft.propose([], [], live)
                return
            for seq, (tokens, q) in zip(seqs, self.draft.propose(seqs, ks, live)):
                seq.draft_token_ids = tokens
                if q is not None:
                    self._draft_probs[seq] = q
        else:
            for seq, k in zip(seqs, ks):
                seq.draft_token_ids = propose_ngram(seq.token_ids, k, self.max_matching_ngram_size)
            if self.uniform_verify and any(seq.draft_token_ids for seq in seqs):
                # a sequence whose lookup found nothing verifies its last token repeated, so the
                # step keeps one verify graph's shape (ragged, it ran op by op: docstring)
                for seq, k in zip(seqs, ks):
                    if not seq.draft_token_ids:
                        seq.draft_token_ids = [seq.token_at(seq.num_tokens - 1)] * k

    def speculates_next(self, seqs: list[Sequence]) -> bool:
        """Whether any of `seqs` may get drafts at the step after the one that gives it its
        next token: False only when each is backed off past that token."""
        for seq in seqs:
            back_off = self._back_off.get(seq)
            if back_off is None or seq.num_tokens + 1 >= back_off[2]:
                return True
        return False

    def release(self) -> None:
        """No sequence runs any more (the engine is idle): free all a draft model holds."""
        self._back_off.clear()
        if self.draft is not None:
            self.draft.propose([], [], set())

    # -- after the target ran ---------------------------------------------------------
    @torch.no_grad()
    def sample(self, launched: LaunchedStep, sampler: Sampler
               ) -> tuple[dict[Sequence, int | list[int]], dict, dict[Sequence, str]]:
        """Every sampled sequence's new token (an int) or tokens (a list: accepted drafts,
        then the target's own), logprobs of the plain rows that asked, and the sequences
        whose logits were NaN / Inf (to finish with "error")."""
        seqs, counts, logits = launched.to_sample, launched.num_rows, launched.logits
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        sampled, logprobs, failed = {}, {}, {}
        plain = [i for i, c in enumerate(counts) if c == 1]
        if plain:
            rows = logits[torch.tensor([starts[i] for i in plain], device=logits.device)]
            pseqs = [seqs[i] for i in plain]
            out = sampler(rows, SamplingBatch.build(pseqs, rows.shape[-1], rows.device, self.eos_token_ids))
            tokens, finite = out.token_ids.tolist(), out.finite.tolist()
            chosen, top = out.host_logprobs()
            for j, seq in enumerate(pseqs):
                if not finite[j]:
                    failed[seq] = nan_logits(seq)
                    continue
                sampled[seq] = tokens[j]
                k = seq.sampling_params.logprobs
                if k is not None:
                    logprobs[seq] = (chosen[j], top[j][:k] if top is not None else [])
        spec = [i for i, c in enumerate(counts) if c > 1]
        if spec:
            self._verify([seqs[i] for i in spec], logits, [(starts[i], counts[i]) for i in spec], sampled, failed)
        for seq in seqs:  # another micro-batch's keep theirs
            seq.draft_token_ids = []
            self._draft_probs.pop(seq, None)
        return sampled, logprobs, failed

    def _verify(self, seqs: list[Sequence], logits: torch.Tensor, spans: list[tuple[int, int]],
                sampled: dict, failed: dict) -> None:
        """Accepted drafts + one token per speculating sequence (verify.py)."""
        if sum(n for _, n in spans) == logits.shape[0]:  # every row verifies (no plain row between)
            x = logits  # [sum(k_i + 1), V]
        else:
            index = torch.tensor([r for start, n in spans for r in range(start, start + n)], device=logits.device)
            x = logits[index]
        if argmax_serves(seqs):  # greedy, no penalty: the raw argmax is the sampler's pick
            # greedy_picks: the decode graphs' argmax and finite check, in few launches, one read
            picks, finite = greedy_picks(x).tolist()
        else:  # each row as the sampler sees it: outputs so far plus the drafts before it
            finite = _finite_rows(x)
            x = torch.where(finite[:, None], x.float(), 0.0)
            rows = [_after_drafts(seq, j) for seq, (_, n) in zip(seqs, spans) for j in range(n)]
            batch = SamplingBatch.build(rows, self.vocab_size, x.device, self.eos_token_ids)
            x = process_logits(x, batch)
            picks, finite = draw_tokens(x, batch).tolist(), finite.tolist()
        row = 0
        for seq, (_, n) in zip(seqs, spans):
            draft = seq.draft_token_ids[:n - 1]
            target, ok = picks[row:row + n], all(finite[row:row + n])
            q = self._draft_probs.get(seq)
            if not ok:
                failed[seq] = nan_logits(seq)
            elif q is None or seq.sampling_params.greedy:
                sampled[seq] = greedy_accept(draft, target)
            else:
                g = verify_generator(x.device, seq.seed, seq.index, len(seq.output_token_ids))
                sampled[seq] = rejection_sample(x[row:row + n].softmax(-1), q[:n - 1].to(x.device), draft, g,
                                                bonus=target[-1])
            row += n
            if seq in sampled:
                accepted = len(sampled[seq]) - 1
                room = _output_room(seq)  # the drafts past it only kept the step uniform
                drafted, kept = min(len(draft), room), min(accepted, room)
                seq.num_draft_tokens += drafted
                seq.num_accepted_draft_tokens += kept
                seq.num_verify_steps += int(drafted > 0)  # its last token alone: a plain decode's
                self.num_draft_tokens += drafted
                self.num_accepted_tokens += kept
                self.num_verify_steps += int(drafted > 0)
                self._count_misses(seq, accepted)

    def _count_misses(self, seq: Sequence, accepted: int) -> None:
        """The back-off's books after a verify step of `seq` (module docstring)."""
        if accepted:
            self._back_off.pop(seq, None)
            return
        back_off = self._back_off.setdefault(seq, [0, FIRST_BACK_OFF, 0])
        back_off[0] += 1
        if back_off[0] >= MISSES_TO_BACK_OFF:  # from the token after this step's, for back_off[1] tokens
            back_off[0], back_off[2] = 0, seq.num_tokens + 1 + back_off[1]
            back_off[1] = min(2 * back_off[1], MAX_BACK_OFF)


def _output_room(seq: Sequence) -> int:
    """Draft tokens that can become output before max_tokens: the target's own token after
    them is the last one."""
    return max(0, seq.sampling_params.max_tokens - len(seq.output_token_ids) - 1)


def _after_drafts(seq: Sequence, j: int) -> Sequence:
    """A stand-in for `seq` with its first j draft tokens as outputs: what the sampler's
    penalties, min_tokens and noise (keyed on the output length) see at verify row j."""
    if j == 0:
        return seq
    return Sequence(seq.request_id, seq.prompt_token_ids, seq.sampling_params, index=seq.index,
                    output_token_ids=seq.output_token_ids + seq.draft_token_ids[:j], seed=seq.seed)


def append_tokens(req, seq: Sequence, tokens: list[int]) -> str | None:
    """A verify step's tokens (already in seq.output_token_ids, by Scheduler.update) into
    the request's output one by one, with the stop checks after each; a stop inside the run
    cuts it there: the tokens after it leave the sequence (and their K/V, computed, is never
    read: the sequence finishes now)."""
    for j, token in enumerate(tokens):
        reason = req.append(seq, token, None)
        if reason is not None:
            cut = len(tokens) - j - 1
            if cut:
                del seq.output_token_ids[-cut:]
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.num_tokens - 1)
            return reason
    return None


def _needs_engine_sampling(seq: Sequence) -> bool:
    """A grammar's matcher, a beam search, logits processors or returned logits: rows the
    engine's own sampling path must take, one token a step."""
    p = seq.sampling_params
    return seq.guide is not None or seq.beam is not None or p.reads_logits or p.logits_processor is not None \
        or p.apply_batched_logits_processor
