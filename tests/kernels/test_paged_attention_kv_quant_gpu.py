"""Paged attention with an FP8 (e4m3) or INT8 KV cache compiled for the GPU, at real shapes
(head_dim 128, GQA 32/8 as Llama-3-8B; 8/2 at head_dim 64 on 64-token pages): every
kernel path (the cache write + prefill kernel; decode with 1 split, 2 merged in a cluster,
4 and 16 by ticket) against paged_attention_ref, the cache writes bit for bit (the GPU's
cvt.rn.satfinite.e4m3 and INT8's round to nearest even against torch's rounding), sliding
windows and soft-capping, a CUDA-graph replay. Skipped in CI (CPU, interpreter); run on
the H200 with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_paged_attention_kv_quant_gpu.py
"""
import os

import pytest
import torch

from tests.kernels.test_paged_attention import TOL, make_batch
from tests.kernels.test_paged_attention_kv_quant import check, clone_caches, crafted_values, quantized, run_both
from trtllm.kernels.paged_attention import (
    DecodeLaunch,
    PrefillLaunch,
    choose_launch,
    decode_launch,
    launch_paged_attention as launch,
)
from trtllm.kernels.paged_attention.kv_quant import KV_CACHE_DTYPES, quantize_kv_ref

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    or torch.cuda.get_device_capability() < (8, 9),
    reason="needs an sm_89+ GPU (FP8) without the Triton interpreter")
sm90 = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                          reason="the cluster merge needs sm_90+")

FORMATS = ["fp8", "int8"]
SHAPES = [(32, 8, 128, 16), (8, 2, 64, 64)]
# prompts, a chunk after a long context, decodes mixed in, lengths off the 64-key tile
PREFILL = [(0, 300), (500, 77), (2000, 1), (0, 1), (63, 65), (1000, 130)]
DECODE = [(300, 1), (5, 1), (64, 1), (0, 1), (2047, 1), (63, 1), (1000, 1)]


def on_gpu(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def batch(specs, fmt, dtype, hq, hkv, d, bs, **kw):
    args, _ = make_batch(specs, hq, hkv, d, bs, dtype, **kw)
    return on_gpu(quantized(args, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,bs", SHAPES)
@pytest.mark.parametrize("window", [0, 200])
def test_prefill(fmt, dtype, hq, hkv, d, bs, window):
    args = batch(PREFILL, fmt, dtype, hq, hkv, d, bs, window=window)
    check(args)  # the default: the H100-tuned prefill tiles
    check(args, PrefillLaunch(32, 64, 4, 3))  # short-chunk tiles


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hq,hkv,d,bs", SHAPES)
@pytest.mark.parametrize("window", [0, 40])
def test_decode(fmt, dtype, hq, hkv, d, bs, window):
    args = batch(DECODE, fmt, dtype, hq, hkv, d, bs, window=window)
    elem = args[0].element_size()
    out, _, _ = check(args)  # the default for this batch
    for splits in (1, 4, 16):  # one program, ticket merges
        again, _, _ = check(args, decode_launch(splits, False, d, elem))
        torch.testing.assert_close(again, out, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@sm90
@pytest.mark.parametrize("fmt", FORMATS)
def test_decode_cluster_merge(fmt):
    args = batch(DECODE, fmt, torch.bfloat16, 32, 8, 128, 16)
    cluster, _, _ = check(args, decode_launch(2, True, 128, 2))
    ticket, _, _ = check(args, decode_launch(2, False, 128, 2))
    torch.testing.assert_close(cluster, ticket, atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


@pytest.mark.parametrize("fmt", FORMATS)
def test_softcap(fmt):
    """Gemma-2's soft-capping (50.0) on quantized keys: prefill and decode."""
    args, _ = make_batch(PREFILL, 16, 8, 128, 16, torch.bfloat16, softcap=50.0)
    check(on_gpu(quantized((args[0] * 20, *args[1:]), fmt)))
    args, _ = make_batch(DECODE, 16, 8, 128, 16, torch.bfloat16, softcap=50.0)
    check(on_gpu(quantized((args[0] * 20, *args[1:]), fmt)), DecodeLaunch(4, False, 64, 8, 5))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("decode", [False, True])
def test_cache_write_rounds_as_torch(fmt, decode):
    """crafted_values (ties, past the clamp, e4m3 subnormals, signed zeros) stored by the
    compiled kernels: torch's quantization bit for bit."""
    hq, hkv, d = 32, 8, 128
    values = crafted_values(fmt)
    m = -(-values.numel() // (hkv * d))
    x = torch.nn.functional.pad(values, (0, m * hkv * d - values.numel())).view(m, hkv, d)
    scales = (2.0 ** torch.randint(-6, 2, (2, 2, hkv))).float()  # powers of 2: x / scale is exact
    k, v = x * scales[1, 0][:, None], -x * scales[1, 1][:, None]
    k_cache = torch.zeros((2, m + 2, 16, hkv, d), dtype=KV_CACHE_DTYPES[fmt])
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    if decode:
        slots, table = i32([(s + 1) * 16 for s in range(m)]), i32([[s + 1] for s in range(m)])
        meta = (i32([1] * m), i32(list(range(m + 1))), d ** -0.5, 0, 0.0, m, 1, 1)
    else:
        slots, table = i32([16 + t for t in range(m)]), i32([list(range(1, m + 2))])
        meta = (i32([m]), i32([0, m]), d ** -0.5, 0, 0.0, 1, m, m)
    args = on_gpu((torch.randn(m, hq, d), k, v, k_cache, k_cache.clone(), 1, slots, table, *meta, scales))
    _, _, written = run_both(args)
    stored = written[3][1].flatten(0, 1)[slots.long().cuda()]
    assert torch.equal(stored.view(torch.uint8).cpu(), quantize_kv_ref(k, scales[1, 0], fmt).view(torch.uint8))


@pytest.mark.parametrize("fmt", FORMATS)
def test_graph_replay_and_padding(fmt):
    """A captured decode launch replays to the eager result; padding tokens and unused rows
    (as under capture) stay zero."""
    args, _ = make_batch([(20, 1), (300, 1)], 32, 8, 128, 16, torch.bfloat16, pad_tokens=5, extra_seqs=2)
    a = list(on_gpu(quantized(args, fmt)))
    a[15] = 4096  # max_seq_len: an upper bound
    out, _, _ = check(tuple(a))
    assert out[-5:].abs().sum() == 0 and out[:2].abs().sum() > 0
    caches = clone_caches(a)
    launch(*caches)  # compiled before capture
    graph = torch.cuda.CUDAGraph()
    caches = clone_caches(a)
    with torch.cuda.graph(graph):
        replayed = launch(*caches)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed, out, atol=0, rtol=0)


def test_default_launch_is_unchanged_by_the_cache_format():
    """choose_launch picks by q's dtype and the shapes, whatever the cache holds."""
    host, _ = make_batch([(2047, 1)] * 8, 32, 8, 128, 16, torch.bfloat16)
    plain = on_gpu(host)
    for fmt in FORMATS:
        q = on_gpu(quantized(host, fmt))  # quantized on the host, where its scales are made
        assert choose_launch(q[0], q[3], *q[13:16]) == choose_launch(plain[0], plain[3], *plain[13:16])


@sm90
@pytest.mark.parametrize("fmt", FORMATS)
def test_rope_with_a_quantized_cache(fmt):
    """Rope inside the op on a quantized cache: the new keys rotated, then quantized (the
    cluster merge, a ticket merge, the prefill path) against the unfused chain."""
    from tests.kernels.test_paged_attention_gpu import rope_against_rotated_first
    args, _ = make_batch(DECODE, 32, 8, 128, 16, torch.bfloat16, pad_tokens=2)
    rope_against_rotated_first(quantized(args, fmt), False, [
        decode_launch(2, True, 128, 2), decode_launch(4, False, 128, 2), PrefillLaunch(32, 64, 4, 3)])
