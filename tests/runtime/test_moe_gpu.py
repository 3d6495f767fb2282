"""MoE models served on a GPU under CUDA graphs (skipped without CUDA or with the Triton
interpreter): tiny HF MoE checkpoints in fp32 give the same greedy tokens with the decode
CUDA graphs captured as without, and as HF generate; a Qwen3-30B-A3B-width block pair (2
layers of the real hidden size, 128 experts, top-8) in bf16 fuses every block (fuse_moe's
numeric check passes at real widths) and serves a full decode batch. The plain-PyTorch MoE
of the zoo runs under CUDA graphs in tests/runtime/test_zoo.py."""
import os

import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.cli.model_arg import PRESETS, build_preset
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81)), [9]]
NEW = 8
MOE = {"mixtral": 2, "qwen2_moe": 2, "qwen3_moe": 1, "olmoe": 2}


def greedy(llm, prompts):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(o.outputs[0].finish_reason == "length" for o in outs), [o.outputs[0].error for o in outs]
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("family", sorted(MOE))
def test_moe_checkpoint_under_cuda_graphs_equals_eager_and_hf(family, tmp_path):
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
        assert f"trtllm.fused_moe: {MOE[family] * graphs}" in summary and "left as captured" not in summary, summary
    assert got[True] == got[False] == expected


def test_qwen3_30b_a3b_width_blocks_fuse_in_bf16_and_serve_a_decode_batch():
    config = dict(PRESETS["qwen3-30b-a3b"], num_hidden_layers=2)
    model = build_preset(config, dtype="bfloat16", device="cuda")
    batch = [[(7 * i + j) % 1000 for j in range(3 + i % 11)] for i in range(32)]
    with LLM(model, dtype="bfloat16", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=8192),
             build_config=BuildConfig(max_batch_size=32, max_num_tokens=256, max_seq_len=128)) as llm:
        tokens = greedy(llm, batch)
        summary, graphs = llm.compiled.summary(), llm.compiled.captures
    assert f"trtllm.fused_moe: {2 * graphs}" in summary and "left as captured" not in summary, summary
    assert all(len(t) == NEW for t in tokens)
