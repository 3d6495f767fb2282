"""SwiGLU activation: the gated half of a Llama MLP.

    silu_mul(gate, up) = silu(gate) * up = gate * sigmoid(gate) * up

Shapes: gate, up [..., N] of one dtype (fp32/fp16/bf16), leading dims with any strides,
last dim contiguous: typically the two halves of one fused [M, 2N] gate_up projection.
Output [..., N], contiguous, gate.dtype. Computed in fp32 and rounded once (HF's
`act_fn(gate_proj(x)) * up_proj(x)` rounds the silu and the product separately).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from trtllm.kernels.pdl import pdl_options, wait_for_previous
from trtllm.kernels.registry import interpreter_upcast, register_op


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype).contiguous()


@triton.jit
def _silu_mul_kernel(
    gate_ptr, up_ptr, out_ptr,
    n_cols,
    gate_row_stride, up_row_stride, out_row_stride,
    BLOCK_N: tl.constexpr,
    PDL: tl.constexpr = False,     # kernels/pdl.py
):
    wait_for_previous(PDL)
    # Grid: (rows, column blocks). No reduction, so a row need not fit one block.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * out_row_stride + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _as_rows(t: torch.Tensor, name: str) -> torch.Tensor:
    """[..., N] -> [M, N] with a row stride; a view unless the leading dims can't be merged."""
    assert t.stride(-1) == 1 or t.shape[-1] == 1, f"{name}: last dim must be contiguous"
    return t.reshape(-1, t.shape[-1])


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    assert gate.shape == up.shape, f"gate {tuple(gate.shape)} != up {tuple(up.shape)}"
    assert gate.dtype == up.dtype and gate.device == up.device
    assert gate.dtype in (torch.float32, torch.float16, torch.bfloat16), gate.dtype
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    n_cols = gate.shape[-1]
    gate_rows, up_rows, out_rows = _as_rows(gate, "gate"), _as_rows(up, "up"), out.view(-1, n_cols)
    BLOCK_N = min(triton.next_power_of_2(n_cols), 2048)
    with interpreter_upcast((gate_rows, up_rows), (out_rows,)) as ((gate_rows, up_rows), (out_rows,)):
        _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(n_cols, BLOCK_N))](
            gate_rows, up_rows, out_rows,
            n_cols,
            gate_rows.stride(0), up_rows.stride(0), out_rows.stride(0),
            BLOCK_N=BLOCK_N,
            num_warps=4 if BLOCK_N <= 1024 else 8, **pdl_options(gate_rows),
        )
    return out


def _silu_mul_fake(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return gate.new_empty(gate.shape)


silu_mul = register_op("silu_mul", launcher=silu_mul_triton, reference=silu_mul_ref, fake=_silu_mul_fake)
