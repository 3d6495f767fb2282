"""LLM(model=path) for DeepSeek-V2/V3 checkpoints: multi-head latent attention paged as its
latent (passes/place_mla_attention.py, trtllm/mla_attention.py), MoE layers after the dense
first ones fused (fuse_moe). Greedy output equals HF generate token for token (fp32, with
chunked prefill and prefix reuse); the cache holds kv_lora_rank + qk_rope_head_dim values per
token and layer; what the MLA kernels cannot do is refused by name."""
import pytest
import torch

from tests.runtime.test_llm_families import NEW, PROMPTS, check_greedy, checkpoint, hf_greedy, llm
from trtllm.config import KvCacheConfig

# family -> (kv_lora_rank + qk_rope_head_dim, MoE layers of 2): tests/models/checkpoints.py's configs
MLA = {"deepseek_v3": (32 + 8, 1), "deepseek_v2": (32 + 8, 1)}


@pytest.mark.parametrize("family", sorted(MLA))
def test_greedy_matches_hf_generate_with_the_latent_paged(family, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    expected, hf_class = hf_greedy(path)
    with llm(path) as engine:
        check_greedy(engine, expected)
        summary, graphs = engine.compiled.summary(), len(engine.compiled.graphs)
        cache = engine.engine.runner.cache
    row, moe = MLA[family]
    assert f"HF module {hf_class}" in summary, summary
    assert f"trtllm.mla_attention: {2 * graphs}" in summary, summary
    assert f"trtllm.fused_moe: {moe * graphs}" in summary and "left as captured" not in summary, summary
    assert "trtllm.attention:" not in summary, summary
    # the pool: one latent row of kv_lora_rank + qk_rope_head_dim fp32 values per token and layer
    tokens = cache.num_blocks * cache.block_size
    assert cache.nbytes == tokens * 2 * row * 4, (tuple(cache.k.shape), tuple(cache.v.shape))
