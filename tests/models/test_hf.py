"""HF modules under trtllm's attention interface (models/hf.py): what each layer asks of the
interface is honoured (sliding windows per layer, softmax scale, logit soft-capping) or
refused at compile() naming the layer and the feature; never dropped."""
import re

import pytest
import torch

import trtllm
from tests.models.checkpoints import make_hf_model, random_batch
from trtllm.compile import CompileError
from trtllm.models.hf import UnsupportedAttention, trtllm_attention, unhonoured


@pytest.mark.parametrize("family, windows", [("phi3", (5, 5)), ("gemma2", (4, 0)), ("gemma3", (4, 0)),
                                             ("starcoder2", (5, 5))])
def test_per_layer_windows_and_scale_match_hf_eager_past_the_window(family, windows):
    """(gemma2's layers soft-cap their logits too: checkpoints.py)"""
    model = make_hf_model(family)  # eager attention: HF's own masks and scale
    ids = random_batch(seq_len=12)  # longer than every window
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    compiled = trtllm.compile(make_hf_model(family))
    assert compiled.attention.windows == windows
    got = compiled(ids, torch.arange(12)[None].expand(2, -1))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4
    if family == "gemma3":  # HF's QK-norm (after its transpose) joins the rope
        assert "trtllm.rms_norm_rotary: 4" in compiled.summary()


@pytest.mark.parametrize("softcap", [5.0, 50.0])  # 50: HF's default
def test_soft_capping_is_honoured_and_bites(softcap):
    """Gemma-2's attn_logit_softcapping: compiled logits equal HF eager's, and differ from
    the same model's without the cap (so dropping it would fail here)."""
    model = make_hf_model("gemma2", attn_logit_softcapping=softcap)
    ids = random_batch(seq_len=12)
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
        uncapped = make_hf_model("gemma2", attn_logit_softcapping=None)(input_ids=ids, use_cache=False).logits
    compiled = trtllm.compile(make_hf_model("gemma2", attn_logit_softcapping=softcap))
    assert compiled.attention.softcaps == (softcap, softcap)
    assert f"logit soft-capping per layer [{softcap}, {softcap}]" in compiled.summary()
    got = compiled(ids, torch.arange(12)[None].expand(2, -1))
    scale = expected.abs().max()
    assert ((got - expected).abs().max() / scale).item() < 1e-4
    assert ((uncapped - expected).abs().max() / scale).item() > 1e-3  # 50: 3e-3; 5: 0.16


def test_attention_sinks_are_refused_at_compile_naming_layer_and_feature():
    with pytest.raises(CompileError, match=r"attention layer 0 \(GptOssAttention\): the attention argument 's_aux'"):
        trtllm.compile(make_hf_model("gpt_oss"))


def test_a_family_with_its_own_attention_code_is_refused_by_name():
    with pytest.raises(CompileError, match="GPTJForCausalLM is refused: its attention does not go through"):
        trtllm.compile(make_hf_model("gptj"))


@pytest.mark.parametrize("call, feature", [
    (dict(softcap=-1.0), "softcap=-1.0"),
    (dict(softcap=float("inf")), "softcap=inf"),
    (dict(s_aux=torch.zeros(4)), "'s_aux'"),
    (dict(attention_mask=torch.zeros(1, 1, 3, 3)), "an attention mask"),
    (dict(dropout=0.1), "dropout=0.1"),
    (dict(is_causal=False), "non-causal"),
    (dict(sliding_window=(4, 0)), "sliding_window=(4, 0)"),
])
def test_every_unhonoured_feature_raises_eagerly(call, feature):
    class Attention(torch.nn.Module):
        layer_idx = 3

    q = torch.randn(1, 4, 3, 8)
    kwargs = dict(attention_mask=None, scaling=None, dropout=0.0, sliding_window=None, position_ids=None)
    trtllm_attention(Attention(), q, q, q, **kwargs)  # plain causal: fine
    trtllm_attention(Attention(), q, q, q, **{**kwargs, "softcap": 30.0, "sliding_window": 2})  # honoured
    with pytest.raises(UnsupportedAttention, match=r"attention layer 3 \(Attention\): .*" + re.escape(feature)):
        trtllm_attention(Attention(), q, q, q, **{**kwargs, **call})
    assert unhonoured(None, 0.0, 4, None, {"position_ids": None, "use_cache": False}) == []


def test_values_narrower_than_keys_are_refused_unless_the_layer_is_mla():
    """K and V of different widths page only as DeepSeek's latent (a layer with kv_b_proj and
    kv_lora_rank); any other such layer is refused eagerly, naming the widths."""
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 8)
    with pytest.raises(UnsupportedAttention, match="values 8 wide but keys 16"):
        trtllm_attention(torch.nn.Module(), q, k, v, None)
    mla = torch.nn.Module()
    mla.kv_b_proj, mla.kv_lora_rank, mla.qk_rope_head_dim = torch.nn.Linear(4, 4), 32, 8
    out, _ = trtllm_attention(mla, q, k, v, None)
    assert out.shape == (1, 3, 2, 8)


def test_a_weight_of_an_hf_module_that_is_not_finite_is_refused_by_name(tmp_path):
    """As our model files' loader refuses one (tests/models/test_loader.py): transformers loads it silently."""
    from safetensors.torch import load_file, save_file

    from tests.models.checkpoints import write_checkpoint
    path = write_checkpoint("gpt_neox", tmp_path)
    weights = load_file(path / "model.safetensors")
    name = next(n for n in weights if n.endswith("attention.dense.weight"))
    weights[name][0, 0] = float("inf")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: tensor '{re.escape(name)}' holds 1 NaN or infinite"):
        trtllm.load_model(path, dtype=torch.float32, device="cpu")


def test_an_hf_module_tensor_of_another_shape_is_named(tmp_path):
    """A config.json whose kv_lora_rank is not the checkpoint's: transformers raised 'You set
    ignore_mismatched_sizes to False ... look at the above report' (a report logged, not raised)."""
    import json

    from tests.models.checkpoints import write_checkpoint
    path = write_checkpoint("deepseek_v2", tmp_path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "kv_lora_rank": 16}))
    with pytest.raises(ValueError, match=r"does not match DeepseekV2ForCausalLM: \{'mismatched_keys': .*"
                                         r"kv_a_layernorm\.weight', torch\.Size\(\[32\]\), torch\.Size\(\[16\]\)"):
        trtllm.load_model(path, dtype=torch.float32, device="cpu")
