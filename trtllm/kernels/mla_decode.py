"""Paged multi-head latent attention (MLA, DeepSeek-V2/V3), decode step, in the absorbed form.

The cache holds one latent row per token, D = R + P wide: the normed compressed KV c [R]
(kv_lora_rank) followed by the rotated shared rope key k_r [P] (qk_rope_head_dim). With
the query already absorbed into latent space (q_latent[t, h] = W_UK[h]^T q_nope[t, h], done
by the caller, trtllm/mla_attention.py) every head attends over the same rows, as in MQA
with keys D wide and values R wide:

    out[t, h] = sum_j softmax_j(scale * (q_latent[t, h] . C[j] + q_rope[t, h] . Kr[j])) C[j]
    over j in [0, L), L = seq_lens[t], C[j] = kv_cache[layer, block_tables[t, j // BS], j % BS, 0, :R],
    Kr[j] = kv_cache[..., R:]

which equals the expanded attention softmax(q_nope . k_nope + q_rope . k_r) v once the caller
takes out[t, h] through W_UV[h] (k_nope = W_UK c, v = W_UV c). Before attending, each new
row is written: kv_cache[layer, slot // BS, slot % BS, 0] = latent[t] for slot = slot_mapping[t]
>= 0 (-1: a padding token, not written). Decode only: token t is sequence t's one new token,
for t < num_seqs; rows of other tokens and of sequences with L = 0 are 0.

Shapes: q_latent [T, H, R], q_rope [T, H, P], latent [T, R + P] (last dims contiguous), one
dtype (fp32 / fp16 / bf16); kv_cache [L, NB, BS, 1, R + P] of that dtype; slot_mapping [>= T],
block_tables [>= num_seqs, MB], seq_lens [>= num_seqs], int32 -> out [T, H, R] in q's dtype.
num_seqs and max_seq_len are host-side upper bounds (CUDA-graph capture fixes them) that
choose the grid and the splits only.

Kernels: `_store_latent_kernel` writes the new rows (grid T); `_mla_decode_kernel`, grid
(num_seqs, head blocks of 16, splits), streams a split's share of the sequence's latent rows
in tiles of BLOCK_N, two dots per tile (latent and rope parts), online softmax in base 2,
fp32 accumulators; it stores each split's (max, sum, acc) partials and `_merge_splits_kernel`
(grid (num_seqs, H)) merges them (flash-decoding): three launches a layer in all. All heads
of a block share each row read, so a sequence's latent is read once per head block
(DeepSeek-V2-Lite: 16 heads, one block). Not tuned on a GPU yet; builds for sm_90 without
spills (tools/check_mla_build.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.registry import interpreter_upcast, register_op

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
BLOCK_H = 16  # heads per program: tl.dot's smallest M


# ------------------------------------------------------------------ reference


def mla_decode_ref(q_latent: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, kv_cache: torch.Tensor,
                   layer: int, slot_mapping: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor,
                   scale: float, num_seqs: int, max_seq_len: int) -> torch.Tensor:
    """The semantics of record: plain torch, fp32 inside, one sequence at a time."""
    T, H, R = q_latent.shape
    BS = kv_cache.shape[2]
    slots = slot_mapping[:T].long()
    keep = slots >= 0
    kv_cache[layer, slots[keep] // BS, slots[keep] % BS, 0] = latent[keep].to(kv_cache.dtype)
    out = torch.zeros((T, H, R), dtype=torch.float32, device=q_latent.device)
    lens = seq_lens.tolist()
    for s in range(min(num_seqs, T)):
        L = lens[s]
        if L <= 0:
            continue
        j = torch.arange(L, device=q_latent.device)
        rows = kv_cache[layer, block_tables[s, j // BS].long(), j % BS, 0].float()  # [L, R + P]
        c, k_rope = rows[:, :R], rows[:, R:]
        scores = (q_latent[s].float() @ c.T + q_rope[s].float() @ k_rope.T) * scale  # [H, L]
        out[s] = torch.softmax(scores, dim=-1) @ c
    return out.to(q_latent.dtype)


# ------------------------------------------------------------------ kernels


@triton.jit
def _store_latent_kernel(latent_ptr, cache_ptr, slot_ptr, D, BS,
                         stride_lat, stride_blk, stride_tok, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        d = tl.arange(0, BLOCK_D)
        row = tl.load(latent_ptr + t.to(tl.int64) * stride_lat + d, mask=d < D)
        dst = (slot // BS).to(tl.int64) * stride_blk + (slot % BS).to(tl.int64) * stride_tok
        tl.store(cache_ptr + dst + d, row.to(cache_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _mla_decode_kernel(
    q_lat_ptr, q_rope_ptr, cache_ptr, bt_ptr, lens_ptr, m_ptr, l_ptr, acc_ptr,
    H, R, P, BS, qk_scale,
    stride_ql_t, stride_ql_h, stride_qr_t, stride_qr_h, stride_blk, stride_tok, stride_bt,
    SPLITS: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Grid: (sequence, head block, split). Partials at [s, split, head(, r)].
    s = tl.program_id(0)
    hb = tl.program_id(1)
    sp = tl.program_id(2)
    L = tl.load(lens_ptr + s)
    heads = hb * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    hmask = heads < H
    r = tl.arange(0, BLOCK_R)
    rmask = r < R
    pr = tl.arange(0, BLOCK_P)
    pmask = pr < P
    q_lat = tl.load(q_lat_ptr + s.to(tl.int64) * stride_ql_t + heads[:, None] * stride_ql_h + r[None, :],
                    mask=hmask[:, None] & rmask[None, :], other=0.0)  # [BLOCK_HEADS, BLOCK_R]
    q_rope = tl.load(q_rope_ptr + s.to(tl.int64) * stride_qr_t + heads[:, None] * stride_qr_h + pr[None, :],
                     mask=hmask[:, None] & pmask[None, :], other=0.0)  # [BLOCK_HEADS, BLOCK_P]

    chunk = tl.cdiv(tl.cdiv(L, SPLITS), BLOCK_N) * BLOCK_N  # a split's rows, whole tiles
    start = sp * chunk
    end = tl.minimum(start + chunk, L)
    m_i = tl.zeros([BLOCK_HEADS], dtype=tl.float32) - 1e30  # finite: an empty split merges as weight 0
    l_i = tl.zeros([BLOCK_HEADS], dtype=tl.float32)
    acc = tl.zeros([BLOCK_HEADS, BLOCK_R], dtype=tl.float32)
    for n in range(start, end, BLOCK_N):
        j = n + tl.arange(0, BLOCK_N)
        jmask = j < end
        page = tl.load(bt_ptr + s.to(tl.int64) * stride_bt + j // BS, mask=jmask, other=0)
        row = page.to(tl.int64) * stride_blk + (j % BS).to(tl.int64) * stride_tok  # [BLOCK_N]
        c = tl.load(cache_ptr + row[:, None] + r[None, :], mask=jmask[:, None] & rmask[None, :], other=0.0)
        k_rope = tl.load(cache_ptr + row[:, None] + R + pr[None, :], mask=jmask[:, None] & pmask[None, :],
                         other=0.0)
        scores = tl.dot(q_lat, tl.trans(c), input_precision=DOT_PREC)
        scores += tl.dot(q_rope, tl.trans(k_rope), input_precision=DOT_PREC)  # [BLOCK_HEADS, BLOCK_N]
        scores = tl.where(jmask[None, :], scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c.dtype), c, input_precision=DOT_PREC)
        m_i = m_new
    part = (s.to(tl.int64) * SPLITS + sp) * H + heads  # [BLOCK_HEADS]
    tl.store(m_ptr + part, m_i, mask=hmask)
    tl.store(l_ptr + part, l_i, mask=hmask)
    tl.store(acc_ptr + part[:, None] * R + r[None, :], acc, mask=hmask[:, None] & rmask[None, :])


@triton.jit
def _merge_splits_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, H, R, stride_out_t, stride_out_h,
                         SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr):
    # Grid: (sequence, head). out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s; an empty
    # split has m = -1e30 (weight 0); a sequence of L = 0 has l = 0 everywhere and gives 0.
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    smask = sp < SPLITS
    part = (s * SPLITS + sp) * H + h  # [BLOCK_S]
    m = tl.load(m_ptr + part, mask=smask, other=-1e30)
    weight = tl.where(smask, tl.exp2(m - tl.max(m, 0)), 0.0)
    total = tl.sum(tl.load(l_ptr + part, mask=smask, other=0.0) * weight, 0)
    r = tl.arange(0, BLOCK_R)
    acc = tl.load(acc_ptr + part[:, None] * R + r[None, :], mask=smask[:, None] & (r[None, :] < R), other=0.0)
    merged = tl.sum(acc * weight[:, None], 0) / tl.maximum(total, 1.1754943508222875e-38)
    tl.store(out_ptr + s * stride_out_t + h * stride_out_h + r, merged.to(out_ptr.dtype.element_ty), mask=r < R)


# ------------------------------------------------------------------ launcher


def num_splits(num_seqs: int, num_heads: int, max_seq_len: int, block_n: int) -> int:
    """Flash-decoding splits: enough programs to fill ~264 (two per SM of an H200), none
    shorter than 4 tiles of the longest sequence."""
    programs = max(1, num_seqs * triton.cdiv(num_heads, BLOCK_H))
    return max(1, min(triton.cdiv(264, programs), triton.cdiv(max(max_seq_len, 1), 4 * block_n), 32))


def default_block_n(dtype: torch.dtype, interpreted: bool) -> int:
    """Latent rows a tile: 64 for 16-bit on the GPU; 16 in fp32 (an ieee fp32 tile of 32 rows
    spills registers at R 512: tools/check_mla_build.py) and in the interpreter (time)."""
    return 16 if interpreted or dtype == torch.float32 else 64


def launch_mla_decode(q_latent, q_rope, latent, kv_cache, layer, slot_mapping, block_tables, seq_lens,
                      scale, num_seqs, max_seq_len, *, splits: int | None = None, block_n: int | None = None):
    """The launcher: the op's arguments checked, the new rows stored, the split kernel, the
    merge kernel. splits / block_n: forced (tests); default num_splits and default_block_n."""
    T, H, R = q_latent.shape
    NL, NB, BS, one, D = kv_cache.shape
    P = D - R
    assert q_latent.dtype in _FLOAT_DTYPES, f"unsupported dtype {q_latent.dtype}"
    assert one == 1, f"kv_cache {tuple(kv_cache.shape)}: an MLA cache holds one latent row per token ([L, NB, BS, 1, D])"
    assert P > 0, f"kv_cache rows {D} wide leave no rope part after the {R}-wide latent"
    assert q_rope.shape == (T, H, P), f"q_rope {tuple(q_rope.shape)} != ({T}, {H}, {P})"
    assert latent.shape == (T, D), f"latent {tuple(latent.shape)} != ({T}, {D})"
    for name, t in (("q_rope", q_rope), ("latent", latent), ("kv_cache", kv_cache)):
        assert t.dtype == q_latent.dtype, f"{name}: dtype {t.dtype} != q_latent's {q_latent.dtype}"
        assert t.device == q_latent.device, f"{name} on {t.device}, q_latent on {q_latent.device}"
    for name, t in (("q_latent", q_latent), ("q_rope", q_rope), ("latent", latent), ("kv_cache", kv_cache)):
        assert t.stride(-1) == 1, f"{name}: last dim must be contiguous"
    assert kv_cache.stride(3) == D, "kv_cache: a token's row must be contiguous"
    assert 0 <= layer < NL, f"layer {layer} out of range"
    assert scale > 0, f"softmax scale must be > 0, got {scale}"
    for name, t in (("slot_mapping", slot_mapping), ("block_tables", block_tables), ("seq_lens", seq_lens)):
        assert t.dtype == torch.int32 and t.device == q_latent.device, f"{name}: int32 on q_latent's device"
    assert slot_mapping.dim() == 1 and slot_mapping.shape[0] >= T and slot_mapping.stride(0) == 1
    assert block_tables.dim() == 2 and block_tables.stride(1) == 1 and block_tables.shape[0] >= num_seqs
    assert seq_lens.dim() == 1 and seq_lens.shape[0] >= num_seqs and seq_lens.stride(0) == 1
    assert num_seqs <= T, f"decode: {num_seqs} sequences but {T} tokens (one new token each)"

    out = torch.zeros((T, H, R), dtype=q_latent.dtype, device=q_latent.device)
    if T == 0:
        return out
    block_n = block_n or default_block_n(q_latent.dtype, interpreted=not q_latent.is_cuda)
    splits = splits or num_splits(num_seqs, H, max_seq_len, block_n)
    cache = kv_cache[layer]  # a view: no layer * stride overflow in-kernel
    m = torch.empty((max(num_seqs, 1), splits, H), dtype=torch.float32, device=q_latent.device)
    lsum, acc = torch.empty_like(m), torch.empty((max(num_seqs, 1), splits, H, R), dtype=torch.float32,
                                                 device=q_latent.device)
    dot_prec = "ieee" if q_latent.dtype == torch.float32 else "tf32"
    with interpreter_upcast((q_latent, q_rope, latent), (cache, out)) as ((ql, qr, lat), (cache_w, o)):
        _store_latent_kernel[(T,)](lat, cache_w, slot_mapping, D, BS, lat.stride(0), cache_w.stride(0),
                                   cache_w.stride(1), BLOCK_D=triton.next_power_of_2(D))
        if num_seqs > 0:
            _mla_decode_kernel[(num_seqs, triton.cdiv(H, BLOCK_H), splits)](
                ql, qr, cache_w, block_tables, seq_lens, m, lsum, acc,
                H, R, P, BS, scale * _LOG2E,
                ql.stride(0), ql.stride(1), qr.stride(0), qr.stride(1), cache_w.stride(0), cache_w.stride(1),
                block_tables.stride(0),
                SPLITS=splits, BLOCK_HEADS=BLOCK_H, BLOCK_R=triton.next_power_of_2(R),
                BLOCK_P=max(16, triton.next_power_of_2(P)), BLOCK_N=block_n, DOT_PREC=dot_prec,
                num_warps=4 if R <= 128 else 8,
            )
            _merge_splits_kernel[(num_seqs, H)](m, lsum, acc, o, H, R, o.stride(0), o.stride(1), SPLITS=splits,
                                                BLOCK_S=triton.next_power_of_2(splits),
                                                BLOCK_R=triton.next_power_of_2(R), num_warps=4)
    return out


def _mla_decode_fake(q_latent, q_rope, latent, kv_cache, layer, slot_mapping, block_tables, seq_lens,
                     scale, num_seqs, max_seq_len):
    return q_latent.new_empty(q_latent.shape)


mla_decode = register_op("mla_decode", launcher=launch_mla_decode, reference=mla_decode_ref,
                         fake=_mla_decode_fake, mutates_args=("kv_cache",))
