"""`BlockManager`: the pool of paged KV-cache blocks, with prefix reuse.

A block holds `block_size` consecutive tokens of one sequence; token `p` of a sequence
lives in slot `block_table[p // block_size] * block_size + p % block_size` of the cache
(see attention_context.py). The manager deals in block ids only, never bytes, so the
cache's dtype (bf16 today, FP8 later) is no concern of it.

Every block is in exactly one of three states:
- free:   ref count 0, holds nothing reusable (in `_free`);
- cached: ref count 0, but holds a published hash, so a later request with the same
          prefix can take it back (in `_cached`, least recently used first);
- used:   ref count > 0 (in one or more sequences' block tables).
A new block comes from the free list, and only when that is empty by evicting the least
recently used cached block.

Prefix reuse (`enable_block_reuse`): once a block is full of *computed* tokens,
`publish` registers it under hash(parent block's hash, its tokens). The chain makes the
hash name the whole prefix, not just the block's own tokens. The hash is 128-bit
blake2b rather than builtin `hash`: a collision would silently serve one prompt's K/V to
another (wrong output, and a leak across requests), and a 64-bit tuple hash is neither
collision-resistant nor stable across processes. A block whose tokens are not all
computed is never published, and a failed sequence is freed with `publish=False`, so
garbage (NaN) K/V never enters the cache.

Copy-on-write (beam search, runtime/beams.py): `fork` gives sequences their parents' block
tables, every block shared by reference count. A step writes a sequence's next token into
its last block; when that block is shared (a partial block several beams hold), `try_append`
first gives the sequence a copy of its own and queues (source, copy, tokens) in
`pending_copies`, which the engine has the model runner copy before the step runs: only the
`tokens` positions the block holds so far (on average half a block), none when it holds
none. Only beams share a block they write into (a prefix-cache hit is always full and never written), so nothing else pays.
A sequence with a LoRA adapter starts its chain from the adapter's id (`chain_root`), so a
prefix computed under one adapter is never reused under another, nor under the base model.
A block holding image placeholder tokens hashes the images' content hashes with its tokens
(runtime/multimodal_inputs.py), so the same text with another image never shares its blocks.
"""
from __future__ import annotations

import hashlib
import time
from array import array
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable

from trtllm.runtime.sequence import Sequence


def block_hash(parent: bytes | None, tokens: list[int], extra: bytes = b"") -> bytes:
    """The hash naming a full block of `tokens` that follows the block hashed `parent`; `extra`:
    what else its K/V depend on (the hashes of the images whose tokens it holds)."""
    data = (parent or b"") + array("q", tokens).tobytes() + extra
    return hashlib.blake2b(data, digest_size=16).digest()


def chain_root(seq: Sequence) -> bytes | None:
    """What the first block's hash follows: nothing for the base model, the adapter's id for a
    sequence with a LoRA adapter (its K/V differ from the base's for the same tokens), and the
    request's cache salt (`cache_salt`: only requests of one salt share cached prefixes)."""
    lora, salt = seq.lora_request, seq.cache_salt
    if lora is None and salt is None:
        return None
    root = b"" if lora is None else b"lora" + lora.lora_int_id.to_bytes(8, "little")
    return root if salt is None else root + b"salt" + hashlib.blake2b(salt.encode(), digest_size=16).digest()


# A pool up to this size gets the full check every time the engine goes idle (~0.3 ms on the
# dev CPU: every test's pool); a larger one at most once a second (check_when_idle).
FULL_IDLE_CHECK_BLOCKS = 4096


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_block_reuse: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be > 0")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_block_reuse = enable_block_reuse
        self._ref = [0] * num_blocks
        self._hash: list[bytes | None] = [None] * num_blocks   # published hash a block holds
        self._free: deque[int] = deque(range(num_blocks))
        self._cached: OrderedDict[int, None] = OrderedDict()   # LRU first
        self._block_of_hash: dict[bytes, int] = {}
        self._num_used = 0
        # per sequence (by seq_id): hashes of its full token blocks, computed lazily
        # (tokens only ever grow, so a computed hash stays valid), and how many of its
        # leading blocks `publish` has already dealt with
        self._chain: dict[int, list[bytes]] = {}
        self._num_published: dict[int, int] = {}
        # prefix-cache metrics: tokens looked up at allocation vs tokens found cached
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0
        self.pending_copies: list[tuple[int, int, int]] = []  # (shared block, its copy, tokens): see above
        self._checked_at = float("-inf")  # time.monotonic() of the last full check_when_idle
        self.events = None  # KvCacheConfig.event_buffer_max_size > 0: runtime/kv_cache_events.KvCacheEvents

    # --- books ----------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self._num_used

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- sequences ------------------------------------------------------------------

    def num_prefix_hit_tokens(self, seq: Sequence) -> int:
        """Tokens of `seq` that `allocate` would find in the prefix cache right now."""
        return len(self._lookup(seq)) * self.block_size

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Whether `allocate(seq)` can take its blocks and still leave `reserve` blocks."""
        hits = self._lookup(seq)
        new = self.blocks_needed(seq.num_tokens) - len(hits)
        hits_now_cached = sum(1 for b in hits if self._ref[b] == 0)  # taking them shrinks the pool
        return new + reserve <= len(self._free) + len(self._cached) - hits_now_cached

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting `seq` blocks for all its tokens (prompt, plus outputs when it
        comes back after preemption), reusing cached prefix blocks. Sets `num_computed_tokens`
        to the tokens found cached, and at its first admission `num_cached_tokens` too."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        if not self.can_allocate(seq):
            raise RuntimeError(f"not enough KV blocks for sequence {seq.seq_id}; ask can_allocate first")
        hits = self._lookup(seq)
        for b in hits:  # before taking new blocks, so that eviction cannot take a hit
            self._incref(b)
        new = [self._take() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + new
        seq.num_computed_tokens = len(hits) * self.block_size
        # num_cached_tokens: the hits of its first admission (vLLM's rule). Back after preemption, a sequence
        # finds blocks it computed itself, its outputs' too (the server's cached_tokens ran past prompt_tokens)
        if not seq.admitted:
            seq.num_cached_tokens, seq.admitted = seq.num_computed_tokens, True
        self._num_published[seq.seq_id] = len(hits)
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens

    def try_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` tokens after the computed ones (a decode token, or
        a prefill chunk) if the pool can (True); else change nothing (False)."""
        table, first = seq.block_table, seq.num_computed_tokens // self.block_size
        shared = first < len(table) and self._ref[table[first]] > 1  # copy-on-write: see the docstring
        if not shared and seq.num_computed_tokens + num_new_tokens <= len(table) * self.block_size:
            return True  # its last block has room: block_size - 1 decode steps in block_size
        short = self._blocks_short(seq, num_new_tokens)
        if short + shared > len(self._free) + len(self._cached):
            return False
        if shared:
            copy = self._take()
            held = seq.num_computed_tokens - first * self.block_size  # the block's positions written so far
            if held:
                self.pending_copies.append((table[first], copy, held))
            self._ref[table[first]] -= 1  # still held by another: stays used
            # an entry changes: a new list, which AttentionMetadata rewrites whole (it rewrites
            # only the new tail of the list it wrote last)
            seq.block_table = table = table[:first] + [copy] + table[first + 1:]
        table += [self._take() for _ in range(short)]  # in place: see AttentionMetadata
        return True

    def fork(self, seqs: list[Sequence], parents: list[Sequence]) -> None:
        """Beam search's reshuffle: each `seqs[i]` drops its blocks and takes a reference to
        every block of `parents[i]` (which may be in `seqs`, the state before any change
        counts). Their tokens are the caller's to set (the parent's, plus what comes next)."""
        states = {p.seq_id: (list(p.block_table), list(self._chain.get(p.seq_id, ())),
                             self._num_published.get(p.seq_id, 0)) for p in parents}
        for p in parents:  # every new reference first: a block both old and new never hits 0
            for b in p.block_table:
                self._incref(b)
        for seq in seqs:
            self.free(seq)
        for seq, p in zip(seqs, parents):
            table, chain, published = states[p.seq_id]
            seq.block_table = list(table)
            self._chain[seq.seq_id], self._num_published[seq.seq_id] = list(chain), published

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back `seq`'s blocks past those `num_tokens` tokens need (the slots of draft
        tokens the target rejected: runtime/speculative). Such blocks hold no computed token
        (were never published) and were taken by try_append for this sequence alone."""
        keep = self.blocks_needed(num_tokens)
        if len(seq.block_table) <= keep:
            return
        # a new list, not in place: AttentionMetadata rewrites a row only when its list is
        # another object or shorter than it wrote, and the table may regrow before the next
        # step to the same length with other blocks
        table, seq.block_table = seq.block_table, seq.block_table[:keep]
        for b in table[keep:]:
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._num_used -= 1
                self._unpublish(b)
                self._free.append(b)

    def publish(self, seq: Sequence) -> None:
        """Register the blocks of `seq` that have become full of computed tokens."""
        if not self.enable_block_reuse:
            return
        done = self._num_published.get(seq.seq_id, 0)
        if seq.num_computed_tokens < (done + 1) * self.block_size:
            return  # no block newly full: block_size - 1 decode steps in block_size
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= done:
            return
        chain = self._hashes(seq, full)
        stored = []  # (index, hash) of the blocks published here: KV-cache events
        for i in range(done, full):
            b, h = seq.block_table[i], chain[i]
            # another sequence may have computed the same prefix at the same time and
            # published first; this block then stays private and is freed, not cached
            if h not in self._block_of_hash and self._hash[b] is None:
                self._hash[b], self._block_of_hash[h] = h, b
                stored.append(i)
        self._num_published[seq.seq_id] = full
        if self.events is not None and stored:
            self._store_events(seq, chain, stored)

    def _store_events(self, seq: Sequence, chain: list[bytes], stored: list[int]) -> None:
        """One "stored" event per run of consecutive blocks published (runtime/kv_cache_events.py)."""
        lora = seq.lora_request.lora_int_id if seq.lora_request is not None else None
        bs, start = self.block_size, 0
        for k in range(1, len(stored) + 1):
            if k == len(stored) or stored[k] != stored[k - 1] + 1:
                run = stored[start:k]
                self.events.stored(chain[run[0] - 1] if run[0] else None,
                                   [(chain[i], seq.token_slice(i * bs, (i + 1) * bs)) for i in run], lora)
                start = k

    def free(self, seq: Sequence, publish: bool = True) -> None:
        """Drop `seq`'s references. With `publish` (the default) its computed full blocks
        are published first and stay cached once unreferenced. `publish=False` is for a
        failed sequence: nothing more is published, and every block whose last reference
        this was is uncached too (a conservative purge: its K/V may be garbage)."""
        if publish:
            self.publish(seq)
        # last block first: it joins the LRU earliest and is evicted first, keeping a
        # prefix's head (which more requests share) cached longest
        for b in reversed(seq.block_table):
            self._ref[b] -= 1
            if self._ref[b] > 0:
                continue
            self._num_used -= 1
            if self._hash[b] is not None and publish:
                self._cached[b] = None
            else:
                self._unpublish(b)
                self._free.append(b)
        seq.block_table = []
        self._chain.pop(seq.seq_id, None)
        self._num_published.pop(seq.seq_id, None)

    # --- internals ------------------------------------------------------------------

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """The hashes of the first `n` full token blocks of `seq` (at least)."""
        chain = self._chain.setdefault(seq.seq_id, [])
        tokens, bs, mm = seq.token_ids, self.block_size, seq.multimodal
        while len(chain) < n:
            i = len(chain)
            extra = mm.block_key(i * bs, (i + 1) * bs) if mm is not None else b""  # its images' hashes
            chain.append(block_hash(chain[-1] if chain else chain_root(seq), tokens[i * bs:(i + 1) * bs], extra))
        return chain

    def _lookup(self, seq: Sequence) -> list[int]:
        """The cached blocks holding `seq`'s longest cached prefix of full blocks. Capped
        below the last token: that one must be computed for the model to give logits. None
        for a sequence with prompt logprobs pending: a cached prefix has no logits."""
        if not self.enable_block_reuse or seq.prompt_logprobs_pending:
            return []
        n = (seq.num_tokens - 1) // self.block_size
        hits = []
        for h in self._hashes(seq, n)[:n]:
            b = self._block_of_hash.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _blocks_short(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table))

    def _take(self) -> int:
        if self._free:
            b = self._free.popleft()
        else:
            b, _ = self._cached.popitem(last=False)  # evict the least recently used
            self._unpublish(b)
        self._incref(b)
        return b

    def _incref(self, b: int) -> None:
        if self._ref[b] == 0:
            self._num_used += 1
            self._cached.pop(b, None)
        self._ref[b] += 1

    def _unpublish(self, b: int) -> None:
        if self._hash[b] is not None:
            del self._block_of_hash[self._hash[b]]
            if self.events is not None:
                self.events.removed(self._hash[b])
            self._hash[b] = None

    def check_when_idle(self) -> None:
        """The books, as the engine checks them each time it goes idle (AssertionError unless they
        balance): in full (`check_invariants`) where the pool is small or a second has passed
        since the last full check, else the O(1) count (free + cached + used = all). The full
        check is on the path of the finishing request's output: 1.8 ms at the 8B's 26,475 blocks
        on the H200 (bf16), 3.9 ms at 59,135 (FP8 KV), dev CPU; a 2,048-token TTFT is ~50 ms."""
        now = time.monotonic()
        if self.num_blocks <= FULL_IDLE_CHECK_BLOCKS or now - self._checked_at >= 1.0:
            self.check_invariants()
            self._checked_at = now
            return
        assert len(self._free) + len(self._cached) + self._num_used == self.num_blocks, (
            f"free {len(self._free)} + cached {len(self._cached)} + used {self._num_used} != total "
            f"{self.num_blocks}: a block leaked")

    def check_invariants(self, seqs: Iterable[Sequence] | None = None) -> None:
        """Raise AssertionError unless the books balance. Given every sequence that holds
        blocks, also check that ref counts equal block-table occurrences."""
        # The engine runs this each time it goes idle, over every block of the pool (~12K
        # for an 8B model on an H100): the checks go through C loops (min, count, map,
        # set operations), not per-block Python: 1.9 ms at 11,810 blocks on the dev CPU
        # (python -m timeit -s "from trtllm.runtime.block_manager import BlockManager;
        # bm = BlockManager(11810, 16)" "bm.check_invariants()").
        n, ref, hashes = self.num_blocks, self._ref, self._hash
        assert min(ref) >= 0, f"negative ref counts: {[b for b in range(n) if ref[b] < 0]}"
        free, cached = set(self._free), set(self._cached)
        assert len(free) == len(self._free), "a block is on the free list twice"
        assert not free & cached, f"blocks both free and cached: {sorted(free & cached)}"
        idle = [*free, *cached]
        assert not any(map(ref.__getitem__, idle)), (
            f"free or cached blocks referenced: {[b for b in idle if ref[b]]}")
        assert [*map(hashes.__getitem__, free)].count(None) == len(free), "a free block holds a published hash"
        assert None not in map(hashes.__getitem__, cached), "a cached block holds no hash"
        used = n - ref.count(0)
        assert used == self._num_used, f"{used} blocks referenced but books say {self._num_used}"
        assert len(free) + len(cached) + used == n, (
            f"free {len(free)} + cached {len(cached)} + used {used} != total {n}: a block leaked")
        assert [*map(hashes.__getitem__, self._block_of_hash.values())] == [*self._block_of_hash], (
            "the hash table points at a block that does not hold that hash")
        assert n - hashes.count(None) == len(self._block_of_hash), (
            "a block holds a hash the hash table does not know")
        if seqs is not None:
            held = Counter(b for s in seqs for b in s.block_table)
            bad = [b for b in range(n) if held[b] != ref[b]]
            assert not bad, f"ref counts differ from block tables at blocks {bad}"
