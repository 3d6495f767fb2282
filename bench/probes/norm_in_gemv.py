"""Does the residual add + RMS norm (+ FP8 quantization) inside the one-row GEMV
(kernels/add_rms_norm_gemv.py) beat the two kernels a batch-1 decode layer runs today
(fused_add_rms_norm + linear's GEMV in bf16; fused_add_rms_norm_quant_fp8 + fp8_gemm in FP8),
and which config? (CUDA, sm_89+ for the FP8 rows)

    PYTHONPATH=$PWD python bench/probes/norm_in_gemv.py [--quick]

Llama-3.1-8B's two norm-fed shapes (qkv 6144 x 4096, gate_up 28672 x 4096), one bf16 row x and
its residual. Each path checked against the other first (relative error of y; s compared
exactly), then timed as 32 back-to-back calls in one CUDA graph, each with its own weight (as a
decode step runs them), median of do_bench_cudagraph, µs a call. Every config is swept on qkv;
gate_up takes the four fastest and the default. GB/s = weight bytes / time. Table last.
"""
import argparse
import itertools

import torch
from triton.testing import do_bench_cudagraph

from bench.report import copy_ceiling_tbs, markdown, report
from trtllm.kernels.add_rms_norm_gemv import ONE_ROW, NormGemvConfig, add_rms_norm_gemv
from trtllm.kernels.fp8_gemm import FP8_DTYPE, fp8_gemm
from trtllm.kernels.linear import linear
from trtllm.kernels.rms_norm import fused_add_rms_norm
from trtllm.kernels.rms_norm_quant_fp8 import fused_add_rms_norm_quant_fp8

SHAPES = {"qkv": (6144, 4096), "gate_up": (28672, 4096)}
CALLS = 32
EPS = 1e-5
CONFIGS = [NormGemvConfig(b, w, p, f) for f, b, w, p in itertools.product((False, True), (1, 2, 4), (4, 8), (0, 4, 8))]


def weights_of(n, k, fp8):
    if fp8:
        ws = [(torch.randn(n, k, device="cuda") * 50).clamp(-448, 448).to(FP8_DTYPE) for _ in range(CALLS)]
        return ws, [torch.rand(n, 1, device="cuda") * 0.01 + 0.001 for _ in range(CALLS)]
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5 for _ in range(CALLS)], [None] * CALLS


def two_ops(x, r, nw, weights, scales):
    for w, ws in zip(weights, scales):
        if ws is None:
            normed, _ = fused_add_rms_norm(x, r, nw, EPS)
            linear(normed, w, None)
        else:
            xq, xs, _ = fused_add_rms_norm_quant_fp8(x, r, nw, EPS)
            fp8_gemm(xq, w, xs, ws, None, torch.bfloat16)


def fused(x, r, nw, weights, scales, config):
    out = torch.empty(1, weights[0].shape[0], device="cuda", dtype=torch.bfloat16)
    for w, ws in zip(weights, scales):
        add_rms_norm_gemv(x, r, nw, EPS, False, w, None, out, weight_scale=ws, config=config)


def check(x, r, nw, w, ws, config) -> float:
    """||fused - two ops|| / ||two ops|| of y (fp32 outputs); s must be equal."""
    out = torch.empty(1, w.shape[0], device="cuda", dtype=torch.float32)
    y, s = add_rms_norm_gemv(x, r, nw, EPS, False, w, None, out, weight_scale=ws, config=config)
    if ws is None:
        normed, summed = fused_add_rms_norm(x, r, nw, EPS)
        want = normed.float() @ w.float().t()
    else:
        xq, xs, summed = fused_add_rms_norm_quant_fp8(x, r, nw, EPS)
        want = fp8_gemm(xq, w, xs, ws, None, torch.float32)
    assert torch.equal(s, summed), "s differs from fused_add_rms_norm's"
    return ((y - want).norm() / want.norm()).item()


def time_us(f) -> float:
    return do_bench_cudagraph(f) * 1e3 / CALLS


def sweep(name: str, fp8: bool, configs: list[NormGemvConfig], ceiling: float, rows: list) -> list:
    """Time the two kernels and each config on one shape; append the table rows; (us, config) sorted."""
    n, k = SHAPES[name]
    weights, scales = weights_of(n, k, fp8)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    r = torch.randn(1, k, device="cuda", dtype=torch.bfloat16) * 3
    nw = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    nbytes = n * k * weights[0].element_size()

    def row(path, us, err=""):
        rows.append({"shape": f"{name} {n}x{k}", "weights": "fp8" if fp8 else "bf16", "path": path, "rel err": err,
                     "us a call": f"{us:.2f}", "GB/s": f"{nbytes / us / 1e3:.0f}", "copy GB/s": f"{ceiling * 1e3:.0f}"})

    base = time_us(lambda: two_ops(x, r, nw, weights, scales))
    row("two kernels (today)", base)
    timed = []
    for config in configs:
        err = check(x, r, nw, weights[0], scales[0], config)
        us = time_us(lambda c=config: fused(x, r, nw, weights, scales, c))
        timed.append((us, config))
        row(f"fused {tuple(config)}" + (" (default)" if config == ONE_ROW else ""), us, f"{err:.1e}")
    timed.sort()
    print(f"{'fp8' if fp8 else 'bf16'} {name}: two kernels {base:.2f} us; best fused {timed[0][0]:.2f} us "
          f"{tuple(timed[0][1])}", flush=True)
    return timed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="the default config and four others only")
    args = parser.parse_args()
    configs = CONFIGS[:: len(CONFIGS) // 4] + [ONE_ROW] if args.quick else CONFIGS
    ceiling = copy_ceiling_tbs()
    rows: list = []
    for fp8 in (True, False):
        timed = sweep("qkv", fp8, configs, ceiling, rows)
        best = [c for _, c in timed[:4]]
        sweep("gate_up", fp8, best + ([ONE_ROW] if ONE_ROW not in best else []), ceiling, rows)
        torch.cuda.empty_cache()
    report("norm_in_gemv", "## Residual add + RMS norm inside the one-row GEMV vs the two kernels\n" + markdown(rows),
           {"rows": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
