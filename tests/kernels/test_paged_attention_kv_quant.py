"""paged_attention with a quantized KV cache (FP8 e4m3, INT8; kernels/paged_attention/kv_quant.py):
the kernels (through the interpreter) against paged_attention_ref, the reference against
dense attention over the quantized-then-dequantized keys and values, and the cache
writes bit for bit against torch's own rounding."""
import math

import pytest
import torch

import trtllm.kernels.paged_attention.op as pa_op
from tests.kernels.test_paged_attention import TOL, clone_caches, dense_sdpa, make_batch
from trtllm.kernels.paged_attention import (
    DecodeLaunch,
    PrefillLaunch,
    choose_launch,
    launch_paged_attention,
    paged_attention,
    paged_attention_ref,
)
from trtllm.kernels.paged_attention.kv_quant import (
    KV_CACHE_DTYPES,
    KV_QMAX,
    dequantize_kv_ref,
    kv_scales_tensor,
    quantize_kv_ref,
)

FORMATS = ["fp8", "int8"]
MIXED = [(0, 7), (35, 9), (83, 1), (0, 2), (17, 1)]  # prefill, chunk after context, decodes
DECODES = [(150, 1), (6, 1), (0, 1), (64, 1)]


def quantized(args, fmt):
    """`args` (make_batch's, unquantized caches) with quantized caches and their scales
    appended (kv_scales, the op's last argument): per (layer, K/V, kv head) scales that
    differ, amax / qmax for amax from 3 to 6 (sigmas of the random values: a few clamp)."""
    a = list(args)
    k_cache, v_cache = a[3], a[4]
    layers, hkv = k_cache.shape[0], k_cache.shape[3]
    scales = 3.0 / KV_QMAX[fmt] * (1.0 + torch.rand(layers, 2, hkv))
    for i, cache in ((0, k_cache), (1, v_cache)):
        stored = torch.empty(cache.shape, dtype=KV_CACHE_DTYPES[fmt])
        for layer in range(layers):
            stored[layer] = quantize_kv_ref(cache[layer], scales[layer, i], fmt)
        a[3 + i] = stored
    return (*a, scales)


def fmt_of(args):
    return "fp8" if args[3].dtype == torch.float8_e4m3fn else "int8"


def dense_of(args, dense, stored=True):
    """Per sequence, dense (q, K, V) in fp32: the cached positions as the quantized cache
    reads them back, the new tokens' rows as the cache write stores them (quantized and
    read back) if `stored`, else as given (the unquantized truth)."""
    k_cache, v_cache, layer, bt, scales = args[3], args[4], args[5], args[7], args[16]
    ks, vs, bs = scales[layer, 0], scales[layer, 1], k_cache.shape[2]
    out = []
    for s, (q, k, v) in enumerate(dense):
        n, L = q.shape[0], k.shape[0]
        pos = torch.arange(L - n)
        pages, offs = bt[s, pos // bs].long(), pos % bs
        k_new, v_new = k[L - n:].float(), v[L - n:].float()
        if stored:
            k_new = dequantize_kv_ref(quantize_kv_ref(k_new, ks, fmt_of(args)), ks)
            v_new = dequantize_kv_ref(quantize_kv_ref(v_new, vs, fmt_of(args)), vs)
        out.append((q, torch.cat([dequantize_kv_ref(k_cache[layer, pages, offs], ks), k_new]),
                    torch.cat([dequantize_kv_ref(v_cache[layer, pages, offs], vs), v_new])))
    return out


def same_bits(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def run_both(args, launch=None):
    a_ref, a_tri = clone_caches(args), clone_caches(args)
    ref = paged_attention_ref(*a_ref)
    out = launch_paged_attention(*a_tri, launch=launch)
    # the cache writes: the kernels' rounding is torch's, bit for bit
    assert same_bits(a_tri[3], a_ref[3]) and same_bits(a_tri[4], a_ref[4])
    return out, ref, a_tri


def check(args, launch=None):
    out, ref, written = run_both(args, launch)
    atol, rtol = TOL[args[0].dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    return out, ref, written


# ------------------------------------------------------------------ the reference


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("window,softcap", [(0, 0.0), (6, 0.0), (0, 1.5)])
def test_reference_is_dense_attention_over_the_dequantized_cache(fmt, window, softcap):
    args, dense = make_batch(MIXED, 6, 2, 24, 16, torch.float32, window=window, softcap=softcap)
    args = quantized(args, fmt)
    ref = paged_attention_ref(*clone_caches(args))
    torch.testing.assert_close(ref, dense_sdpa(dense_of(args, dense), 6, args[10], window, softcap),
                               atol=1e-5, rtol=1e-5)
    # the new tokens attend to their quantized keys and values: near the unquantized ones,
    # not equal (relative rms: e4m3 rounds each value by up to 2^-4 of itself, int8 by half
    # a step of amax / 127)
    exact = dense_sdpa(dense_of(args, dense, stored=False), 6, args[10], window, softcap)
    err = ((ref - exact).norm() / exact.norm()).item()
    assert 0 < err < (0.04 if fmt == "fp8" else 0.02), err


# ------------------------------------------------------------------ kernels vs reference


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,bs", [(8, 2, 64, 16), (6, 2, 24, 16)])  # GQA 4; G = 3, D = 24 (masked)
def test_mixed_batch(fmt, dtype, hq, hkv, d, bs):
    args, _ = make_batch(MIXED, hq, hkv, d, bs, dtype)
    check(quantized(args, fmt))


@pytest.mark.parametrize("fmt", FORMATS)
def test_prefill_small_tiles(fmt):
    """Many q blocks: unmasked, diagonal and context tiles of the new tokens, quantized in
    registers."""
    args, _ = make_batch([(0, 83), (50, 33), (0, 1)], 8, 2, 16, 16, torch.float16, strided=True)
    check(quantized(args, fmt), PrefillLaunch(32, 16, 4, 1))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("launch", [None, DecodeLaunch(1, False, 16, 4, 1), DecodeLaunch(3, False, 16, 4, 1)])
def test_decode(fmt, dtype, launch):
    """The decode kernel: 2 splits by ticket (the default here), 1, 3 forced."""
    args, _ = make_batch(DECODES, 8, 2, 32, 16, dtype)
    args = quantized(args, fmt)
    if launch is None:
        assert choose_launch(args[0], args[3], *args[13:16]).splits == 2
    check(args, launch)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("window", [5, 40])
def test_sliding_window(fmt, window):
    args, dense = make_batch([(0, 40), (30, 12), (60, 1)], 4, 2, 16, 16, torch.float32, window=window)
    args = quantized(args, fmt)
    out, _, _ = check(args, PrefillLaunch(16, 16, 4, 1))
    expected = dense_sdpa(dense_of(args, dense), 4, args[10], window)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    args, _ = make_batch([(60, 1), (3, 1)], 4, 2, 16, 16, torch.float32, window=window)
    check(quantized(args, fmt), DecodeLaunch(3, False, 16, 4, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_softcap(fmt):
    """Logit soft-capping still bites on quantized keys (the K scale inside the tanh)."""
    args, _ = make_batch([(0, 19), (23, 6), (40, 1)], 6, 2, 24, 16, torch.float32, softcap=1.5)
    args = quantized((args[0] * 4, *args[1:]), fmt)
    out, _, _ = check(args, PrefillLaunch(16, 16, 4, 1))
    uncapped = list(args)
    uncapped[12] = 0.0
    plain, _, _ = check(tuple(uncapped), PrefillLaunch(16, 16, 4, 1))
    assert (out - plain).abs().max() > 0.1
    args, _ = make_batch(DECODES, 6, 2, 24, 16, torch.float32, softcap=1.5)
    check(quantized((args[0] * 4, *args[1:]), fmt), DecodeLaunch(3, False, 16, 4, 1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_padding_and_unused_rows(fmt):
    """Padding tokens (slot -1 and one with a slot: written, quantized), unused rows."""
    args, _ = make_batch([(20, 1), (3, 1)], 4, 2, 16, 16, torch.float16, pad_tokens=5, extra_seqs=2)
    a = list(quantized(args, fmt))
    a[15] = 700  # max_seq_len an upper bound: 2 decode splits, one empty
    a[6] = a[6].clone()
    used = {int(b) for i, (c, n) in enumerate([(20, 1), (3, 1)]) for b in a[7][i, : math.ceil((c + n) / 16)]}
    a[6][a[0].shape[0] - 2] = next(b for b in range(a[3].shape[1]) if b not in used) * 16 + 3
    out, ref, _ = check(tuple(a))
    assert out[-5:].abs().sum() == 0 and ref[-5:].abs().sum() == 0


# ------------------------------------------------------------------ rounding, write then read


def crafted_values(fmt):
    """Quotients x / scale where rounding is delicate: halfway between neighbours (ties go
    to even), past the clamp, e4m3's subnormals, zeros of both signs; random ones too."""
    if fmt == "fp8":
        grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
        grid = grid[torch.isfinite(grid)].unique()  # every e4m3 value
        ties = (grid[1:] + grid[:-1]) / 2
        special = torch.tensor([500.0, -1e4, 2.0 ** -7, 3 * 2.0 ** -11, -(2.0 ** -10), 0.0, -0.0, 447.9, 449.0])
    else:
        ties = torch.arange(-130, 130) + 0.5
        special = torch.tensor([127.4, 127.6, -127.6, 1e4, -1e4, 0.0, -0.0, 0.49, -0.51])
    values = torch.cat([ties, special, torch.randn(300) * 300])
    return values[torch.randperm(values.numel())]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("decode", [False, True])
def test_cache_write_rounds_as_torch(fmt, decode):
    """The stored values, by the cache-write kernel (a prefill) or the decode kernel (each
    sequence's new key), are torch's quantization bit for bit on crafted_values (scales
    powers of 2, so x / scale is exactly the crafted quotient)."""
    hq, hkv, d = 4, 2, 64
    values = crafted_values(fmt)
    m = math.ceil(values.numel() / (hkv * d))
    x = torch.nn.functional.pad(values, (0, m * hkv * d - values.numel())).view(m, hkv, d)
    scales = torch.tensor([[0.5, 0.25], [0.125, 2.0]]).expand(2, 2, 2).contiguous()  # [L, 2, Hkv]
    k = x * scales[1, 0][:, None]
    v = -x * scales[1, 1][:, None]
    q = torch.randn(m, hq, d)
    k_cache = torch.zeros((2, m + 2, 16, hkv, d), dtype=KV_CACHE_DTYPES[fmt])
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    if decode:  # m sequences of one token each, sequence s in block s + 1
        slots, table = i32([(s + 1) * 16 for s in range(m)]), i32([[s + 1] for s in range(m)])
        meta = (i32([1] * m), i32(list(range(m + 1))), d ** -0.5, 0, 0.0, m, 1, 1)
    else:  # one sequence of m tokens in blocks 1..
        slots, table = i32([16 + t for t in range(m)]), i32([list(range(1, m + 2))])
        meta = (i32([m]), i32([0, m]), d ** -0.5, 0, 0.0, 1, m, m)
    args = (q, k, v, k_cache, k_cache.clone(), 1, slots, table, *meta, scales)
    _, _, written = run_both(args)
    for cache, rows, scale in ((written[3], k, scales[1, 0]), (written[4], v, scales[1, 1])):
        stored = cache[1].flatten(0, 1)[slots.long()]
        assert same_bits(stored, quantize_kv_ref(rows, scale, fmt))
        assert torch.isfinite(stored.float()).all() and stored.float().abs().max() == KV_QMAX[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_written_by_prefill_read_by_decode(fmt, dtype):
    """A prompt's k/v, quantized into the cache by the prefill call, are what the next
    decode call reads (bf16: both calls on fp32 copies of an fp8 cache, whose writes must
    reach it)."""
    hq, hkv, d, bs, n = 4, 2, 32, 16, 21
    k_cache = torch.zeros((2, 4, bs, hkv, d), dtype=KV_CACHE_DTYPES[fmt])
    v_cache = torch.zeros_like(k_cache)
    scales = kv_scales_tensor([(0.01, 0.02), ([0.02, 0.015], 0.01)], 2, hkv)
    table = torch.tensor([[2, 0]], dtype=torch.int32)
    slots = torch.tensor([table[0, p // bs] * bs + p % bs for p in range(n + 1)], dtype=torch.int32)
    q = torch.randn(n + 1, hq, d, dtype=dtype)
    k, v = torch.randn(n + 1, hkv, d, dtype=dtype), torch.randn(n + 1, hkv, d, dtype=dtype)
    i32 = lambda *xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
    launch_paged_attention(q[:n], k[:n], v[:n], k_cache, v_cache, 1, slots[:n], table, i32(n), i32(0, n),
                           d ** -0.5, 0, 0.0, 1, n, n, scales)
    out = launch_paged_attention(q[n:], k[n:], v[n:], k_cache, v_cache, 1, slots[n:], table, i32(n + 1),
                                 i32(0, 1), d ** -0.5, 0, 0.0, 1, 1, n + 1, scales)
    pos = torch.arange(n + 1)
    ks, vs = scales[1, 0], scales[1, 1]
    assert same_bits(k_cache[1, table[0, pos // bs].long(), pos % bs], quantize_kv_ref(k, ks, fmt))
    assert same_bits(v_cache[1, table[0, pos // bs].long(), pos % bs], quantize_kv_ref(v, vs, fmt))
    assert not k_cache[0].float().any()  # the other layer untouched
    keys = dequantize_kv_ref(quantize_kv_ref(k, ks, fmt), ks)
    vals = dequantize_kv_ref(quantize_kv_ref(v, vs, fmt), vs)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, dense_sdpa([(q[n:], keys, vals)], hq, d ** -0.5, 0).to(dtype), atol=atol, rtol=rtol)


# ------------------------------------------------------------------ the op, refusals


@pytest.mark.parametrize("fmt", FORMATS)
def test_registered_op(fmt):
    args, _ = make_batch([(5, 3), (9, 1)], 4, 2, 16, 16, torch.float32)
    args = quantized(args, fmt)
    out = paged_attention(*clone_caches(args))
    ref = paged_attention_ref(*clone_caches(args))
    torch.testing.assert_close(out, ref, atol=TOL[torch.float32][0], rtol=TOL[torch.float32][1])


def test_bad_scales_and_caches_are_refused():
    args, _ = make_batch([(20, 1)], 4, 2, 16, 16, torch.float16)
    a = list(quantized(args, "int8"))
    for bad, match in [(None, "needs kv_scales"), (a[16][:1], r"kv_scales \(1, 2, 2\) != \(2, 2, 2\)"),
                       (a[16].double(), "contiguous float32"), (DecodeLaunch(1, False, 16, 4, 1), "a tensor or None")]:
        with pytest.raises(AssertionError, match=match):
            launch_paged_attention(*clone_caches(a[:16]), bad)
        with pytest.raises(AssertionError, match=match):
            paged_attention_ref(*clone_caches(a[:16]), bad)
    with pytest.raises(AssertionError, match="kv_scales given for an unquantized"):
        launch_paged_attention(*clone_caches(args), a[16])
    mixed = clone_caches(a)
    mixed[4] = mixed[4].to(torch.float8_e4m3fn)
    with pytest.raises(AssertionError, match="v_cache: dtype"):
        launch_paged_attention(*mixed)
    wrong = clone_caches(a)
    wrong[3], wrong[4] = wrong[3].to(torch.int16), wrong[4].to(torch.int16)
    with pytest.raises(AssertionError, match="KV cache dtype torch.int16"):
        launch_paged_attention(*wrong)


def test_fp8_cache_asks_for_an_fp8_gpu(monkeypatch):
    """The launcher refuses an fp8 cache on a GPU before sm_89 by name
    (quantize_fp8.require_fp8_gpu); an int8 cache needs no fp8."""
    asked = []
    monkeypatch.setattr(pa_op, "require_fp8_gpu", lambda device, op: asked.append((device.type, op)))
    args, _ = make_batch([(20, 1)], 4, 2, 16, 16, torch.float16)
    launch_paged_attention(*clone_caches(quantized(args, "fp8")))
    launch_paged_attention(*clone_caches(quantized(args, "int8")))
    assert asked == [("cpu", "paged_attention with an fp8 KV cache")]


def test_kv_scales_tensor():
    s = kv_scales_tensor([(0.5, torch.tensor(0.25)), (torch.tensor([1.0]), [0.1, 0.2, 0.3])], 2, 3)
    assert s.shape == (2, 2, 3) and s.dtype == torch.float32
    assert s[0, 0].tolist() == [0.5] * 3 and s[1, 1].tolist() == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1 \\(k_scale, v_scale\\) pairs for 2 layers"):
        kv_scales_tensor([(1.0, 1.0)], 2, 3)
    with pytest.raises(ValueError, match="layer 1 v_scale has 2 values; expected 1 .* or 3"):
        kv_scales_tensor([(1.0, 1.0), (1.0, [1.0, 2.0])], 2, 3)
    with pytest.raises(ValueError, match="layer 0 k_scale = \\[0.0\\] must be finite and > 0"):
        kv_scales_tensor([(0.0, 1.0), (1.0, 1.0)], 2, 3)
    with pytest.raises(ValueError, match="must be finite"):
        kv_scales_tensor([(1.0, float("nan")), (1.0, 1.0)], 2, 3)


@pytest.mark.parametrize("specs, launch", [(MIXED, PrefillLaunch(16, 16, 4, 1)), (DECODES, DecodeLaunch(3, False, 16, 4, 1))])
def test_int8_cache_with_alibi(specs, launch):
    """ALiBi on a quantized cache (K's scale folded into the softmax scale, then the bias):
    both kernels against the reference and against dense ALiBi attention over the stored cache.
    int8: fp8 caches need an sm_89+ GPU."""
    from tests.kernels.test_paged_attention import bloom_slopes, dense_alibi
    args, dense = make_batch(specs, 6, 2, 24, 16, torch.float32)
    args = (*quantized(args, "int8"), bloom_slopes(6))
    out, _, _ = check(args, launch)
    torch.testing.assert_close(out, dense_alibi(dense_of(args, dense), 6, args[10], 0, bloom_slopes(6)),
                               atol=1e-4, rtol=1e-4)
