"""Paged attention over a ragged batch: cache write + causal attention, one op.

For each sequence s < num_seqs with new tokens q[a:b] (a, b = query_start_loc[s], [s+1],
n = b - a) and context length L = seq_lens[s] (including the new tokens), new token i has
position p = L - n + i and

    out[a + i, h] = sum_j softmax_j(c(scale * q[a+i, h] . K_s[j, h // G]) + b_h(j - p)) V_s[j, h // G]
    over j in [0, p], or [p - window + 1, p] when window > 0 (sliding window),
    c(x) = softcap * tanh(x / softcap) when softcap > 0 (logit soft-capping, Gemma-2's
    attn_logit_softcapping: on the scaled logits, before the mask), else c(x) = x,
    b_h(d) = alibi_slopes[h] * d with ALiBi (alibi_slopes [Hq] fp32, BLOOM / MPT / Falcon's
    per-head linear bias: HF adds slope * j or slope * (j - last key), the same under each
    row's softmax), else 0; ALiBi together with soft-capping is refused (no family has both),

where G = Hq // Hkv (GQA/MQA) and K_s[j] = k_cache[layer, block_tables[s, j // BS], j % BS]
(same for V). Before attending, the new k/v rows are written into the cache:
k_cache[layer, slot // BS, slot % BS] = k[t] for slot = slot_mapping[t] >= 0 (-1: padding).
With rope_cos / rope_sin ([T, D] each, token t's rows), q and k are first rotated as
`trtllm.rotary` does (kernels/rotary.py; rope_interleaved its GPT-J layout), and the rotated
keys are what the cache stores: the op is then rotary(q), rotary(k), attention in one.
Rows of tokens outside the first num_seqs sequences, and of sequences with L = 0, are 0.

A quantized cache (kv_quant.py): k_cache/v_cache of float8_e4m3fn or int8 with kv_scales
[L, 2, Hkv] fp32 (the op's last argument; K's and V's scale per layer and kv head) store
quantize(k[t] / scale) and are read as K_s[j] = k_cache[...] * scale; the new tokens attend
to their quantized keys/values too, exactly as stored. An fp8 cache needs an sm_89+ GPU.

Shapes: q [T, Hq, D], k/v [T, Hkv, D] (any strides, last dim contiguous); rope_cos/rope_sin
[T, D] (row stride any, last dim contiguous), a floating dtype;
k_cache/v_cache [L, NB, BS, Hkv, D] (q's dtype, or float8_e4m3fn / int8 with kv_scales);
slot_mapping [>=T], block_tables [S_max, MB],
seq_lens [S_max], query_start_loc [S_max + 1], all int32 -> out [T, Hq, D] in q.dtype.
num_seqs / max_query_len / max_seq_len are host-side upper bounds that only choose the
path, grid and splits (CUDA-graph capture fixes them); true lengths come from the tensors.

Kernels (all accumulate in fp32, softmax in base 2 with scale * log2(e) folded in; with
soft-capping the scale goes inside the tanh and the capped logits are taken to base 2,
tiles.softcap_log2; softcap is a constexpr, 0.0 compiling to the kernels without it; so is
ALiBi, the bias added in log2 units after the scale, tiles.alibi_log2), chosen
per call by a launch value (launch_shape.py: `choose_launch` by default):
- prefill.py (`PrefillLaunch`; any batch, the only path for max_query_len > 1): with rope,
  q and k rotated first by the rotary kernel; a cache write kernel, then `_prefill_kernel` over tiles of BLOCK_Q tokens x the G query heads
  of one kv head, found by binary search on query_start_loc.
- decode.py (`DecodeLaunch`; max_query_len == 1), grid (Hkv, num_seqs, splits), the whole
  step in one launch: the G query heads are the (padded to 16) rows of one tile; K/V
  pages stream through; the new key is taken from k/v (and written to the cache) by the
  split owning it; with rope, q and the new key are rotated as they load; with splits > 1 (flash-decoding) the splits' (max, sum, acc) partials
  merge in the same launch (decode_merge.py: in a thread-block cluster, or by the last
  split to take an atomic ticket).

Both attention kernels take the new tokens' own keys/values from k/v rather than from the
cache they were just written to (but for the prefill kernel over a quantized cache, which
reads them as stored: prefill.py says why): identical values as long as slot_mapping agrees
with block_tables (the runtime's invariant; the reference reads the cache). Page size: any
16..128 works; 16 (vLLM's default) is what the bench and the H100 defaults assume.
"""
import math

import torch

from trtllm.kernels.paged_attention.decode import launch_decode
from trtllm.kernels.paged_attention.kv_quant import check_kv_scales, dequantize_kv_ref, kv_cache_format, quantize_kv_ref
from trtllm.kernels.paged_attention.launch_shape import DecodeLaunch, PrefillLaunch, choose_launch
from trtllm.kernels.paged_attention.prefill import launch_prefill
from trtllm.kernels.paged_attention.tiles import LOG2E
from trtllm.kernels.quantize_fp8 import require_fp8_gpu
from trtllm.kernels.registry import interpreter_upcast, register_op
from trtllm.kernels.rotary import rotary_ref, rotary_triton

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ------------------------------------------------------------------ reference


def paged_attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, layer: int,
    slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor, scale: float, window: int, softcap: float,
    num_seqs: int, max_query_len: int, max_seq_len: int, kv_scales: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None, rope_interleaved: bool = False,
) -> torch.Tensor:
    """The semantics of record: plain torch, fp32 inside, one sequence at a time."""
    if rope_cos is not None:
        q, k = (rotate_tokens(rotary_ref, x, rope_cos, rope_sin, rope_interleaved) for x in (q, k))
    T, Hq, _ = q.shape
    Hkv, BS = k.shape[1], k_cache.shape[2]
    fmt = kv_cache_format(k_cache.dtype, q.dtype)
    check_kv_scales(kv_scales, fmt, k_cache)
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    blk, off = slots[keep] // BS, slots[keep] % BS
    if fmt:
        ks, vs = kv_scales[layer, 0], kv_scales[layer, 1]
        k_cache[layer, blk, off] = quantize_kv_ref(k[keep], ks, fmt)
        v_cache[layer, blk, off] = quantize_kv_ref(v[keep], vs, fmt)
    else:
        k_cache[layer, blk, off] = k[keep].to(k_cache.dtype)
        v_cache[layer, blk, off] = v[keep].to(v_cache.dtype)

    out = torch.zeros(T, Hq, v.shape[-1], dtype=torch.float32, device=q.device)
    qsl, lens = query_start_loc.tolist(), seq_lens.tolist()
    for s in range(num_seqs):
        a, b, L = qsl[s], qsl[s + 1], lens[s]
        if b <= a or L <= 0:
            continue
        j = torch.arange(L, device=q.device)
        pages = block_tables[s, j // BS].long()
        keys, vals = k_cache[layer, pages, j % BS].float(), v_cache[layer, pages, j % BS].float()
        if fmt:
            keys, vals = dequantize_kv_ref(keys, ks), dequantize_kv_ref(vals, vs)
        keys, vals = keys.repeat_interleave(Hq // Hkv, dim=1), vals.repeat_interleave(Hq // Hkv, dim=1)
        for c in range(a, b, 1024):  # query chunks bound the [Hq, rows, L] score memory
            e = min(c + 1024, b)
            p = (L - (b - a) + torch.arange(c - a, e - a, device=q.device))[:, None]
            allowed = (j[None, :] <= p) & ((window <= 0) | (j[None, :] > p - window))
            scores = torch.einsum("nhd,lhd->hnl", q[c:e].float(), keys) * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            if alibi_slopes is not None:  # [Hq, 1, 1] * (key - query position) [rows, L]
                scores = scores + alibi_slopes.float()[:, None, None] * (j[None, :] - p).float()
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            out[c:e] = torch.einsum("hnl,lhd->nhd", probs.nan_to_num(0.0), vals)
    return out.to(q.dtype)


def rotate_tokens(rotary, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x [T, H, D] rotated by `rotary` (rotary_ref or rotary_triton) with token t's rows cos[t],
    sin[t]: the op on x viewed as [1, H, T, D]. -> [T, H, D], last dim contiguous."""
    return rotary(x.transpose(0, 1)[None], cos[None], sin[None], interleaved)[0].transpose(0, 1)


# ------------------------------------------------------------------ launcher


def launch_paged_attention(
    q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables, seq_lens, query_start_loc,
    scale, window, softcap, num_seqs, max_query_len, max_seq_len, kv_scales: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None, rope_cos: torch.Tensor | None = None,
    rope_sin: torch.Tensor | None = None, rope_interleaved: bool = False, *,
    launch: PrefillLaunch | DecodeLaunch | None = None, trace: torch.Tensor | None = None,
):
    """The launcher: the op's arguments checked, then the kernels of `launch` (default:
    `choose_launch` for these shapes). kv_scales: a quantized cache's scales (see above).
    alibi_slopes: ALiBi's slope per query head, [Hq] fp32 (see above). rope_cos / rope_sin:
    the rows q and k are rotated with first (see above): inside the decode kernel, by the
    rotary kernel before the prefill ones.
    trace: an int64 CUDA tensor of programs x
    TRACE_SLOTS the decode kernel stamps its phases into (bench/probes/decode_timeline.py)."""
    T, Hq, D = q.shape
    _, NB, BS, Hkv, Dc = k_cache.shape
    assert q.dtype in _FLOAT_DTYPES, f"unsupported dtype {q.dtype}"
    fmt = kv_cache_format(k_cache.dtype, q.dtype)  # "": the caches hold q's dtype
    assert v_cache.dtype == k_cache.dtype, f"v_cache: dtype {v_cache.dtype} != k_cache's {k_cache.dtype}"
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.dtype == q.dtype or name.endswith("cache"), f"{name}: dtype {t.dtype} != q dtype {q.dtype}"
        assert t.device == q.device, f"{name} on {t.device}, q on {q.device}"
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
    assert q.stride(-1) == 1, "q: last dim must be contiguous"
    assert k.shape == v.shape == (T, Hkv, D), f"k/v {tuple(k.shape)}/{tuple(v.shape)} != ({T}, {Hkv}, {D})"
    assert v_cache.shape == k_cache.shape and Dc == D, "k/v caches must be [L, NB, BS, Hkv, D]"
    assert k_cache.stride() == v_cache.stride(), "k/v caches must share strides"
    assert Hq % Hkv == 0, f"{Hq} query heads not a multiple of {Hkv} kv heads"
    assert scale > 0, f"softmax scale must be > 0 (the kernels take row maxima before scaling), got {scale}"
    assert softcap >= 0 and math.isfinite(softcap), f"softcap must be finite and >= 0 (0 = none), got {softcap}"
    assert 0 <= layer < k_cache.shape[0], f"layer {layer} out of range"
    if alibi_slopes is not None:
        assert alibi_slopes.shape == (Hq,) and alibi_slopes.dtype == torch.float32 \
            and alibi_slopes.device == q.device and alibi_slopes.stride(0) == 1, \
            f"alibi_slopes must be [{Hq}] fp32 on q's device, got {tuple(alibi_slopes.shape)} {alibi_slopes.dtype}"
        assert softcap == 0, "ALiBi with logit soft-capping is not supported (no family has both)"
    assert (rope_cos is None) == (rope_sin is None), "rope_cos and rope_sin come together"
    if rope_cos is not None:
        for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            assert t.shape == (T, D) and t.is_floating_point() and t.device == q.device and t.stride(-1) == 1, \
                f"{name} must be [{T}, {D}] (a token's row, last dim contiguous) on q's device, got {tuple(t.shape)}"
        assert D % 2 == 0, f"rope needs an even head_dim, got {D}"
    for name, t in (("slot_mapping", slot_mapping), ("block_tables", block_tables),
                    ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        assert t.dtype == torch.int32 and t.device == q.device, f"{name}: int32 on q's device"
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] >= T and slot_mapping.stride(0) == 1
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1
    assert seq_lens.shape[0] >= num_seqs and seq_lens.stride(0) == 1
    assert query_start_loc.shape[0] >= num_seqs + 1 and query_start_loc.stride(0) == 1
    assert block_tables.shape[0] >= num_seqs
    check_kv_scales(kv_scales, fmt, k_cache)
    if fmt == "fp8":
        require_fp8_gpu(q.device, "paged_attention with an fp8 KV cache")
    if launch is None:
        launch = choose_launch(q, k_cache, num_seqs, max_query_len, max_seq_len)
    decode = isinstance(launch, DecodeLaunch)
    if decode and not (max_query_len == 1 and num_seqs > 0):
        raise ValueError(f"the decode kernel needs max_query_len == 1 and num_seqs > 0 (got "
                         f"{max_query_len} and {num_seqs}): {launch}")
    if trace is not None and not decode:
        raise ValueError(f"trace stamps the decode kernel only, not {launch}")

    out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    if T == 0:
        return out
    kc, vc = k_cache[layer], v_cache[layer]  # a view: no layer * stride overflow in-kernel
    ks, vs = (kv_scales[layer, 0], kv_scales[layer, 1]) if fmt else (None, None)  # [Hkv] views
    qk_scale = scale * LOG2E
    dot_prec = "ieee" if q.dtype == torch.float32 else "tf32"  # tf32 only matters for fp32
    if rope_cos is not None and not decode:  # the prefill kernels take rotated q and k
        q, k = (rotate_tokens(rotary_triton, x, rope_cos, rope_sin, rope_interleaved) for x in (q, k))
        rope_cos = rope_sin = None
    # The kernels write the new k/v rows into the layer's caches: written back too.
    with interpreter_upcast((q, k, v, rope_cos, rope_sin), (kc, vc, out)) as ((q, k, v, cos, sin), (kc, vc, o)):
        if decode:
            launch_decode(q, k, v, kc, vc, o, slot_mapping, block_tables, seq_lens, query_start_loc,
                          qk_scale, window, float(softcap), num_seqs, dot_prec, launch, trace=trace,
                          kv_quant=fmt, ks=ks, vs=vs, alibi_slopes=alibi_slopes,
                          rope=None if cos is None else (cos, sin, rope_interleaved))
        else:
            launch_prefill(q, k, v, kc, vc, o, slot_mapping, block_tables, seq_lens, query_start_loc,
                           qk_scale, window, float(softcap), num_seqs, max_query_len, dot_prec, launch,
                           kv_quant=fmt, ks=ks, vs=vs, alibi_slopes=alibi_slopes)
    return out


def _paged_attention_fake(q, k, v, k_cache, v_cache, layer, slot_mapping, block_tables,
                          seq_lens, query_start_loc, scale, window, softcap, num_seqs, max_query_len,
                          max_seq_len, kv_scales=None, alibi_slopes=None, rope_cos=None, rope_sin=None,
                          rope_interleaved=False):
    return q.new_empty(q.shape[:2] + (v.shape[-1],))


paged_attention = register_op(
    "paged_attention",
    launcher=launch_paged_attention,
    reference=paged_attention_ref,
    fake=_paged_attention_fake,
    mutates_args=("k_cache", "v_cache"),
)
