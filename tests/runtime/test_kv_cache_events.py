"""KvCacheConfig(event_buffer_max_size=N) and LLM.get_kv_cache_events(): TensorRT-LLM's events of
the prefix cache (created, blocks stored with their tokens and parent, blocks removed)."""
from __future__ import annotations

import asyncio

import pytest

from trtllm.config import BuildConfig, ConfigError, KvCacheConfig
from trtllm.runtime.kv_cache_events import hash_id
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)


def events_llm(path, blocks=8, events=64):
    return LLM(str(path), dtype="float32", skip_tokenizer_init=True,
               kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=16 * blocks,
                                             event_buffer_max_size=events),
               build_config=BuildConfig(max_batch_size=2, max_num_tokens=64, max_seq_len=64))


def test_stored_blocks_name_their_tokens_and_chain(checkpoint):
    prompt = list(range(3, 43))  # 40 tokens: 2 full blocks of 16 become reusable (+2 generated: still 2)
    with events_llm(checkpoint) as llm:
        created, = llm.get_kv_cache_events()
        assert created["data"] == {"type": "created", "num_blocks_per_cache_level": [8, 0]}
        assert created["window_size"] == 64
        llm.generate(prompt, PARAMS, use_tqdm=False)
        events = llm.get_kv_cache_events()
        stored = [e["data"] for e in events if e["data"]["type"] == "stored"]
        blocks = [b for e in stored for b in e["blocks"]]
        assert [[t["token_id"] for t in b["tokens"]] for b in blocks] == [prompt[:16], prompt[16:32]]
        # the prompt is prefilled in one step: its two blocks become reusable together, one run
        assert len(stored) == 1 and stored[0]["parent_hash"] is None and all(b["lora_id"] is None for b in blocks)
        assert [e["event_id"] for e in events] == list(range(1, len(events) + 1))
        assert llm.get_kv_cache_events() == []  # drained
        # the first block found cached, the second new: its run's parent is the first block
        llm.generate(prompt[:16] + list(range(200, 224)), PARAMS, use_tqdm=False)
        branch = [e["data"] for e in llm.get_kv_cache_events() if e["data"]["type"] == "stored"]
        assert len(branch) == 1 and branch[0]["parent_hash"] == blocks[0]["block_hash"]
        assert [t["token_id"] for t in branch[0]["blocks"][0]["tokens"]] == list(range(200, 216))
        llm.generate(prompt, PARAMS, use_tqdm=False)  # a prefix hit stores nothing new
        assert not [e for e in llm.get_kv_cache_events() if e["data"]["type"] == "stored"]
        # the events' hashes are the pool's own keys (their first 8 bytes)
        assert {b["block_hash"] for b in blocks} <= {hash_id(h) for h in llm.block_manager._block_of_hash}


def test_evicted_blocks_are_removed(checkpoint):
    with events_llm(checkpoint, blocks=4) as llm:
        llm.get_kv_cache_events()
        first = list(range(3, 43))
        llm.generate(first, PARAMS, use_tqdm=False)
        stored = {b["block_hash"] for e in llm.get_kv_cache_events() if e["data"]["type"] == "stored"
                  for b in e["data"]["blocks"]}
        llm.generate(list(range(100, 140)), PARAMS, use_tqdm=False)  # 3 blocks of a pool of 4: evicts
        removed = {h for e in llm.get_kv_cache_events() if e["data"]["type"] == "removed"
                   for h in e["data"]["block_hashes"]}
        assert removed and removed <= stored

        async def drain():
            return [e async for e in llm.get_kv_cache_events_async()]

        llm.generate(first, PARAMS, use_tqdm=False)
        assert any(e["data"]["type"] == "stored" for e in asyncio.run(drain()))


def test_events_are_asked_for_by_name(checkpoint):
    with LLM(str(checkpoint), dtype="float32", skip_tokenizer_init=True, max_seq_len=64,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256)) as llm:
        with pytest.raises(ValueError, match=r"get_kv_cache_events\(\) needs .*event_buffer_max_size=N"):
            llm.get_kv_cache_events()
    with pytest.raises(ConfigError, match="event_buffer_max_size > 0 needs enable_block_reuse=True"):
        KvCacheConfig(event_buffer_max_size=8, enable_block_reuse=False)
    with pytest.raises(ConfigError, match="event_buffer_max_size=-1"):
        KvCacheConfig(event_buffer_max_size=-1)
