"""trtllm.models.llama against HF transformers, one tiny random checkpoint per family."""

import pytest
import torch

from tests.models.checkpoints import (
    FAMILIES,
    hf_config,
    loaded_pair,
    logits_vs_hf,
    random_batch,
    rel_err,
)
from trtllm.models.attention import causal_mask
from trtllm.models.llama import HF_ARCHITECTURES, LlamaConfig, LlamaForCausalLM

B, S = 2, 12


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(our model, HF model) loaded from the same checkpoint on disk."""
    return loaded_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("offsets", [(0, 0), (7, 100)], ids=["from0", "offset"])
def test_logits_match_hf(pair, offsets):
    ours, hf = pair
    got, want = logits_vs_hf(ours, hf, S, offsets)
    assert got.shape == (B, S, ours.config.vocab_size)
    assert rel_err(got, want) <= 1e-4


def test_config_from_hf_families():
    c = LlamaConfig.from_hf(hf_config("qwen3"))
    assert (c.head_dim, c.qk_norm, c.qkv_bias, c.o_bias) == (32, True, False, False)
    c = LlamaConfig.from_hf(hf_config("qwen2"))
    assert (c.qkv_bias, c.o_bias, c.tie_word_embeddings, c.head_dim) == (True, False, True, 16)
    c = LlamaConfig.from_hf(hf_config("llama31"))
    assert c.rope_scaling["rope_type"] == "llama3" and c.rope_scaling["original_max_position_embeddings"] == 32
    assert LlamaConfig.from_hf(hf_config("mqa")).num_key_value_heads == 1
    assert LlamaConfig.from_hf(hf_config("mistral_swa")).layer_windows == [5, 5]
    assert LlamaConfig.from_hf(hf_config("mistral")).layer_windows == [0, 0]
    assert LlamaConfig.from_hf(hf_config("qwen2_swa")).layer_windows == [0, 4]
    # Qwen ignores sliding_window unless use_sliding_window
    assert LlamaConfig.from_hf(hf_config("qwen2", sliding_window=4)).layer_windows == [0, 0]


def test_config_from_dict_matches_pretrained_config_and_tolerates_absent_fields():
    hf = hf_config("llama31")
    assert LlamaConfig.from_hf(hf) == LlamaConfig.from_hf(hf.to_dict())
    minimal = dict(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                   num_hidden_layers=1, num_attention_heads=2)
    c = LlamaConfig.from_hf(minimal)
    assert (c.num_key_value_heads, c.head_dim, c.rope_scaling, c.layer_windows) == (2, 4, None, [0])
    # transformers 4 layout: rope_theta + rope_scaling with legacy "type"
    c = LlamaConfig.from_hf({**minimal, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_theta == 5e5 and c.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("bad, word", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ({"model_type": "gpt2"}, "gpt2"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_config_rejects_unsupported(bad, word):
    d = {**hf_config("llama2").to_dict(), **bad}
    if "rope_scaling" in bad:  # transformers 4 layout: no rope_parameters
        del d["rope_parameters"]
    with pytest.raises(ValueError, match=word):
        LlamaConfig.from_hf(d)


def test_llama3_inv_freq_is_hf_and_scaled():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = LlamaRotaryEmbedding(hf_config("llama31"))
    ours = LlamaForCausalLM(LlamaConfig.from_hf(hf_config("llama31"))).model.rotary_emb.inv_freq
    plain = LlamaForCausalLM(LlamaConfig.from_hf(hf_config("llama2"))).model.rotary_emb.inv_freq
    torch.testing.assert_close(ours, hf.inv_freq, rtol=0, atol=0)
    assert not torch.equal(ours, plain)


def test_sliding_window_mask_is_banded_causal():
    m = causal_mask(6, 3, "cpu")
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    assert torch.equal(m, (j <= i) & (j > i - 3))


def test_window_changes_output_only_past_the_window():
    model = LlamaForCausalLM(LlamaConfig.from_hf(hf_config("mistral_swa"))).eval()
    full = LlamaForCausalLM(LlamaConfig.from_hf(hf_config("mistral"))).eval()
    full.load_state_dict(model.state_dict())
    ids = random_batch(seq_len=S)
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        a, b = model(ids, pos), full(ids, pos)
    torch.testing.assert_close(a[:, :5], b[:, :5])  # first `window` queries see everything anyway
    assert rel_err(a[:, 5:], b[:, 5:]) > 1e-3


def test_names_mirror_hf_and_architectures():
    hf = FAMILIES["qwen3"][1](hf_config("qwen3"))
    ours = LlamaForCausalLM(LlamaConfig.from_hf(hf.config))
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.config.model_type == "qwen3"
    assert set(HF_ARCHITECTURES) == {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                                     "Qwen3ForCausalLM"}


def test_meta_construction_then_init_buffers():
    config = LlamaConfig.from_hf(hf_config("llama31"))
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    assert model.model.rotary_emb.inv_freq.is_meta
    model.init_buffers("cpu")
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq.device.type == "cpu" and inv_freq.dtype == torch.float32
    torch.testing.assert_close(inv_freq, LlamaForCausalLM(config).model.rotary_emb.inv_freq, rtol=0, atol=0)
