"""GPU-only paths of paged attention: the decode merge inside a thread-block cluster
(kernels/paged_attention/decode_merge.py, 2 splits on sm_90+), against paged_attention_ref
and the global-ticket merge; soft-capping and ALiBi compiled for the GPU (prefill, decode by
cluster and by ticket) at real head shapes. Skipped in CI (CPU, interpreter); run on a Hopper GPU with

    TRITON_INTERPRET=0 python -m pytest -q tests/kernels/test_paged_attention_gpu.py
"""
import os

import pytest
import torch

from tests.kernels.test_paged_attention import (
    TOL,
    bloom_slopes,
    check,
    clone_caches,
    make_batch,
    rotated_first,
    with_alibi,
    with_rope,
    with_softcap,
)
from trtllm.kernels.paged_attention import PrefillLaunch, choose_launch, decode_launch, launch_paged_attention

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") == "1" or not torch.cuda.is_available()
    or torch.cuda.get_device_capability()[0] < 9,
    reason="needs an sm_90+ GPU without the Triton interpreter")

# Short sequences leave split 1 (cluster rank 0, the merger) or split 0 empty; 0 cached
# keys; lengths off the 64-key tile; a long one.
SPECS = [(300, 1), (5, 1), (64, 1), (0, 1), (2047, 1), (63, 1), (1000, 1)]


def on_gpu(args):
    return tuple(a.cuda() if isinstance(a, torch.Tensor) else a for a in args)


def rope_against_rotated_first(args, interleaved, launches):
    """Rope inside the op against the unfused chain (the rotary kernel, then the op) for
    each launch: outputs within TOL; the keys each writes to the cache within an ulp of the
    chain's (the GPU may contract the rotation's multiply-adds differently in the two kernels)."""
    dtype = args[0].dtype
    roped, (cos, sin) = with_rope(args, interleaved, dtype)
    roped, first = on_gpu(roped), rotated_first(on_gpu(args), cos.cuda(), sin.cuda(), interleaved)
    atol, rtol = TOL[dtype]
    outs = []
    for launch in launches:
        a_fused, a_first = clone_caches(roped), clone_caches(first)
        fused = launch_paged_attention(*a_fused, launch=launch)
        torch.testing.assert_close(fused, launch_paged_attention(*a_first, launch=launch), atol=atol, rtol=rtol)
        got, want = a_fused[3].float(), a_first[3].float()
        # an ulp: relative 2^-7 (bf16, and loose for fp32), 2^-3 (e4m3, whose subnormals step by
        # 2^-9), one step (int8)
        rel, step = {torch.float8_e4m3fn: (2.0 ** -3, 2.0 ** -9), torch.int8: (0.0, 1.0)}.get(
            a_fused[3].dtype, (2.0 ** -7, 0.0))
        assert ((got - want).abs() <= rel * want.abs() + step).all()
        assert torch.equal(a_fused[4], a_first[4])  # values are not rotated
        outs.append(fused)
    return outs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("hq,hkv,d,bs", [(32, 8, 128, 16), (8, 2, 64, 64), (16, 1, 128, 32)])
def test_cluster_merge_matches_reference_and_ticket(dtype, window, hq, hkv, d, bs):
    args, _ = make_batch(SPECS, hq, hkv, d, bs, dtype, window=window)
    args = on_gpu(args)
    cluster = decode_launch(2, True, d, args[0].element_size())
    out, _ = check(args, cluster)
    ticket, _ = check(args, decode_launch(2, False, d, args[0].element_size()))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ticket, atol=atol, rtol=rtol)
    again = launch_paged_attention(*clone_caches(args), launch=cluster)
    torch.testing.assert_close(again, out, atol=0, rtol=0)  # no state carried between launches


@pytest.mark.parametrize("splits", [3, 4, 8])
def test_forced_larger_clusters(splits):
    """Clusters of 3-8 splits (never chosen by default): several programs write their
    partials into the merger's shared memory, each into its own slot."""
    args, _ = make_batch(SPECS, 32, 8, 128, 16, torch.bfloat16)
    args = on_gpu(args)
    out, _ = check(args, decode_launch(splits, True, 128, 2))
    ticket, _ = check(args, decode_launch(splits, False, 128, 2))
    torch.testing.assert_close(out, ticket, atol=TOL[torch.bfloat16][0], rtol=TOL[torch.bfloat16][1])


def test_cluster_merge_padding_unused_rows_and_graph_replay():
    """Padding tokens and unused sequence rows (as under CUDA-graph capture) stay zero, and
    a captured launch replays to the eager result."""
    args, _ = make_batch([(20, 1), (300, 1)], 32, 8, 128, 16, torch.bfloat16, pad_tokens=5,
                         extra_seqs=2)
    a = list(on_gpu(args))
    a[15] = 4096  # max_seq_len: an upper bound
    cluster = decode_launch(2, True, 128, 2)
    out, ref = check(tuple(a), cluster)
    assert out[-5:].abs().sum() == 0 and out[:2].abs().sum() > 0
    graph, caches = torch.cuda.CUDAGraph(), clone_caches(a)
    launch_paged_attention(*caches, launch=cluster)  # compiled before capture
    with torch.cuda.graph(graph):
        replayed = launch_paged_attention(*caches, launch=cluster)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(replayed, out, atol=0, rtol=0)


def test_default_launch_at_b8_is_the_cluster_merge():
    """The default for b8 x 2048 (8 kv heads) on an sm_90+ GPU of 128-191 SMs (H100, H200):
    2 splits merged in a cluster, 2 warps."""
    args, _ = make_batch([(2047, 1)] * 8, 32, 8, 128, 16, torch.bfloat16)
    args = on_gpu(args)
    assert choose_launch(args[0], args[3], *args[13:]) == decode_launch(2, True, 128, 2)
    assert decode_launch(2, True, 128, 2).num_warps == 2
    check(args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 40])
def test_softcap_decode_cluster_and_ticket(dtype, window):
    """Gemma-2-like soft-capping (q scaled so the logits, ~8 std, reach past the cap of 5)
    through the cluster merge, the ticket merge and one split, against the reference."""
    args, _ = make_batch(SPECS, 16, 8, 128, 16, dtype, window=window, softcap=5.0)
    args = on_gpu((args[0] * 8, *args[1:]))
    es = args[0].element_size()
    outs = [check(args, launch)[0] for launch in (decode_launch(2, True, 128, es), decode_launch(2, False, 128, es),
                                                  decode_launch(1, False, 128, es))]
    atol, rtol = TOL[dtype]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=atol, rtol=rtol)
    uncapped, _ = check(with_softcap(args, 0.0), decode_launch(2, True, 128, es))
    assert (outs[0].float() - uncapped.float()).abs().max() > 0.1  # the cap bites


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 100])
def test_softcap_prefill(dtype, window):
    """The default prefill tiles (128 x 64 rows in 16-bit, 64 x 16 in fp32) and a small one,
    soft-capped, on a prompt and a chunk after cached context."""
    args, _ = make_batch([(0, 300), (500, 77), (37, 1)], 32, 8, 128, 16, dtype, window=window, softcap=5.0)
    args = on_gpu((args[0] * 8, *args[1:]))
    out, _ = check(args)
    small, _ = check(args, PrefillLaunch(16, 16, 4, 1))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(small, out, atol=atol, rtol=rtol)
    uncapped, _ = check(with_softcap(args, 0.0))
    assert (out.float() - uncapped.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 40])
def test_alibi_decode_cluster_and_ticket(dtype, window):
    """BLOOM's slopes for 16 heads through the cluster merge, the ticket merge and one split,
    against the reference; the bias bites over these contexts (up to 2047 keys)."""
    args, _ = make_batch(SPECS, 16, 8, 128, 16, dtype, window=window)
    plain = on_gpu(args)
    args = on_gpu(with_alibi(args, bloom_slopes(16)))
    es = args[0].element_size()
    outs = [check(args, launch)[0] for launch in (decode_launch(2, True, 128, es), decode_launch(2, False, 128, es),
                                                  decode_launch(1, False, 128, es))]
    atol, rtol = TOL[dtype]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=atol, rtol=rtol)
    unbiased, _ = check(plain, decode_launch(2, True, 128, es))
    assert (outs[0].float() - unbiased.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [0, 100])
def test_alibi_prefill(dtype, window):
    """The default prefill tiles and a small one with ALiBi (32 heads: BLOOM's slopes), on a
    prompt and a chunk after cached context."""
    args, _ = make_batch([(0, 300), (500, 77), (37, 1)], 32, 8, 128, 16, dtype, window=window)
    plain = on_gpu(args)
    args = on_gpu(with_alibi(args, bloom_slopes(32)))
    out, _ = check(args)
    small, _ = check(args, PrefillLaunch(16, 16, 4, 1))
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(small, out, atol=atol, rtol=rtol)
    unbiased, _ = check(plain)
    assert (out.float() - unbiased.float()).abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_in_every_decode_merge_and_prefill(dtype, interleaved):
    """Rope inside the op (passes/fuse_rotary_attention.py) at Llama-3-8B heads: the cluster
    merge, a ticket merge, one split, and the prefill kernels (rotated first by the launcher),
    with padding tokens, against the unfused chain; all four agree."""
    args, _ = make_batch(SPECS, 32, 8, 128, 16, dtype, pad_tokens=3, strided=True)
    es = args[0].element_size()
    outs = rope_against_rotated_first(args, interleaved, [
        decode_launch(2, True, 128, es), decode_launch(4, False, 128, es), decode_launch(1, False, 128, es),
        PrefillLaunch(16, 16, 4, 1)])
    atol, rtol = TOL[dtype]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=atol, rtol=rtol)
