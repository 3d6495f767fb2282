"""TensorRT-LLM's KV-cache events, for a router that tracks which prefixes each engine holds
(KV-aware routing, as Dynamo's): `LLM(kv_cache_config=KvCacheConfig(event_buffer_max_size=N))`
keeps the last N events, and `llm.get_kv_cache_events()` returns those since the last call:

    {"event_id": 0, "window_size": 4096, "data": {"type": "created", "num_blocks_per_cache_level": [512, 0]}}
    {"event_id": 1, "window_size": 4096, "data": {"type": "stored", "parent_hash": None, "blocks": [
        {"type": "stored_block", "block_hash": 8812..., "lora_id": None, "cache_level": 0, "priority": 35,
         "tokens": [{"type": "unique_token", "token_id": 5, "token_extra_id": 0}, ...]}, ...]}}
    {"event_id": 9, "window_size": 4096, "data": {"type": "removed", "block_hashes": [8812...]}}

A block is "stored" when it becomes reusable (full of computed tokens: BlockManager.publish), in
runs of consecutive blocks of one sequence, each run's `parent_hash` the block before its first
(None: the prompt's first block); "removed" when it can no longer be reused (evicted, or freed by a
failed sequence). A hash is the first 8 bytes (little-endian) of the 16-byte blake2b hash the pool
keys blocks by (block_manager.py: it names the whole prefix, the adapter and cache salt included);
`window_size` is the engine's max_seq_len (full attention); one cache level (GPU), priority 35
(TensorRT-LLM's default). Recorded on the engine's thread; a deque's append and popleft are atomic,
so the reader never locks it.
"""
from __future__ import annotations

import itertools
from collections import deque

DEFAULT_PRIORITY = 35  # TensorRT-LLM's default retention priority


def hash_id(block_hash: bytes) -> int:
    return int.from_bytes(block_hash[:8], "little")


class KvCacheEvents:
    """The pool's events, the last `max_size` kept."""

    def __init__(self, max_size: int, window_size: int, num_blocks: int):
        self.window_size = window_size
        self._ids = itertools.count()
        self._events: deque[dict] = deque(maxlen=max_size)
        self._add({"type": "created", "num_blocks_per_cache_level": [num_blocks, 0]})

    def _add(self, data: dict) -> None:
        self._events.append({"event_id": next(self._ids), "data": data, "window_size": self.window_size})

    def stored(self, parent: bytes | None, blocks: list[tuple[bytes, list[int]]], lora_id: int | None) -> None:
        """A run of consecutive blocks of one sequence became reusable: (hash, tokens) each."""
        self._add({"type": "stored", "parent_hash": None if parent is None else hash_id(parent), "blocks": [
            {"type": "stored_block", "block_hash": hash_id(h), "lora_id": lora_id, "cache_level": 0,
             "priority": DEFAULT_PRIORITY,
             "tokens": [{"type": "unique_token", "token_id": t, "token_extra_id": 0} for t in tokens]}
            for h, tokens in blocks]})

    def removed(self, block_hash: bytes) -> None:
        self._add({"type": "removed", "block_hashes": [hash_id(block_hash)]})

    def drain(self) -> list[dict]:
        """The events since the last drain, oldest first (one popleft each: an event the engine
        records meanwhile stays for the next)."""
        return [self._events.popleft() for _ in range(len(self._events))]
