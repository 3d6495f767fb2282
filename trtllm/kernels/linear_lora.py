"""A LoRA-wrapped linear in one op: the base linear plus each token's adapter.

    y[t, :] = x[t, :] @ W^T (+ bias) + (x[t, :] @ A[s]^T) @ B[s]^T,   s = slot_ids[t]
                                                           (no adapter term where s = -1)

= lora_expand(linear(x, W, b), lora_shrink(x, A, slot_ids), B, slot_ids) of kernels/lora_sgmv.py,
which passes/fuse_lora_linear.py replaces with this op where the linear is a plain one.

Shapes: x [..., K] (leading dims flattened to T rows); W [N, K] contiguous; bias [N] or None;
A [S, R, K]; B [S, N, R] (last dims contiguous); slot_ids [>= T] integer (lora_sgmv's
contract: a fixed-address buffer the runtime refills each step). Output [..., N] in x.dtype.

Why: at decode the unfused linear is four launches (the base GEMV, the shrink over K
splits, the splits' sum, the expand) although the adapter's weights are ~1% of the base's:
384 extra kernels a Llama-3.1-8B step, which ran at 0.72x the base model's batch-1 tok/s on
the H200 (bench_lora.py, 2026-12-03). Here, for the GEMV's rows (up to GEMV_MAX_M tokens,
kernels/linear.py): two launches. The shrink writes its fp32 partial sums over K splits
(lora_shrink_partials), and the GEMV's LoRA epilogue sums each row's splits in order, rounds h
to x's dtype as lora_shrink stores it, and adds h @ B[s]^T to the fp32 accumulator before
its one rounding (the unfused path rounds the base output first: an ulp apart at most).
More rows: F.linear (cuBLAS), the shrink with its K splits summed once (a small second
launch), then the expand. Summed in the expand instead, every one of its N / BLOCK_N programs
of a token block re-read all the splits: at 64 tokens over a gate-up of N = 28,672, 16 splits,
~57 MB of (mostly L2) reads a linear against ~0.13 MB summed once (an estimate; not yet timed on a GPU).

Inside `no_adapters()` (the runtime's steps in which no token has an adapter, and the decode
graphs captured for them): the base linear alone, `linear`'s own choice of GEMV or F.linear.
"""
from __future__ import annotations

import contextlib
import contextvars

import torch
import torch.nn.functional as F

from trtllm.kernels.linear import check_linear, gemv, gemv_choice, gemv_rows, linear_ref, linear_triton
from trtllm.kernels.lora_sgmv import (
    lora_expand_partials,
    lora_expand_ref,
    lora_shrink_partials,
    lora_shrink_ref,
    lora_shrink_triton,
)
from trtllm.kernels.registry import register_op

# Set by the runtime (runtime/model_runner.py, cuda_graphs.py) around steps and graph captures
# in which no token has an adapter; read by the launcher when it runs (at capture, in a graph).
_NO_ADAPTERS = contextvars.ContextVar("trtllm_lora_no_adapters", default=False)


@contextlib.contextmanager
def no_adapters(on: bool = True):
    """Within: no token of the step has an adapter (with on=False: as outside)."""
    token = _NO_ADAPTERS.set(on)
    try:
        yield
    finally:
        _NO_ADAPTERS.reset(token)


def adapters_off() -> bool:
    return _NO_ADAPTERS.get()


def linear_lora_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, slot_ids: torch.Tensor, parts: list[int] | None = None) -> torch.Tensor:
    return lora_expand_ref(linear_ref(x, weight, bias), lora_shrink_ref(x, lora_a, slot_ids), lora_b, slot_ids,
                           parts)


def linear_lora_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                       lora_b: torch.Tensor, slot_ids: torch.Tensor, parts: list[int] | None = None) -> torch.Tensor:
    # parts: where B's rank blocks are (kernels/lora_sgmv.py): the expand reads only them; the
    # GEMV's epilogue (up to 16 rows) reads every rank, B's zeros too
    check_linear(x, weight, bias)
    n, k = weight.shape
    assert lora_a.dim() == 3 and lora_a.shape[2] == k and lora_b.dim() == 3 and lora_b.shape[:3] == (
        lora_a.shape[0], n, lora_a.shape[1]), \
        f"lora_a {tuple(lora_a.shape)} / lora_b {tuple(lora_b.shape)} do not fit weight {tuple(weight.shape)}"
    assert lora_b.stride(2) == 1 and lora_b.dtype == x.dtype, f"lora_b {lora_b.dtype}, last dim contiguous"
    if adapters_off():
        return linear_triton(x, weight, bias)
    config = gemv_choice(x, weight)
    x2 = gemv_rows(x)
    if config is None:  # cuBLAS, the shrink (its K splits summed once), then the expand
        h = lora_shrink_triton(x2, lora_a, slot_ids)
        return lora_expand_partials(F.linear(x2, weight, bias), h[None], lora_b, slot_ids,
                                    parts=parts).reshape(*x.shape[:-1], n)
    h_parts = lora_shrink_partials(x2, lora_a, slot_ids)  # [splits, T, R] fp32
    if config is not None and config.dot and x.dtype == torch.float16 and x.is_cuda:
        # Triton 3.6 failed to compile the epilogue in the tl.dot GEMV for fp16 at 16 rows and
        # BLOCK_N 16 (TritonGPURemoveLayoutConversions, H200, 2026-12-03; bf16 compiled and
        # matched): fp16 takes the base GEMV, then the expand
        base = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
        gemv(x2, weight, bias, base, config)
        return lora_expand_partials(base, h_parts, lora_b, slot_ids, parts=parts).reshape(*x.shape[:-1], n)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    gemv(x2, weight, bias, out.view(x2.shape[0], n), config, lora=(h_parts, lora_b, slot_ids))
    return out


def _linear_lora_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, slot_ids: torch.Tensor, parts: list[int] | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear_lora = register_op("linear_lora", launcher=linear_lora_triton, reference=linear_lora_ref,
                          fake=_linear_lora_fake)
