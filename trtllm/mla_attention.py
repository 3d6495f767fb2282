"""Multi-head latent attention (DeepSeek-V2/V3) on the paged latent cache: the graph op
`trtllm.mla_attention`, which passes/place_mla_attention.py puts where a model expands its
latent into per-head keys and values for SDPA.

    out = torch.ops.trtllm.mla_attention(q_nope, q_rope, latent, k_rope, kv_b_weight, layer, scale)
        q_nope [B, H, S, dn], q_rope [B, H, S, dr]     the query's two parts (rope applied)
        latent [B, 1, S, R] (or [B, S, R])             the normed compressed KV (kv_lora_rank R)
        k_rope [B, 1, S, dr] (or [B, S, dr])           the shared rotated key
        kv_b_weight [H * (dn + dv), R]                 kv_b_proj: per head W_UK [dn, R] then W_UV [dv, R]
        -> [B, H, S, dv], what SDPA over k = [W_UK c, k_rope], v = W_UV c gives (causal)

Like `trtllm.attention` it reads the active attention context (attention_context.py): the
cache is the context's `k` pool, [L, NB, BS, 1, R + dr], one latent row per token (the
`v` pool is empty: AttentionSpec.latent). Each new token's row [c, k_rope] is written at
its slot, then:
- a decode step (max_query_len == 1: the runner's decode graphs) takes the absorbed form:
  q_latent = W_UK^T q_nope per head, kernels/mla_decode.py attends over the latent rows,
  the output goes through W_UV: the cache is read once for all heads, nothing is expanded;
- a step of at most ABSORBED_MAX_QUERY_LEN tokens a sequence (speculative decoding's verify
  steps: the last token and its drafts) the same, each token a decode query of its own
  (`_per_token`: its sequence's block table, its position + 1 rows), built on the device:
  no host sync, so verify steps run in CUDA graphs;
- any other step (prefill, chunked prefill) expands each sequence's cached latent with
  kv_b_proj and runs causal SDPA per sequence (plain torch, on the host's lengths: not
  captured in a CUDA graph): DeepSeek's own prefill, FLOPs of dn + dr per score.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from trtllm.attention_context import active_context
from trtllm.kernels.mla_decode import mla_decode
from trtllm.kernels.registry import register_op

# Steps of up to 33 tokens a sequence (verify steps of up to 32 drafts, short prompts) take the
# absorbed per-token path; longer chunks are prompts, expanded. The expanded path reads the host's
# lengths in every layer, so verify steps ran outside CUDA graphs: bench/bench_mtp.py on the
# H200 (2026-12-03, before this path) 0.21x the plain target at ~100% MTP acceptance, batch 1.
ABSORBED_MAX_QUERY_LEN = 33


def _flat_heads(t: torch.Tensor) -> torch.Tensor:  # [B, H, S, d] -> [B * S, H, d]
    return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])


def _mla_attention(q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                   kv_b_weight: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    ctx = active_context()
    meta, cache = ctx.metadata, ctx.cache.k  # [L, NB, BS, 1, R + dr]
    b, h, s, dn = q_nope.shape
    R, dr = latent.shape[-1], k_rope.shape[-1]
    dv = kv_b_weight.shape[0] // h - dn
    if cache.shape[-2:] != (1, R + dr):
        raise RuntimeError(f"trtllm.mla_attention: the KV cache {tuple(cache.shape)} is not a latent cache of "
                           f"{R} + {dr} per token (AttentionSpec.latent sizes it)")
    w = kv_b_weight.view(h, dn + dv, R)
    qn, qr = _flat_heads(q_nope), _flat_heads(q_rope)  # [T, H, dn], [T, H, dr]
    rows = torch.cat([latent.reshape(-1, R), k_rope.reshape(-1, dr)], dim=-1).to(cache.dtype)  # [T, R + dr]
    if meta.max_query_len <= ABSORBED_MAX_QUERY_LEN:
        if meta.max_query_len == 1:  # a decode step: token t is sequence t's
            tables, lens, rows_bound = meta.block_tables, meta.seq_lens, meta.num_seqs
        else:
            tables, lens = _per_token(meta, qn.shape[0])
            rows_bound = qn.shape[0]
        # batched over heads, W_UK / W_UV as strided views of kv_b_proj's weight (no copy)
        q_latent = torch.bmm(qn.transpose(0, 1), w[:, :dn]).transpose(0, 1)  # [T, H, R], strided
        out_latent = mla_decode(q_latent, qr.contiguous(), rows, cache, layer, meta.slot_mapping,
                                tables, lens, scale, rows_bound, meta.max_seq_len)
        out = torch.bmm(out_latent.transpose(0, 1), w[:, dn:].transpose(1, 2)).transpose(0, 1)  # [T, H, dv]
    else:
        out = _expanded_prefill(qn, qr, rows, cache, layer, w, dn, scale)
    return out.contiguous().view(b, s, h, dv).transpose(1, 2)  # the strides _mla_attention_fake promises


def _per_token(meta, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A step of several tokens a sequence as T decode queries: token t's block table (its
    sequence's) and length (its position + 1: causal within the chunk, whose rows the kernel
    writes before any is read), [T, MB] and [T]; 0 for padding tokens. On the device only."""
    n = meta.num_seqs
    starts = meta.query_start_loc[: n + 1]
    t = torch.arange(T, dtype=starts.dtype, device=starts.device)
    seq = torch.searchsorted(starts[1:], t, right=True).clamp(max=n - 1)  # [T]
    ends = starts[seq + 1]
    lens = torch.where(t < ends, meta.seq_lens[seq] - (ends - t) + 1, 0).clamp(min=0)
    return meta.block_tables[seq], lens.to(torch.int32)


def _expanded_prefill(qn, qr, rows, cache, layer, w, dn, scale) -> torch.Tensor:
    """Write the rows, then per sequence: its cached latent expanded to keys and values,
    causal SDPA of its new tokens (the last n of its L positions) over them."""
    meta = active_context().metadata
    T, H, _ = qn.shape
    R, BS = w.shape[-1], cache.shape[2]
    slots = meta.slot_mapping[:T].long()
    keep = slots >= 0
    cache[layer, slots[keep] // BS, slots[keep] % BS, 0] = rows[keep]
    out = qn.new_zeros((T, H, w.shape[1] - dn))
    starts, lens = meta.query_start_loc.tolist(), meta.seq_lens.tolist()
    for seq in range(meta.num_seqs):
        a, e, L = starts[seq], starts[seq + 1], lens[seq]
        if e <= a or L <= 0:
            continue
        j = torch.arange(L, device=qn.device)
        ctx_rows = cache[layer, meta.block_tables[seq, j // BS].long(), j % BS, 0]  # [L, R + dr]
        kv = torch.einsum("lr,hdr->hld", ctx_rows[:, :R].to(w.dtype), w)  # [H, L, dn + dv]
        k = torch.cat([kv[..., :dn], ctx_rows[None, :, R:].to(w.dtype).expand(H, L, -1)], dim=-1)
        q = torch.cat([qn[a:e], qr[a:e]], dim=-1).transpose(0, 1)  # [H, n, dn + dr]
        allowed = j[None, :] <= (L - (e - a) + torch.arange(e - a, device=qn.device))[:, None]  # [n, L]
        out[a:e] = F.scaled_dot_product_attention(q, k, kv[..., dn:], attn_mask=allowed, scale=scale).transpose(0, 1)
    return out


def _mla_attention_fake(q_nope, q_rope, latent, k_rope, kv_b_weight, layer, scale):
    b, h, s, dn = q_nope.shape
    return q_nope.new_empty((b, s, h, kv_b_weight.shape[0] // h - dn)).transpose(1, 2)


# mla_decode dispatches itself (Triton kernel or reference): this op is plain torch around it
mla_attention = register_op("mla_attention", impl=_mla_attention, fake=_mla_attention_fake)
