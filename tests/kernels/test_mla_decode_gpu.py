"""kernels/mla_decode.py compiled for the GPU at DeepSeek-V2-Lite / V3 latent geometry,
against its reference on the same GPU, also replayed from a CUDA graph. Skipped in CI (CPU,
interpreter); run on a GPU with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_mla_decode_gpu.py
"""
import os

import pytest
import torch

from tests.kernels.test_mla_decode import make_case
from trtllm.kernels.mla_decode import mla_decode, mla_decode_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
    reason="needs a GPU without the Triton interpreter")

# the kernel rounds P to the element type before P @ C; tf32 dots for fp32 are off (ieee)
TOLERANCES = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def on_gpu(case):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in case]


@pytest.mark.parametrize("dtype", list(TOLERANCES))
@pytest.mark.parametrize("lens, heads", [([2048], 16), ([1, 300, 2048, 17], 16), ([1000] * 64, 16),
                                         ([513, 77], 128)])  # V2-Lite's 16 heads; V3's 128
def test_mla_decode_on_the_gpu_matches_reference(lens, heads, dtype):
    case = on_gpu(make_case(lens, heads, 512, 64, dtype))
    ref_case = [t.clone() if isinstance(t, torch.Tensor) else t for t in case]
    scale = 192 ** -0.5
    out = mla_decode(*case, scale, len(lens), max(lens))
    ref = mla_decode_ref(*ref_case, scale, len(lens), max(lens))
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    assert torch.equal(case[3], ref_case[3])


def test_mla_decode_replays_from_a_cuda_graph():
    case = on_gpu(make_case([700, 33], 16, 512, 64, torch.bfloat16))
    ref = mla_decode_ref(*[t.clone() if isinstance(t, torch.Tensor) else t for t in case], 0.1, 2, 2048)
    mla_decode(*case, 0.1, 2, 2048)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mla_decode(*case, 0.1, 2, 2048)
    case[0].mul_(-1)  # new queries, same addresses
    graph.replay()
    ref2 = mla_decode_ref(*[t.clone() if isinstance(t, torch.Tensor) else t for t in case], 0.1, 2, 2048)
    torch.testing.assert_close(out, ref2, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(ref, ref2)
