"""The sampler's noise: Gumbel(0, 1) per (row, token) from a counter-based hash of (seed,
completion index, step, token id), so a request's samples depend on its seed and its own
logits only (runtime/sampler.py says why). argmax(logits + noise) is an exact sample of
softmax(logits).
"""
from __future__ import annotations

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: Tensor) -> Tensor:
    """lowbias32 (C. Wellons) on int64 tensors holding 32-bit values. Both multipliers
    are < 2**31, so products stay < 2**63: no overflow, no uint64 needed."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def _combine(h: Tensor, v) -> Tensor:
    return _mix32(((h ^ v) + _GOLDEN) & _M32)


def gumbel_noise(batch) -> Tensor:
    """[N, V] Gumbel(0, 1) noise, a pure function of (seed, index, step, token id); batch: a
    sampler.SamplingBatch (its seed, index, step [N] and vocab_size)."""
    k = _combine(batch.seed & _M32, batch.seed >> 32)      # seed < 2**63: shift is exact
    k1 = _combine(_combine(k, batch.index & _M32), batch.step & _M32)
    k2 = _combine(k1, 0x2545F491)
    tok = torch.arange(batch.vocab_size, device=k.device)
    # two keyed rounds, so one step's noise is no simple permutation of another's
    x = _combine(_combine(k1[:, None], tok[None, :]), k2[:, None])
    return -torch.log(-torch.log(open_unit(x)))


def open_unit(x: Tensor) -> Tensor:
    """32-bit hashes (int64) -> fp32 uniforms strictly inside (0, 1), from their top 23 bits:
    m + 0.5 is exact in fp32 below 2**23. (With 24 bits, m = 2**24 - 1 rounded to u = 1.0,
    Gumbel noise +inf: that token won whatever its logit and beat a grammar's or top-k's
    -inf mask (-inf + inf = NaN, which argmax takes) — one draw in 2**24, a row of 128k
    tokens every ~128 sampled steps.)"""
    return ((x >> 9).to(torch.float32) + 0.5) * 2.0 ** -23
