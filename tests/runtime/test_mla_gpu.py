"""DeepSeek-V2/V3 (multi-head latent attention) served on a GPU under CUDA graphs (skipped
without CUDA or with the Triton interpreter): tiny checkpoints in fp32 give the same greedy
tokens with the decode CUDA graphs captured (the absorbed decode kernel replayed) as without,
and as HF generate; DeepSeek-V2-Lite-width layers (2 of them: MLA with 16 heads, latent 512 +
rope 64, then 64 experts) in bf16 serve a full decode batch with the latent placed and the
MoE block fused. Run on a GPU with

    TRITON_INTERPRET=0 PYTHONPATH=$PWD python -m pytest -q tests/runtime/test_mla_gpu.py
"""
import os

import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.test_moe_gpu import NEW, PROMPTS, greedy
from tests.runtime.tokenizers import make_tokenizer
from trtllm.cli.model_arg import PRESETS, build_preset
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_mla_checkpoint_under_cuda_graphs_equals_eager_and_hf(family, tmp_path):
    path = write_checkpoint(family, tmp_path, vocab_size=512)
    make_tokenizer(path)
    hf = hf_model(path).cuda()
    expected = [hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=NEW, min_new_tokens=NEW,
                            do_sample=False)[0, len(p):].tolist() for p in PROMPTS]
    got = {}
    for cuda_graph in (True, False):
        with LLM(str(path), dtype="float32", enable_cuda_graph=cuda_graph,
                 kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=2048),
                 build_config=BuildConfig(max_batch_size=4, max_num_tokens=8, max_seq_len=64)) as llm:
            got[cuda_graph] = greedy(llm, PROMPTS)
            summary, graphs = llm.compiled.summary(), llm.compiled.captures
        assert f"trtllm.mla_attention: {2 * graphs}" in summary and "left as captured" not in summary, summary
    assert got[True] == got[False] == expected


def test_deepseek_v2_lite_width_layers_serve_a_decode_batch_in_bf16():
    config = dict(PRESETS["deepseek-v2-lite"], num_hidden_layers=2)
    model = build_preset(config, dtype="bfloat16", device="cuda")
    batch = [[(7 * i + j) % 1000 for j in range(3 + i % 11)] for i in range(32)]
    with LLM(model, dtype="bfloat16", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=8192),
             build_config=BuildConfig(max_batch_size=32, max_num_tokens=256, max_seq_len=128)) as llm:
        tokens = greedy(llm, batch)
        summary, graphs = llm.compiled.summary(), llm.compiled.captures
        cache = llm.engine.runner.cache
    assert f"trtllm.mla_attention: {2 * graphs}" in summary, summary
    assert f"trtllm.fused_moe: {graphs}" in summary and "left as captured" not in summary, summary
    assert cache.nbytes == cache.num_blocks * cache.block_size * 2 * (512 + 64) * 2  # bf16 latent rows
    assert all(len(t) == NEW for t in tokens)
