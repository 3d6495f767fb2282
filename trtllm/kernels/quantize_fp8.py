"""Dynamic FP8 (e4m3) quantization of activations, per token or per token-group.

    scale[m, g] = max(amax(|x[m, group g]|), MIN_AMAX) / 448
    x_fp8[m, k] = clamp(x[m, k] / scale[m, k // group_size], -448, 448).to(float8_e4m3fn)

so that x ~ x_fp8 * scale (the multiplier kernels/fp8_gemm.py takes as x_scale). Shapes:
x [M, K] (fp32/fp16/bf16, last dim contiguous, any row stride); group_size None: one
group per row, scale [M, 1] (per-token, for per-channel or per-tensor weights);
group_size G (a power of 2 >= 16; 128 for DeepSeek-V3 / Qwen3-FP8 block weights): scale
[M, ceil(K/G)], the last group of a row possibly partial. Outputs contiguous: x_fp8
[M, K] float8_e4m3fn, scale fp32.

The amax is taken of x as given (no rounding before it) in fp32; a group of zeros gets the
scale MIN_AMAX / 448 and quantizes to zeros (no division by zero). The kernel divides with
round-to-nearest (tl.math.div_rn, as torch does) and casts to e4m3 rounding to nearest-even,
so it matches the reference up to a rare 1-ulp flip at a tie of the two (the sm_90 build
checked to use div.rn.f32 and cvt.rn.satfinite.e4m3x2.f32, tools/dump_sass.py's compile).

One program per row: the row as a [BLOCK_G, GROUP] tile (BLOCK_G groups padded to a power
of 2), amax along the group axis. Rows up to 65536 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.registry import interpreter_upcast, register_op, row_num_warps

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
MIN_AMAX = 1e-12  # the amax of an all-zero group, so its scale is not 0
_IN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_fp8_gpu(device: torch.device, op: str) -> None:
    """Refuse, by name, a CUDA device without FP8: Triton builds e4m3 casts and tl.dot on e4m3
    only for sm_89+ (every FP8 op calls this before it launches)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RuntimeError(
            f"{op}: FP8 (e4m3) ops need a GPU with FP8 tensor cores (sm_89+: Ada, Hopper, "
            f"Blackwell); {torch.cuda.get_device_name(device)} is sm_{major}{minor}")


def _check(x: torch.Tensor, group_size: int | None) -> None:
    assert x.dtype in _IN_DTYPES, f"x: dtype {x.dtype}, expected one of {_IN_DTYPES}"
    assert x.dim() == 2, f"x: {tuple(x.shape)} is not an [M, K] matrix"
    if group_size is not None:
        assert group_size >= 16 and group_size & (group_size - 1) == 0, \
            f"group_size {group_size}: expected a power of 2 >= 16 (or None for per-token)"


def quantize_fp8_ref(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, group_size)
    m, k = x.shape
    g = k if group_size is None else group_size
    n_groups = 1 if group_size is None else triton.cdiv(k, g)
    xf = torch.nn.functional.pad(x.float(), (0, n_groups * g - k)).view(m, n_groups, g)
    amax = xf.abs().amax(dim=-1, keepdim=True) if k else torch.zeros(m, n_groups, 1)
    scale = amax.clamp(min=MIN_AMAX) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).view(m, n_groups * g)[:, :k]
    return q.to(FP8_DTYPE).contiguous(), scale.view(m, n_groups).contiguous()


@triton.jit
def store_fp8_groups(y, q_row_ptr, s_row_ptr, cols, mask, N_GROUPS,
                     MIN_AMAX: tl.constexpr, FP8_MAX: tl.constexpr, BLOCK_G: tl.constexpr):
    """Quantize one row held as an fp32 [BLOCK_G, GROUP] tile y (group g's elements in row g
    of the tile, `cols` their columns, `mask` the real ones: masked elements must be 0) and
    store it: e4m3 values at q_row_ptr + cols, the BLOCK_G group scales at s_row_ptr. The
    formula of the module docstring; kernels that fuse a producer with the quantization
    (rms_norm_quant_fp8, silu_mul_quant_fp8) call it on their output tile."""
    groups = tl.arange(0, BLOCK_G)
    amax = tl.max(tl.abs(y), axis=1)                                  # [BLOCK_G]
    # div_rn: the IEEE quotient torch computes (a plain `/` compiles to div.full.f32, ~2 ulp)
    scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), tl.full([BLOCK_G], FP8_MAX, tl.float32))
    q = tl.math.div_rn(y, scale[:, None])
    q = tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX)
    tl.store(q_row_ptr + cols, q.to(q_row_ptr.dtype.element_ty), mask=mask)
    tl.store(s_row_ptr + groups, scale, mask=groups < N_GROUPS)


@triton.jit
def _quantize_fp8_kernel(
    x_ptr, q_ptr, s_ptr,
    K, N_GROUPS,
    x_row_stride, q_row_stride, s_row_stride,
    MIN_AMAX: tl.constexpr,
    FP8_MAX: tl.constexpr,
    GROUP: tl.constexpr,     # elements per group (per-token: K padded to a power of 2)
    BLOCK_G: tl.constexpr,   # groups per row, padded to a power of 2
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    row = tl.program_id(0).to(tl.int64)
    groups = tl.arange(0, BLOCK_G)
    cols = groups[:, None] * GROUP + tl.arange(0, GROUP)[None, :]   # [BLOCK_G, GROUP]
    mask = cols < K
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    store_fp8_groups(x, q_ptr + row * q_row_stride, s_ptr + row * s_row_stride, cols, mask, N_GROUPS,
                     MIN_AMAX, FP8_MAX, BLOCK_G)


def quantize_fp8_triton(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, group_size)
    assert x.stride(1) == 1 or x.shape[1] <= 1, "x: last dim must be contiguous"
    m, k = x.shape
    assert k <= 65536, f"x: rows of {k} elements; one row must fit one program (65536)"
    group = triton.next_power_of_2(k) if group_size is None else group_size
    n_groups = 1 if group_size is None else triton.cdiv(k, group)
    require_fp8_gpu(x.device, "quantize_fp8")
    q = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    scale = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    if k == 0:
        return q, scale.fill_(MIN_AMAX / FP8_MAX)
    num_warps = row_num_warps(k, 1024, lo=1)
    # Interpreted, q is an fp32 copy rounded to e4m3 by torch (registry.interpreter_upcast).
    with interpreter_upcast((x,), (q,)) as ((x,), (q_k,)):
        _quantize_fp8_kernel[(m,)](
            x, q_k, scale,
            k, n_groups,
            x.stride(0), q_k.stride(0), scale.stride(0),
            MIN_AMAX=MIN_AMAX, FP8_MAX=FP8_MAX,
            GROUP=group, BLOCK_G=triton.next_power_of_2(n_groups),
            num_warps=num_warps, **pdl_options(x),
        )
    return q, scale


def _quantize_fp8_fake(x: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    n_groups = 1 if group_size is None else -(-x.shape[1] // group_size)
    return (x.new_empty(x.shape, dtype=FP8_DTYPE),
            x.new_empty((x.shape[0], n_groups), dtype=torch.float32))


quantize_fp8 = register_op("quantize_fp8", launcher=quantize_fp8_triton, reference=quantize_fp8_ref,
                           fake=_quantize_fp8_fake)
