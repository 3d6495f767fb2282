"""trtllm.models.falcon against HF transformers: Falcon-40B's layout (grouped kv heads, two
LayerNorms), Falcon-7B's (multi-query, parallel block) and Falcon-RW's (ALiBi, sequential,
biases). Greedy through LLM(model=path): tests/runtime/test_llm_families.py."""

import pytest
import torch
import transformers

from tests.models.checkpoints import FALCON_FAMILIES, hf_config, logits_vs_hf, rel_err, write_checkpoint
from trtllm.models.bloom import bloom_alibi_slopes
from trtllm.models.falcon import FalconConfig, FalconForCausalLM
from trtllm.models.loader import load_model


@pytest.fixture(scope="module", params=sorted(FALCON_FAMILIES))
def pair(request, tmp_path_factory):
    """(our model, HF's with its default sdpa attention, HF's with eager attention)."""
    path = write_checkpoint(request.param, tmp_path_factory.mktemp(request.param))
    hf = {impl: transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                                  attn_implementation=impl).eval()
          for impl in ("sdpa", "eager")}
    return request.param, load_model(path, dtype=torch.float32, device="cpu"), hf


@pytest.mark.parametrize("offsets", [(0, 0), (7, 100)], ids=["from0", "offset"])
def test_logits_match_hf(pair, offsets):
    family, ours, hf = pair
    assert type(ours) is FalconForCausalLM
    got, want = logits_vs_hf(ours, hf["sdpa"], 20, offsets)
    assert rel_err(got, want) <= 1e-5
    if family != "falcon_alibi":  # HF's two attention paths agree
        assert rel_err(got, logits_vs_hf(ours, hf["eager"], 20, offsets)[1]) <= 1e-5


def test_hf_eager_falcon_adds_alibi_twice(tmp_path):
    """Why the reference is HF's sdpa path: its eager path adds ALiBi in the mask it builds and
    again in the attention, so it is not Falcon's model (ours agrees with sdpa, above)."""
    path = write_checkpoint("falcon_alibi", tmp_path)
    eager = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").eval()
    got, want = logits_vs_hf(load_model(path, dtype=torch.float32, device="cpu"), eager, 20, (0, 0))
    assert rel_err(got, want) > 1e-2


def test_config_from_hf():
    c = FalconConfig.from_hf(hf_config("falcon"))
    assert (c.layout, c.qkv_layout, c.num_key_value_heads, c.alibi_slopes) == ("parallel2", "grouped", 2, [])
    c = FalconConfig.from_hf(hf_config("falcon_7b"))
    assert (c.layout, c.qkv_layout, c.num_key_value_heads, c.bias) == ("parallel", "mqa", 1, False)
    c = FalconConfig.from_hf(hf_config("falcon_alibi"))
    assert (c.layout, c.qkv_layout, c.num_key_value_heads, c.bias) == ("sequential", "mha", 4, True)
    assert c.alibi_slopes == [s / 4 for s in bloom_alibi_slopes(4)]  # head_dim 16: times 1/4


def test_unsupported_configs_are_refused():
    with pytest.raises(ValueError, match="activation='relu'"):
        FalconConfig.from_hf(hf_config("falcon", activation="relu"))
    with pytest.raises(ValueError, match="num_kv_heads=2 without multi_query"):
        FalconConfig.from_hf(hf_config("falcon_alibi", num_kv_heads=2))
