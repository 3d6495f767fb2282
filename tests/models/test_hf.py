"""HF modules under trtllm's attention interface (models/hf.py): what each layer asks of the
interface is honoured (sliding windows per layer, softmax scale) or refused at compile()
naming the layer and the feature; never dropped."""
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
    model = make_hf_model(family)  # eager attention: HF's own masks and scale
    ids = random_batch(seq_len=12)  # longer than every window
    with torch.no_grad():
        expected = model(input_ids=ids, use_cache=False).logits
    compiled = trtllm.compile(make_hf_model(family))
    assert compiled.attention.windows == windows
    got = compiled(ids, torch.arange(12)[None].expand(2, -1))
    assert ((got - expected).abs().max() / expected.abs().max()).item() < 1e-4


def test_soft_capping_is_refused_at_compile_naming_layer_and_feature():
    with pytest.raises(CompileError, match=r"attention layer 0 \(Gemma2Attention\): attention logit "
                                           r"soft-capping \(softcap=2.0\)"):
        trtllm.compile(make_hf_model("gemma2_softcap"))


def test_a_family_with_its_own_attention_code_is_refused_by_name():
    with pytest.raises(CompileError, match="GPTJForCausalLM is refused: its attention does not go through"):
        trtllm.compile(make_hf_model("gptj"))


@pytest.mark.parametrize("call, feature", [
    (dict(softcap=30.0), "soft-capping"),
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
    with pytest.raises(UnsupportedAttention, match=r"attention layer 3 \(Attention\): .*" + re.escape(feature)):
        trtllm_attention(Attention(), q, q, q, **{**kwargs, **call})
    assert unhonoured(None, 0.0, 4, None, {"position_ids": None, "use_cache": False}) == []
