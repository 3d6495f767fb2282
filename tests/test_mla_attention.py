"""trtllm/mla_attention.py: the graph op over the latent cache, step by step as the runtime
calls it (ragged prefill, a mixed step with a prefill chunk over cached context, decode steps
through the Triton kernel, padding tokens), against DeepSeek's expanded attention over each
whole sequence; steps of several tokens a sequence both ways: absorbed, each token a decode
query (up to ABSORBED_MAX_QUERY_LEN tokens a sequence: verify steps), and expanded."""
import pytest
import torch
import torch.nn.functional as F

import trtllm.mla_attention  # noqa: F401  (registers torch.ops.trtllm.mla_attention)
from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context

H, R, DR, DN, DV, BS = 3, 16, 8, 12, 10, 4


def expanded(q_nope, q_rope, latent, k_rope, w, scale):
    """Causal attention over one whole sequence, K/V expanded: [S, H, *] -> [S, H, dv]."""
    kv = torch.einsum("sr,hdr->hsd", latent, w.view(H, DN + DV, R))
    k = torch.cat([kv[..., :DN], k_rope[None].expand(H, -1, -1)], dim=-1)
    q = torch.cat([q_nope, q_rope], dim=-1).transpose(0, 1)
    return F.scaled_dot_product_attention(q, k, kv[..., DN:], is_causal=True, scale=scale).transpose(0, 1)


@pytest.mark.parametrize("absorbed_max_query_len", [1, 33])  # 1: every multi-token step expanded
def test_prefill_chunks_and_decode_steps_equal_the_expanded_attention(absorbed_max_query_len, monkeypatch):
    monkeypatch.setattr(trtllm.mla_attention, "ABSORBED_MAX_QUERY_LEN", absorbed_max_query_len)
    g = torch.Generator().manual_seed(0)
    lens = [11, 8]
    seqs = [dict(q_nope=torch.randn(n, H, DN, generator=g), q_rope=torch.randn(n, H, DR, generator=g),
                 latent=torch.randn(n, R, generator=g), k_rope=torch.randn(n, DR, generator=g)) for n in lens]
    w = torch.randn(H * (DN + DV), R, generator=g) * 0.3
    scale = (DN + DR) ** -0.5
    cache = PagedKVCache.allocate(2, 8, BS, 1, R + DR, torch.float32, "cpu", values=False)
    assert cache.nbytes == 2 * 8 * BS * (R + DR) * 4  # the latent rows only
    meta = AttentionMetadata(16, 2, 4, "cpu")
    tables = [[5, 0, 7], [2, 6]]
    got = [torch.zeros(n, H, DV) for n in lens]
    # (tokens of seq 0, tokens of seq 1) per step: ragged prefill, mixed, decode, decode + padding
    steps = [((0, 6), (0, 5)), ((6, 9), (5, 6)), ((9, 10), (6, 7)), ((10, 11), (7, 8))]
    for step, spans in enumerate(steps):
        meta.fill([b - a for a, b in spans], [b for _, b in spans], tables, BS)
        parts = {k: torch.cat([s[k][a:b] for s, (a, b) in zip(seqs, spans)]) for k in seqs[0]}
        pad = step in (1, 3)  # a verify or decode graph's padding token: slot -1, no sequence
        if pad:
            parts = {k: torch.cat([v, torch.full_like(v[:1], 7.0)]) for k, v in parts.items()}
        with attention_context(cache, meta):
            out = torch.ops.trtllm.mla_attention(
                parts["q_nope"].transpose(0, 1)[None], parts["q_rope"].transpose(0, 1)[None],
                parts["latent"][None, None], parts["k_rope"][None, None], w, 1, scale)  # [1, H, T, dv]
        out = out[0].transpose(0, 1)
        start = 0
        for i, (a, b) in enumerate(spans):
            got[i][a:b] = out[start:start + b - a]
            start += b - a
        if pad:
            assert torch.equal(out[start:], torch.zeros_like(out[start:]))
    for s, g_out in zip(seqs, got):
        torch.testing.assert_close(g_out, expanded(s["q_nope"], s["q_rope"], s["latent"], s["k_rope"], w, scale),
                                   atol=1e-5, rtol=1e-5)
    assert not cache.k[0].any()  # layer 0 untouched
