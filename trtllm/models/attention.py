"""A layer's causal attention with its options (sliding window, logit soft-capping, ALiBi),
as a model under the contract calls it: the eager reference, or plain causal SDPA where
trtllm pages it.

    y = causal_attention(q, k, v, scale=s, window=w, softcap=c, alibi_slopes=a)
        # q [B, Hq, S, D], k/v [B, Hkv, S, D] (GQA when Hq > Hkv) -> [B, Hq, S, D]

Under `trtllm.compile` (`attention_is_paged()`: dynamo traces the model, or the contract's
probe runs it) it is `F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=s)`:
the pass replaces that by paged attention and gives the op the layer's window and
softcap from what the probe learnt (an own model's `config.layer_windows` /
`config.layer_softcaps`, or what an HF layer asked of the attention interface). Eagerly
it is the reference: a window that bites is a banded mask; soft-capping is applied to the
scaled logits before the mask, softmax in fp32, as HF's eager_attention_forward does
(softcap * tanh(scores / softcap)); ALiBi adds slope_h * (key - query position) to the
scaled scores (a_h = alibi_slopes [Hq] fp32; the probe reads them from
`config.alibi_slopes`). A model file whose layers have windows, caps or ALiBi calls
this instead of SDPA, so the probe sees the plain SDPA the compiled graph will hold.
models/hf.py's attention interface calls it too.

While dynamo traces (`torch.compiler.is_compiling()`), that SDPA is trtllm's op of the same
arguments, `torch.ops.trtllm.scaled_dot_product_attention` (trtllm/traced_sdpa.py says why),
which the passes read as SDPA (passes/match.py).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import trtllm.traced_sdpa  # noqa: F401  (registers torch.ops.trtllm.scaled_dot_product_attention)

_probing = False


def attention_is_paged() -> bool:
    """Whether the model call now running has its SDPA calls turned into trtllm's paged
    attention (traced by trtllm.compile, or run by its probe, contract.probe_attention): a
    layer then calls plain causal SDPA and leaves its window and soft-capping to the op."""
    return torch.compiler.is_compiling() or _probing  # in that order: dynamo reads no global


@contextlib.contextmanager
def probing_attention():
    """While inside, `attention_is_paged()`: the probe sees each layer's SDPA as the graph will."""
    global _probing
    previous, _probing = _probing, True
    try:
        yield
    finally:
        _probing = previous


def causal_mask(seq_len: int, window: int, device) -> torch.Tensor:
    """[S, S] bool, True = attend: key j is visible to query i iff j <= i and, with a window
    (> 0), i - window < j (as HF)."""
    i = torch.arange(seq_len, device=device)
    dist = i[:, None] - i[None, :]  # [S, S] query - key
    return (dist >= 0) & ((window <= 0) | (dist < window))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
                     window: int = 0, softcap: float = 0.0,
                     alibi_slopes: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, S, D], k/v [B, Hkv, S, D] -> [B, Hq, S, D]; scale None = D ** -0.5;
    window 0 = full causal attention; softcap 0.0 = no soft-capping; alibi_slopes None =
    no ALiBi, else [Hq] fp32."""
    gqa = q.shape[1] != k.shape[1]
    S = q.shape[2]
    if torch.compiler.is_compiling():  # traced: plain causal SDPA, as trtllm's op (docstring)
        return torch.ops.trtllm.scaled_dot_product_attention.default(q, k, v, is_causal=True, scale=scale,
                                                                    enable_gqa=gqa)
    if attention_is_paged() or (not softcap and alibi_slopes is None and not (window and S > window)):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    allowed = causal_mask(S, window, q.device)  # [S, S]
    if alibi_slopes is not None:
        if softcap:
            raise ValueError("ALiBi with logit soft-capping is not supported (the paged kernels take one or the other)")
        i = torch.arange(S, device=q.device)
        bias = alibi_slopes.float()[:, None, None] * (i[None, :] - i[:, None]).float()  # [Hq, S, S]: key - query
        mask = bias.masked_fill(~allowed, float("-inf")).to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if not softcap:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [B, Hq, S, D]
    scores = q @ k.transpose(2, 3) * (q.shape[-1] ** -0.5 if scale is None else scale)  # [B, Hq, S, S]
    scores = torch.tanh(scores / softcap) * softcap
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1, dtype=torch.float32)
    return probs.to(q.dtype) @ v
