"""The KV pool's size from free GPU memory, capped for tiny models (kv_budget.MAX_MEASURED_BLOCKS)."""
from types import SimpleNamespace

import torch

from trtllm.config import KvCacheConfig
from trtllm.runtime import kv_budget


def _measured_blocks(monkeypatch, free_bytes: int, max_tokens=None) -> int:
    spec = SimpleNamespace(dtype=torch.bfloat16, latent=False, num_layers=2, num_kv_heads=1, head_dim=16)
    compiled = SimpleNamespace(attention=spec, device=torch.device("cuda"), tensor_parallel=None)
    monkeypatch.setattr(kv_budget, "_profile_peak", lambda *a: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_bytes, free_bytes))
    config = KvCacheConfig(tokens_per_block=32, free_gpu_memory_fraction=1.0, max_tokens=max_tokens)
    return kv_budget.num_kv_blocks(compiled, config, 64, 2, 64)


def test_a_tiny_model_on_a_big_gpu_gets_at_most_the_cap(monkeypatch):
    per_block = 2 * 2 * 32 * 16 * 2  # K and V, 2 layers, 32 tokens, 1 head of 16, bf16: 4 KiB
    assert _measured_blocks(monkeypatch, 1000 * per_block) == 1000
    assert _measured_blocks(monkeypatch, 125 * 2**30) == kv_budget.MAX_MEASURED_BLOCKS  # 32 M blocks would fit
    # a pool the user sized in tokens is theirs
    assert _measured_blocks(monkeypatch, 125 * 2**30, max_tokens=40 * 2**20) == 40 * 2**20 // 32
