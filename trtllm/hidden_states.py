"""Hidden states kept per KV-cache slot, for EAGLE-3 drafts: what one model writes and a draft reads.

EAGLE-3 (Li et al. 2025) drafts from the target's hidden states: at position t its draft layer
reads token t + 1 and g_t = fc(cat(h_a[t], h_b[t], h_c[t])), the states leaving three of the
target's decoder layers (models/eagle3.py). Two graph ops carry them, reading the *active
hidden-states context* the runtime sets around each forward, as attention_context.py does for
the KV cache:

- `trtllm.stash_hidden(x [B, S, W], done [1])`: row t of x into `stash.rows` at the KV slot
  the step writes token t's K/V to (the attention metadata's slot_mapping; a padding token's
  slot -1 goes to the store's last row, never read). passes/stash_hidden_states.py puts it
  in a graph: the target's stashes fc(cat(h_a, h_b, h_c)), the draft's its own output before
  its final norm. `done` is a one-element constant the op declares it mutates, so that no
  compiler drops an op whose result nobody reads; the writes themselves, like the attention
  op's into the KV cache, go to the context's store.
- `trtllm.draft_hidden_input(input_ids [B, S], width, dtype) -> [B, S, W]`: for token t of
  the step, `inputs.rows[t]` says where its hidden input is: r >= 0 the target's store row r,
  r < 0 the draft's own store row -r - 1 (ModelRunner-independent: the EAGLE-3 proposer,
  runtime/speculative/eagle3.py, fills `rows` before each draft step).

A store holds a row a KV slot (num_slots + 1 rows), allocated once: a CUDA graph captured
with the context set replays against the same memory. Slot-indexed, the states live exactly
as long as the K/V beside them (prefix reuse and preemption included), and a verify step's
rejected drafts leave rows that the next step overwrites. Outside a context (the compile
probe, whole-sequence calls) stash writes nothing and the input is zeros.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from trtllm.attention_context import active_context, in_attention_context
from trtllm.kernels.registry import register_op


@dataclass(frozen=True)
class HiddenStash:
    """What passes/stash_hidden_states.py stashes: the states leaving decoder layers `layers`
    (module paths `...layers.<i>...`), concatenated, times `combine` [W, len(layers) * H]
    when given (EAGLE-3's fc), else as they are (W = H)."""
    layers: tuple[int, ...]
    hidden_size: int
    combine: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return self.combine.shape[0] if self.combine is not None else self.hidden_size * len(self.layers)


class HiddenStore:
    """rows [num_slots + 1, width]: a row a KV slot, the last for padding tokens."""

    def __init__(self, num_slots: int, width: int, dtype: torch.dtype, device):
        self.rows = torch.zeros((num_slots + 1, width), dtype=dtype, device=device)
        self.num_slots = num_slots


class DraftHiddenInputs:
    """Where a draft step's tokens read their hidden input: rows [max_num_tokens] (see the
    module docstring), between the target's store and the draft's own."""

    def __init__(self, max_num_tokens: int, target: HiddenStore | None, own: HiddenStore, device):
        self.rows = torch.zeros((max_num_tokens,), dtype=torch.long, device=device)
        self.target, self.own = target, own


@dataclass
class HiddenStatesContext:
    stash: HiddenStore | None = None          # where stash_hidden writes
    inputs: DraftHiddenInputs | None = None   # where draft_hidden_input reads


_active: HiddenStatesContext | None = None


@contextlib.contextmanager
def hidden_states_context(ctx: HiddenStatesContext | None):
    """Make `ctx` what both ops use during the calls inside (None: none)."""
    global _active
    previous, _active = _active, ctx
    try:
        yield ctx
    finally:
        _active = previous


def _stash_hidden(x: torch.Tensor, done: torch.Tensor) -> None:
    """Row t of x [B, S, W] into the active stash at token t's KV slot (see the module docstring)."""
    store = _active.stash if _active is not None else None
    if store is None or not in_attention_context():
        return
    flat = x.reshape(-1, x.shape[-1])
    slots = active_context().metadata.slot_mapping[: flat.shape[0]].long()
    slots = torch.where(slots < 0, store.num_slots, slots)  # padding: the last row
    store.rows.index_copy_(0, slots, flat.to(store.rows.dtype))


def _stash_hidden_fake(x, done):
    return None


def _draft_hidden_input(input_ids: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S, width]: each token's hidden input from the stores (module docstring); zeros outside a context."""
    inputs = _active.inputs if _active is not None else None
    shape = (*input_ids.shape, width)
    if inputs is None:
        return torch.zeros(shape, dtype=dtype, device=input_ids.device)
    rows = inputs.rows[: input_ids.numel()]
    own = inputs.own.rows.index_select(0, (-rows - 1).clamp(min=0))  # [T, W]
    if inputs.target is None:
        return own.to(dtype).view(shape)
    target = inputs.target.rows.index_select(0, rows.clamp(min=0))
    return torch.where((rows >= 0)[:, None], target, own).to(dtype).view(shape)


def _draft_hidden_input_fake(input_ids, width, dtype):
    return input_ids.new_empty((*input_ids.shape, width), dtype=dtype)


stash_hidden = register_op("stash_hidden", impl=_stash_hidden, fake=_stash_hidden_fake, mutates_args=("done",))
draft_hidden_input = register_op("draft_hidden_input", impl=_draft_hidden_input, fake=_draft_hidden_input_fake)
