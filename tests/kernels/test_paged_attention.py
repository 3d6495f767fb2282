"""paged_attention: Triton kernel (through the interpreter on CPU) vs paged_attention_ref,
and paged_attention_ref vs dense SDPA per sequence."""
import math

import pytest
import torch
import torch.nn.functional as F

import trtllm.kernels.paged_attention.decode as pa_decode
import trtllm.kernels.paged_attention.launch_shape as launch_shape
from trtllm.kernels.paged_attention import (
    DecodeLaunch,
    PrefillLaunch,
    choose_launch,
    decode_launch,
    launch_paged_attention,
    paged_attention,
    paged_attention_ref,
)

# (atol, rtol) of kernel vs reference. fp16: P is rounded to fp16 before P @ V, as in
# every flash kernel, and the output once more. bf16: the same on the GPU; here the
# kernels run in fp32 (registry.interpreter_upcast) and only the output is rounded.
TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3),
       torch.bfloat16: (1.6e-2, 1.6e-2)}
# reference vs dense SDPA, both fp32 inside
REF_TOL = (1e-5, 1e-5)


def make_batch(specs, hq, hkv, d, bs, dtype, *, layers=2, layer=1, pad_tokens=0,
               extra_seqs=0, strided=False, window=0, softcap=0.0):
    """specs: [(cached, new)] per sequence. Random (never zero) caches, non-contiguous
    random block tables, garbage in unused table entries and in the slots about to be
    written. Returns (args tuple of the op, per-sequence dense (q, K, V) for SDPA)."""
    lens = [c + n for c, n in specs]
    nblk = [math.ceil(L / bs) for L in lens]
    num_blocks = sum(nblk) + 3
    perm = torch.randperm(num_blocks).tolist()
    tables, at = [], 0
    for nb in nblk:
        tables.append(perm[at: at + nb])
        at += nb
    shape = (layers, num_blocks, bs, hkv, d)
    k_cache, v_cache = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)

    n_seq = len(specs)
    T = sum(n for _, n in specs) + pad_tokens
    q_all = torch.randn(T, hq, d, dtype=dtype)
    k_all, v_all = torch.randn(T, hkv, d, dtype=dtype), torch.randn(T, hkv, d, dtype=dtype)
    if strided:  # what the graph op passes: transposes of [1, H, T, D]
        q_all = q_all.transpose(0, 1).contiguous().transpose(0, 1)
        k_all = k_all.transpose(0, 1).contiguous().transpose(0, 1)
        v_all = v_all.transpose(0, 1).contiguous().transpose(0, 1)
    slot = torch.full((T + 5,), -1, dtype=torch.int32)
    mb = max(nblk) + 2
    s_max = n_seq + extra_seqs
    bt = torch.randint(0, num_blocks, (s_max, mb), dtype=torch.int32)  # garbage beyond use
    seq_lens = torch.zeros(s_max, dtype=torch.int32)
    total = sum(n for _, n in specs)
    qsl = torch.full((s_max + 1,), total, dtype=torch.int32)
    dense, t0 = [], 0
    for s, ((c, n), blocks) in enumerate(zip(specs, tables)):
        L = c + n
        bt[s, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        seq_lens[s], qsl[s] = L, t0
        pos = torch.arange(L)
        pages, offs = torch.tensor(blocks)[pos // bs], pos % bs
        kc, vc = k_cache[layer, pages, offs].clone(), v_cache[layer, pages, offs].clone()
        kc[c:], vc[c:] = k_all[t0: t0 + n], v_all[t0: t0 + n]  # the truth after the write
        slot[t0: t0 + n] = (pages * bs + offs)[c:].to(torch.int32)
        dense.append((q_all[t0: t0 + n], kc, vc))
        t0 += n
    qsl[n_seq] = total
    scale = d ** -0.5
    args = (q_all, k_all, v_all, k_cache, v_cache, layer, slot, bt, seq_lens, qsl, scale,
            window, softcap, n_seq + extra_seqs, max(n for _, n in specs), max(lens))
    return args, dense


def clone_caches(args):
    a = list(args)
    a[3], a[4] = a[3].clone(), a[4].clone()
    return a


def run_both(args, launch=None):
    a_ref, a_tri = clone_caches(args), clone_caches(args)
    ref = paged_attention_ref(*a_ref)
    out = launch_paged_attention(*a_tri, launch=launch)
    torch.testing.assert_close(a_tri[3], a_ref[3], atol=0, rtol=0, equal_nan=True)  # cache write
    torch.testing.assert_close(a_tri[4], a_ref[4], atol=0, rtol=0, equal_nan=True)
    return out, ref


def check(args, launch=None):
    out, ref = run_both(args, launch)
    atol, rtol = TOL[args[0].dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    return out, ref


def dense_sdpa(dense, hq, scale, window, softcap=0.0):
    """Per sequence, dense attention: SDPA, or with softcap > 0 the soft-capped scores as
    HF's eager_attention_forward computes them (scale, / softcap, tanh, * softcap, mask)."""
    outs = []
    for q, k, v in dense:
        n, L = q.shape[0], k.shape[0]
        g = hq // k.shape[1]
        i = torch.arange(n)[:, None] + (L - n)
        j = torch.arange(L)[None, :]
        mask = (j <= i) & ((window <= 0) | (j > i - window))
        qh, kh = q.float().transpose(0, 1), k.float().repeat_interleave(g, 1).transpose(0, 1)
        vh = v.float().repeat_interleave(g, 1).transpose(0, 1)
        if softcap > 0:
            scores = torch.tanh(qh @ kh.transpose(1, 2) * scale / softcap) * softcap
            o = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vh
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


MIXED = [(0, 7), (21, 5), (40, 1), (0, 1), (9, 1), (0, 20)]  # prefill, prefix hit, decodes


@pytest.mark.parametrize("window", [0, 6])
@pytest.mark.parametrize("softcap", [0.0, 1.5])
def test_reference_matches_dense_sdpa(window, softcap):
    args, dense = make_batch(MIXED, 4, 2, 16, 16, torch.float32, window=window, softcap=softcap)
    ref = paged_attention_ref(*clone_caches(args))
    torch.testing.assert_close(ref, dense_sdpa(dense, 4, args[10], window, softcap), atol=REF_TOL[0],
                               rtol=REF_TOL[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [
    (8, 2, 64, 16),   # GQA 4
    (4, 1, 32, 32),   # MQA
    (2, 2, 128, 128), # MHA, one big page
    (6, 2, 24, 16),   # G = 3, head dim not a power of 2 (masked)
])
def test_mixed_batch(dtype, hq, hkv, d, bs):
    """Prefill, chunked prefill / prefix hit and decodes in one ragged batch (general path)."""
    args, dense = make_batch([(0, 7), (35, 9), (83, 1), (0, 2), (17, 1)], hq, hkv, d, bs, dtype)
    out, _ = check(args)
    if dtype == torch.float32:
        torch.testing.assert_close(out, dense_sdpa(dense, hq, args[10], 0), atol=1e-4, rtol=1e-4)


def test_prefill_tiles_small():
    """Small forced tiles: many q blocks per sequence, unmasked + diagonal + context tiles."""
    args, dense = make_batch([(0, 83), (50, 33), (0, 1)], 8, 2, 16, 16, torch.float32, strided=True)
    out, _ = check(args, PrefillLaunch(32, 16, 4, 1))
    torch.testing.assert_close(out, dense_sdpa(dense, 8, args[10], 0), atol=1e-4, rtol=1e-4)


def test_prefill_gpu_config():
    """The H100 prefill config (BLOCK_M=128, BLOCK_N=64) on a 130-token prompt + a chunk."""
    args, _ = make_batch([(0, 130), (70, 40)], 8, 2, 64, 16, torch.float16)
    check(args, PrefillLaunch(128, 64, 8, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(8, 2, 64, 16), (4, 1, 16, 32), (4, 4, 128, 128)])
def test_decode(dtype, hq, hkv, d, bs):
    args, dense = make_batch([(150, 1), (6, 1), (0, 1), (64, 1)], hq, hkv, d, bs, dtype)
    assert choose_launch(args[0], args[3], *args[13:]).splits == 2  # max_seq_len 151 // SPLIT_MIN_LEN
    out, _ = check(args)
    if dtype == torch.float32:
        torch.testing.assert_close(out, dense_sdpa(dense, hq, args[10], 0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("splits", [3, 8, 12])  # 12: the merge loop past 8 splits
@pytest.mark.parametrize("window", [0, 40])
def test_decode_split(splits, window):
    """Flash-decoding path forced: uneven and empty splits (short sequences)."""
    args, _ = make_batch([(300, 1), (5, 1), (64, 1), (0, 1)], 8, 2, 32, 16, torch.float32,
                         window=window)
    out, _ = check(args, DecodeLaunch(splits, False, 16, 4, 1))
    # the merge tickets are back to zero: a second launch merges again
    assert not pa_decode._counters[torch.device("cpu")].any()
    if splits == 3 and window == 0:
        again, _ = check(args, DecodeLaunch(splits, False, 16, 4, 1))
        torch.testing.assert_close(again, out, atol=0, rtol=0)


@pytest.mark.parametrize("splits", [None, 3])
def test_decode_never_reads_unwritten_slots(splits):
    """Every cache slot no key was written to holds NaN (a cache is torch.empty): the
    decode loop's tail rows re-read written rows and masked ones never reach the output."""
    specs = [(300, 1), (5, 1), (64, 1), (0, 1), (47, 1)]
    args, _ = make_batch(specs, 8, 2, 32, 16, torch.float32)
    k_cache, v_cache, layer, bt = args[3], args[4], args[5], args[7]
    used = torch.zeros(k_cache.shape[1], dtype=torch.bool)
    for s, (c, n) in enumerate(specs):
        blocks = bt[s, : math.ceil((c + n) / 16)].long()
        used[blocks] = True
        for p in range(c, len(blocks) * 16):
            k_cache[layer, blocks[p // 16], p % 16] = float("nan")
            v_cache[layer, blocks[p // 16], p % 16] = float("nan")
    k_cache[layer, ~used] = float("nan")
    v_cache[layer, ~used] = float("nan")
    out, _ = check(args, None if splits is None else DecodeLaunch(splits, False, 16, 4, 1))
    assert torch.isfinite(out).all()


def test_split_heuristic():
    dev = torch.device("cpu")
    assert launch_shape.num_splits(8, 8, 2048, dev) == 2
    assert launch_shape.num_splits(1, 8, 8192, dev) == 16
    assert launch_shape.num_splits(1, 8, 512, dev) == 8
    assert launch_shape.num_splits(64, 8, 8192, dev) == 1
    assert launch_shape.num_splits(1, 8, 100, dev) == 1


def test_cluster_merge_is_gpu_only():
    """The cluster merge (2 splits on sm_90+; tests/kernels/test_paged_attention_gpu.py)
    is never chosen here, and forcing it names what it needs."""
    args, _ = make_batch([(150, 1), (6, 1)], 8, 2, 32, 16, torch.float16)
    assert choose_launch(args[0], args[3], *args[13:]) == decode_launch(2, False, 32, 2)  # the ticket merge
    check(args, decode_launch(2, False, 32, 2))
    with pytest.raises(ValueError, match="sm_90"):
        launch_paged_attention(*clone_caches(args), launch=decode_launch(2, True, 32, 2))


def test_impossible_launches_are_refused():
    """A launch choice the batch cannot run names what it needs."""
    args, _ = make_batch([(20, 3), (6, 1)], 4, 2, 16, 16, torch.float32)
    assert isinstance(choose_launch(args[0], args[3], *args[13:]), PrefillLaunch)
    with pytest.raises(ValueError, match="max_query_len == 1"):
        launch_paged_attention(*clone_caches(args), launch=DecodeLaunch(1, False, 16, 4, 1))
    with pytest.raises(ValueError, match="decode kernel only"):
        launch_paged_attention(*clone_caches(args), trace=torch.zeros(64, dtype=torch.int64))
    args, _ = make_batch([(20, 1), (6, 1)], 4, 2, 16, 16, torch.float32)
    with pytest.raises(ValueError, match="splits >= 1"):
        launch_paged_attention(*clone_caches(args), launch=DecodeLaunch(0, False, 16, 4, 1))
    check(args, PrefillLaunch(16, 16, 4, 1))  # a decode batch through the prefill kernel


def test_decode_int64_cache_offsets(monkeypatch):
    """Caches past 2**31 elements per layer take 64-bit offsets in the decode loop: the
    same path, forced here on a small cache."""
    monkeypatch.setattr(pa_decode, "_MAX_INT32_OFFSET", 0)
    args, _ = make_batch([(150, 1), (37, 1), (0, 1)], 8, 2, 32, 16, torch.float16)
    check(args, decode_launch(2, False, 32, 2))
    check(args, decode_launch(1, False, 32, 2))


@pytest.mark.parametrize("scale", [0.0, -0.125])
def test_nonpositive_scale_is_refused(scale):
    """The kernels take row maxima of unscaled scores and scale them after."""
    args, _ = make_batch([(20, 1)], 4, 2, 16, 16, torch.float32)
    args = list(args)
    args[10] = scale
    with pytest.raises(AssertionError, match="softmax scale must be > 0"):
        launch_paged_attention(*args)


@pytest.mark.parametrize("window", [5, 16])
def test_sliding_window(window):
    specs = [(0, 40), (30, 12), (60, 1)]
    args, dense = make_batch(specs, 4, 2, 16, 16, torch.float32, window=window)
    out, _ = check(args, PrefillLaunch(16, 16, 4, 1))
    torch.testing.assert_close(out, dense_sdpa(dense, 4, args[10], window), atol=1e-4, rtol=1e-4)
    args, _ = make_batch([(60, 1), (3, 1)], 4, 2, 16, 16, torch.float32, window=window)
    check(args)  # decode path


def i32(*values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cache_written_by_one_call_is_read_by_the_next(dtype):
    """A prompt's k/v rows, written to the cache by the prefill call, are what the next
    decode call reads: in bf16 here both calls get fp32 copies of the caches
    (registry.interpreter_upcast), whose writes must reach the bf16 caches."""
    hq, hkv, d, bs, n = 4, 2, 32, 16, 21
    k_cache = torch.full((2, 4, bs, hkv, d), float("nan"), dtype=dtype)  # never-written slots: NaN
    v_cache = torch.full_like(k_cache, float("nan"))
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    slots = torch.tensor([table[0, p // bs] * bs + p % bs for p in range(n + 1)], dtype=torch.int32)
    q = torch.randn(n + 1, hq, d, dtype=dtype)
    k, v = torch.randn(n + 1, hkv, d, dtype=dtype), torch.randn(n + 1, hkv, d, dtype=dtype)
    launch_paged_attention(q[:n], k[:n], v[:n], k_cache, v_cache, 1, slots[:n], table, i32(n),
                           i32(0, n), d ** -0.5, 0, 0.0, 1, n, n)
    out = launch_paged_attention(q[n:], k[n:], v[n:], k_cache, v_cache, 1, slots[n:], table,
                                 i32(n + 1), i32(0, 1), d ** -0.5, 0, 0.0, 1, 1, n + 1)
    pos = torch.arange(n + 1)
    assert torch.equal(k_cache[1, table[0, pos // bs].long(), pos % bs], k)
    assert torch.equal(v_cache[1, table[0, pos // bs].long(), pos % bs], v)
    assert k_cache[0].isnan().all() and v_cache[0].isnan().all()  # the other layer untouched
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, dense_sdpa([(q[n:], k, v)], hq, d ** -0.5, 0).to(dtype), atol=atol, rtol=rtol)


@pytest.mark.parametrize("decode", [False, True])
def test_padding_and_unused_rows_are_zero(decode):
    """Padding tokens (slot -1, beyond query_start_loc[num_seqs]), unused sequence rows
    (upper-bound num_seqs / max_seq_len as under CUDA-graph capture), seq_len 0."""
    specs = [(20, 1), (3, 1)] if decode else [(0, 9), (20, 3)]
    args, _ = make_batch(specs, 4, 2, 16, 16, torch.float16, pad_tokens=7, extra_seqs=2)
    a = list(args)
    a[15] = 700  # max_seq_len: an upper bound (2 decode splits, one of them empty)
    out, ref = check(tuple(a))
    assert out[-7:].abs().sum() == 0 and ref[-7:].abs().sum() == 0
    # a token outside every sequence still has its (valid) slot written, as in the reference
    a[6] = a[6].clone()
    bs, nb = a[3].shape[2], a[3].shape[1]
    used = {int(b) for i, (c, n) in enumerate(specs) for b in a[7][i, : math.ceil((c + n) / bs)]}
    free = next(b for b in range(nb) if b not in used)
    a[6][len(out) - 2] = free * bs + 3
    out, ref = check(tuple(a))
    a[6][len(out) - 2] = -1
    before = a[3][a[5]].clone()
    # seq_len 0 for sequence 1: its rows are zeros
    a[8] = a[8].clone()
    a[8][1] = 0
    out, _ = check(tuple(a))
    n0 = int(a[9][1])
    assert out[n0: int(a[9][2])].abs().sum() == 0 and out[:n0].abs().sum() > 0
    # nothing but the new tokens' slots changed in the cache
    after = a[3].clone()
    launch_paged_attention(*[after if i == 3 else x for i, x in enumerate(a)])
    written = torch.zeros(after.shape[1] * after.shape[2], dtype=torch.bool)
    written[a[6][a[6] >= 0].long()] = True
    diff = (after[a[5]] != before).flatten(0, 1).any(-1).any(-1)
    assert torch.equal(diff, written & diff) and diff.any()


def test_decode_batch_through_general_path():
    """max_query_len as an upper bound (> 1) on a decode-only batch."""
    args, _ = make_batch([(40, 1), (7, 1), (0, 1)], 8, 2, 16, 16, torch.float16)
    a = list(args)
    a[14] = 16
    check(tuple(a))


def test_registered_op_and_opcheck():
    args, _ = make_batch([(5, 3), (9, 1)], 4, 2, 16, 16, torch.float32)
    a = clone_caches(args)
    out = paged_attention(*a)
    ref = paged_attention_ref(*clone_caches(args))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])
    assert torch.ops.trtllm.paged_attention.default is not None
    torch.library.opcheck(torch.ops.trtllm.paged_attention.default, tuple(clone_caches(args)))


def with_softcap(args, softcap):
    a = list(args)
    a[12] = softcap
    return tuple(a)


# Soft-capping (Gemma-2's attn_logit_softcapping): q scaled up so that the scaled logits
# (~4 std) sit where tanh bends, 1.5 caps them hard; odd shapes (G = 3, head dim 24).
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_softcap_prefill(window, dtype):
    specs = [(0, 19), (23, 6), (40, 1)]  # prompt, chunk after cached context, a decode
    args, dense = make_batch(specs, 6, 2, 24, 16, dtype, window=window, softcap=1.5)
    args = (args[0] * 4, *args[1:])
    dense = [(q * 4, k, v) for q, k, v in dense]
    out, _ = check(args, PrefillLaunch(16, 16, 4, 1))  # several q blocks, diagonal + context tiles
    if dtype == torch.float32:
        torch.testing.assert_close(out, dense_sdpa(dense, 6, args[10], window, 1.5), atol=1e-4, rtol=1e-4)
    uncapped, _ = check(with_softcap(args, 0.0), PrefillLaunch(16, 16, 4, 1))
    assert (out.float() - uncapped.float()).abs().max() > 0.1  # the cap bites: this test can fail


@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("launch", [None, DecodeLaunch(3, False, 16, 4, 1)])  # 2 splits by ticket, 3 forced
def test_softcap_decode(window, launch):
    args, dense = make_batch([(150, 1), (6, 1), (0, 1), (64, 1)], 6, 2, 24, 16, torch.float32,
                             window=window, softcap=1.5)
    args = (args[0] * 4, *args[1:])
    dense = [(q * 4, k, v) for q, k, v in dense]
    out, _ = check(args, launch)
    torch.testing.assert_close(out, dense_sdpa(dense, 6, args[10], window, 1.5), atol=1e-4, rtol=1e-4)
    uncapped, _ = check(with_softcap(args, 0.0), launch)
    assert (out - uncapped).abs().max() > 0.1


@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")  # the point: exp2 -> inf
def test_softcap_saturates_without_nan():
    """Logits far past the cap (e^(2x) overflows to inf, or underflows to 0): tanh is +-1,
    no NaN, on both kernels."""
    args, _ = make_batch([(20, 5), (33, 1)], 4, 2, 16, 16, torch.float32, softcap=0.5)
    args = (args[0] * 1e4, *args[1:])
    out, ref = check(args)
    assert torch.isfinite(out).all() and torch.isfinite(ref).all()
    args, _ = make_batch([(20, 1), (33, 1)], 4, 2, 16, 16, torch.float32, softcap=0.5)
    out, _ = check((args[0] * 1e4, *args[1:]))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("softcap", [-1.0, float("inf"), float("nan")])
def test_bad_softcap_is_refused(softcap):
    args, _ = make_batch([(20, 1)], 4, 2, 16, 16, torch.float32)
    with pytest.raises(AssertionError, match="softcap must be finite and >= 0"):
        launch_paged_attention(*with_softcap(args, softcap))


def bloom_slopes(heads: int) -> torch.Tensor:
    """ALiBi slopes as BLOOM's build_alibi_tensor makes them (heads not a power of 2 included)."""
    p2 = 2 ** math.floor(math.log2(heads))
    slopes = [2 ** (-8 * (i + 1) / p2) for i in range(p2)]
    slopes += [2 ** (-4 * (2 * i + 1) / p2) for i in range(min(p2, heads - p2))]
    return torch.tensor(slopes, dtype=torch.float32)


def with_alibi(args, slopes):
    return (*args, None, slopes)  # kv_scales None, then the slopes


def dense_alibi(dense, hq, scale, window, slopes):
    """Per sequence, dense attention with ALiBi as HF's BLOOM adds it: slope_h * key position
    (absolute, not relative: the same under each row's softmax), then the causal mask."""
    outs = []
    for q, k, v in dense:
        n, L = q.shape[0], k.shape[0]
        g = hq // k.shape[1]
        i = torch.arange(n)[:, None] + (L - n)
        j = torch.arange(L)[None, :]
        mask = (j <= i) & ((window <= 0) | (j > i - window))
        qh, kh = q.float().transpose(0, 1), k.float().repeat_interleave(g, 1).transpose(0, 1)
        vh = v.float().repeat_interleave(g, 1).transpose(0, 1)
        scores = qh @ kh.transpose(1, 2) * scale + slopes[:, None, None] * j.float()
        o = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ vh
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


# ALiBi (BLOOM, MPT, Falcon-RW): odd shapes (G = 3 and 5 heads of MHA, head dim 24), slopes
# of heads not a power of 2, prompts long enough for the bias to dominate the far keys.
@pytest.mark.parametrize("window", [0, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (5, 5)])
def test_alibi_prefill(window, dtype, hq, hkv):
    specs = [(0, 19), (23, 6), (40, 1)]  # prompt, chunk after cached context, a decode
    args, dense = make_batch(specs, hq, hkv, 24, 16, dtype, window=window)
    args = with_alibi(args, bloom_slopes(hq))
    out, _ = check(args, PrefillLaunch(16, 16, 4, 1))  # several q blocks, diagonal + context tiles
    if dtype == torch.float32:
        torch.testing.assert_close(out, dense_alibi(dense, hq, args[10], window, bloom_slopes(hq)),
                                   atol=1e-4, rtol=1e-4)
    plain, _ = check(args[:16], PrefillLaunch(16, 16, 4, 1))
    assert (out.float() - plain.float()).abs().max() > 0.1  # the bias bites: this test can fail


@pytest.mark.parametrize("window", [0, 40])
@pytest.mark.parametrize("launch", [None, DecodeLaunch(3, False, 16, 4, 1)])  # 2 splits by ticket, 3 forced
def test_alibi_decode(window, launch):
    args, dense = make_batch([(150, 1), (6, 1), (0, 1), (64, 1)], 6, 2, 24, 16, torch.float32, window=window)
    slopes = bloom_slopes(6)
    out, _ = check(with_alibi(args, slopes), launch)
    torch.testing.assert_close(out, dense_alibi(dense, 6, args[10], window, slopes), atol=1e-4, rtol=1e-4)
    plain, _ = check(args, launch)
    assert (out - plain).abs().max() > 0.1


def test_alibi_registered_op_and_refusals():
    args, _ = make_batch([(5, 3), (9, 1)], 4, 2, 16, 16, torch.float32)
    a = with_alibi(args, bloom_slopes(4))
    torch.library.opcheck(torch.ops.trtllm.paged_attention.default, tuple(clone_caches(a)))
    with pytest.raises(AssertionError, match=r"alibi_slopes must be \[4\] fp32"):
        launch_paged_attention(*clone_caches(with_alibi(args, bloom_slopes(2))))
    with pytest.raises(AssertionError, match="ALiBi with logit soft-capping"):
        launch_paged_attention(*clone_caches(with_alibi(with_softcap(args, 2.0), bloom_slopes(4))))


# Rope inside the op (passes/fuse_rotary_attention.py): q and k arrive unrotated with each
# token's cos/sin rows. Odd shapes (G = 3, head dim 24: the partner loads cross a padded
# BLOCK_D of 32), both layouts, positions that are not the cache positions (any table works).
def with_rope(args, interleaved, dtype, seed=0):
    from trtllm.kernels.rotary import rope_cos_sin, rope_inv_freq
    T, D = args[0].shape[0], args[0].shape[2]
    positions = torch.randint(0, 4096, (T,), generator=torch.Generator().manual_seed(seed))
    cos, sin = rope_cos_sin(positions, rope_inv_freq(D, 10000.0), dtype, interleaved)
    scales_and_slopes = (*args[16:], None, None)[:2]  # kv_scales, alibi_slopes as given, else None
    return (*args[:16], *scales_and_slopes, cos, sin, interleaved), (cos, sin)


def rotated_first(args, cos, sin, interleaved):
    """The unfused graph: q and k rotated by the rotary kernel, then the op without rope."""
    from trtllm.kernels.paged_attention.op import rotate_tokens
    from trtllm.kernels.rotary import rotary_triton
    q, k = (rotate_tokens(rotary_triton, x, cos, sin, interleaved) for x in args[:2])
    return (q, k, *args[2:])


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("specs, launch", [
    ([(150, 1), (6, 1), (0, 1), (64, 1)], None),                     # decode, 2 splits by ticket
    ([(300, 1), (5, 1), (64, 1)], DecodeLaunch(3, False, 16, 4, 1)),  # decode, 3 splits forced
    (MIXED, None),                                                   # prefill path: rotated first
])
def test_rope(interleaved, dtype, specs, launch):
    args, _ = make_batch(specs, 6, 2, 24, 16, dtype, pad_tokens=3, strided=True)
    roped, (cos, sin) = with_rope(args, interleaved, dtype)
    out, _ = check(roped, launch)  # kernel and reference, caches bit for bit
    a_first = clone_caches(rotated_first(args, cos, sin, interleaved))
    a_fused = clone_caches(roped)
    first = launch_paged_attention(*a_first, launch=launch)
    fused = launch_paged_attention(*a_fused, launch=launch)
    torch.testing.assert_close(a_fused[3], a_first[3], atol=0, rtol=0)  # the cache holds rotated keys
    # fp32: the same bits. bf16: interpreted, the fused q stays fp32 where the GPU rounds it to
    # bf16 as the rotary kernel's output is (registry.interpreter_upcast)
    atol, rtol = (0, 0) if dtype == torch.float32 else TOL[dtype]
    torch.testing.assert_close(fused, first, atol=atol, rtol=rtol)
    plain = launch_paged_attention(*clone_caches(args), launch=launch)
    assert (out.float() - plain.float()).abs().max() > 0.1  # the rope bites: this test can fail


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_uncovered_token_with_a_slot(interleaved):
    """A token outside every sequence with a valid slot: the decode kernel's extra cache
    write rotates its key too."""
    specs = [(20, 1), (3, 1)]
    args, _ = make_batch(specs, 4, 2, 16, 16, torch.float32, pad_tokens=3)
    a = list(args)
    a[6] = a[6].clone()
    used = {int(b) for i, (c, n) in enumerate(specs) for b in a[7][i, : math.ceil((c + n) / 16)]}
    a[6][len(specs) + 1] = next(b for b in range(a[3].shape[1]) if b not in used) * 16 + 5
    roped, _ = with_rope(tuple(a), interleaved, torch.float32)
    out, ref = check(roped)
    assert out[len(specs):].abs().sum() == 0


def test_rope_registered_op_and_refusals():
    args, _ = make_batch([(5, 3), (9, 1)], 4, 2, 16, 16, torch.float32)
    roped, (cos, sin) = with_rope(args, False, torch.float32)
    torch.library.opcheck(torch.ops.trtllm.paged_attention.default, tuple(clone_caches(roped)))
    with pytest.raises(AssertionError, match="rope_cos and rope_sin come together"):
        launch_paged_attention(*clone_caches(args), None, None, cos, None, False)
    with pytest.raises(AssertionError, match=r"rope_sin must be \[4, 16\]"):
        launch_paged_attention(*clone_caches(args), None, None, cos, sin[:3], False)
