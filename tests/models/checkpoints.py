"""Tiny random-weight HF checkpoints for tests (no downloads, no tokenizer).

    write_checkpoint(family, directory, **config_overrides) -> Path
    hf_model(directory) -> the HF *ForCausalLM, fp32, eager attention, eval

FAMILIES lists the families models/llama.py runs, GEMMA_FAMILIES and PHI3_FAMILIES those of
models/gemma.py and models/phi3.py, ALIBI_FAMILIES those of models/bloom.py and models/mpt.py,
HF_MODULE_FAMILIES the others (no model file of ours);
each is hidden 64, 2 layers, 4 heads, vocab 128. Every
parameter is random (norm weights around 1, biases nonzero) so a misplaced tensor shows.
Other test files reuse these: `from tests.models.checkpoints import write_checkpoint`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

_BASE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=128, max_position_embeddings=256, rms_norm_eps=1e-5)

# family -> (HF config class, HF model class, config kwargs)
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama2": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
               dict(num_key_value_heads=4, rope_theta=10000.0, tie_word_embeddings=False)),
    # llama3 rope scaling with original_max_position_embeddings=32: with head_dim 16 and
    # theta 10000, wavelengths fall in all three branches (kept, blended, divided).
    "llama31": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                dict(num_key_value_heads=2, tie_word_embeddings=False,
                     rope_scaling={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 32})),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM,
                dict(num_key_value_heads=2, sliding_window=None, tie_word_embeddings=False)),
    # sliding_window=5 bites for sequences longer than 5
    "mistral_swa": (transformers.MistralConfig, transformers.MistralForCausalLM,
                    dict(num_key_value_heads=2, sliding_window=5, tie_word_embeddings=False)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              dict(num_key_value_heads=2, tie_word_embeddings=True)),
    # layer 0 full, layer 1 sliding (window 4)
    "qwen2_swa": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                  dict(num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                       sliding_window=4, max_window_layers=1)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)),
    "mqa": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
            dict(num_key_value_heads=1, tie_word_embeddings=False)),
}

# Sliding windows of 4-5 bite on the tests' 21-token prompt. Token ids 0-2 as special
# tokens, inside every test vocabulary.
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
GEMMA_FAMILIES: dict[str, tuple[type, type, dict]] = {
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, dict(num_key_value_heads=2, head_dim=16)),
    # alternating local (window 4) / global layers, query_pre_attn_scalar != head_dim, final logit
    # soft-capping (HF's default 30), no attention soft-capping
    "gemma2": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                    attn_logit_softcapping=None)),
    # a cap that bites on these random weights (HF's default, 50, moves the logits ~0.3%; 5 moves
    # them ~16% and changes HF's own greedy tokens on the tests' prompts)
    "gemma2_softcap": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                       dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                            attn_logit_softcapping=5.0)),
    # local layer (window 4, rope base 10^4) then global layer (rope base 10^6, linear scaling x8,
    # as Gemma-3 4B+); QK-norm; final logit soft-capping set (HF's default is none)
    "gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                    layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=20.0,
                    rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                        "rope_theta": 1000000.0}})),
}
PHI3_FAMILIES: dict[str, tuple[type, type, dict]] = {
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(num_key_value_heads=2, sliding_window=5)),
    # as Phi-4-mini: partial rotary (12 of 16 channels), tied embeddings, no window
    "phi3_partial": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
                     dict(num_key_value_heads=2, partial_rotary_factor=0.75, tie_word_embeddings=True)),
}
# ALiBi: head counts not a power of 2, so the slopes' second series (BLOOM) and interleaving
# (MPT) are used; head_dim 16. BLOOM's head untied: tied, these random weights make it repeat
# the last token whatever attention does (zeroing the slopes then changes no greedy token);
# eos 127, which the greedy runs do not meet (HF's min_new_tokens would mask it: id 2 is met).
ALIBI_FAMILIES: dict[str, tuple[type, type, dict]] = {
    "bloom": (transformers.BloomConfig, transformers.BloomForCausalLM,
              dict(hidden_size=80, num_attention_heads=5, tie_word_embeddings=False, eos_token_id=127)),
    # the residual taken after the LayerNorms (BLOOM-176B's config has it off; the variant exists)
    "bloom_post_ln": (transformers.BloomConfig, transformers.BloomForCausalLM,
                      dict(hidden_size=80, num_attention_heads=5, apply_residual_connection_post_layernorm=True,
                           tie_word_embeddings=False, eos_token_id=127)),
    "mpt": (transformers.MptConfig, transformers.MptForCausalLM,
            dict(hidden_size=96, num_attention_heads=6, max_seq_len=128)),
    "mpt_clip": (transformers.MptConfig, transformers.MptForCausalLM,
                 dict(hidden_size=96, num_attention_heads=6, max_seq_len=128,
                      attn_config={"clip_qkv": 0.3, "softmax_scale": 0.2})),
}
# models/falcon.py: Falcon-40B's layout (grouped kv heads, ln_attn / ln_mlp), Falcon-7B's
# (multi-query, parallel attention + MLP, one LayerNorm), Falcon-RW's (ALiBi, sequential, biases);
# eos 127 where id 2 is a greedy token (HF's min_new_tokens would mask it)
FALCON_FAMILIES: dict[str, tuple[type, type, dict]] = {
    "falcon": (transformers.FalconConfig, transformers.FalconForCausalLM,
               dict(num_kv_heads=2, new_decoder_architecture=True)),
    "falcon_7b": (transformers.FalconConfig, transformers.FalconForCausalLM,
                  dict(multi_query=True, parallel_attn=True, tie_word_embeddings=False, eos_token_id=127)),
    "falcon_alibi": (transformers.FalconConfig, transformers.FalconForCausalLM,
                     dict(alibi=True, multi_query=False, parallel_attn=False, bias=True, tie_word_embeddings=False)),
}
# Families with no model file of ours: LLM(model=path) runs HF's module under our attention
# interface (models/hf.py), or refuses them by name.
HF_MODULE_FAMILIES: dict[str, tuple[type, type, dict]] = {
    "phi": (transformers.PhiConfig, transformers.PhiForCausalLM, dict(partial_rotary_factor=0.5)),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel, dict()),
    "gpt_neox": (transformers.GPTNeoXConfig, transformers.GPTNeoXForCausalLM, dict()),
    # attention sinks (`s_aux`), which the kernels do not honour: refused by name
    "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM,
                dict(num_key_value_heads=2, head_dim=16, intermediate_size=64, num_local_experts=4,
                     num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    "gptj": (transformers.GPTJConfig, transformers.GPTJForCausalLM, dict(rotary_dim=8)),
    "stablelm": (transformers.StableLmConfig, transformers.StableLmForCausalLM, dict(num_key_value_heads=2)),
    "starcoder2": (transformers.Starcoder2Config, transformers.Starcoder2ForCausalLM,
                   dict(num_key_value_heads=2, sliding_window=5)),
    "olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM, dict(num_key_value_heads=2)),
    "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM,
                dict(num_key_value_heads=2, attention_multiplier=0.3, residual_multiplier=0.5,
                     embedding_multiplier=2.0, logits_scaling=4.0)),
    "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, dict(num_key_value_heads=2)),
    # no-rope layers: SmolLM3's `no_rope_layers` (layer 1 skips rotary), Cohere2's global layers
    # (layer 1: full attention, no rotary; layer 0 sliding, window 4, rotary)
    "smollm3": (transformers.SmolLM3Config, transformers.SmolLM3ForCausalLM,
                dict(num_key_value_heads=2, no_rope_layers=[1, 0])),
    "cohere2": (transformers.Cohere2Config, transformers.Cohere2ForCausalLM,
                dict(num_key_value_heads=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    # Llama-4 text: a chunked-attention rotary layer (chunk 8) then a global no-rope layer with
    # attention temperature tuning; MoE (4 experts, top-1) on every layer
    "llama4": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM,
               dict(num_key_value_heads=2, head_dim=16, intermediate_size=64, intermediate_size_mlp=128,
                    num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=8, no_rope_layers=[1, 0],
                    layer_types=["chunked_attention", "full_attention"], floor_scale=4)),
    # as "llama4" with both layers full attention: no-rope and temperature tuning alone
    "llama4_full": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM,
                    dict(num_key_value_heads=2, head_dim=16, intermediate_size=64, intermediate_size_mlp=128,
                         num_local_experts=4, num_experts_per_tok=1, attention_chunk_size=8, no_rope_layers=[1, 0],
                         layer_types=["full_attention", "full_attention"], floor_scale=4)),
    # MoE: 4 experts, top-2; passes/fuse_moe.py replaces each block by moe_routing + fused_moe
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                     sliding_window=None)),
    # a shared expert with its sigmoid gate; weights not renormalised (Qwen1.5-MoE's default)
    "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM,
                  dict(num_key_value_heads=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False)),
    # renormalised top-k (Qwen3-30B-A3B's norm_topk_prob), QK-norm; layer 0 dense (mlp_only_layers)
    "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM,
                  dict(num_key_value_heads=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                       num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0])),
    "olmoe": (transformers.OlmoeConfig, transformers.OlmoeForCausalLM,
              dict(num_key_value_heads=2, intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    # multi-head latent attention (latent 32 + rope 8; K 24 wide, V 16): tests/runtime/test_llm_mla.py;
    # V3: grouped sigmoid routing (2 groups, 1 chosen); V2: no q_lora_rank, softmax greedy routing (V2-Lite's)
    "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                    dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=32,
                         q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
    "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                    dict(num_key_value_heads=4, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                         num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=None,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16)),
}
GEMMA_FAMILIES, PHI3_FAMILIES, ALIBI_FAMILIES, FALCON_FAMILIES, HF_MODULE_FAMILIES = (
    {name: (config, model, {**_IDS, **kwargs}) for name, (config, model, kwargs) in families.items()}
    for families in (GEMMA_FAMILIES, PHI3_FAMILIES, ALIBI_FAMILIES, FALCON_FAMILIES, HF_MODULE_FAMILIES))


def _family(family: str) -> tuple[type, type, dict]:
    for families in (FAMILIES, GEMMA_FAMILIES, PHI3_FAMILIES, ALIBI_FAMILIES, FALCON_FAMILIES, HF_MODULE_FAMILIES):
        if family in families:
            return families[family]
    raise KeyError(f"no test family {family!r}")


def hf_config(family: str, **overrides):
    config_cls, _, kwargs = _family(family)
    return config_cls(**{**_BASE, **kwargs, **overrides})


def make_hf_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random HF model of `family` (fp32, eager attention, eval)."""
    _, model_cls, _ = _family(family)
    config = hf_config(family, **overrides)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif p.ndim == 1:  # norm weights
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model


def write_checkpoint(family: str, directory: str | Path, seed: int = 0, dtype: torch.dtype | None = None,
                     max_shard_size: str | int | None = None, **overrides) -> Path:
    """save_pretrained a random `family` model into `directory` (created); returns the path."""
    directory = Path(directory)
    model = make_hf_model(family, seed, **overrides)
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF reference model of a checkpoint written by write_checkpoint."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation="eager").eval()


def random_batch(vocab_size: int = 128, batch: int = 2, seq_len: int = 12, seed: int = 1) -> torch.Tensor:
    """input_ids [batch, seq_len]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, in fp32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def loaded_pair(family: str, directory: Path):
    """(our model, HF model), fp32 on CPU, loaded from one checkpoint of `family` written to `directory`."""
    from trtllm.models.loader import load_model
    path = write_checkpoint(family, directory)
    return load_model(path, dtype=torch.float32, device="cpu"), hf_model(path)


def logits_vs_hf(ours, hf, seq_len: int, offsets: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(our logits, HF's) [2, seq_len, V] on random_batch's ids, each row's positions from its offset."""
    ids = random_batch(batch=2, seq_len=seq_len)
    positions = torch.arange(seq_len).expand(2, seq_len) + torch.tensor(offsets)[:, None]  # [2, S]
    with torch.no_grad():
        return ours(ids, positions), hf(input_ids=ids, position_ids=positions).logits
