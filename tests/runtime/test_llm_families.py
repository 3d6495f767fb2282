"""LLM(model=path) for HF decoder families with no model file of ours: transformers' module
under trtllm's attention interface (models/hf.py), compiled by the same passes. Greedy
output equals HF generate token for token (fp32, chunked prefill and prefix reuse on,
windows and Gemma-2's logit soft-capping that bite); a family the kernels or the contract
cannot run is refused by name."""
import pytest
import torch

from tests.models.checkpoints import hf_model, write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm.compile import CompileError
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

PROMPTS = [[5, 17, 99, 3, 250, 31, 8], [400, 3], list(range(60, 81)), [9]]
NEW = 8
RUN = ["gemma", "gemma2", "gemma3", "phi", "phi3", "gpt2", "gpt_neox", "stablelm", "starcoder2", "olmo2",
       "granite", "cohere"]


def checkpoint(family, tmp_path_factory):
    path = tmp_path_factory.mktemp(family)
    write_checkpoint(family, path, vocab_size=512)
    make_tokenizer(path)
    return path


def llm(path, **build):
    # max_num_tokens 8: the 21-token prompt is prefilled in chunks; block reuse is on by default
    return LLM(str(path), dtype="float32", kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=1024),
               build_config=BuildConfig(**{"max_batch_size": 4, "max_num_tokens": 8, "max_seq_len": 64, **build}))


@pytest.mark.parametrize("family", RUN)
def test_greedy_matches_hf_generate(family, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    model = hf_model(path)
    expected = [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                [0, len(p):].tolist() for p in PROMPTS]
    params = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    with llm(path) as engine:
        summary = engine.compiled.summary()
        assert f"HF module {type(model).__name__}" in summary, summary
        if family == "gemma2":
            assert "logit soft-capping per layer [5.0, 5.0]" in summary, summary
        for _ in range(2):  # the second run takes the prompts' full blocks from the prefix cache
            got = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]
            assert got == expected
        assert engine.block_manager.prefix_hit_rate > 0


@pytest.mark.parametrize("family, error, why", [
    ("gptj", CompileError, "GPTJForCausalLM is refused: its attention does not go through HF's AttentionInterface"),
    ("falcon", CompileError, "FalconForCausalLM is refused: its attention does not go through"),
    ("gpt_oss", CompileError, r"attention layer 0 \(GptOssAttention\): the attention argument 's_aux'"),
])
def test_a_family_that_cannot_run_is_refused_by_name(family, error, why, tmp_path_factory):
    path = checkpoint(family, tmp_path_factory)
    with pytest.raises(error, match=why):
        llm(path)


def test_gemma2_soft_capping_changes_hf_greedy_tokens(tmp_path_factory):
    """The gemma2 checkpoint's cap (5) changes HF's own greedy tokens for these prompts, so
    test_greedy_matches_hf_generate[gemma2] fails if the cap is dropped."""
    path = checkpoint("gemma2", tmp_path_factory)
    capped, uncapped = hf_model(path), hf_model(path)
    uncapped.config.attn_logit_softcapping = None
    assert capped.config.attn_logit_softcapping == 5.0
    for layer in uncapped.model.layers:
        layer.self_attn.attn_logit_softcapping = None

    def greedy(model):
        return [model.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
                [0, len(p):].tolist() for p in PROMPTS]

    assert greedy(capped) != greedy(uncapped)


def test_our_model_file_is_taken_where_there_is_one(tmp_path_factory):
    with llm(checkpoint("qwen2_swa", tmp_path_factory)) as engine:
        summary = engine.compiled.summary()
    assert "model file of ours: trtllm.models.llama.LlamaForCausalLM" in summary
    assert "sliding windows per layer [0, 4]" in summary
