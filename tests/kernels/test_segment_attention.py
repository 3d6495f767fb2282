"""trtllm.segment_attention: bidirectional attention within segments of a packed sequence
(Qwen2.5-VL's vision blocks) equals SDPA run on each segment alone."""
import os

import pytest
import torch
import torch.nn.functional as F

from trtllm.kernels.segment_attention import segment_attention, segment_attention_ref, segment_bounds


def per_segment_sdpa(q, k, v, cu, scale):
    outs = [F.scaled_dot_product_attention(q[None, :, a:b], k[None, :, a:b], v[None, :, a:b], scale=scale)[0]
            for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("lengths,dim", [([5, 70, 1, 64, 3], 16), ([130], 32), ([4, 4, 9, 2, 66, 1], 80)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available()
                                             and os.environ.get("TRITON_INTERPRET") != "1" else []))
def test_segment_attention_equals_sdpa_per_segment(lengths, dim, dtype, device):
    torch.manual_seed(0)
    T, H = sum(lengths), 2
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32).to(device)
    qkv = torch.randn(T, 3, H, dim, dtype=dtype, device=device)
    q, k, v = (t.transpose(0, 1) for t in qkv.unbind(1))  # [H, T, D], strided as a ViT makes them
    start, end = segment_bounds(cu)
    out = segment_attention(q, k, v, start, end, dim ** -0.5)
    want = per_segment_sdpa(q.float(), k.float(), v.float(), cu, dim ** -0.5)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, atol=tol, rtol=tol)
    torch.testing.assert_close(segment_attention_ref(q, k, v, start, end, dim ** -0.5).float(), want,
                               atol=tol, rtol=tol)


def test_segment_bounds():
    start, end = segment_bounds(torch.tensor([0, 2, 5], dtype=torch.int32))
    assert start.tolist() == [0, 0, 2, 2, 2] and end.tolist() == [2, 2, 5, 5, 5]
