import pytest
import torch
import torch.nn.functional as F

from trtllm.kernels.bidirectional_attention import bidirectional_attention, bidirectional_attention_ref

# Kernel vs reference (both fp32 inside). fp16: P is rounded to fp16 before P @ V in the
# kernel (on the GPU; in the interpreter fp16 stays fp16 numpy), the reference keeps fp32;
# bf16: the interpreter runs the kernel on fp32 copies (registry.interpreter_upcast).
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}
DTYPES = list(TOLERANCES)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,h,s,d", [(1, 1, 1, 8), (2, 3, 17, 8), (1, 2, 65, 16), (3, 1, 50, 24),
                                     (1, 2, 130, 64), (2, 1, 7, 80)])
def test_matches_reference(b, h, s, d, dtype):
    q, k, v = (torch.randn(b, h, s, d, dtype=dtype) for _ in range(3))
    scale = d ** -0.5
    out = bidirectional_attention(q, k, v, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous()  # laid out [B, S, H, D]: a ViT's reshape after it is a view
    torch.testing.assert_close(out, bidirectional_attention_ref(q, k, v, scale), **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_vit_strides(dtype):
    """q/k/v as a ViT makes them: proj(x).view(B, S, H, D).transpose(1, 2) of one fused [B, S, 3HD]."""
    B, S, H, D = 2, 37, 4, 16
    qkv = torch.randn(B, S, 3 * H * D, dtype=dtype)
    q, k, v = (t.view(B, S, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=-1))
    out = bidirectional_attention(q, k, v, 0.3)
    torch.testing.assert_close(out, bidirectional_attention_ref(q, k, v, 0.3), **TOLERANCES[dtype])


def test_reference_is_sdpa():
    q, k, v = (torch.randn(2, 3, 29, 16) for _ in range(3))
    torch.testing.assert_close(bidirectional_attention_ref(q, k, v, 0.2),
                               F.scaled_dot_product_attention(q, k, v, scale=0.2), atol=1e-5, rtol=1e-5)


def test_large_logits_are_stable():
    q, k, v = (torch.randn(1, 1, 40, 8) * 30 for _ in range(3))
    out = bidirectional_attention(q, k, v, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, bidirectional_attention_ref(q, k, v, 1.0), atol=1e-4, rtol=1e-4)


def test_bad_shapes_refused():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(AssertionError, match="one \\[B, H, S, D\\] shape"):
        bidirectional_attention(q, torch.randn(1, 1, 8, 16), q, 1.0)
    with pytest.raises(AssertionError, match="head dim must be contiguous"):
        t = torch.randn(1, 2, 16, 8).transpose(2, 3)
        bidirectional_attention(t, t, t, 1.0)


def test_opcheck():
    q, k, v = (torch.randn(1, 2, 9, 16, dtype=torch.float16) for _ in range(3))
    torch.library.opcheck(torch.ops.trtllm.bidirectional_attention.default, (q, k, v, 0.25))


def test_sm90_build():
    """The kernel as the H100/H200 gets it, compiled here for sm_90 without a GPU
    (tools/check_bidirectional_attention_build.py, in its own process: the suite's kernels are
    interpreted ones): every build compiles and the 16-bit dots are tensor-core MMAs."""
    from tools.sm90_build import run_build_check
    out = run_build_check("check_bidirectional_attention_build.py", timeout=300)
    assert out.count("ok   ") == 4 and out.count(": wgmma") == 2, out
