"""Linear layer for decode batches: a GEMV that reads the weight once for all rows.

    y[M, N] = x[M, K] @ W[N, K]^T (+ bias[N])

Shapes: x [..., K] (leading dims flattened to M rows; any strides, copied to rows with a
contiguous last dim if they cannot be viewed so); W [N, K] row-major contiguous (the
`nn.Linear` layout); bias [N] contiguous or None. x, W and bias share one dtype
(fp32/fp16/bf16). Output [..., N], contiguous, in x.dtype; products accumulate in fp32
and the bias is added in fp32 before the one rounding.

Why: at batch-1 decode every matmul is memory bound (Llama-3-8B: 15 GB of weights per
step), and cuBLAS runs the N=4096 shapes (o_proj, down_proj) as a split-K GEMM plus a
separate reduce kernel, below the copy bandwidth. This kernel streams W once, in
contiguous [BLOCK_N, BLOCK_K] tiles (coalesced along K), and keeps all M rows' sums:

- "fma" variant: the weight tile is multiplied by each x row on the CUDA cores; for
  M = 1 the [BLOCK_N, BLOCK_K] products accumulate elementwise and are reduced once
  at the end; for M > 1 each row's dot products are reduced per tile.
- "dot" variant: acc[BLOCK_N, BLOCK_M] += W_tile @ x_tile^T with tl.dot (the rows
  padded to BLOCK_M >= 16 with masked zero loads), whose operand loads Triton
  software-pipelines (num_stages) into shared memory.

One program per BLOCK_N output features, the whole K loop inside it (no split-K: with
BLOCK_N of 8-16, N = 4096 gives 256-512 programs for the 132 SMs of an H100).

`torch.ops.trtllm.linear(x, weight, bias)` runs this kernel for M <= GEMV_MAX_M rows
in CUDA-graph capture (and on CPU under TRITON_INTERPRET=1), F.linear (cuBLAS) for more
rows or eagerly on CUDA, and the fp32 reference on CPU otherwise. Configs come from
kernels/linear_configs.py (`TUNED` by N, K and M rounded up to a power of 2, else
`default_config`); bench/bench_linear.py tunes both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trtllm.kernels.linear_configs import GemvConfig, gemv_config
from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.registry import interpreter_upcast, register_op

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The largest row count (tokens) the GEMV handles; above it the op calls F.linear. Set
# from bench/bench_linear.py: the largest M whose whole-step GEMM time beats cuBLAS.
# Rows up to which the GEMV runs: a step's GEMMs at M = 16 take 5.44 ms against cuBLAS's 5.78.
GEMV_MAX_M = 16
_MAX_BLOCK_M = 64  # the kernel's limit on rows (BLOCK_M); GEMV_MAX_M must not exceed it


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    b = bias.float() if bias is not None else None
    return F.linear(x.float(), weight.float(), b).to(x.dtype).contiguous()


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    x_row_stride, w_row_stride, y_row_stride,
    # LoRA (kernels/linear_lora.py): h's fp32 partial sums [SPLITS, M, R], B [S, N, R], slots [>= M]
    h_ptr, lb_ptr, slot_ptr, R, SPLITS, h_split_stride, h_row_stride, lb_slot_stride, lb_row_stride,
    HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 (no tf32), else the default
    BLOCK_M: tl.constexpr,        # rows, padded to a power of 2 (>= 16 with USE_DOT)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,         # K % BLOCK_K == 0: no K mask
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (cdiv(N, BLOCK_N),). Each program streams W[rows, :] once, for all M rows.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past N re-read row N-1 (in bounds, so W loads need no row mask); not stored.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    w_ptrs = w_ptr + rows[:, None] * w_row_stride + offs_k[None, :]

    if USE_DOT:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        x_ptrs = x_ptr + offs_m[:, None] * x_row_stride + offs_k[None, :]
        m_mask = offs_m[:, None] < M
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=m_mask, other=0.0)
            else:
                k_mask = (k0 + offs_k) < K
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=m_mask & k_mask[None, :], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION)
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
    elif BLOCK_M == 1:
        # One row: accumulate the products elementwise, reduce over K once at the end.
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        x_ptrs = x_ptr + offs_k
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                w = tl.load(w_ptrs, eviction_policy="evict_first")
                x = tl.load(x_ptrs)
            else:
                k_mask = (k0 + offs_k) < K
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs, mask=k_mask, other=0.0)
            acc2 += w.to(tl.float32) * x.to(tl.float32)[None, :]
            w_ptrs += BLOCK_K
            x_ptrs += BLOCK_K
        acc = tl.sum(acc2, axis=1)[:, None]  # [BLOCK_N, 1]
    else:
        # A few rows: each weight tile (loaded once) meets every row; sums reduced per tile.
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                k_mask = offs_k < BLOCK_K
                w = tl.load(w_ptrs, eviction_policy="evict_first").to(tl.float32)
            else:
                k_mask = (k0 + offs_k) < K
                w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0,
                            eviction_policy="evict_first").to(tl.float32)
            for m in tl.static_range(BLOCK_M):
                x = tl.load(x_ptr + m * x_row_stride + k0 + offs_k,
                            mask=k_mask & (m < M), other=0.0).to(tl.float32)
                part = tl.sum(w * x[None, :], axis=1)  # [BLOCK_N]
                acc += tl.where(offs_m[None, :] == m, part[:, None], 0.0)
            w_ptrs += BLOCK_K

    if HAS_BIAS:
        acc += tl.load(b_ptr + rows).to(tl.float32)[:, None]
    if HAS_LORA:
        # acc[:, m] += B[slot[m]][rows, :] @ h[m] with h[m] = the sum of its splits, rounded to
        # y's dtype as lora_shrink stores it; no adapter (slot -1): nothing added
        offs_r = tl.arange(0, BLOCK_R)
        r_mask = offs_r < R
        for m in tl.static_range(BLOCK_M):
            m_ok = m < M
            slot = tl.load(slot_ptr + m, mask=m_ok, other=-1).to(tl.int32)
            h = tl.zeros((BLOCK_R,), dtype=tl.float32)
            for s in range(0, SPLITS):
                h += tl.load(h_ptr + s * h_split_stride + m * h_row_stride + offs_r, mask=r_mask & m_ok, other=0.0)
            h = h.to(y_ptr.dtype.element_ty).to(tl.float32)
            lb = tl.load(lb_ptr + tl.maximum(slot, 0).to(tl.int64) * lb_slot_stride + rows[:, None] * lb_row_stride
                         + offs_r[None, :], mask=r_mask[None, :] & (slot >= 0), other=0.0)
            delta = tl.sum(lb.to(tl.float32) * h[None, :], axis=1)  # [BLOCK_N]
            acc += tl.where(offs_m[None, :] == m, delta[:, None], 0.0)
    # y[m, n] = acc[n, m]
    y_ptrs = y_ptr + offs_m[None, :] * y_row_stride + offs_n[:, None]
    y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _block_m(m: int, dot: bool) -> int:
    return max(16, triton.next_power_of_2(m)) if dot else triton.next_power_of_2(m)


def gemv(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
         out: torch.Tensor, config: GemvConfig, lora: tuple | None = None) -> torch.Tensor:
    """Launch the GEMV on rows x2 [M, K] (last dim contiguous) into out [M, N] (contiguous).
    lora: (h_parts [splits, M, R] fp32, lora_b [S, N, R], slot_ids [>= M]) adds each row's
    adapter term (kernels/linear_lora.py checks them)."""
    m, k = x2.shape
    n = weight.shape[0]
    block_m = _block_m(m, config.dot)
    assert block_m <= _MAX_BLOCK_M, f"{m} rows: too many for the GEMV"
    assert x2.stride(1) == 1 and out.is_contiguous() and out.shape == (m, n)
    dot_precision = "ieee" if x2.dtype == torch.float32 else "tf32"
    h_parts, lora_b, slot_ids = lora if lora is not None else (out, out, out)  # unused stand-ins without
    r = lora_b.shape[2] if lora is not None else 0
    with interpreter_upcast((x2, weight, bias, lora_b), (out,)) as ((x2, weight, bias, lb), (y,)):
        _gemv_kernel[(triton.cdiv(n, config.block_n),)](
            x2, weight, bias if bias is not None else weight, y,
            m, n, k,
            x2.stride(0), weight.stride(0), y.stride(0),
            h_parts, lb, slot_ids, r, h_parts.shape[0] if lora is not None else 0,
            h_parts.stride(0), h_parts.stride(1) if lora is not None else 0,
            lb.stride(0), lb.stride(1) if lora is not None else 0,
            HAS_BIAS=bias is not None,
            HAS_LORA=lora is not None,
            BLOCK_R=max(16, triton.next_power_of_2(r)),
            USE_DOT=config.dot,
            DOT_PRECISION=dot_precision,
            BLOCK_M=block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            EVEN_K=k % config.block_k == 0,
            num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(x2),
        )
    return out


def unsupported(x_dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None) -> str | None:
    """Why `linear(x, weight, bias)` cannot take this op (it asserts the same), or None.
    For callers that choose between it and F.linear: the graph pass, the LM head."""
    if weight.dim() != 2 or not weight.is_contiguous():
        return f"weight {tuple(weight.shape)} with strides {weight.stride()} is not a contiguous [N, K] matrix"
    if weight.dtype not in _FLOAT_DTYPES or weight.dtype != x_dtype:
        return f"weight dtype {weight.dtype} with input dtype {x_dtype}"
    if bias is not None and (bias.shape != weight.shape[:1] or not bias.is_contiguous()
                             or bias.dtype != x_dtype or bias.device != weight.device):
        return f"bias {tuple(bias.shape)} {bias.dtype} is not a contiguous [N] vector of the input dtype"
    return None


def check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    assert x.dtype in _FLOAT_DTYPES, f"x: unsupported dtype {x.dtype}"
    assert weight.dim() == 2 and weight.shape[1] == x.shape[-1], \
        f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    assert weight.device == x.device, f"weight on {weight.device}, x on {x.device}"
    reason = unsupported(x.dtype, weight, bias)
    assert reason is None, reason


def gemv_choice(x: torch.Tensor, weight: torch.Tensor) -> GemvConfig | None:
    """The GEMV config `linear` launches for x [..., K] @ weight [N, K]^T, or None for F.linear.
    On CUDA the GEMV runs only inside CUDA-graph capture (the decode graphs): its launch
    costs ~120 us of host time per call against cuBLAS's ~22 us (bench_linear.py, H100
    host), and an eager step with few rows is host-bound, 4 GEMMs x 32 layers of it.
    In a graph the launch is paid once, at capture."""
    n, k = weight.shape
    m = x.numel() // k if k else 0
    on_gpu_eager = x.is_cuda and not torch.cuda.is_current_stream_capturing()
    return gemv_config(m, n, k) if 0 < m <= GEMV_MAX_M and k > 0 and not on_gpu_eager else None


def gemv_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as the GEMV's rows [M, K] with a contiguous last dim."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    check_linear(x, weight, bias)
    config = gemv_choice(x, weight)
    if config is None:
        return F.linear(x, weight, bias)
    x2 = gemv_rows(x)
    out = torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)
    gemv(x2, weight, bias, out.view(x2.shape[0], weight.shape[0]), config)
    return out


def _linear_fake(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


linear = register_op("linear", launcher=linear_triton, reference=linear_ref, fake=_linear_fake)
