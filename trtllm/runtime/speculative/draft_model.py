"""Draft-model proposer: a smaller model with the target's vocabulary proposes k tokens
for each speculating sequence, on its own `ModelRunner` (its own paged KV pool, its own
decode CUDA graphs on a GPU) and its own `BlockManager`.

Each target sequence has a mirror `Sequence` here, the same prompt and outputs, whose K/V
the draft keeps. A proposal:
1. sync: the mirror's outputs become the target's; its computed tokens are cut to the
   prefix it shares with them (the draft tokens the target rejected are forgotten, the
   accepted ones, already computed here, are kept);
2. catch-up: the tokens the draft has not computed (a new sequence's whole prompt, else
   the target's last new token or two), in chunks of at most max_num_tokens, which also
   scores the first draft token;
3. k - 1 decode steps, each one token a sequence (CUDA graphs on a GPU).
A draft token is the draft's sample under the request's own sampling parameters (argmax
for greedy requests; then no distribution is kept), with a seed of its own; for sampled
requests the draft's processed distribution q [k, V] goes to rejection sampling
(verify.py). Mirrors of sequences no longer running (finished, preempted) are freed; a
sequence the draft pool has no room for is simply not speculated this step.
"""
from __future__ import annotations

import torch

from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.model_runner import ModelRunner
from trtllm.runtime.sampler import SamplingBatch, argmax_serves, gumbel_noise, process_logits
from trtllm.runtime.sequence import Sequence, SequenceStatus

_DRAFT_SEED_SALT = 0x5DEC0DE  # the draft's noise differs from the target's


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, block_manager: BlockManager, max_num_tokens: int, vocab_size: int,
                 eos_token_ids: list[int]):
        self.runner, self.block_manager = runner, block_manager
        self.max_num_tokens, self.vocab_size, self.eos_token_ids = max_num_tokens, vocab_size, eos_token_ids
        self.mirrors: dict[int, Sequence] = {}  # target seq_id -> mirror

    def propose(self, seqs: list[Sequence], ks: list[int], live: set[int]
                ) -> list[tuple[list[int], torch.Tensor | None]]:
        """(draft tokens, q [k, V] or None for argmax drafts) per sequence; `live`: the
        seq_ids of every running target sequence (the others' mirrors are freed)."""
        for sid in [s for s in self.mirrors if s not in live]:
            self.block_manager.free(self.mirrors.pop(sid), publish=False)
        mirrors, kept = [], []
        for seq, k in zip(seqs, ks):
            m = self._sync(seq, k)
            if m is not None:
                mirrors.append(m)
                kept.append(k)
        drafts = {m.seq_id: ([], []) for m in mirrors}
        if mirrors:
            self._catch_up(mirrors, drafts)
            active = [m for m, k in zip(mirrors, kept) if k > 1]
            step = 1
            while active:
                launched = self.runner.execute([(m, 1) for m in active])
                launched.wait()
                self._sample(launched.to_sample, launched.logits, drafts, launched.picks)
                for m in active:
                    m.num_computed_tokens += 1
                step += 1
                active = [m for m, k in zip(mirrors, kept) if k > step]
        out = []
        for seq in seqs:
            m = self.mirrors.get(seq.seq_id)
            if m is None or m.seq_id not in drafts:
                out.append(([], None))
                continue
            tokens, qs = drafts[m.seq_id]
            out.append((tokens, torch.stack(qs) if qs and qs[0] is not None else None))
        return out

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The mirror of `seq`, its tokens the target's, blocks for them and k more; None
        if the pool cannot hold them now."""
        m = self.mirrors.get(seq.seq_id)
        if m is None:
            m = Sequence(seq.request_id, seq.prompt_token_ids, seq.sampling_params, index=seq.index,
                         seed=seq.seed ^ _DRAFT_SEED_SALT, status=SequenceStatus.RUNNING)
            if not self.block_manager.can_allocate(m):
                return None
            self.block_manager.allocate(m)
            self.mirrors[seq.seq_id] = m
        old, new = m.output_token_ids, seq.output_token_ids
        common = 0
        for a, b in zip(old, new):
            if a != b:
                break
            common += 1
        m.output_token_ids = list(new)
        # the last token is always computed again: its logits give the first draft token
        m.num_computed_tokens = min(m.num_computed_tokens, len(m.prompt_token_ids) + common, m.num_tokens - 1)
        # the catch-up chunk and k - 1 draft tokens: positions up to num_tokens + k - 2
        if not self.block_manager.try_append(m, m.num_tokens - m.num_computed_tokens + k - 1):
            return None
        return m

    def _catch_up(self, mirrors: list[Sequence], drafts: dict) -> None:
        """Compute each mirror's uncomputed tokens, in chunks within max_num_tokens; the
        chunk that reaches a mirror's last token gives its first draft token."""
        pending = list(mirrors)
        while pending:
            batch, budget = [], self.max_num_tokens
            for m in pending:
                n = min(m.num_tokens - m.num_computed_tokens, budget)
                if n == 0:
                    break
                batch.append((m, n))
                budget -= n
            launched = self.runner.execute(batch)
            launched.wait()
            if launched.to_sample:
                self._sample(launched.to_sample, launched.logits, drafts)
            for m, n in batch:
                m.num_computed_tokens += n
            # a sampled mirror gained its draft token: num_computed == num_tokens - 1 now
            pending = [m for m in pending if m.num_tokens - m.num_computed_tokens > 1
                       or (m.num_tokens - m.num_computed_tokens == 1 and not drafts[m.seq_id][0])]

    @torch.no_grad()
    def _sample(self, mirrors: list[Sequence], logits: torch.Tensor, drafts: dict,
                picks: torch.Tensor | None = None) -> None:
        """One draft token per mirror, appended to its outputs (and q, for sampled ones).
        `picks`: a decode graph's own argmax (on the host), which serves greedy mirrors."""
        if picks is not None and argmax_serves(mirrors):
            for m, t in zip(mirrors, picks[0].tolist()):
                toks, qs = drafts[m.seq_id]
                toks.append(t)
                qs.append(None)
                m.output_token_ids.append(t)
            return
        batch = SamplingBatch.build(mirrors, self.vocab_size, logits.device, self.eos_token_ids)
        x = process_logits(logits.float(), batch)
        tokens = x.argmax(-1)
        if not batch.all_greedy:
            tokens = torch.where(batch.greedy, tokens, (x + gumbel_noise(batch)).argmax(-1))
            probs = x.softmax(-1)
        for i, (m, t) in enumerate(zip(mirrors, tokens.tolist())):
            toks, qs = drafts[m.seq_id]
            toks.append(t)
            qs.append(None if m.sampling_params.greedy else probs[i])
            m.output_token_ids.append(t)
