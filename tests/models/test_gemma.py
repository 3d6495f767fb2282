"""trtllm.models.gemma against HF transformers, one tiny random checkpoint per family
(Gemma, Gemma-2 with and without attention soft-capping, Gemma-3 text)."""

import pytest
import torch

import trtllm
from tests.models.checkpoints import (
    GEMMA_FAMILIES,
    hf_config,
    loaded_pair,
    logits_vs_hf,
    random_batch,
    rel_err,
    write_checkpoint,
)
from trtllm.models.gemma import GemmaConfig, GemmaForCausalLM
from trtllm.models.loader import load_model

B, S = 2, 12  # longer than the windows (4)


@pytest.fixture(scope="module", params=sorted(GEMMA_FAMILIES))
def pair(request, tmp_path_factory):
    """(our model, HF model) loaded from the same checkpoint on disk."""
    return loaded_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("offsets", [(0, 0), (7, 100)], ids=["from0", "offset"])
def test_logits_match_hf(pair, offsets):
    ours, hf = pair
    assert type(ours) is GemmaForCausalLM
    got, want = logits_vs_hf(ours, hf, S, offsets)
    assert got.shape == (B, S, ours.config.vocab_size)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("family, feature, off", [
    ("gemma2_softcap", "attention soft-capping", dict(layer_softcaps=[0.0, 0.0])),
    ("gemma2", "final logit soft-capping", dict(final_logit_softcapping=0.0)),
    ("gemma2", "sliding window", dict(layer_windows=[0, 0])),
    ("gemma3", "local rope base", dict(local_rope_theta=0.0)),
    ("gemma3", "global rope scaling", dict(rope_scaling=None)),
])
def test_each_feature_changes_the_logits(family, feature, off, tmp_path):
    """The features the test checkpoints carry bite: with one turned off, the logits differ
    (so test_logits_match_hf would catch it dropped)."""
    model = load_model(write_checkpoint(family, tmp_path), dtype=torch.float32, device="cpu")
    ids, positions = random_batch(seq_len=S), torch.arange(S).expand(B, S) + 50
    without = GemmaForCausalLM(GemmaConfig(**{**vars(model.config), **off}))
    without.load_state_dict(model.state_dict())
    without.init_buffers("cpu")
    with torch.no_grad():
        assert rel_err(without(ids, positions), model(ids, positions)) > 1e-3, feature


def test_config_from_hf_families():
    c = GemmaConfig.from_hf(hf_config("gemma"))
    assert (c.sandwich_norms, c.qk_norm, c.query_pre_attn_scalar, c.gelu_approximate) == (False, False, 16.0, "tanh")
    assert (c.layer_windows, c.layer_softcaps, c.final_logit_softcapping, c.local_rope_theta) == \
        ([0, 0], [0.0, 0.0], 0.0, 0.0)
    c = GemmaConfig.from_hf(hf_config("gemma2_softcap"))
    assert (c.sandwich_norms, c.query_pre_attn_scalar, c.layer_windows) == (True, 24.0, [4, 0])
    assert (c.layer_softcaps, c.final_logit_softcapping) == ([5.0, 5.0], 30.0)
    c = GemmaConfig.from_hf(hf_config("gemma3"))
    assert (c.qk_norm, c.layer_types, c.layer_windows) == (True, ["sliding_attention", "full_attention"], [4, 0])
    assert (c.rope_theta, c.rope_scaling, c.local_rope_theta, c.local_rope_scaling) == \
        (1e6, {"rope_type": "linear", "factor": 8.0}, 1e4, None)
    # HF's Gemma3Attention does not apply attn_logit_softcapping: neither do we
    assert GemmaConfig.from_hf(hf_config("gemma3", attn_logit_softcapping=50.0)).layer_softcaps == [0.0, 0.0]
    assert GemmaConfig.from_hf(hf_config("gemma", hidden_act="gelu")).gelu_approximate == "none"


def test_config_from_a_transformers_4_gemma3_config_json():
    """The legacy fields, read as transformers' Gemma3TextConfig reads them."""
    d = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=10, hidden_size=8,
             intermediate_size=16, num_hidden_layers=7, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
             rope_theta=1e6, rope_local_base_freq=5000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
             sliding_window=512, sliding_window_pattern=3, query_pre_attn_scalar=4)
    c = GemmaConfig.from_hf(d)
    assert c.layer_windows == [512, 512, 0, 512, 512, 0, 512]
    assert (c.rope_theta, c.rope_scaling, c.local_rope_theta) == (1e6, {"rope_type": "linear", "factor": 8.0}, 5000.0)
    assert c == GemmaConfig.from_hf(hf_config("gemma3").__class__(**d))


@pytest.mark.parametrize("family, bad, word", [
    ("gemma2", {"hidden_activation": "silu"}, "activation 'silu'"),
    ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}, "yarn"),
    ("gemma", {"model_type": "gemma3"}, "multimodal Gemma-3"),
    ("gemma", {"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
])
def test_config_rejects_unsupported(family, bad, word):
    with pytest.raises(ValueError, match=word):
        GemmaConfig.from_hf({**hf_config(family).to_dict(), **bad})


@pytest.mark.parametrize("family, fused", [
    # per layer: q/k/v + gate/up GEMMs; 4 norms (+ q/k norms in Gemma-3) and the final one;
    # each residual add into a norm (Gemma-3: with the norm of the block output before it);
    # rope on q and k (Gemma-3: joined with their norms); the head (Gemma-3: with its final soft-capping)
    ("gemma", dict(fuse_parallel_linears=4, fuse_rms_norm=5, fuse_add_rms_norm=4, fuse_norm_add_rms_norm=0,
                   fuse_rotary=4, fuse_rms_norm_rotary=0, split_lm_head=1)),
    ("gemma3", dict(fuse_parallel_linears=4, fuse_rms_norm=13, fuse_add_rms_norm=4, fuse_norm_add_rms_norm=4,
                    fuse_rotary=4, fuse_rms_norm_rotary=4, split_lm_head=1)),
])
def test_compiled_matches_eager_and_summary_names_our_file(family, fused, tmp_path):
    model = load_model(write_checkpoint(family, tmp_path), dtype=torch.float32, device="cpu")
    ids, positions = random_batch(seq_len=S), torch.arange(S).expand(B, S)
    with torch.no_grad():
        want = model(ids, positions)
    compiled = trtllm.compile(model)
    got = compiled(ids, positions)
    assert rel_err(got, want) <= 1e-5
    summary = compiled.summary()
    assert "model: model file of ours: trtllm.models.gemma.GemmaForCausalLM" in summary
    assert compiled.attention.windows == tuple(model.config.layer_windows)
    for name, count in fused.items():
        assert compiled.matches[name] == count, (name, summary)


def test_attention_soft_capping_is_applied_by_the_paged_kernels(tmp_path):
    """Gemma-2's attn_logit_softcapping reaches the kernels through config.layer_softcaps:
    compiled logits equal eager's, which differ from the uncapped model's."""
    model = load_model(write_checkpoint("gemma2_softcap", tmp_path), dtype=torch.float32, device="cpu")
    assert model.config.layer_softcaps == [5.0, 5.0]
    ids, positions = random_batch(seq_len=S), torch.arange(S).expand(B, S)
    with torch.no_grad():
        want = model(ids, positions)
        attns = [m for m in model.modules() if hasattr(m, "softcap") and hasattr(m, "q_proj")]
        assert len(attns) == 2
        for a in attns:
            a.softcap = 0.0
        uncapped = model(ids, positions)
        for a in attns:
            a.softcap = 5.0
    compiled = trtllm.compile(model)
    assert compiled.attention.softcaps == (5.0, 5.0)
    assert rel_err(compiled(ids, positions), want) <= 1e-5
    assert rel_err(uncapped, want) > 1e-3
