"""Prefill CUDA graphs on a GPU (skipped without CUDA or with the Triton interpreter): steps of
several tokens a sequence (whole prompts, chunks, decode + prefill) replayed from token-bucket
graphs give the greedy tokens of the same engine without them and of one without any graph
(fp32) and compile nothing after startup (with LoRA: tests/runtime/test_lora_gpu.py)."""
import os

import pytest
import torch

from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, CudaGraphConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 101)), [9], [(7 * i) % 500 for i in range(150)]]
NEW = 8


def run(path, max_num_tokens: int, **llm_kwargs):
    """(greedy tokens, prefill replays, graphs compiled after startup, captured prefill sizes)."""
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    with LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
             build_config=BuildConfig(max_batch_size=4, max_num_tokens=max_num_tokens, max_seq_len=256),
             **llm_kwargs) as llm:
        graphs, replays = llm.engine.runner.cuda_graphs, []
        real = graphs.replay_prefill
        graphs.replay_prefill = lambda size, *a: (replays.append(size), real(size, *a))[1]
        compiled_before = llm.compiled.captures
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        assert all(o.outputs[0].finish_reason == "length" for o in outs), [o.outputs[0].error for o in outs]
        return ([o.outputs[0].token_ids for o in outs], replays, llm.compiled.captures - compiled_before,
                sorted(graphs.prefill))


@pytest.mark.parametrize("max_num_tokens", [256, 16], ids=["whole", "chunked"])
def test_prefill_graphs_give_the_tokens_of_eager_steps(tmp_path, max_num_tokens):
    path = write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(path)
    tokens, replays, compiled, sizes = run(path, max_num_tokens)
    assert sizes == ([16, 32, 64, 128, 256] if max_num_tokens == 256 else [16])
    assert replays and compiled == 0, (replays, compiled)
    off, off_replays, _, off_sizes = run(path, max_num_tokens, cuda_graph_config=CudaGraphConfig(max_prefill_tokens=0))
    assert off_sizes == [] and off_replays == []
    eager, *_ = run(path, max_num_tokens, enable_cuda_graph=False)
    assert tokens == off == eager
