import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import _compute_llama3_parameters
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from trtllm.kernels.rotary import rope_cos_sin, rope_inv_freq, rotary, rotary_ref

# Kernel vs reference: both fp32 inside and rounded once; they differ by FMA contraction
# (bf16: the kernel runs here in fp32 and its output is rounded by torch, as the
# reference's: registry.interpreter_upcast).
TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
DTYPES = list(TOLERANCES)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


def _hf_rotary_embedding(head_dim, theta, scaling=None):
    config = LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=131072,
        rope_parameters={"rope_type": "default", **(scaling or {}), "rope_theta": theta},
    )
    return config, LlamaRotaryEmbedding(config)


def _tables(batch, seq, head_dim, dtype, interleaved=False):
    positions = torch.randint(0, 20000, (batch, seq))
    return rope_cos_sin(positions, rope_inv_freq(head_dim, 500000.0, LLAMA3_SCALING), dtype, interleaved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch,heads,seq,head_dim", [(1, 1, 1, 128), (2, 3, 7, 16), (2, 3, 7, 64), (2, 3, 7, 128), (1, 2, 29, 16)]
)
@pytest.mark.parametrize("interleaved", [False, True])
def test_rotary_matches_reference(batch, heads, seq, head_dim, dtype, interleaved):
    x = torch.randn(batch, heads, seq, head_dim, dtype=dtype)
    cos, sin = _tables(batch, seq, head_dim, dtype, interleaved)
    out = rotary(x, cos, sin, interleaved)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, rotary_ref(x, cos, sin, interleaved), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("interleaved", [False, True])
def test_strided_inputs(dtype, interleaved):
    # x: the transpose of a [B, S, H, D] projection output; cos/sin: fp32 tables sliced out
    # of a wider buffer, for a batch of 1: as is, and expanded (batch stride 0).
    batch, heads, seq, head_dim = 2, 3, 7, 64
    x = torch.randn(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
    cos, sin = _tables(1, seq, head_dim, torch.float32, interleaved)
    cos = torch.cat((cos, cos), dim=-1)[..., :head_dim]
    sin = torch.cat((sin, sin), dim=-1)[..., head_dim:]
    expected = rotary_ref(x, cos, sin, interleaved)
    torch.testing.assert_close(rotary(x, cos, sin, interleaved), expected, **TOLERANCES[dtype])
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    torch.testing.assert_close(rotary(x, cos, sin, interleaved), expected, **TOLERANCES[dtype])
    with pytest.raises(AssertionError):
        rotary(x.transpose(-1, -2).contiguous().transpose(-1, -2), cos, sin, interleaved)


@pytest.mark.parametrize("scaling", [None, LLAMA3_SCALING])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_tables_are_hf(head_dim, scaling):
    config, hf = _hf_rotary_embedding(head_dim, 500000.0, scaling)
    inv_freq = rope_inv_freq(head_dim, 500000.0, scaling)
    assert torch.equal(inv_freq, hf.inv_freq)
    if scaling is not None:
        assert torch.equal(inv_freq, _compute_llama3_parameters(config)[0])
    positions = torch.tensor([[0, 1, 7, 8191, 8192, 20000, 131071]])
    for dtype in DTYPES:
        cos, sin = rope_cos_sin(positions, inv_freq, dtype)
        hf_cos, hf_sin = hf(torch.empty(0, dtype=dtype), positions)
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_rope_type_is_checked():
    assert torch.equal(rope_inv_freq(64, 1e4, {"rope_type": "default"}), rope_inv_freq(64, 1e4, None))
    assert torch.equal(rope_inv_freq(64, 5e5, {**LLAMA3_SCALING, "rope_type": None, "type": "llama3"}),
                       rope_inv_freq(64, 5e5, LLAMA3_SCALING))
    with pytest.raises(ValueError, match="yarn"):
        rope_inv_freq(64, 1e4, {"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_hf_apply_rotary_pos_emb(dtype):
    _, hf = _hf_rotary_embedding(64, 500000.0, LLAMA3_SCALING)
    positions = torch.arange(9)[None].expand(2, -1)
    q = torch.randn(2, 3, 9, 64, dtype=dtype)
    cos, sin = hf(q, positions)
    hf_q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    ours = rotary_ref(q, cos, sin, False)
    if dtype == torch.float32:
        assert torch.equal(ours, hf_q)  # the same fp32 ops
    else:  # HF rounds after each op in the model dtype; we round once
        torch.testing.assert_close(ours, hf_q, atol=2e-2, rtol=2e-2)


def test_interleaved_is_complex_rotation():
    # GPT-J / Meta-Llama layout: (x[2i], x[2i+1]) is the complex number x[2i] + i x[2i+1],
    # multiplied by exp(i * pos * inv_freq[i]).
    seq, head_dim = 5, 32
    inv_freq = rope_inv_freq(head_dim, 1e4, None)
    positions = torch.arange(seq)[None]
    x = torch.randn(1, 2, seq, head_dim)
    cos, sin = rope_cos_sin(positions, inv_freq, torch.float32, interleaved=True)
    angles = torch.polar(torch.ones(seq, head_dim // 2), positions[0, :, None].float() * inv_freq)
    expected = torch.view_as_real(torch.view_as_complex(x.view(1, 2, seq, -1, 2)) * angles).flatten(-2)
    torch.testing.assert_close(rotary(x, cos, sin, True), expected, atol=1e-5, rtol=1e-5)


def test_opcheck():
    x = torch.randn(1, 5, 3, 64, dtype=torch.bfloat16).transpose(1, 2)
    cos, sin = _tables(1, 5, 64, torch.bfloat16)
    for interleaved in (False, True):
        torch.library.opcheck(torch.ops.trtllm.rotary.default, (x, cos, sin, interleaved))
