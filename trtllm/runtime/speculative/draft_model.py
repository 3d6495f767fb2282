"""Draft-model proposer: a smaller model with the target's vocabulary proposes k tokens
for each speculating sequence, on its own `ModelRunner` (its own paged KV pool, its own
decode CUDA graphs on a GPU) and its own `BlockManager`.

Each target sequence has a mirror `Sequence` here, the same prompt and outputs, whose K/V
the draft keeps. A proposal:
1. sync: the mirror's outputs become the target's; its computed tokens are cut to the
   prefix it shares with them (the draft tokens the target rejected are forgotten, the
   accepted ones, already computed here, are kept);
2. catch-up: every token the draft has not computed but the last (a new sequence's
   prompt, in chunks of at most max_num_tokens), launched and not waited for: nothing is
   sampled there. Chained proposals (below) leave the last two: after a step that accepted
   every draft, the last draft token then rides in the first draft step;
3. k draft steps: the first from the last token (the target's newest; after all drafts
   were accepted, the last draft token and it), giving draft token 1, each next one token
   a sequence (decode CUDA graphs on a GPU) from the one before.
A draft token is the draft's sample under the request's own sampling parameters (argmax
for greedy requests; then no distribution is kept), with a seed of its own; for sampled
requests the draft's processed distribution q [k, V] goes to rejection sampling
(verify.py). Mirrors of sequences no longer running (finished, preempted) are freed; a
sequence the draft pool has no room for is simply not speculated this step, nor are drafts
past the draft's own `max_positions` (its max_position_embeddings, which may be shorter
than the target's max_seq_len: a learned position table has no row past it): a sequence
there drafts fewer tokens, or none (its mirror freed).

An EAGLE-3 head (`eagle`, eagle3.py) is such a draft model whose mirrors hold the target's
tokens from the second on, whose launches read hidden states staged before each, and whose
K/V is kept only where it came from the target's states.

Greedy drafts on decode graphs are chained on the device (`_propose_chained`): step i+1's
input ids are step i's greedy picks, gathered on the GPU (`ModelRunner.execute_ahead`, the
overlap scheduler's path), so the k steps are queued back to back and the host reads all
k x batch draft tokens once, at the end; step by step, the host would wait for every
step and the GPU would idle while it built the next (H200, Llama-3.1-8B shapes, batch 1:
a 10.8 ms speculative step of 7.3 ms of kernels). Sampled drafts (and a runner without
decode graphs: the CPU) go step by step (`_propose_stepwise`).
"""
from __future__ import annotations

import torch

from trtllm.runtime.block_manager import BlockManager
from trtllm.runtime.model_runner import ModelRunner
from trtllm.runtime.sampler import SamplingBatch, argmax_serves, draw_tokens, greedy_picks, process_logits
from trtllm.runtime.sequence import Sequence, SequenceStatus
from trtllm.runtime.speculative.eagle3 import Eagle3Inputs

_DRAFT_SEED_SALT = 0x5DEC0DE  # the draft's noise differs from the target's


class DraftModelProposer:
    def __init__(self, runner: ModelRunner | None, block_manager: BlockManager | None, max_num_tokens: int,
                 vocab_size: int, eos_token_ids: list[int], eagle: Eagle3Inputs | None = None,
                 max_positions: int | None = None):
        # None until attach_target for an EAGLE-3 head (its stores need the target's pool size)
        self.runner, self.block_manager = runner, block_manager
        self.max_positions = max_positions  # the draft's max_position_embeddings (None: no limit)
        self.eagle = eagle  # an EAGLE-3 head's inputs (eagle3.py), None: an ordinary draft model
        self.max_num_tokens, self.vocab_size, self.eos_token_ids = max_num_tokens, vocab_size, eos_token_ids
        self.mirrors: dict[int, Sequence] = {}  # target seq_id -> mirror
        self._synced: dict[int, int] = {}  # target seq_id -> its output length at the last sync

    def propose(self, seqs: list[Sequence], ks: list[int], live: set[int]
                ) -> list[tuple[list[int], torch.Tensor | None]]:
        """(draft tokens, q [k, V] or None for argmax drafts) per sequence; `live`: the
        seq_ids of every running target sequence (the others' mirrors are freed)."""
        for sid in [s for s in self.mirrors if s not in live]:
            self._free(sid)
        mirrors, kept = [], []
        for seq, k in zip(seqs, ks):
            if self.max_positions is not None:  # the last draft's position, num_tokens + k - 2, within the draft's
                k = min(k, self.max_positions - seq.num_tokens + 1)
                if k <= 0:
                    if seq.seq_id in self.mirrors:
                        self._free(seq.seq_id)
                    continue
            m = self._sync(seq, k)
            if m is not None:
                mirrors.append(m)
                kept.append(k)
        drafts = {m.seq_id: ([], []) for m in mirrors}
        if mirrors:
            n = len(mirrors)
            if argmax_serves(mirrors) and self.runner.cuda_graphs.decode_size(n, n, []) is not None:
                self._catch_up(mirrors, keep=2)
                self._propose_chained(mirrors, kept, drafts)
            else:
                self._catch_up(mirrors, keep=1)
                self._propose_stepwise(mirrors, kept, drafts)
        out = []
        for seq in seqs:
            m = self.mirrors.get(seq.seq_id)
            if m is None or m.seq_id not in drafts:
                out.append(([], None))
                continue
            tokens, qs = drafts[m.seq_id]
            out.append((tokens, torch.stack(qs) if qs and qs[0] is not None else None))
        return out

    def _free(self, sid: int) -> None:
        m = self.mirrors.pop(sid)
        self.block_manager.free(m, publish=False)
        self._synced.pop(sid, None)
        if self.eagle is not None:
            self.eagle.forget(m)

    def _propose_stepwise(self, mirrors: list[Sequence], kept: list[int], drafts: dict) -> None:
        """The k decode steps, each waited for and sampled on the host."""
        step = 0
        while True:
            active = [m for m, k in zip(mirrors, kept) if k > step]
            if not active:
                return
            launched = self._launch([(m, 1) for m in active])
            launched.wait()
            self._sample(launched.to_sample, launched.logits, drafts, launched.picks)
            for m in active:
                m.num_computed_tokens += 1
            step += 1

    def _propose_chained(self, mirrors: list[Sequence], kept: list[int], drafts: dict) -> None:
        """Greedy drafts, k decode-graph steps queued back to back (module docstring). While
        they are queued a mirror's draft tokens are placeholders (-1) in its outputs: a step
        launched ahead reads only num_tokens and the block table. One read at the end."""
        runner, steps = self.runner, max(kept)
        base = {m: len(m.output_token_ids) for m in mirrors}  # where each mirror's drafts go
        picks = torch.empty((steps, len(mirrors)), dtype=torch.long, device=runner.device)
        launched, rows_of, taken = None, {}, []  # rows_of: mirror -> its row in the step before
        for step in range(steps):
            active = [m for m, k in zip(mirrors, kept) if k > step]
            if launched is None:  # the first step: the mirrors' uncomputed tokens, known on the host
                computed = [m.num_tokens - m.num_computed_tokens for m in active]
                launched = self._launch(list(zip(active, computed)))
                # two tokens (a catch-up's last draft token and the newest) run on a prefill graph or
                # eagerly: their picks taken on the device from the logits, as a decode graph's are
                step_picks = launched.device_picks[0] if launched.device_picks is not None \
                    else self._device_picks(launched.logits)
            else:  # each mirror's input: its pick of the step before, gathered on the device
                if self.eagle is not None:
                    self.eagle.stage([(m, 1) for m in active])
                launched = runner.execute_ahead(launched, active, [rows_of[m] for m in active], step_picks)
                if launched is None:  # decode_size said a graph fits
                    raise RuntimeError(f"a chained draft step of {len(active)} sequences found no decode graph")
                computed, step_picks = [1] * len(active), launched.device_picks[0]
            for m, n in zip(active, computed):
                if step:  # the token this step computed: the pick of the step before, not read yet
                    m.output_token_ids.append(-1)
                m.num_computed_tokens += n
            # out of the graph's own buffer, which the next replay of its size overwrites
            picks[step, :len(active)].copy_(step_picks[:len(active)])
            rows_of = {m: i for i, m in enumerate(active)}
            taken.append(active)
        tokens = self._read_picks(picks)
        for step, active in enumerate(taken):
            row = tokens[step]
            for i, m in enumerate(active):
                drafts[m.seq_id][0].append(row[i])
                drafts[m.seq_id][1].append(None)
        for m in mirrors:
            m.output_token_ids[base[m]:] = drafts[m.seq_id][0]

    def _device_picks(self, logits: torch.Tensor) -> torch.Tensor:
        """Each row's greedy draft token, on the device (a decode graph's picks, for a step no
        decode graph ran), in the target's vocabulary."""
        picks = greedy_picks(logits)[0]
        return picks if self.runner.pick_map is None else self.runner.pick_map[picks]

    def _read_picks(self, picks: torch.Tensor) -> list[list[int]]:
        """The chained steps' draft tokens on the host: the proposal's one wait for the GPU
        (an event's, which lets other Python threads run, not .tolist()'s, which holds the GIL)."""
        if picks.device.type != "cuda":
            return picks.tolist()
        host = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True)
        host.copy_(picks, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        done.synchronize()
        return host.tolist()

    def _sync(self, seq: Sequence, k: int) -> Sequence | None:
        """The mirror of `seq`, its tokens the target's, blocks for them and k more; None
        if the pool cannot hold them now."""
        m = self.mirrors.get(seq.seq_id)
        if m is None:
            prompt = seq.prompt_token_ids if self.eagle is None else self.eagle.mirror_prompt(seq)
            m = Sequence(seq.request_id, prompt, seq.sampling_params, index=seq.index,
                         seed=seq.seed ^ _DRAFT_SEED_SALT, status=SequenceStatus.RUNNING)
            if not self.block_manager.can_allocate(m):
                return None
            self.block_manager.allocate(m)
            self.mirrors[seq.seq_id] = m
        old, new = m.output_token_ids, seq.output_token_ids
        # the common prefix: at least the outputs of the last sync (a sequence's outputs only
        # grow), checked at C speed; then token by token over the drafts after them
        common = min(self._synced.get(seq.seq_id, 0), len(old), len(new))
        if old[:common] != new[:common]:
            common = 0
        for a, b in zip(old[common:], new[common:]):
            if a != b:
                break
            common += 1
        self._synced[seq.seq_id] = len(new)
        m.output_token_ids = list(new)
        # the last token is always computed again: its logits give the first draft token
        m.num_computed_tokens = min(m.num_computed_tokens, len(m.prompt_token_ids) + common, m.num_tokens - 1)
        if self.eagle is not None:  # its K/V computed from the target's states only (eagle3.py)
            self.eagle.begin(m, seq)
        # the catch-up, the last token and k - 1 draft tokens: positions up to num_tokens + k - 2
        if not self.block_manager.try_append(m, m.num_tokens - m.num_computed_tokens + k - 1):
            if self.eagle is not None:  # nothing computed this time: recompute from the start next time
                self.eagle.forget(m)
            return None
        return m

    def _catch_up(self, mirrors: list[Sequence], keep: int) -> None:
        """Compute every mirror's uncomputed tokens but its last `keep` (which the first draft
        step computes), in chunks within max_num_tokens; nothing is sampled, so nothing is
        waited for. Chained proposals keep 2: after a step that accepted every draft, the last
        draft token then rides in the first draft step instead of a decode step of its own,
        whose LM head would be read for logits no one uses (at Llama-3.1-8B shapes 1.05 GB,
        a fifth of a 2-layer draft's step's bytes)."""
        pending = [m for m in mirrors if m.num_tokens - m.num_computed_tokens > keep]
        while pending:
            batch, budget = [], self.max_num_tokens
            for m in pending:
                n = min(m.num_tokens - m.num_computed_tokens - keep, budget)
                if n == 0:
                    break
                batch.append((m, n))
                budget -= n
            self._launch(batch)
            for m, n in batch:
                m.num_computed_tokens += n
            pending = [m for m in pending if m.num_tokens - m.num_computed_tokens > keep]

    def _launch(self, batch: list[tuple[Sequence, int]]):
        """runner.execute, an EAGLE-3 head's hidden-input rows staged first."""
        if self.eagle is not None:
            self.eagle.stage(batch)
        return self.runner.execute(batch)

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
        if self.eagle is not None:  # the head's vocabulary into the target's
            logits = self.eagle.expand(logits)
        batch = SamplingBatch.build(mirrors, self.vocab_size, logits.device, self.eos_token_ids)
        x = process_logits(logits.float(), batch)
        tokens = draw_tokens(x, batch)
        if not batch.all_greedy:
            probs = x.softmax(-1)
        for i, (m, t) in enumerate(zip(mirrors, tokens.tolist())):
            toks, qs = drafts[m.seq_id]
            toks.append(t)
            qs.append(None if m.sampling_params.greedy else probs[i])
            m.output_token_ids.append(t)
