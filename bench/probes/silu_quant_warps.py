"""How many warps should kernels/silu_mul_quant_fp8.py give a row? (CUDA, sm_89+)

    PYTHONPATH=$PWD python bench/probes/silu_quant_warps.py

The FP8 prefill of 2,048 tokens spent 2.39 ms in this kernel (H100 profile, e79af1e, 32 layers
of [2048, 14336] bf16 gate and up): ~59% of the copy rate for the bytes it moves. It keeps a
whole row (padded to 16,384) in registers, row_num_warps(14336, 1024) = 16 warps. For M in
(1, 256, 2048) rows of Llama-3.1-8B's 14,336, per token, this times the kernel at 2-32 warps
(do_bench_cudagraph, median), each checked bit for bit against the default's output first.
GB/s = (gate + up read, fp8 + scales written) / time; the copy ceiling beside. Table last.
"""
import torch
import triton
from triton.testing import do_bench_cudagraph

from bench.report import copy_ceiling_tbs, markdown, report
from trtllm.kernels import silu_mul_quant_fp8 as k

N = 14336
ROWS = (1, 256, 2048)
WARPS = (2, 4, 8, 16, 32)


def launch(gate, up, warps):
    m, n = gate.shape
    q = torch.empty((m, n), dtype=k.FP8_DTYPE, device=gate.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=gate.device)
    k._silu_mul_quant_fp8_kernel[(m,)](gate, up, q, scale, n, 1, gate.stride(0), up.stride(0), q.stride(0),
                                       scale.stride(0), MIN_AMAX=k.MIN_AMAX, FP8_MAX=k.FP8_MAX,
                                       GROUP=triton.next_power_of_2(n), BLOCK_G=1, num_warps=warps)
    return q, scale


def main() -> None:
    ceiling = copy_ceiling_tbs()
    rows = []
    for m in ROWS:
        gate_up = torch.randn(m, 2 * N, device="cuda", dtype=torch.bfloat16) * 3
        gate, up = gate_up[:, :N], gate_up[:, N:]
        want = k.silu_mul_quant_fp8(gate, up)
        default = k.row_num_warps(N, 1024, lo=1)
        for warps in WARPS:
            q, s = launch(gate, up, warps)
            same = torch.equal(q.view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(s, want[1])
            ms = do_bench_cudagraph(lambda g=gate, u=up, w=warps: launch(g, u, w)) if same else float("nan")
            moved = m * N * (2 * 2 + 1) + m * 4
            rows.append({"rows": m, "warps": f"{warps}{' (default)' if warps == default else ''}",
                         "same bits": same, "us": f"{ms * 1e3:.1f}", "GB/s": f"{moved / ms / 1e6:.0f}",
                         "copy GB/s": f"{ceiling * 1e3:.0f}"})
    report("silu_quant_warps", "## silu_mul_quant_fp8 warps, N = 14,336 per token\n" + markdown(rows),
           {"rows": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
