"""Plain-PyTorch models (tests/models/zoo.py) served by `LLM(module)`: greedy output equals
the model's own eager greedy loop, token for token (fp32), with chunked prefill and prefix
reuse on. On CPU the graphs run as rewritten FX; on a CUDA machine (`cuda` case, skipped
elsewhere) through Inductor with the decode CUDA graphs captured, at batch 1 and a full batch."""
import os

import pytest
import torch

from tests.models.zoo import ZOO, greedy_reference, make
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

VOCAB = 128
PROMPTS = [[5, 17, 99, 3, 50, 31, 8], [100, 3], list(range(60, 81)), [9]]
NEW = 8
MOE_LAYERS = {"moe": 2}  # zoo model -> MoE blocks fuse_moe must fuse in every compiled graph

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")


def serve(model, **build):
    # max_num_tokens 8: the 21-token prompt is prefilled in chunks; block reuse is on by default
    return LLM(model, kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=2048),
               build_config=BuildConfig(**{"max_batch_size": 4, "max_num_tokens": 8, "max_seq_len": 64, **build}))


def check(name: str, device: str, prompts: list[list[int]], **build):
    model = make(name, VOCAB, device=device)
    expected = [greedy_reference(model, p, NEW) for p in prompts]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    with serve(model, **build) as llm:
        assert "plain module" in llm.compiled.summary()
        for _ in range(2):  # the second run takes the prompts' full blocks from the prefix cache
            outs = llm.generate(prompts, params, use_tqdm=False)
            assert all(o.outputs[0].finish_reason == "length" for o in outs), [o.outputs[0].error for o in outs]
            assert [o.outputs[0].token_ids for o in outs] == expected
        if name in MOE_LAYERS:
            summary, graphs = llm.compiled.summary(), llm.compiled.captures
            assert f"trtllm.fused_moe: {MOE_LAYERS[name] * graphs}" in summary, summary
            assert "left as captured" not in summary, summary
        if any(len(p) >= 16 for p in prompts):  # a full block to find in the cache
            assert llm.engine_stats().prefix_hit_rate > 0


@pytest.mark.parametrize("name", sorted(ZOO))
def test_plain_model_greedy_equals_its_eager_loop(name):
    check(name, "cpu", PROMPTS)


@needs_cuda
@pytest.mark.parametrize("name", sorted(ZOO))
def test_plain_model_on_the_gpu_under_cuda_graphs(name):
    check(name, "cuda", PROMPTS[:1])  # batch 1
    batch = [[(7 * i + j) % VOCAB for j in range(3 + i % 11)] for i in range(64)]
    check(name, "cuda", batch, max_batch_size=64, max_num_tokens=128)  # a full decode batch
