"""LoRA on a GPU under CUDA graphs (skipped without CUDA or with the Triton interpreter): the
prefill graphs (captured with the adapters' kernels) replay each token's adapter slot, so do
the verify graphs of n-gram speculation, and adapters over FP8 GEMMs replay in the decode
graphs; greedy tokens equal those of the same engine without CUDA graphs (fp32)."""
import os

import pytest
import torch

from tests.lora_adapters import write_adapter
from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig, LoraConfig, LoRARequest, NGramDecodingConfig, SamplingParams
from trtllm.config import QuantAlgo, QuantConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                                reason="needs a CUDA GPU with compiled Triton (TRITON_INTERPRET=0)")

PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7], [400, 2, 400, 2, 400, 2], list(range(60, 81))]


def tokens(path, request, graphs: bool, **kwargs):
    with LLM(str(path), dtype="float32", enable_cuda_graph=graphs,
             kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=4096),
             build_config=BuildConfig(max_batch_size=8, max_num_tokens=64, max_seq_len=64),
             lora_config=LoraConfig(max_lora_rank=8), **kwargs) as llm:
        graphs, replays = llm.engine.runner.cuda_graphs, []
        real = graphs.replay_prefill
        graphs.replay_prefill = lambda size, *a: (replays.append(size), real(size, *a))[1]
        outs = llm.generate(PROMPTS * 2, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
                            use_tqdm=False, lora_request=[request] * 3 + [None] * 3)
        assert all(o.outputs[0].finish_reason == "length" for o in outs), [o.outputs[0].error for o in outs]
        return [o.outputs[0].token_ids for o in outs], dict(vars(llm.engine_stats()), prefill_replays=len(replays))


@pytest.mark.parametrize("options", [dict(), dict(speculative_config=NGramDecodingConfig(max_draft_len=3)),
                                     dict(quant_config=QuantConfig(quant_algo=QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN))],
                         ids=["prefill_graphs", "ngram_verify_graphs", "fp8"])
def test_adapters_under_cuda_graphs_give_the_eager_tokens(tmp_path, options):
    path = write_checkpoint("llama31", tmp_path / "base", vocab_size=512)
    make_tokenizer(path)
    write_adapter(path, tmp_path / "adapter", r=8, seed=1)
    request = LoRARequest("a", 1, str(tmp_path / "adapter"))
    eager, _ = tokens(path, request, False, **options)
    graphs, stats = tokens(path, request, True, **options)
    assert eager[:3] != eager[3:]
    assert graphs == eager
    assert stats["prefill_replays"] > 0
    if "speculative_config" in options:
        assert stats["spec_accepted_tokens"] > 0
