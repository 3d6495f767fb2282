"""How many warps should kernels/silu_mul_quant_fp8.py give a row? (CUDA, sm_89+)

    PYTHONPATH=$PWD python bench/probes/silu_quant_warps.py

The FP8 prefill of 2,048 tokens spent 2.39 ms in this kernel (H100 profile, e79af1e, 32 layers
of [2048, 14336] bf16 gate and up): ~59% of the copy rate for the bytes it moves. It keeps a
whole row (padded to 16,384) in registers, row_num_warps(14336, 1024) = 16 warps. For M in
(1, 256, 2048) rows of Llama-3.1-8B's 14,336, per token, this times the kernel at 4-32 warps and
the two-walk variant (_silu_mul_quant_fp8_rows_kernel: amax over BLOCK-wide steps, then the
row again from L2) at a few steps and warps (do_bench_cudagraph, median), each checked bit for
bit against the op's output first.

H100, 2026-12-06: the default (tile, 16 warps) was the fastest at every M: 72.1 us at 2,048 rows
(2,036 GB/s, 68% of copy), 10.2 at 256, 6.5 at 1; the two walks 90-101 us at 2,048 rows; fewer
or more warps 94-139 us. So the kernel stays as it is.
GB/s = (gate + up read, fp8 + scales written) / time; the copy ceiling beside. Table last.
"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

from bench.report import copy_ceiling_tbs, markdown, report
from trtllm.kernels import silu_mul_quant_fp8 as k

N = 14336
ROWS = (1, 256, 2048)
WARPS = (4, 8, 16, 32)
STEPS = ((1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16))  # the two-walk kernel: (BLOCK, warps)


@triton.jit
def _silu_mul_quant_fp8_rows_kernel(
    gate_ptr, up_ptr, q_ptr, s_ptr,
    N,
    gate_row_stride, up_row_stride, q_row_stride,
    MIN_AMAX: tl.constexpr,
    FP8_MAX: tl.constexpr,
    BLOCK: tl.constexpr,     # elements a step: the row is walked twice (amax, then quantize)
):
    """The candidate: per token, the row in BLOCK-wide steps instead of one register tile; the
    second walk reads the row back from L2. The same values and roundings as the op's kernel
    (a max is order-free), so the same bits."""
    row = tl.program_id(0).to(tl.int64)
    amax = 0.0
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = (gate * tl.sigmoid(gate) * up).to(gate_ptr.dtype.element_ty).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(y), axis=0))
    scale = tl.math.div_rn(tl.maximum(amax, MIN_AMAX), FP8_MAX)
    for start in range(0, N, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < N
        gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * up_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        y = (gate * tl.sigmoid(gate) * up).to(gate_ptr.dtype.element_ty).to(tl.float32)
        q = tl.minimum(tl.maximum(tl.math.div_rn(y, scale), -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + row * q_row_stride + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def launch(gate, up, warps):
    m, n = gate.shape
    q = torch.empty((m, n), dtype=k.FP8_DTYPE, device=gate.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=gate.device)
    k._silu_mul_quant_fp8_kernel[(m,)](gate, up, q, scale, n, 1, gate.stride(0), up.stride(0), q.stride(0),
                                       scale.stride(0), MIN_AMAX=k.MIN_AMAX, FP8_MAX=k.FP8_MAX,
                                       GROUP=triton.next_power_of_2(n), BLOCK_G=1, num_warps=warps)
    return q, scale


def launch_rows(gate, up, block, warps):
    m, n = gate.shape
    q = torch.empty((m, n), dtype=k.FP8_DTYPE, device=gate.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=gate.device)
    _silu_mul_quant_fp8_rows_kernel[(m,)](gate, up, q, scale, n, gate.stride(0), up.stride(0), q.stride(0),
                                            MIN_AMAX=k.MIN_AMAX, FP8_MAX=k.FP8_MAX, BLOCK=block, num_warps=warps)
    return q, scale


def main() -> None:
    ceiling = copy_ceiling_tbs()
    rows = []
    for m in ROWS:
        gate_up = torch.randn(m, 2 * N, device="cuda", dtype=torch.bfloat16) * 3
        gate, up = gate_up[:, :N], gate_up[:, N:]
        want = k.silu_mul_quant_fp8(gate, up)
        default = k.row_num_warps(N, 1024, lo=1)
        variants = [(f"tile, {w} warps{' (default)' if w == default else ''}", lambda g, u, w=w: launch(g, u, w))
                    for w in WARPS]
        variants += [(f"two walks, {b} a step, {w} warps", lambda g, u, b=b, w=w: launch_rows(g, u, b, w))
                     for b, w in STEPS]
        for name, f in variants:
            q, s = f(gate, up)
            same = torch.equal(q.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(s, want[1])
            ms = do_bench_cudagraph(lambda g=gate, u=up, f=f: f(g, u)) if same else float("nan")
            moved = m * N * (2 * 2 + 1) + m * 4
            rows.append({"rows": m, "kernel": name,
                         "same bits": same, "us": f"{ms * 1e3:.1f}", "GB/s": f"{moved / ms / 1e6:.0f}",
                         "copy GB/s": f"{ceiling * 1e3:.0f}"})
    report("silu_quant_warps", "## silu_mul_quant_fp8 warps, N = 14,336 per token\n" + markdown(rows),
           {"rows": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
