"""RMS norm, alone or fused with the residual add before it, with HF Llama's or Gemma's rounding.

    rms_norm(x, w, eps)              = w * (xf * rsqrt(mean(xf**2, -1) + eps)).to(x.dtype)
                                        with xf = x.float()                       (Llama)
    rms_norm(x, w, eps, True)        = ((xf * rsqrt(mean(xf**2, -1) + eps)) * (1 + w.float())).to(x.dtype)
                                                                                   (Gemma: unit_offset)
    fused_add_rms_norm(x, r, w, eps[, unit_offset]) = (rms_norm(s, w, eps[, unit_offset]), s)
                                        with s = (x + r).to(x.dtype)
    norm_add_rms_norm(x, v, r, w, eps, unit_offset) = fused_add_rms_norm(rms_norm(x, v, eps, unit_offset), r, w, eps,
                                                                         unit_offset)
                                        (Gemma-2/3's "sandwich": a block's output norm, the
                                        residual add, the next block's input norm; one eps)

Shapes: x, r [..., N] of one dtype (fp32/fp16/bf16), leading dims with any strides, last
dim contiguous; w [N] contiguous. Outputs [..., N], contiguous, in x.dtype.

Rounding, as in `LlamaRMSNorm.forward` and the decoder layer's `residual + hidden`:
the residual sum is rounded to x.dtype; the normalized value is rounded to x.dtype before
the weight multiply; the product is rounded once more. With w.dtype == x.dtype (the model
case) the product of two 16-bit floats is exact in fp32, so rounding it once to x.dtype is
bit-for-bit HF's 16-bit multiply. Gemma's (`GemmaRMSNorm`, `unit_offset=True`) stores the
weight as an offset from 1 and stays in fp32 until one rounding of the product. The kernel
keeps each rounding point.
"""
import torch
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.registry import interpreter_upcast, register_op

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:  # Gemma: (1 + w) in fp32, one rounding
        return (normed * (1.0 + weight.float())).to(x.dtype).contiguous()
    return (weight.float() * normed.to(x.dtype).float()).to(x.dtype).contiguous()


def fused_add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = (x.float() + residual.float()).to(x.dtype).contiguous()
    return rms_norm_ref(summed, weight, eps, unit_offset), summed


def norm_add_rms_norm_ref(
    x: torch.Tensor, pre_weight: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_add_rms_norm_ref(rms_norm_ref(x, pre_weight, eps, unit_offset), residual, weight, eps, unit_offset)


@triton.jit
def _normed(xf, w, n_cols, eps, dtype: tl.constexpr, UNIT_OFFSET: tl.constexpr):
    """rms_norm of fp32 rows xf [BLOCK_M, BLOCK_N] with weight w [BLOCK_N] (fp32), rounded to dtype."""
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)
    if UNIT_OFFSET:  # HF Gemma: fp32 throughout
        normed = xf * rstd[:, None]
        w = 1.0 + w
    else:  # HF Llama rounds the normalized value to x.dtype before the weight multiply.
        normed = (xf * rstd[:, None]).to(dtype).to(tl.float32)
    return (normed * w[None, :]).to(dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr, pre_weight_ptr,
    n_rows, n_cols,
    x_row_stride, residual_row_stride, out_row_stride, sum_row_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_PRE_NORM: tl.constexpr,  # x is first normed with pre_weight (norm_add_rms_norm)
    UNIT_OFFSET: tl.constexpr,  # Gemma: weight = 1 + w, the product rounded once
    BLOCK_M: tl.constexpr,  # rows per program (> 1 only for small N)
    BLOCK_N: tl.constexpr,  # next power of 2 >= n_cols: a whole row in one block
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]

    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0)
    if HAS_PRE_NORM:
        v = tl.load(pre_weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        x = _normed(x.to(tl.float32), v, n_cols, eps, x_ptr.dtype.element_ty, UNIT_OFFSET)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * residual_row_stride + cols[None, :],
                    mask=mask, other=0.0)
        # The residual stream lives in the model dtype: round the sum before normalizing it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows[:, None] * sum_row_stride + cols[None, :], x, mask=mask)

    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    out = _normed(x.to(tl.float32), w, n_cols, eps, out_ptr.dtype.element_ty, UNIT_OFFSET)
    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :], out, mask=mask)


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., N] -> [M, N] with a row stride; a view unless the leading dims can't be merged."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, f"{name}: last dim must be contiguous"
    return t.reshape(-1, t.shape[-1])


def _launch(x, residual, weight, eps, unit_offset, pre_weight=None):
    n_cols = x.shape[-1]
    assert x.dtype in _FLOAT_DTYPES, f"x: unsupported dtype {x.dtype}"
    assert weight.shape == (n_cols,), f"weight {tuple(weight.shape)} != ({n_cols},)"
    assert weight.is_contiguous() and weight.device == x.device
    if pre_weight is not None:
        assert pre_weight.shape == (n_cols,) and pre_weight.is_contiguous() and pre_weight.device == x.device, \
            f"pre_weight {tuple(pre_weight.shape)} is not a contiguous ({n_cols},) vector on {x.device}"
    assert n_cols <= 65536, "one row must fit one block"
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        assert residual.device == x.device
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else None
    if x.numel() == 0:
        return out, summed

    x_rows = _as_rows(x, "x")
    r_rows = _as_rows(residual, "residual") if residual is not None else x_rows
    out_rows = out.view(-1, n_cols)
    sum_rows = summed.view(-1, n_cols) if summed is not None else out_rows
    n_rows = x_rows.shape[0]
    BLOCK_N = triton.next_power_of_2(n_cols)
    BLOCK_M = min(max(1, 2048 // BLOCK_N), 16, triton.next_power_of_2(n_rows))
    num_warps = min(16, max(4, BLOCK_M * BLOCK_N // 512))
    # Interpreted in bf16, the kernel runs in fp32 and skips its two inner roundings to
    # x.dtype (the interpreter's casts would truncate them: registry.interpreter_upcast).
    pre = pre_weight if pre_weight is not None else weight
    with interpreter_upcast((x_rows, r_rows, weight, pre), (out_rows, sum_rows)) as \
            ((x_rows, r_rows, weight, pre), (out_rows, sum_rows)):
        _rms_norm_kernel[(triton.cdiv(n_rows, BLOCK_M),)](
            x_rows, r_rows, weight, out_rows, sum_rows, pre,
            n_rows, n_cols,
            x_rows.stride(0), r_rows.stride(0), out_rows.stride(0), sum_rows.stride(0),
            eps,
            HAS_RESIDUAL=residual is not None, HAS_PRE_NORM=pre_weight is not None, UNIT_OFFSET=unit_offset, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=num_warps, **pdl_options(x_rows),
        )
    return out, summed


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    return _launch(x, None, weight, eps, unit_offset)[0]


def fused_add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps, unit_offset)


def norm_add_rms_norm_triton(
    x: torch.Tensor, pre_weight: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _launch(x, residual, weight, eps, unit_offset, pre_weight)


def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False) -> torch.Tensor:
    return x.new_empty(x.shape)


def _fused_add_rms_norm_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, unit_offset: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


def _norm_add_rms_norm_fake(
    x: torch.Tensor, pre_weight: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape)


rms_norm = register_op(
    "rms_norm", launcher=rms_norm_triton, reference=rms_norm_ref, fake=_rms_norm_fake
)
fused_add_rms_norm = register_op(
    "fused_add_rms_norm",
    launcher=fused_add_rms_norm_triton,
    reference=fused_add_rms_norm_ref,
    fake=_fused_add_rms_norm_fake,
)
norm_add_rms_norm = register_op(
    "norm_add_rms_norm",
    launcher=norm_add_rms_norm_triton,
    reference=norm_add_rms_norm_ref,
    fake=_norm_add_rms_norm_fake,
)
