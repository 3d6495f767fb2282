"""Does the one-row FP8 GEMV that quantizes its own input (kernels/quantize_fp8_gemm.py) beat
quantize_fp8 followed by fp8_gemm's GEMV? And for down, silu_mul_fp8_gemm (SiLU·mul spread over
programs, then that GEMV) against silu_mul_quant_fp8 + fp8_gemm? (CUDA, sm_89+)

    PYTHONPATH=$PWD python bench/probes/quantize_in_gemv.py

Per Llama-3.1-8B shape (per-channel weights, one bf16 row x): both paths checked against each
other first (relative error of the fused output, fp32), then timed as 32 back-to-back calls in
one CUDA graph, each with its own weight (as a decode step runs them: each call's launch and
ramp included), median of do_bench_cudagraph, reported per call. GB/s = fp8 weight bytes /
time; the copy ceiling beside. Table last.
"""
import torch
from triton.testing import do_bench_cudagraph

from bench.report import copy_ceiling_tbs, markdown, report
from trtllm.kernels.fp8_gemm import FP8_DTYPE, fp8_gemm
from trtllm.kernels.quantize_fp8 import quantize_fp8
from trtllm.kernels.quantize_fp8_gemm import quantize_fp8_gemm
from trtllm.kernels.silu_mul_fp8_gemm import silu_mul_fp8_gemm
from trtllm.kernels.silu_mul_quant_fp8 import silu_mul_quant_fp8

SHAPES = {"o_proj": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
CALLS = 32  # one a layer; each call its own weight (no L2 reuse between calls)


def two_ops(x, weights, scales):
    for w, ws in zip(weights, scales):
        xq, xs = quantize_fp8(x, None)
        fp8_gemm(xq, w, xs, ws, None, torch.bfloat16)


def fused(x, weights, scales):
    for w, ws in zip(weights, scales):
        quantize_fp8_gemm(x, w, ws, None, torch.bfloat16)


def silu_two_ops(gate, up, weights, scales):
    for w, ws in zip(weights, scales):
        hq, hs = silu_mul_quant_fp8(gate, up, None)
        fp8_gemm(hq, w, hs, ws, None, torch.bfloat16)


def silu_fused(gate, up, weights, scales):
    for w, ws in zip(weights, scales):
        silu_mul_fp8_gemm(gate, up, w, ws, None, torch.bfloat16)


def main() -> None:
    ceiling = copy_ceiling_tbs()
    rows = []
    for name, (n, k) in SHAPES.items():
        weights = [(torch.randn(n, k, device="cuda") * 50).clamp(-448, 448).to(FP8_DTYPE) for _ in range(CALLS)]
        scales = [torch.rand(n, 1, device="cuda") * 0.01 + 0.001 for _ in range(CALLS)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3
        xq, xs = quantize_fp8(x, None)
        want = fp8_gemm(xq, weights[0], xs, scales[0], None, torch.float32)
        got = quantize_fp8_gemm(x, weights[0], scales[0], None, torch.float32)
        rel = ((got - want).norm() / want.norm()).item()
        for path, f in (("quantize_fp8 + fp8_gemm", two_ops), ("quantize_fp8_gemm", fused)):
            us = do_bench_cudagraph(lambda f=f, a=(x, weights, scales): f(*a)) * 1e3 / CALLS
            rows.append({"shape": f"{name} {n}x{k}", "path": path, "rel err vs two ops": f"{rel:.1e}",
                         "us a call": f"{us:.2f}", "GB/s": f"{n * k / us / 1e3:.0f}",
                         "copy GB/s": f"{ceiling * 1e3:.0f}"})
    n, k = SHAPES["down"]
    weights = [(torch.randn(n, k, device="cuda") * 50).clamp(-448, 448).to(FP8_DTYPE) for _ in range(CALLS)]
    scales = [torch.rand(n, 1, device="cuda") * 0.01 + 0.001 for _ in range(CALLS)]
    gate, up = (torch.randn(1, 2 * k, device="cuda") * 3).to(torch.bfloat16).chunk(2, dim=1)
    hq, hs = silu_mul_quant_fp8(gate, up, None)
    want = fp8_gemm(hq, weights[0], hs, scales[0], None, torch.float32)
    got = silu_mul_fp8_gemm(gate, up, weights[0], scales[0], None, torch.float32)
    rel = ((got - want).norm() / want.norm()).item()
    for path, f in (("silu_mul_quant_fp8 + fp8_gemm", silu_two_ops), ("silu_mul_fp8_gemm", silu_fused)):
        us = do_bench_cudagraph(lambda f=f, a=(gate, up, weights, scales): f(*a)) * 1e3 / CALLS
        rows.append({"shape": f"down (SiLU·mul) {n}x{k}", "path": path, "rel err vs two ops": f"{rel:.1e}",
                     "us a call": f"{us:.2f}", "GB/s": f"{n * k / us / 1e3:.0f}", "copy GB/s": f"{ceiling * 1e3:.0f}"})
    report("quantize_in_gemv", "## One-row FP8 GEMV quantizing its input vs quantize_fp8 + fp8_gemm\n" + markdown(rows),
           {"rows": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
