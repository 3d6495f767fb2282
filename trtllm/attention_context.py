"""How the paged KV cache and attention metadata reach a compiled graph.

`trtllm.compile` replaces every SDPA call in a model with `torch.ops.trtllm.attention
(q, k, v, layer, scale, window, softcap, alibi_slopes)`. That graph op takes no cache and no metadata: it reads
them from the *active attention context*, which the runtime sets around each forward:

    cache = PagedKVCache.allocate(num_layers, num_blocks, block_size, num_kv_heads, head_dim, ...)
    meta = AttentionMetadata(max_num_tokens, max_num_seqs, max_blocks_per_seq, device)
    meta.fill(query_lens, seq_lens, block_tables, block_size)   # refills the same buffers
    with attention_context(cache, meta):
        logits = compiled(input_ids, positions)                  # [1, T] flat ragged batch

The device tensors in `AttentionMetadata` are allocated once and refilled in place
(`fill` copies into them), so their addresses never change: a CUDA graph captured with
one context replays correctly after the runtime refills the buffers. The host-side
ints (`num_seqs`, `max_query_len`, `max_seq_len`) only steer kernel choice and grid
size at launch; under graph capture they must be upper bounds for every replay.

Layout (see trtllm/kernels/paged_attention for the op's semantics):
- k/v cache: [num_layers, num_blocks, block_size, num_kv_heads, head_dim], of the model's
  dtype or quantized (float8_e4m3fn / int8) with `scales` [num_layers, 2, num_kv_heads] fp32
  beside it (K's and V's per layer and kv head; kernels/paged_attention/kv_quant.py), a
  fixed-address device tensor as the cache itself
- slot_mapping [max_num_tokens] int32: cache slot (block * block_size + offset) for
  each new token, -1 for padding tokens (not written)
- block_tables [max_num_seqs, max_blocks_per_seq] int32
- seq_lens [max_num_seqs] int32: context length of each sequence *including* this
  step's new tokens; 0 for unused rows
- query_start_loc [max_num_seqs + 1] int32: offsets of each sequence's new tokens in
  the flat batch (cumulative sum of query lengths; unused rows repeat the total)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from itertools import accumulate

import numpy as np
import torch

from trtllm.kernels.copy_blocks import copy_blocks
from trtllm.kernels.paged_attention import paged_attention
from trtllm.kernels.registry import register_op


@dataclass
class PagedKVCache:
    k: torch.Tensor  # [L, num_blocks, block_size, Hkv, D]
    v: torch.Tensor  # [L, num_blocks, block_size, Hkv, D]; an MLA latent cache's: [..., 0] (empty)
    scales: torch.Tensor | None = None  # [L, 2, Hkv] fp32: a quantized cache's K and V scales

    @staticmethod
    def allocate(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device, scales: torch.Tensor | None = None,
                 values: bool = True) -> PagedKVCache:
        """dtype: the model's, or float8_e4m3fn / int8 with `scales` [L, 2, Hkv] (copied to
        the device: kv_quant.kv_scales_tensor builds them). values=False: multi-head latent
        attention's cache (trtllm/mla_attention.py), one latent row per token in `k` serving
        as key and value, and `v` empty (0 wide), so code that walks both pools still works."""
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        if scales is not None:
            if tuple(scales.shape) != (num_layers, 2, num_kv_heads):
                raise ValueError(f"KV cache scales {tuple(scales.shape)}: expected ({num_layers}, 2, {num_kv_heads})")
            scales = scales.to(device=device, dtype=torch.float32).contiguous()
        v_shape = shape if values else shape[:-1] + (0,)
        return PagedKVCache(torch.zeros(shape, dtype=dtype, device=device),
                            torch.zeros(v_shape, dtype=dtype, device=device), scales)

    def copy_blocks(self, copies: list[tuple[int, int, int]]) -> None:
        """Each (source, copy, tokens): the first `tokens` positions of block source's K and V,
        every layer, into block copy (beams' copy-on-write, runtime/block_manager.py; each copy
        a fresh block no pair reads). The list reaches the device in one copy. Bytes, whatever
        the dtype (the scales are per layer, not per block): kernels/copy_blocks.py, one pass a pool."""
        src, dst, tokens = torch.tensor(copies, dtype=torch.long).T.contiguous().to(self.k.device)
        for pool in (self.k, self.v):
            if pool.numel() == 0:  # a latent cache's V
                continue
            copy_blocks(pool, src, dst, tokens)

    @property
    def nbytes(self) -> int:
        """The pool's memory: K and V of every layer and block."""
        return self.k.nbytes + self.v.nbytes

    @property
    def num_layers(self) -> int:
        return self.k.shape[0]

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def block_size(self) -> int:
        return self.k.shape[2]


class AttentionMetadata:
    """Fixed-address device buffers describing one step's ragged batch.

    The four int32 tensors are views into one device buffer, refilled from one pinned
    host buffer of the same layout: a step costs one host-to-device copy.

    `fill` runs every step, so it does per-step work only: a block-table row is written
    in full when its row gets a new list, and otherwise only the entries its list grew
    by since the last fill (a decode step adds at most one block per sequence; at batch
    64 rewriting every row would cost ~1.7 ms of host time a step on the dev CPU:
    bench/probes/host_step.py). That makes
    one promise of its callers: a block-table list passed again is the same blocks,
    perhaps more of them at the end; a table that changes otherwise is a new list.
    (The BlockManager only ever grows a table in place, or replaces it.)
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, device):
        device = torch.device(device)
        sizes = [max_num_tokens, max_num_seqs * max_blocks_per_seq, max_num_seqs, max_num_seqs + 1]
        try:
            self._device_buffer = torch.zeros(sum(sizes), dtype=torch.int32, device=device)
            self._host_buffer = torch.zeros(sum(sizes), dtype=torch.int32,
                                            pin_memory=device.type == "cuda")
        except RuntimeError as e:  # torch.OutOfMemoryError too: a limit far past what the machine holds
            raise ValueError(f"the attention metadata of max_batch_size={max_num_seqs} sequences of up to "
                             f"{max_blocks_per_seq} KV blocks and max_num_tokens={max_num_tokens} "
                             f"({8 * sum(sizes) / 2**30:.1f} GiB, host and device) cannot be allocated: lower "
                             f"max_batch_size, max_seq_len or max_num_tokens ({str(e).splitlines()[0]})") from None
        self._host = self._host_buffer.numpy()
        views = torch.split(self._device_buffer, sizes)
        host_views = [self._host[a:a + n] for a, n in zip(np.cumsum([0] + sizes[:-1]), sizes)]
        self.slot_mapping = views[0]
        self.block_tables = views[1].view(max_num_seqs, max_blocks_per_seq)
        self.seq_lens, self.query_start_loc = views[2], views[3]
        self._slots, self._tables, self._lens, self._starts = host_views
        self._tables = self._tables.reshape(max_num_seqs, max_blocks_per_seq)
        self.slot_mapping.fill_(-1)
        self._slots.fill(-1)
        self.max_num_tokens, self.max_num_seqs = max_num_tokens, max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        # per row of _tables: the list last written there and how many of its entries
        self._row_list: list[list[int] | None] = [None] * max_num_seqs
        self._row_len = [0] * max_num_seqs
        self._num_tokens = 0  # slots written by the last fill (the rest hold -1)
        self._iota = np.arange(max_num_seqs + 1, dtype=np.int32)  # query starts of a decode step
        self.num_seqs = 0
        self.max_query_len = 0
        self.max_seq_len = 0

    def fill(self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]],
             block_size: int) -> None:
        """Describe a step: sequence i has `query_lens[i]` new tokens and `seq_lens[i]`
        tokens of context including them, stored in the blocks `block_tables[i]`."""
        n, total = len(query_lens), sum(query_lens)
        if n > self.max_num_seqs or total > self.max_num_tokens:
            raise ValueError(f"batch of {n} sequences / {total} tokens exceeds the metadata "
                             f"capacity of {self.max_num_seqs} / {self.max_num_tokens}")
        max_blocks = self.max_blocks_per_seq
        slots: list[int] = []
        for i, (q, s, blocks) in enumerate(zip(query_lens, seq_lens, block_tables)):
            if not 0 < q <= s or len(blocks) * block_size < s or len(blocks) > max_blocks:
                raise ValueError(f"bad sequence: {q} new tokens, {s} context, {len(blocks)} blocks "
                                 f"(at most {max_blocks})")
            self._write_row(i, blocks)
            if q == 1:  # a decode token: one slot
                slots.append(blocks[(s - 1) // block_size] * block_size + (s - 1) % block_size)
            else:
                _extend_slots(slots, blocks, s - q, s, block_size)
        self._slots[:total] = slots
        if self._num_tokens > total:  # slots of the previous step's extra tokens: not written
            self._slots[total:self._num_tokens] = -1
        self._num_tokens = total
        self._lens[:n] = seq_lens
        self._lens[n:] = 0
        self._starts[0] = 0
        # np.cumsum of a list costs ~10 us on the dev CPU (it converts through an array)
        self._starts[1:n + 1] = self._iota[1:n + 1] if total == n else list(accumulate(query_lens))
        self._starts[n + 1:] = total
        self._device_buffer.copy_(self._host_buffer, non_blocking=True)
        self.num_seqs, self.max_query_len, self.max_seq_len = n, max(query_lens, default=0), max(seq_lens, default=0)

    def state(self) -> tuple:
        """What describes this step, to describe it again elsewhere (`from_state`): a
        tensor-parallel rank runs rank 0's step on its own cache (trtllm/parallel)."""
        sizes = (self.max_num_tokens, self.max_num_seqs, self.max_blocks_per_seq)
        return sizes, self._device_buffer.cpu().numpy(), (self.num_seqs, self.max_query_len, self.max_seq_len)

    def load_state(self, state: tuple) -> None:
        """Describe the step `state()` described (the capacities must match)."""
        sizes, buffer, (self.num_seqs, self.max_query_len, self.max_seq_len) = state
        if sizes != (self.max_num_tokens, self.max_num_seqs, self.max_blocks_per_seq):
            raise ValueError(f"metadata of capacities {sizes} loaded into one of "
                             f"{(self.max_num_tokens, self.max_num_seqs, self.max_blocks_per_seq)}")
        self._device_buffer.copy_(torch.from_numpy(buffer))

    def _write_row(self, i: int, blocks: list[int]) -> None:
        """Row i of the block tables := blocks, writing only what it does not hold yet."""
        done, now = self._row_len[i], len(blocks)
        if self._row_list[i] is not blocks or done > now:
            self._row_list[i], done = blocks, 0
        if now > done:
            self._tables[i, done:now] = blocks[done:now]
            self._row_len[i] = now


def _extend_slots(slots: list[int], blocks: list[int], start: int, end: int, block_size: int) -> None:
    """Append the cache slots of positions start..end-1: one run of consecutive slots per
    block, so a 2048-token prefill is ~2048 / block_size ranges, not 2048 Python ops."""
    p = start
    while p < end:
        b, offset = divmod(p, block_size)
        run = min(end - p, block_size - offset)
        first = blocks[b] * block_size + offset
        slots.extend(range(first, first + run))
        p += run


@dataclass
class AttentionContext:
    cache: PagedKVCache
    metadata: AttentionMetadata


_active: AttentionContext | None = None


@contextlib.contextmanager
def attention_context(cache: PagedKVCache, metadata: AttentionMetadata):
    """Make `cache` and `metadata` the ones every `trtllm.attention` op reads."""
    global _active
    previous, _active = _active, AttentionContext(cache, metadata)
    try:
        yield _active
    finally:
        _active = previous


def in_attention_context() -> bool:
    """Whether a call now runs inside `attention_context(...)` (the runtime's flat batch)."""
    return _active is not None


@contextlib.contextmanager
def whole_sequences_context(num_seqs: int, seq_len: int, block_size: int, num_layers: int,
                            num_kv_heads: int, head_dim: int, dtype: torch.dtype, device, values: bool = True):
    """A scratch cache and metadata for `num_seqs` independent sequences of `seq_len` new
    tokens each: a model called as in training, [B, S], outside the runtime."""
    per_seq = math.ceil(seq_len / block_size)
    cache = PagedKVCache.allocate(num_layers, num_seqs * per_seq, block_size, num_kv_heads, head_dim,
                                  dtype, device, values=values)
    meta = AttentionMetadata(num_seqs * seq_len, num_seqs, per_seq, device)
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(num_seqs)]
    meta.fill([seq_len] * num_seqs, [seq_len] * num_seqs, tables, block_size)
    with attention_context(cache, meta) as ctx:
        yield ctx


def active_context() -> AttentionContext:
    if _active is None:
        raise RuntimeError(
            "torch.ops.trtllm.attention ran outside an attention context: call the "
            "CompiledModel (which sets one up for whole sequences) or wrap the call in "
            "trtllm.attention_context.attention_context(cache, metadata)")
    return _active


# --- the graph op -------------------------------------------------------------------


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, scale: float,
               window: int, softcap: float, alibi_slopes: torch.Tensor | None = None,
               cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
               interleaved: bool = False) -> torch.Tensor:
    """Causal attention of SDPA's shapes on the active paged cache.

    q [B, Hq, S, D], k/v [B, Hkv, S, D] (the new tokens; B sequences of S tokens, or the
    runtime's flat batch with B = 1) -> [B, Hq, S, D]. Writes k/v into layer `layer` of the
    cache, then each token attends to its sequence's cached context up to itself (the last
    `window` positions if window > 0; logits soft-capped if softcap > 0; ALiBi's bias with
    alibi_slopes [Hq] fp32, a constant input of the graph: kernels/paged_attention).
    cos/sin [B or 1, S, D]: q and k arrive unrotated, and are rotated as `trtllm.rotary(x,
    cos, sin, interleaved)` would first (passes/fuse_rotary_attention.py puts them here).
    """
    ctx = active_context()
    meta = ctx.metadata
    b, hq, s, d = q.shape

    def flat(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [T, H, D]
        return t.transpose(1, 2).reshape(b * s, t.shape[1], t.shape[3])

    if cos is not None:  # [B or 1, S, D] -> a row per token, as flat() orders them
        cos, sin = (t.expand(b, s, t.shape[-1]).reshape(b * s, t.shape[-1]) for t in (cos, sin))
    out = paged_attention(
        flat(q), flat(k), flat(v), ctx.cache.k, ctx.cache.v, layer,
        meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale, window, softcap, meta.num_seqs, meta.max_query_len, meta.max_seq_len, ctx.cache.scales,
        alibi_slopes, cos, sin, interleaved)
    # paged_attention returns a contiguous [T, Hq, D]; .contiguous() is a no-op that pins
    # the strides _attention_fake promises even if that ever changes
    return out.contiguous().view(b, s, hq, v.shape[-1]).transpose(1, 2)


def _attention_fake(q, k, v, layer, scale, window, softcap, alibi_slopes=None, cos=None, sin=None,
                    interleaved=False):
    b, hq, s, _ = q.shape
    return q.new_empty((b, s, hq, v.shape[-1])).transpose(1, 2)  # the strides _attention returns


# paged_attention dispatches itself (Triton kernel or reference): this op is plain torch around it
attention = register_op("attention", impl=_attention, fake=_attention_fake)
