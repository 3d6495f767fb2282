"""trtllm.rms_norm_rotary: QK-norm and rope in one launch, against rms_norm_ref then rotary_ref."""
import pytest
import torch

from trtllm.kernels.rms_norm import rms_norm_ref
from trtllm.kernels.rotary import rms_norm_rotary, rope_cos_sin, rope_inv_freq, rotary_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (batch, seq, heads, head_dim): tokens 1 / 7 / 83, heads 1 / 3 / 8
    (1, 1, 1, 64), (1, 1, 8, 256), (1, 7, 3, 80), (1, 7, 8, 128), (2, 7, 3, 256), (1, 83, 3, 64), (1, 83, 1, 128),
]


def _inputs(batch, seq, heads, head_dim, dtype, unit_offset, interleaved):
    # x: the [B, S, H, D] projection output seen as [B, H, S, D], as the models hand it over
    x = 3 * torch.randn(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2)
    weight = (0.5 * torch.randn(head_dim) + (0.0 if unit_offset else 1.0)).to(dtype)
    positions = torch.randint(0, 20000, (batch, seq))
    cos, sin = rope_cos_sin(positions, rope_inv_freq(head_dim, 1e6), dtype, interleaved)
    return x, weight, cos, sin


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq,heads,head_dim", SHAPES)
def test_matches_rms_norm_then_rotary(batch, seq, heads, head_dim, dtype, unit_offset, interleaved):
    torch.manual_seed(0)
    x, weight, cos, sin = _inputs(batch, seq, heads, head_dim, dtype, unit_offset, interleaved)
    out = rms_norm_rotary(x, weight, 1e-6, unit_offset, cos, sin, interleaved)
    normed = rms_norm_ref(x, weight, 1e-6, unit_offset)
    expected = rotary_ref(normed, cos, sin, interleaved)
    assert out.dtype == dtype and out.shape == x.shape and out.is_contiguous()
    if dtype == torch.float32:  # the same roundings; the sum of squares in another order
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-6)
        return
    # 16-bit: the rotation's inputs (the norm's output) may be an ulp off where the sum of
    # squares rounds differently, and in bf16 where the interpreter skips the norm's roundings
    # (it runs the kernel in fp32: registry.interpreter_upcast); a difference of two products
    # can make that many ulps of a small output: bounded by an ulp of the head's largest value.
    ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    head_max = normed.float().abs().amax(-1, keepdim=True)
    err = (out.float() - expected.float()).abs()
    assert (err <= ulp * (head_max + expected.float().abs())).all()
    if dtype == torch.float16:  # rounded where the unfused graph rounds: all but a sum-order few equal
        assert (err == 0).float().mean() >= 0.99


def test_opcheck():
    x, weight, cos, sin = _inputs(1, 5, 3, 64, torch.bfloat16, True, False)
    for unit_offset in (False, True):
        for interleaved in (False, True):
            torch.library.opcheck(torch.ops.trtllm.rms_norm_rotary.default,
                                  (x, weight, 1e-6, unit_offset, cos, sin, interleaved))


def test_weight_must_cover_the_head():
    x, weight, cos, sin = _inputs(1, 3, 2, 64, torch.float32, False, False)
    with pytest.raises(AssertionError, match="weight"):
        rms_norm_rotary(x, weight[:32], 1e-6, False, cos, sin, False)
