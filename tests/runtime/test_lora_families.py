"""LoRA beyond the Llama names: GPT-NeoX's, Falcon's and Bloom's fused `query_key_value`, `dense`,
`dense_h_to_4h` / `dense_4h_to_h` and Phi-2's `dense`, `fc1` / `fc2` are default targets, so a PEFT
adapter of those families is served by a plain `LoraConfig()` (it was "the model has no linear
named in target modules"); TensorRT-LLM's module names map as TensorRT-LLM maps them."""
from __future__ import annotations

import pytest

from tests.lora_adapters import peft_greedy, write_adapter
from tests.models.checkpoints import write_checkpoint
from tests.runtime.tokenizers import make_tokenizer
from trtllm import LLM, BuildConfig, KvCacheConfig, LoraConfig, LoRARequest, SamplingParams

PROMPT = [5, 17, 99, 3, 250]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
FUSED = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


def small_llm(path, lora_config: LoraConfig) -> LLM:
    return LLM(str(path), dtype="float32", lora_config=lora_config,
               kv_cache_config=KvCacheConfig(tokens_per_block=16, max_tokens=256),
               build_config=BuildConfig(max_batch_size=2, max_num_tokens=16, max_seq_len=64))


@pytest.mark.parametrize("family, targets", [
    ("falcon", FUSED), ("gpt_neox", FUSED),
    ("bloom", FUSED),
    ("phi", ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2")),
])
def test_a_peft_adapter_of_another_familys_linears_gives_peft_tokens(tmp_path, family, targets):
    base = write_checkpoint(family, tmp_path / "base", vocab_size=512)
    make_tokenizer(base)
    peft = write_adapter(base, tmp_path / "adapter", r=4, targets=targets, seed=1)
    want = peft_greedy(peft, PROMPT, PARAMS.max_tokens)
    with small_llm(base, LoraConfig(max_lora_rank=8, max_loras=1)) as llm:
        assert {p.rsplit(".", 1)[-1] for p in llm.compiled.lora.modules} == set(targets)
        request = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
        got = llm.generate([PROMPT], PARAMS, lora_request=request, use_tqdm=False)[0].outputs[0].token_ids
        plain = llm.generate([PROMPT], PARAMS, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want and got != plain


@pytest.mark.parametrize("names, wrapped", [
    (["mlp_h_to_4h"], {"gate_proj"}), (["mlp_gate"], {"up_proj"}), (["attn_dense", "mlp_4h_to_h"], {"o_proj", "down_proj"}),
])
def test_tensorrt_llm_module_names_wrap_the_linears_tensorrt_llm_means(tmp_path, names, wrapped):
    # TensorRT-LLM's GatedMLP `fc` is HF's gate_proj and its `gate` HF's up_proj: mlp_h_to_4h wrapped
    # up_proj and mlp_gate gate_proj here
    base = write_checkpoint("llama31", tmp_path, vocab_size=512)
    make_tokenizer(base)
    with small_llm(base, LoraConfig(max_lora_rank=8, max_loras=1, lora_target_modules=names)) as llm:
        assert {p.rsplit(".", 1)[-1] for p in llm.compiled.lora.modules} == wrapped
