"""FP8 (e4m3) GEMM with dequantization scales, for FP8 linears.

    y[M, N] = ((x[M, K] * sx) @ (w[N, K] * sw)^T + bias[N]).to(out_dtype)

x and w are torch.float8_e4m3fn (w in the `nn.Linear` [N, K] layout); sx and sw are fp32
multipliers that dequantize them (real value ~ fp8 value * scale; the checkpoints'
`weight_scale` and DeepSeek-V3's `weight_scale_inv` both mean this). Their shapes say the
granularity:

| granularity                         | x_scale            | weight_scale                     |
|-------------------------------------|--------------------|----------------------------------|
| per-tensor                          | [1]                | [1]                              |
| per-token x per-channel             | [M, 1]             | [N, 1]                           |
|   (either side may be per-tensor)   | [1] or [M, 1]      | [1] or [N, 1]                    |
| 128x128 blocks (DeepSeek-V3, Qwen3-FP8) | [M, ceil(K/128)]: each row's 1x128 groups | [ceil(N/128), ceil(K/128)] |

Block weights come with per-token-group activations (kernels/quantize_fp8.py with
group_size=128); other mixes are refused. Shapes: x [M, K] with a contiguous last dim
(any row stride); w [N, K] contiguous; scales contiguous fp32; bias [N] contiguous
(fp32/fp16/bf16) or None. Output [M, N], contiguous, in out_dtype (bf16/fp16/fp32).

The kernel feeds the fp8 tiles to tl.dot as they are (fp8 tensor cores: sm_89+; an older
GPU is refused by name), accumulating in fp32 (promoted every FP8_PROMOTE_K = 128 of K on sm_90). Per-tensor / per-row scales multiply the
accumulator once at the end; block scales multiply each 128-wide K step's partial
product (BLOCK_K divides 128) by its row's group scale and its column's block scale, then
add. Two kernels:

- `_fp8_gemm_kernel`: [BLOCK_M, BLOCK_N] output tiles, grouped program order for L2 reuse
  of the weight tiles (the Triton matmul tutorial's), for M > FP8_GEMV_MAX_M rows;
- `_fp8_gemv_kernel`: decode (M <= FP8_GEMV_MAX_M = 16): one program per BLOCK_N output
  features streams W[rows, :] once for all M rows, acc[BLOCK_N, 16] += W_tile @ x_tile^T
  (rows padded to 16 with masked zero loads), as kernels/linear.py's "dot" GEMV does.

Above FP8_GEMV_MAX_M rows on sm_90, per-tensor and per-row scales go to torch._scaled_mm
(cuBLAS; CUTLASS for row scales) instead of the tiled kernel, as kernels/linear.py hands
bf16 rows above its GEMV to cuBLAS: the tiled kernel reached 0.50-0.77x of it at M = 256
(a batch-256 decode step) and 0.77-0.85x at M = 2048-8192 on the Llama-3.1-8B shapes, and
trtllm-bench's FP8 1,024 x 128/128 went from 15,885 to 20,697 output tok/s with it (H200,
bench_fp8_gemm.py and bench/RESULTS.md, 2026-12-04). `_scaled_mm` accumulates as the kernels
do (no fast accumulation: partial sums promoted into fp32). Block scales, fp16/fp32
outputs, a bias in another dtype than the output, and other GPUs keep the tiled kernel.

Configs come from `default_gemm_config` / `default_gemv_config` (kernels/fp8_gemm_configs.py), chosen by
bench/probes/fp8_gemm_tune.py on the H200; bench/bench_fp8_gemm.py measures them against
torch._scaled_mm. Under TRITON_INTERPRET=1
the launcher hands the kernel fp32 copies of the fp8 (and bf16) tensors
(registry.interpreter_upcast): the fp8 x fp8 products are exact in fp32, so an
interpreted run computes what the GPU's fp8 tl.dot computes up to the order of the sums.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from trtllm.kernels.fp8_gemm_configs import Fp8GemmConfig, Fp8GemvConfig, default_gemm_config, default_gemv_config
from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.quantize_fp8 import require_fp8_gpu
from trtllm.kernels.registry import interpreter_upcast, register_op, triton_interpreter_on

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite e4m3 value
SCALE_BLOCK = 128        # block-scale tile: 128x128 weight blocks, 1x128 activation groups
FP8_GEMV_MAX_M = 16      # rows up to which the weight-streaming decode kernel runs
# Hopper's fp8 MMA adds its products in less than fp32 precision, and Triton (3.6) by
# default never promotes on sm_90 (max_num_imprecise_acc 2**30: errors grow with K, as
# DeepSeek-V3's report measured); the kernels promote into the fp32 accumulator every
# FP8_PROMOTE_K of K, DeepSeek's interval and torch._scaled_mm's default (no fast accum).
FP8_PROMOTE_K = 128
# Rows from which torch._scaled_mm serves what it can (see the docstring); the end-to-end
# A/B of 2026-12-04 set it to 1 << 30 before trtllm-bench's main() (bench/RESULTS.md, "FP8
# end to end"); bench_fp8_gemm.py times the tiled kernel through fp8_gemm_tiles.
SCALED_MM_MIN_M = FP8_GEMV_MAX_M + 1
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scale_kind(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor,
                weight_scale: torch.Tensor) -> bool:
    """Check the scales against the table in the docstring; True for block scales."""
    m, k = x.shape
    n = weight.shape[0]
    kg, ng = triton.cdiv(k, SCALE_BLOCK), triton.cdiv(n, SCALE_BLOCK)
    for name, s in (("x_scale", x_scale), ("weight_scale", weight_scale)):
        assert s.dtype == torch.float32, f"{name}: dtype {s.dtype}, expected torch.float32"
        assert s.is_contiguous(), f"{name}: not contiguous (strides {s.stride()})"
        assert s.device == x.device, f"{name} on {s.device}, x on {x.device}"
    ws, xs = tuple(weight_scale.shape), tuple(x_scale.shape)
    if ws in ((1,), (n, 1)):
        assert xs in ((1,), (m, 1)), (
            f"x_scale {xs}: with weight_scale {ws} it must be per-tensor (1,) or per-token ({m}, 1)")
        return False
    assert ws == (ng, kg), (
        f"weight_scale {ws}: expected per-tensor (1,), per-channel ({n}, 1) or "
        f"{SCALE_BLOCK}x{SCALE_BLOCK} blocks ({ng}, {kg}) for weight {tuple(weight.shape)}")
    assert xs == (m, kg), (
        f"x_scale {xs}: block weight scales need per-token-group (1x{SCALE_BLOCK}) activation "
        f"scales ({m}, {kg})")
    return True


def fp8_gemm_check(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
           bias: torch.Tensor | None, out_dtype: torch.dtype) -> bool:
    assert x.dtype == FP8_DTYPE, f"x: dtype {x.dtype}, expected {FP8_DTYPE}"
    assert weight.dtype == FP8_DTYPE, f"weight: dtype {weight.dtype}, expected {FP8_DTYPE}"
    assert x.dim() == 2, f"x: {tuple(x.shape)} is not an [M, K] matrix"
    assert weight.dim() == 2 and weight.shape[1] == x.shape[1], \
        f"weight {tuple(weight.shape)} does not match x {tuple(x.shape)}"
    assert weight.is_contiguous(), f"weight: strides {weight.stride()}, not a contiguous [N, K] matrix"
    assert weight.device == x.device, f"weight on {weight.device}, x on {x.device}"
    assert out_dtype in _OUT_DTYPES, f"out_dtype {out_dtype}: expected one of {_OUT_DTYPES}"
    if bias is not None:
        assert bias.shape == weight.shape[:1] and bias.is_contiguous() and bias.dtype in _BIAS_DTYPES, \
            f"bias {tuple(bias.shape)} {bias.dtype}: expected a contiguous [{weight.shape[0]}] float vector"
        assert bias.device == x.device, f"bias on {bias.device}, x on {x.device}"
    return _scale_kind(x, weight, x_scale, weight_scale)


def dequantize_fp8(t: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None) -> torch.Tensor:
    """fp32 t * scale, the scale broadcast ([1], [rows, 1]) or repeated over block[0] x block[1] tiles."""
    if block is not None:
        scale = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        scale = scale[: t.shape[0], : t.shape[1]]
    return t.float() * scale


def fp8_gemm_ref(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    block = fp8_gemm_check(x, weight, x_scale, weight_scale, bias, out_dtype)
    xf = dequantize_fp8(x, x_scale, (1, SCALE_BLOCK) if block else None)
    wf = dequantize_fp8(weight, weight_scale, (SCALE_BLOCK, SCALE_BLOCK) if block else None)
    y = xf @ wf.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).contiguous()


@triton.jit
def _fp8_gemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K,
    x_row_stride, w_row_stride, y_row_stride,
    xs_row_stride, ws_row_stride,  # per-row scales: 1, per-tensor: 0; block scales: the scale matrices'
    HAS_BIAS: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,   # "ieee" for the interpreter's fp32 copies; ignored for fp8
    MAX_IMPRECISE_ACC: tl.constexpr,  # K elements summed in the sm_90 fp8 MMA's own precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,          # K % BLOCK_K == 0: no K mask
):
    # Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N),), walked GROUP_M tile rows at a time.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N re-read the last one (in bounds: no row masks on loads); not stored.
    rows_m = tl.minimum(offs_m, M - 1).to(tl.int64)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows_m[:, None] * x_row_stride + offs_k[None, :]
    w_ptrs = w_ptr + rows_n[:, None] * w_row_stride + offs_k[None, :]
    if BLOCK_SCALES:
        xs_ptrs = xs_ptr + rows_m * xs_row_stride                    # row m's K groups
        ws_ptrs = ws_ptr + (rows_n // SCALE_BLOCK) * ws_row_stride   # column n's K blocks

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs)
            b = tl.load(w_ptrs)
        else:
            k_mask = (k0 + offs_k) < K
            a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        if BLOCK_SCALES:
            kb = k0 // SCALE_BLOCK
            xs = tl.load(xs_ptrs + kb)
            ws = tl.load(ws_ptrs + kb)
            part = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION,
                          max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            acc += part * xs[:, None] * ws[None, :]
        else:
            acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PRECISION,
                          max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if not BLOCK_SCALES:
        xs = tl.load(xs_ptr + rows_m * xs_row_stride)
        ws = tl.load(ws_ptr + rows_n * ws_row_stride)
        acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * y_row_stride + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _fp8_gemv_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr,
    M, N, K,
    x_row_stride, w_row_stride, y_row_stride,
    xs_row_stride, ws_row_stride,
    HAS_BIAS: tl.constexpr,
    BLOCK_SCALES: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MAX_IMPRECISE_ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,         # rows padded to 16 (the smallest tl.dot side)
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (cdiv(N, BLOCK_N),). Each program streams W[rows, :] once, for all M rows.
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    rows_m = tl.minimum(offs_m, M - 1)
    m_mask = offs_m[:, None] < M
    offs_k = tl.arange(0, BLOCK_K)
    w_ptrs = w_ptr + rows_n[:, None] * w_row_stride + offs_k[None, :]
    x_ptrs = x_ptr + offs_m[:, None] * x_row_stride + offs_k[None, :]
    if BLOCK_SCALES:
        xs_ptrs = xs_ptr + rows_m * xs_row_stride
        ws_ptrs = ws_ptr + (rows_n // SCALE_BLOCK) * ws_row_stride

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask, other=0.0)
        else:
            k_mask = (k0 + offs_k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
            x = tl.load(x_ptrs, mask=m_mask & k_mask[None, :], other=0.0)
        if BLOCK_SCALES:
            kb = k0 // SCALE_BLOCK
            xs = tl.load(xs_ptrs + kb)
            ws = tl.load(ws_ptrs + kb)
            part = tl.dot(w, tl.trans(x), input_precision=DOT_PRECISION,
                          max_num_imprecise_acc=MAX_IMPRECISE_ACC)
            acc += part * ws[:, None] * xs[None, :]
        else:
            acc = tl.dot(w, tl.trans(x), acc, input_precision=DOT_PRECISION,
                          max_num_imprecise_acc=MAX_IMPRECISE_ACC)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K

    if not BLOCK_SCALES:
        xs = tl.load(xs_ptr + rows_m * xs_row_stride)
        ws = tl.load(ws_ptr + rows_n * ws_row_stride)
        acc = acc * ws[:, None] * xs[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows_n).to(tl.float32)[:, None]
    # y[m, n] = acc[n, m]
    y_ptrs = y_ptr + offs_m[None, :] * y_row_stride + offs_n[:, None]
    y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _scale_strides(x_scale: torch.Tensor, weight_scale: torch.Tensor, block: bool) -> tuple[int, int]:
    if block:  # [M, Kg] and [Ng, Kg] matrices
        return x_scale.stride(0), weight_scale.stride(0)
    # [1]: every row reads element 0; [rows, 1]: row r reads element r.
    return (0 if x_scale.dim() == 1 else 1), (0 if weight_scale.dim() == 1 else 1)


def _launch(kernel, grid, x, weight, x_scale, weight_scale, bias, out, block, meta):
    m, k = x.shape
    n = weight.shape[0]
    xs_stride, ws_stride = _scale_strides(x_scale, weight_scale, block)
    dot_precision = "ieee" if triton_interpreter_on() else "tf32"
    with interpreter_upcast((x, weight, bias), (out,)) as ((x, weight, bias), (y,)):
        kernel[grid](
            x, weight, x_scale, weight_scale, bias if bias is not None else x_scale, y,
            m, n, k,
            x.stride(0), weight.stride(0), y.stride(0),
            xs_stride, ws_stride,
            HAS_BIAS=bias is not None, BLOCK_SCALES=block, SCALE_BLOCK=SCALE_BLOCK,
            DOT_PRECISION=dot_precision, MAX_IMPRECISE_ACC=min(meta["BLOCK_K"], FP8_PROMOTE_K), EVEN_K=k % meta["BLOCK_K"] == 0, **meta,
        )
    return out


def fp8_gemm_tiles(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, out: torch.Tensor, config: Fp8GemmConfig) -> torch.Tensor:
    """Launch the tiled GEMM (any M) into out [M, N] (contiguous)."""
    block = fp8_gemm_check(x, weight, x_scale, weight_scale, bias, out.dtype)
    m, k = x.shape
    n = weight.shape[0]
    assert x.stride(1) == 1 and out.is_contiguous() and out.shape == (m, n)
    assert not block or SCALE_BLOCK % config.block_k == 0, \
        f"block_k {config.block_k} must divide the scale block {SCALE_BLOCK}"
    grid = (triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n),)
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                GROUP_M=config.group_m, num_warps=config.num_warps, num_stages=config.num_stages)
    return _launch(_fp8_gemm_kernel, grid, x, weight, x_scale, weight_scale, bias, out, block, meta)


def fp8_gemv(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
             bias: torch.Tensor | None, out: torch.Tensor, config: Fp8GemvConfig) -> torch.Tensor:
    """Launch the weight-streaming kernel (M <= 16 rows) into out [M, N] (contiguous)."""
    block = fp8_gemm_check(x, weight, x_scale, weight_scale, bias, out.dtype)
    m, k = x.shape
    n = weight.shape[0]
    assert m <= FP8_GEMV_MAX_M, f"{m} rows: the fp8 GEMV takes at most {FP8_GEMV_MAX_M}"
    assert x.stride(1) == 1 and out.is_contiguous() and out.shape == (m, n)
    assert not block or SCALE_BLOCK % config.block_k == 0, \
        f"block_k {config.block_k} must divide the scale block {SCALE_BLOCK}"
    meta = dict(BLOCK_M=16, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                num_warps=config.num_warps, num_stages=config.num_stages, **pdl_options(x))
    return _launch(_fp8_gemv_kernel, (triton.cdiv(n, config.block_n),), x, weight, x_scale, weight_scale,
                   bias, out, block, meta)


@functools.cache
def _is_sm90(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) == (9, 0)


def _scaled_mm_serves(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      out_dtype: torch.dtype, block: bool) -> bool:
    return (not block and x.shape[0] >= SCALED_MM_MIN_M and x.is_cuda and not triton_interpreter_on()
            and _is_sm90(x.device) and out_dtype == torch.bfloat16
            and (bias is None or bias.dtype == out_dtype)
            and x.shape[1] % 16 == 0 and weight.shape[0] % 16 == 0)  # cuBLAS fp8 alignment


def fp8_gemm_scaled_mm(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The op through torch._scaled_mm: per-tensor scales as scalars, else both sides per
    row (a per-tensor side broadcast: [M, 1] and [1, N], what its row-wise mode takes)."""
    assert not fp8_gemm_check(x, weight, x_scale, weight_scale, bias, out_dtype), "_scaled_mm takes no block scales"
    return _scaled_mm_checked(x, weight, x_scale, weight_scale, bias, out_dtype)


def _scaled_mm_checked(x, weight, x_scale, weight_scale, bias, out_dtype) -> torch.Tensor:
    m, n = x.shape[0], weight.shape[0]
    if x_scale.numel() == 1 and weight_scale.numel() == 1:
        xs, ws = x_scale.reshape(()), weight_scale.reshape(())
    else:
        xs = x_scale.reshape(-1, 1).expand(m, 1).contiguous()
        ws = weight_scale.reshape(1, -1).expand(1, n).contiguous()
    return torch._scaled_mm(x.contiguous(), weight.t(), xs, ws, bias=bias, out_dtype=out_dtype)


def fp8_gemm_triton(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    block = fp8_gemm_check(x, weight, x_scale, weight_scale, bias, out_dtype)
    require_fp8_gpu(x.device, "fp8_gemm")
    if x.stride(1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = weight.shape[0]
    if n > 0 and _scaled_mm_serves(x, weight, bias, out_dtype, block):
        return _scaled_mm_checked(x, weight, x_scale, weight_scale, bias, out_dtype)  # checked above
    out = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.copy_(bias.to(out_dtype).expand(m, n)) if bias is not None else out.zero_()
    if m <= FP8_GEMV_MAX_M:
        return fp8_gemv(x, weight, x_scale, weight_scale, bias, out, default_gemv_config(m, n, k, block))
    return fp8_gemm_tiles(x, weight, x_scale, weight_scale, bias, out, default_gemm_config(m, n, k, block))


def _fp8_gemm_fake(x: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight.shape[0]), dtype=out_dtype)


fp8_gemm = register_op("fp8_gemm", launcher=fp8_gemm_triton, reference=fp8_gemm_ref, fake=_fp8_gemm_fake)
