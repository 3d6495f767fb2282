"""trtllm.models.bloom and trtllm.models.mpt (ALiBi) against HF transformers: logits from
the same checkpoint, slopes as HF builds them, and the MPT configs HF's module would run
differently from MPT's own code refused by name. Greedy through LLM(model=path):
tests/runtime/test_llm_families.py."""

import math

import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

import trtllm
from tests.models.checkpoints import ALIBI_FAMILIES, hf_config, loaded_pair, logits_vs_hf, random_batch, rel_err
from trtllm.contract import CompileError
from trtllm.models.bloom import BloomConfig, BloomForCausalLM, bloom_alibi_slopes
from trtllm.models.mpt import MptConfig, MptForCausalLM, mpt_alibi_slopes

S = 20


@pytest.fixture(scope="module", params=sorted(ALIBI_FAMILIES))
def pair(request, tmp_path_factory):
    return loaded_pair(request.param, tmp_path_factory.mktemp(request.param))


@pytest.mark.parametrize("offsets", [(0, 0), (7, 100)], ids=["from0", "offset"])
def test_logits_match_hf(pair, offsets):
    """Positions are unused (ALiBi is relative): an offset changes nothing."""
    ours, hf = pair
    assert type(ours) in (BloomForCausalLM, MptForCausalLM)
    got, want = logits_vs_hf(ours, hf, S, offsets)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("heads", [1, 4, 5, 6, 12, 16, 24])
def test_slopes_are_hfs(heads):
    """Bit for bit the slopes HF's tensors are made of (its bias at key 1, BLOOM's, and at key
    max - 2 less the last, MPT's)."""
    bloom = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope * 1
    assert bloom_alibi_slopes(heads) == bloom.tolist()
    mpt = -build_mpt_alibi_tensor(heads, 2)[:, 0, 0]  # slope * -1
    assert mpt_alibi_slopes(heads) == mpt.tolist()
    assert math.isclose(mpt_alibi_slopes(8)[0], 0.5)


def test_config_from_hf():
    c = BloomConfig.from_hf(hf_config("bloom_post_ln"))
    assert (c.hidden_size, c.num_attention_heads, c.head_dim) == (80, 5, 16)
    assert c.apply_residual_connection_post_layernorm and c.alibi_slopes == bloom_alibi_slopes(5)
    c = MptConfig.from_hf(hf_config("mpt_clip"))
    assert (c.hidden_size, c.num_attention_heads, c.clip_qkv, c.softmax_scale) == (96, 6, 0.3, 0.2)
    assert c.alibi_slopes == mpt_alibi_slopes(6)


@pytest.mark.parametrize("attn, match", [
    ({"qk_ln": True}, "qk_ln=True"),
    ({"alibi": False}, "alibi=False"),
    ({"alibi_bias_max": 16}, "alibi_bias_max=16"),
    ({"prefix_lm": True}, "prefix_lm"),
])
def test_mpt_configs_hf_runs_differently_are_refused(attn, match):
    with pytest.raises(ValueError, match=match):
        MptConfig.from_hf(hf_config("mpt", attn_config=attn))


def test_compiled_summary_names_the_slopes(pair):
    """trtllm.compile's probe reads config.alibi_slopes; the compiled graph's attention ops
    take them, and its logits are the eager model's."""
    ours, _ = pair
    compiled = trtllm.compile(ours)
    ids = random_batch(vocab_size=128, batch=2, seq_len=9)
    with torch.no_grad():
        got, want = compiled(ids, torch.arange(9).expand(2, 9)), ours(ids, torch.arange(9).expand(2, 9))
    assert rel_err(got, want) <= 1e-5
    summary = compiled.summary()
    assert "ALiBi slopes per head [" in summary and "trtllm.attention: " in summary, summary


def test_slopes_of_the_wrong_length_are_refused(pair):
    ours, _ = pair
    ours.config.alibi_slopes = ours.config.alibi_slopes[:-1]
    try:
        with pytest.raises(CompileError, match="alibi_slopes has .* entries, the attention layers .* query heads"):
            trtllm.compile(ours)
    finally:
        ours.config.alibi_slopes = (bloom_alibi_slopes if isinstance(ours, BloomForCausalLM)
                                    else mpt_alibi_slopes)(ours.config.num_attention_heads)


def test_alibi_under_tensor_parallelism_is_refused(pair):
    """Each rank would need its own heads' slopes: refused at compile(), naming ALiBi."""
    from trtllm.parallel.tensor_parallel import TensorParallel
    ours, _ = pair
    with pytest.raises(CompileError, match="ALiBi under tensor parallelism"):
        trtllm.compile(ours, tensor_parallel=TensorParallel(0, 2, "never used"))
