"""trtllm.models.phi3 against HF transformers: Phi-3 with a sliding window, and with partial
rotary and tied embeddings (as Phi-4-mini)."""

import pytest
import torch

import trtllm
from tests.models.checkpoints import (
    PHI3_FAMILIES,
    hf_config,
    loaded_pair,
    logits_vs_hf,
    random_batch,
    rel_err,
    write_checkpoint,
)
from trtllm.models.loader import load_model
from trtllm.models.phi3 import Phi3Config, Phi3ForCausalLM

B, S = 2, 12  # longer than the window (5)


@pytest.fixture(scope="module", params=sorted(PHI3_FAMILIES))
def pair(request, tmp_path_factory):
    """(our model, HF model) loaded from the same checkpoint on disk."""
    return loaded_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("offsets", [(0, 0), (7, 100)], ids=["from0", "offset"])
def test_logits_match_hf(pair, offsets):
    ours, hf = pair
    assert type(ours) is Phi3ForCausalLM
    got, want = logits_vs_hf(ours, hf, S, offsets)
    assert got.shape == (B, S, ours.config.vocab_size)
    assert rel_err(got, want) <= 1e-5


def test_config_from_hf():
    c = Phi3Config.from_hf(hf_config("phi3"))
    assert (c.head_dim, c.rotary_dim, c.layer_windows, c.tie_word_embeddings) == (16, 16, [5, 5], False)
    c = Phi3Config.from_hf(hf_config("phi3_partial"))
    assert (c.rotary_dim, c.layer_windows, c.tie_word_embeddings) == (12, [0, 0], True)
    # transformers 4 layout: rope_theta and partial_rotary_factor at the top level
    d = {k: v for k, v in hf_config("phi3").to_dict().items() if k != "rope_parameters"}
    c = Phi3Config.from_hf({**d, "rope_theta": 5e5, "partial_rotary_factor": 0.5})
    assert (c.rope_theta, c.rotary_dim) == (5e5, 8)


@pytest.mark.parametrize("bad, word", [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                       "original_max_position_embeddings": 64}}, "longrope"),
    ({"rope_scaling": {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
                       "original_max_position_embeddings": 64}}, "longrope"),  # HF's alias
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"model_type": "phi"}, "not Phi-3"),
])
def test_config_rejects_unsupported(bad, word):
    d = {k: v for k, v in hf_config("phi3").to_dict().items() if k != "rope_parameters" or "rope_scaling" not in bad}
    with pytest.raises(ValueError, match=word):
        Phi3Config.from_hf({**d, **bad})


def test_compiled_matches_eager_fully_fused(tmp_path):
    """qkv and gate/up are one GEMM each already (nothing for fuse_parallel_linears); norms,
    rope on the rotated part of q and k, silu*mul and the head are fused."""
    model = load_model(write_checkpoint("phi3_partial", tmp_path), dtype=torch.float32, device="cpu")
    ids, positions = random_batch(seq_len=S), torch.arange(S).expand(B, S)
    with torch.no_grad():
        want = model(ids, positions)
    compiled = trtllm.compile(model)
    assert rel_err(compiled(ids, positions), want) <= 1e-5
    assert "model: model file of ours: trtllm.models.phi3.Phi3ForCausalLM" in compiled.summary()
    assert {name: compiled.matches[name] for name in ("fuse_parallel_linears", "fuse_rms_norm", "fuse_add_rms_norm",
                                                       "fuse_rotary", "fuse_silu_mul", "split_lm_head")} == \
        dict(fuse_parallel_linears=0, fuse_rms_norm=5, fuse_add_rms_norm=4, fuse_rotary=4, fuse_silu_mul=2,
             split_lm_head=1)
