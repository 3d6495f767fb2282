"""EAGLE-3 (models/eagle3.py) as a draft model: what the draft-model proposer
(draft_model.py) does differently when its model is an EAGLE-3 head.

- **Tokens shifted by one.** The head at position t reads token t + 1 (and the target's
  state at t), so a mirror's tokens are the target's from the second on: mirror index t is
  position t. Its last token's logits (position N - 2 of a target sequence of N tokens,
  whose state the target computed) give draft token 1, as for any draft model.
- **Hidden inputs.** Before every draft launch, `stage` tells each token where its hidden
  input is (trtllm/hidden_states.py `DraftHiddenInputs.rows`): mirror index t <= `limit` (the
  mirror's last real token) reads the target's state at position t, by the target's KV slot
  of t; a later index (a draft token of this proposal) reads the head's own output at index
  t - 1, by the mirror's KV slot of t - 1. The rows go to the device by a pinned staging ring,
  queued before the launch, so chained steps (`execute_ahead`) stay queued back to back.
- **Only exact K/V is kept.** K/V the head computed from its own outputs (a proposal's later
  steps) is not what it would compute from the target's states: at the next sync a mirror
  keeps at most the indices it computed from the target's (`exact`), and recomputes the
  accepted drafts from the target's states, as EAGLE does.
- **Its vocabulary.** The head's logits cover the draft vocabulary: the runner maps decode
  graphs' greedy picks through `draft_to_target` (ModelRunner.pick_map) and `expand` puts
  eager logits into the target's vocabulary (-inf elsewhere) for the sampler.
"""
from __future__ import annotations

import torch

from trtllm.hidden_states import DraftHiddenInputs, HiddenStatesContext, HiddenStore
from trtllm.runtime.sequence import Sequence

STAGING_RING = 8  # pinned row buffers in flight at once: more than a proposal's launches a step


class Eagle3Inputs:
    def __init__(self, width: int, dtype: torch.dtype, device: torch.device, block_size: int, max_num_tokens: int,
                 draft_to_target: torch.Tensor, vocab_size: int):
        self.width, self.dtype, self.device = width, dtype, device
        self.block_size, self.max_num_tokens = block_size, max_num_tokens
        self.draft_to_target, self.vocab_size = draft_to_target.to(device), vocab_size
        self._identity = draft_to_target.shape[0] == vocab_size and bool(
            torch.equal(draft_to_target.cpu(), torch.arange(vocab_size)))
        self.inputs: DraftHiddenInputs | None = None  # made by `attach`, once the pools are sized
        self.limit: dict[Sequence, int] = {}   # mirror -> its last index with a target state, this proposal
        self.target: dict[Sequence, Sequence] = {}  # mirror -> its target sequence, this proposal
        self.exact: dict[int, int] = {}  # mirror seq_id -> indices computed from the target's states
        cuda = device.type == "cuda"
        self._host = torch.zeros((STAGING_RING, max_num_tokens), dtype=torch.long, pin_memory=cuda)
        self._copied = [torch.cuda.Event() if cuda else None for _ in range(STAGING_RING)]
        self._turn = 0

    def attach(self, target_slots: int, draft_slots: int) -> tuple[HiddenStatesContext, HiddenStatesContext]:
        """The stores, once both pools are sized: (the target runner's context, the draft's)."""
        target = HiddenStore(target_slots, self.width, self.dtype, self.device)
        own = HiddenStore(draft_slots, self.width, self.dtype, self.device)
        self.inputs = DraftHiddenInputs(self.max_num_tokens, target, own, self.device)
        return HiddenStatesContext(stash=target), HiddenStatesContext(stash=own, inputs=self.inputs)

    # -- the mirrors ----------------------------------------------------------------------
    @staticmethod
    def mirror_prompt(seq: Sequence) -> list[int]:
        return seq.prompt_token_ids[1:]

    def begin(self, mirror: Sequence, target: Sequence) -> None:
        """A synced mirror (its tokens the target's, no drafts yet) of this proposal: keep only
        K/V computed from the target's states; note where they end."""
        mirror.num_computed_tokens = min(mirror.num_computed_tokens, self.exact.get(mirror.seq_id, 0))
        self.limit[mirror] = mirror.num_tokens - 1
        self.target[mirror] = target
        # after this proposal's first step, indices 0..limit are computed from the target's states
        self.exact[mirror.seq_id] = mirror.num_tokens

    def forget(self, mirror: Sequence) -> None:
        self.exact.pop(mirror.seq_id, None)
        self.limit.pop(mirror, None)
        self.target.pop(mirror, None)

    # -- before each launch --------------------------------------------------------------
    def stage(self, batch: list[tuple[Sequence, int]]) -> None:
        """Each token's hidden-input row (module docstring), queued to the device before the
        launch that follows. `batch`: (mirror, tokens from its num_computed_tokens on)."""
        i = self._turn
        self._turn = (i + 1) % STAGING_RING
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        host, bs, n = self._host[i].numpy(), self.block_size, 0
        # a Python loop: 27 us for a 64-sequence decode step, 271 us for a 2,047-token catch-up on the
        # dev CPU; numpy over each mirror's tokens took 1,813 / 497 us (its per-call cost at decode)
        for m, count in batch:
            limit, target, start = self.limit[m], self.target[m], m.num_computed_tokens
            for t in range(start, start + count):
                if t <= limit:  # the target's state at position t
                    host[n] = target.block_table[t // bs] * bs + t % bs
                else:  # the head's own output at index t - 1
                    host[n] = -(m.block_table[(t - 1) // bs] * bs + (t - 1) % bs) - 1
                n += 1
        self.inputs.rows[:n].copy_(self._host[i, :n], non_blocking=True)
        if self._copied[i] is not None:
            self._copied[i].record()

    # -- after ----------------------------------------------------------------------------
    def expand(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, Vd] draft logits -> [N, V]: the target's vocabulary, -inf where the head has no token."""
        if self._identity:
            return logits
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.draft_to_target, logits)
