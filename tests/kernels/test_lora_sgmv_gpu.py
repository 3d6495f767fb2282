"""The LoRA kernels compiled for the GPU (kernels/lora_sgmv.py) against their references at
Llama-3.1-8B shapes, eagerly and inside a CUDA graph replayed with new slots. Skipped in CI
(CPU, interpreter); run on a GPU with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_lora_sgmv_gpu.py
"""
import os

import pytest
import torch

from trtllm.kernels.lora_sgmv import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available(),
                                reason="needs a GPU without the Triton interpreter")

TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float32: dict(atol=1e-3, rtol=1e-3)}


@pytest.mark.parametrize("dtype", list(TOL))
def test_split_sums_in_order_on_the_gpu(dtype):
    from tests.kernels.test_lora_sgmv import test_split_sums_in_order_wherever_they_are_added as in_order
    for t, k in [(5, 769), (64, 4100), (17, 14336)]:
        in_order(t, k, dtype, device="cuda")


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("t", [1, 7, 64, 769])
@pytest.mark.parametrize("k,n,rank", [(4096, 6144, 48), (4096, 4096, 16), (14336, 4096, 16), (4096, 28672, 32)])
def test_kernels_match_references_on_the_gpu(t, k, n, rank, dtype):
    slots_n = 8
    x = torch.randn(t, k, dtype=dtype, device="cuda")
    a = (torch.randn(slots_n, rank, k, device="cuda") / k**0.5).to(dtype)
    b = (torch.randn(slots_n, n, rank, device="cuda") / rank**0.5).to(dtype)
    base = torch.randn(t, n, dtype=dtype, device="cuda")
    slots = torch.randint(-1, slots_n, (t + 4,), device="cuda")
    h = lora_shrink(x, a, slots)
    torch.testing.assert_close(h, lora_shrink_ref(x, a, slots), **TOL[dtype])
    out = lora_expand(base, h, b, slots)
    torch.testing.assert_close(out, lora_expand_ref(base, h, b, slots), **TOL[dtype])


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("t", [1, 128, 1030])
@pytest.mark.parametrize("n,parts", [(6144, [0, 4096, 4096, 1024, 5120, 1024]), (28672, [0, 14336, 14336, 14336])])
def test_the_expand_over_parts_reads_only_their_blocks_on_the_gpu(t, n, parts, dtype):
    """The compiled kernel at 8B shapes (fused QKV, gate-up) with garbage off B's blocks: the
    output of zeros there (test_lora_sgmv.py's test_expand_reads_only_each_parts_ranks)."""
    from trtllm.kernels.lora_sgmv import _blocks
    rank = 16 * (len(parts) // 2)
    b = torch.randn(8, n, rank, dtype=dtype, device="cuda")
    base, h = torch.randn(t, n, dtype=dtype, device="cuda"), torch.randn(t, rank, dtype=dtype, device="cuda")
    slots = torch.randint(-1, 8, (t + 4,), device="cuda")
    want = lora_expand_ref(base, h, b * _blocks(parts, n, rank).to("cuda", dtype), slots)
    torch.testing.assert_close(lora_expand(base, h, b, slots, parts), want, **TOL[dtype])


def test_a_cuda_graph_replays_with_the_slots_refilled():
    t, k, n, rank = 16, 4096, 4096, 16
    x = torch.randn(t, k, dtype=torch.bfloat16, device="cuda")
    a = (torch.randn(4, rank, k, device="cuda") / 64).to(torch.bfloat16)
    b = (torch.randn(4, n, rank, device="cuda") / 4).to(torch.bfloat16)
    base = torch.randn(t, n, dtype=torch.bfloat16, device="cuda")
    slots = torch.full((t,), -1, device="cuda")
    lora_expand(base, lora_shrink(x, a, slots), b, slots)  # compile outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = lora_expand(base, lora_shrink(x, a, slots), b, slots)
    for fill in ([-1] * t, [0, 1, 2, 3] * 4, list(range(-1, 3)) * 4):
        slots.copy_(torch.tensor(fill, device="cuda"))
        graph.replay()
        want = lora_expand_ref(base, lora_shrink_ref(x, a, slots), b, slots)
        torch.testing.assert_close(out, want, **TOL[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t", [1, 3, 16, 64, 128])
@pytest.mark.parametrize("k,n,rank", [(4096, 6144, 48), (14336, 4096, 16), (4096, 28672, 32)])
def test_linear_lora_in_a_cuda_graph(t, k, n, rank, dtype):
    """trtllm.linear_lora in a CUDA graph (kernels/linear_lora.py: up to 16 rows the GEMV with its
    LoRA epilogue; 64 and 128 rows cuBLAS, the shrink's K splits summed once, the expand: the path
    a prefill graph with LoRA slots captures) against its reference, slots refilled between replays;
    inside no_adapters() the graph computes the base linear."""
    from trtllm.kernels.linear import linear_ref
    from trtllm.kernels.linear_lora import linear_lora, linear_lora_ref, no_adapters
    x = torch.randn(t, k, dtype=dtype, device="cuda")
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    a = (torch.randn(8, rank, k, device="cuda") / k**0.5).to(dtype)
    b = (torch.randn(8, n, rank, device="cuda") / rank**0.5).to(dtype)
    slots = torch.full((t + 4,), -1, device="cuda")
    graphs = {}
    for base_only in (False, True):
        with no_adapters(base_only):
            linear_lora(x, w, bias, a, b, slots)  # compile outside the graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = linear_lora(x, w, bias, a, b, slots)
        graphs[base_only] = (graph, out)
    for fill in ([-1] * t, [i % 8 for i in range(t)], [i % 9 - 1 for i in range(t)]):
        slots[:t].copy_(torch.tensor(fill, device="cuda"))
        graphs[False][0].replay()
        want = linear_lora_ref(x, w, bias, a, b, slots)
        torch.testing.assert_close(graphs[False][1], want, atol=3e-2, rtol=2e-2)
        assert fill == [-1] * t or (want - linear_ref(x, w, bias)).abs().max() > 0.1  # the adapter term counts
    slots[:t] = -1
    graphs[True][0].replay()
    torch.testing.assert_close(graphs[True][1], linear_ref(x, w, bias), atol=3e-2, rtol=2e-2)
