"""Which configs should kernels/fp8_gemm.py use on this GPU? (CUDA, sm_89+)

    PYTHONPATH=$PWD python bench/probes/fp8_gemm_tune.py [--budget SECONDS]

The untuned defaults left the decode kernel at 41-59% of the copy bandwidth on the N = 4096
and 6144 shapes (64 features a program: 64-96 programs for 132 SMs) and the tiled kernel at
0.69-0.78x torch._scaled_mm (bench_fp8_gemm.py, H200, 2026-12-02). For each Llama-3.1-8B
shape this times candidate configs through the launchers that take a config
(fp8_gemv, fp8_gemm_tiles):

- decode (M = 1 and 16): weight GB/s, each call on its own weight copy inside one CUDA
  graph (more copies than the L2 holds), per-tensor scales and 128x128 block scales;
- prefill (M = 4096): TFLOP/s of one call replayed in a CUDA graph, beside _scaled_mm
  (per-tensor scales) of the same inputs.

Each config is checked against fp8_gemm_ref on the shape before it is timed (a config that
fails or does not compile is dropped, named). Prints the best config per (shape, regime,
scales) and the copy ceiling; table last, JSON under $OUT.
"""
import argparse
import functools
import itertools
import time

import torch
import triton

from bench.report import copy_ceiling_tbs, markdown, report
from trtllm.kernels.fp8_gemm import (
    FP8_DTYPE,
    FP8_MAX,
    fp8_gemm_ref,
    fp8_gemm_tiles,
    fp8_gemv,
)
from trtllm.kernels.fp8_gemm_configs import Fp8GemmConfig, Fp8GemvConfig, default_gemm_config, default_gemv_config

# the shapes the defaults served worst first: a spent budget cuts the last ones
SHAPES = {"o_proj": (4096, 4096), "qkv": (6144, 4096), "down": (4096, 14336), "gate_up": (28672, 4096)}
GEMV_CONFIGS = [Fp8GemvConfig(bn, bk, w, s) for bn, bk, w, s in
                itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4, 6))]
GEMM_CONFIGS = [Fp8GemmConfig(*c) for c in (
    (128, 128, 128, 8, 8, 4), (128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 4),
    (128, 128, 128, 8, 4, 4), (128, 128, 64, 8, 4, 5), (64, 256, 128, 8, 4, 4), (128, 256, 128, 8, 8, 4))]
PREFILL_M = 4096
WEIGHT_BUDGET = 1.5e9
MAX_REL_ERR = 5e-3


def make(m, n, k, block):
    x = (torch.randn(m, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w = (torch.randn(n, k, device="cuda") * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    if block:
        xs = torch.rand(m, triton.cdiv(k, 128), device="cuda") * 0.002 + 0.0005
        ws = torch.rand(triton.cdiv(n, 128), triton.cdiv(k, 128), device="cuda") * 0.002 + 0.0005
    else:
        xs, ws = (torch.rand(1, device="cuda") * 0.002 + 0.0005 for _ in range(2))
    return x, w, xs, ws


def correct(launch, x, w, xs, ws) -> bool:
    out = torch.empty(x.shape[0], w.shape[0], device="cuda", dtype=torch.bfloat16)
    y = launch(x, w, xs, ws, None, out).float()
    ref = fp8_gemm_ref(x, w, xs, ws).float()
    return ((y - ref).norm() / ref.norm()).item() < MAX_REL_ERR


def time_graph(fn) -> float:
    return triton.testing.do_bench_cudagraph(fn, rep=60) * 1e-3


def time_gemv(cfg, x, weights, xs, ws, out) -> float:
    return time_graph(lambda: [fp8_gemv(x, wi, xs, ws, None, out, cfg) for wi in weights])


def time_tiles(cfg, x, w, xs, ws, out) -> float:
    return time_graph(lambda: fp8_gemm_tiles(x, w, xs, ws, None, out, cfg))


def time_scaled_mm(x, w, xs, ws) -> float:
    return time_graph(lambda: torch._scaled_mm(x, w.t(), xs.reshape(()), ws.reshape(()), out_dtype=torch.bfloat16))


def tune_decode(rows, deadline, copy_gbs):
    for block, (name, (n, k)) in itertools.product((False, True), SHAPES.items()):
        copies = max(2, min(64, int(WEIGHT_BUDGET // (n * k))))
        for m in (1, 16):
            x, w, xs, ws = make(m, n, k, block)
            weights = [w] + [torch.empty_like(w).copy_(w) for _ in range(copies - 1)]
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            default = default_gemv_config(m, n, k, block)
            results = []
            for cfg in [default, *GEMV_CONFIGS]:
                if time.time() > deadline:
                    break
                if block and 128 % cfg.block_k:
                    continue
                try:
                    if not correct(functools.partial(fp8_gemv, config=cfg), x, w, xs, ws):
                        print("wrong result:", name, m, cfg)
                        continue
                    t = time_gemv(cfg, x, weights, xs, ws, out)
                except Exception as e:  # a config that does not compile (shared memory) is dropped
                    print("failed:", name, m, cfg, type(e).__name__, str(e)[:120])
                    continue
                results.append((n * k * copies / t / 1e9, cfg))
            if not results:
                continue
            gbs_default = next((g for g, c in results if c == default), float("nan"))
            best_gbs, best = max(results, key=lambda r: r[0])
            rows.append(dict(regime="decode", shape=name, m=m, scales="block" if block else "tensor",
                             default_gbs=f"{gbs_default:.0f}", best_gbs=f"{best_gbs:.0f}",
                             of_copy=f"{best_gbs / copy_gbs:.0%}", best=tuple(best)))
            print(rows[-1], flush=True)
            del weights


def tune_prefill(rows, deadline):
    for (name, (n, k)), block in itertools.product(SHAPES.items(), (False, True)):
        m = PREFILL_M
        x, w, xs, ws = make(m, n, k, block)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        flop = 2 * m * n * k
        peer = None if block else flop / time_scaled_mm(x, w, xs, ws) / 1e12
        default = default_gemm_config(m, n, k, block)
        results = []
        for cfg in [default, *(c for c in GEMM_CONFIGS if c != default)]:
            if time.time() > deadline:
                break
            if block and 128 % cfg.block_k:
                continue
            try:
                if not correct(functools.partial(fp8_gemm_tiles, config=cfg), x, w, xs, ws):
                    print("wrong result:", name, m, cfg)
                    continue
                t = time_tiles(cfg, x, w, xs, ws, out)
            except Exception as e:
                print("failed:", name, m, cfg, type(e).__name__, str(e)[:120])
                continue
            results.append((flop / t / 1e12, cfg))
        if not results:
            continue
        tf_default = next((f for f, c in results if c == default), float("nan"))
        best_tf, best = max(results, key=lambda r: r[0])
        rows.append(dict(regime="prefill", shape=name, m=m, scales="block" if block else "tensor",
                         default_tflops=f"{tf_default:.0f}", best_tflops=f"{best_tf:.0f}",
                         scaled_mm_tflops=f"{peer:.0f}" if peer else "n/a",
                         best_vs_scaled_mm=f"{best_tf / peer:.2f}" if peer else "n/a", best=tuple(best)))
        print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=400, help="seconds; configs left untried past it")
    ap.add_argument("--decode-only", action="store_true",
                    help="the weight-streaming kernel only (on sm_90 _scaled_mm serves the rest but block scales)")
    args = ap.parse_args()
    torch.manual_seed(0)
    start = time.time()
    copy_gbs = copy_ceiling_tbs() * 1e3
    print(torch.cuda.get_device_name(), f"copy {copy_gbs:.0f} GB/s")
    rows = []
    tune_decode(rows, start + args.budget * (1.0 if args.decode_only else 0.6), copy_gbs)
    if not args.decode_only:
        tune_prefill(rows, start + args.budget)
    report("fp8_gemm_tune", f"FP8 GEMM configs, best of the candidates (copy {copy_gbs:.0f} GB/s)\n"
           + markdown(rows), dict(device=torch.cuda.get_device_name(), copy_gbs=copy_gbs, rows=rows))


if __name__ == "__main__":
    main()
