"""FP8 GEMMs (kernels/fp8_gemm.py) vs torch._scaled_mm and the bf16 torch.matmul.

    PYTHONPATH=$PWD python3 bench/bench_fp8_gemm.py            # H100/H200 (sm_89+)
    PYTHONPATH=$PWD python3 bench/bench_fp8_gemm.py --smoke    # CPU: interpreter, tiny shapes

Llama-3.1-8B shapes y[M, N] = x[M, K] @ W[N, K]^T: qkv 6144x4096, o_proj 4096x4096,
gate_up 28672x4096, down 4096x14336; scales per-tensor, per-token x per-channel, and
128x128 blocks with 1x128 activation groups (kernels/fp8_gemm.py's table).

1. Correctness first, every shape, M and granularity: ||y - ref|| / ||ref|| against
   fp8_gemm_ref (fp32) of the same fp8 inputs and scales, and against torch._scaled_mm
   where it takes those scales (per-tensor; per-token x per-channel as "rowwise");
   exit 1 if any is above MAX_REL_ERR, before anything is timed.
2. Large M (a batch-256 decode step and prefill, M in LARGE_MS): TFLOP/s = 2 M N K / time,
   CUDA-graph replays (triton.testing.do_bench_cudagraph), for the op (which hands these rows
   to _scaled_mm on sm_90 where it takes the scales), the tiled Triton kernel alone
   (fp8_gemm_tiles, the op's default config), _scaled_mm with the same scales, and the bf16
   torch.matmul of the same shape.
3. Small M (decode, M <= 16, the weight-streaming kernel): weight GB/s = weight bytes /
   time, each call on a different copy of the weight (COPIES of them, more than the L2)
   inside one CUDA graph; the same for _scaled_mm and bf16 (which reads twice the bytes:
   its GB/s counts its own bf16 weight); a 1 GiB device-to-device copy's GB/s
   (bench/report.py copy_ceiling_tbs) is the ceiling, of_copy the fraction of it.
Table last, also written to $OUT/bench_fp8_gemm.{md,json} (bench/report.py).

--smoke runs step 1 on CPU under TRITON_INTERPRET=1 with tiny shapes (no _scaled_mm on
CPU: its columns say "n/a") and skips the timing.
"""
import os
import sys

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: @triton.jit reads it when a kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

from bench.report import copy_ceiling_tbs, markdown, report  # noqa: E402
from trtllm.kernels.fp8_gemm import (  # noqa: E402
    FP8_DTYPE,
    FP8_MAX,
    fp8_gemm,
    fp8_gemm_ref,
    fp8_gemm_tiles,
)
from trtllm.kernels.fp8_gemm_configs import default_gemm_config  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LARGE_MS = (256, 2048, 8192)
SMALL_MS = (1, 4, 16)
GRANULARITIES = ("tensor", "token_channel", "block")
MAX_REL_ERR = 5e-3   # bf16 output of an fp32-accumulated GEMM
WEIGHT_BUDGET = 2e9  # bytes of fp8 weight copies per shape for the small-M timing (L2: 50-60 MB)
DEVICE = "cpu" if SMOKE else "cuda"
if SMOKE:
    SHAPES = {"qkv": (96, 64), "down": (64, 160)}
    LARGE_MS = (20,)
    SMALL_MS = (1, 3)


def cdiv(a, b):
    return -(-a // b)


def make(m, n, k, granularity):
    x = (torch.randn(m, k, device=DEVICE) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    w = (torch.randn(n, k, device=DEVICE) * 100).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    shapes = {"tensor": ((1,), (1,)), "token_channel": ((m, 1), (n, 1)),
              "block": ((m, cdiv(k, 128)), (cdiv(n, 128), cdiv(k, 128)))}[granularity]
    xs, ws = (torch.rand(*s, device=DEVICE) * 0.002 + 0.0005 for s in shapes)
    return x, w, xs, ws


def scaled_mm(x, w, xs, ws, granularity):
    """torch._scaled_mm with the same scales, or None where it does not take them."""
    if DEVICE == "cpu" or granularity == "block":
        return None
    if granularity == "tensor":
        return lambda: torch._scaled_mm(x, w.t(), xs.reshape(()), ws.reshape(()), out_dtype=torch.bfloat16)
    return lambda: torch._scaled_mm(x, w.t(), xs, ws.t(), out_dtype=torch.bfloat16)


def rel_err(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def check() -> list[dict]:
    rows, bad = [], []
    for name, (n, k) in SHAPES.items():
        for m in (*SMALL_MS, *LARGE_MS):
            for g in GRANULARITIES:
                x, w, xs, ws = make(m, n, k, g)
                y = fp8_gemm(x, w, xs, ws)
                err = rel_err(y, fp8_gemm_ref(x, w, xs, ws))
                peer = scaled_mm(x, w, xs, ws, g)
                err_peer = rel_err(y, peer()) if peer else None
                row = dict(shape=name, m=m, scales=g, rel_err_ref=f"{err:.1e}",
                           rel_err_scaled_mm=f"{err_peer:.1e}" if peer else "n/a")
                rows.append(row)
                if err > MAX_REL_ERR or (err_peer is not None and err_peer > MAX_REL_ERR):
                    bad.append(row)
                print(row, flush=True)
    if bad:
        print(f"FAILED correctness (max rel. err {MAX_REL_ERR}):", *bad, sep="\n")
        sys.exit(1)
    return rows


def time_graph(fn) -> float:
    """Seconds per call of fn, replayed in a CUDA graph."""
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e-3


def time_calls(fn, calls: list[tuple]) -> float:
    """Seconds for fn(*args) over every args in `calls`, one after another in one graph."""
    return time_graph(lambda: [fn(*args) for args in calls])


def bf16_matmul(x, w):
    return torch.matmul(x, w.t())


def large(rows: list[dict]) -> None:
    for name, (n, k) in SHAPES.items():
        for m in LARGE_MS:
            flop = 2 * m * n * k
            xb, wb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16), \
                torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            bf16 = flop / time_calls(bf16_matmul, [(xb, wb)]) / 1e12
            for g in GRANULARITIES:
                x, w, xs, ws = make(m, n, k, g)
                ours = flop / time_calls(fp8_gemm, [(x, w, xs, ws)]) / 1e12
                out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                config = default_gemm_config(m, n, k, g == "block")
                tiles = flop / time_calls(fp8_gemm_tiles, [(x, w, xs, ws, None, out, config)]) / 1e12
                peer = scaled_mm(x, w, xs, ws, g)
                theirs = flop / time_graph(peer) / 1e12 if peer else None
                rows.append(dict(regime="large M", shape=name, m=m, scales=g, trtllm_tflops=f"{ours:.0f}",
                                 triton_tiles_tflops=f"{tiles:.0f}",
                                 scaled_mm_tflops=f"{theirs:.0f}" if theirs else "n/a",
                                 bf16_matmul_tflops=f"{bf16:.0f}",
                                 vs_scaled_mm=f"{ours / theirs:.2f}" if theirs else "n/a",
                                 tiles_vs_scaled_mm=f"{tiles / theirs:.2f}" if theirs else "n/a"))
                print(rows[-1], flush=True)


def small(rows: list[dict]) -> None:
    copy_gbs = copy_ceiling_tbs() * 1e3
    print(f"device copy (bench/report.py): {copy_gbs:.0f} GB/s (read + write)")
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(64, int(WEIGHT_BUDGET // (n * k))))
        for m in SMALL_MS:
            xb = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            wbs = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies // 2)]
            bf16 = 2 * n * k * len(wbs) / time_calls(bf16_matmul, [(xb, wb) for wb in wbs]) / 1e9
            del wbs
            for g in ("tensor", "token_channel", "block"):
                x, w, xs, ws = make(m, n, k, g)
                ws_all = [w] + [torch.empty_like(w).copy_(w) for _ in range(copies - 1)]
                ours = n * k * copies / time_calls(fp8_gemm, [(x, wi, xs, ws) for wi in ws_all]) / 1e9
                peers = [(scaled_mm(x, wi, xs, ws, g),) for wi in ws_all]
                theirs = (n * k * copies / time_calls(lambda p: p(), peers) / 1e9) if peers[0][0] else None
                rows.append(dict(regime="small M", shape=name, m=m, scales=g, trtllm_weight_gbs=f"{ours:.0f}",
                                 scaled_mm_weight_gbs=f"{theirs:.0f}" if theirs else "n/a",
                                 bf16_matmul_weight_gbs=f"{bf16:.0f}",
                                 of_copy=f"{ours / copy_gbs:.0%}"))
                print(rows[-1], flush=True)
                del ws_all, peers


def main() -> None:
    torch.manual_seed(0)
    if DEVICE == "cuda":
        major, minor = torch.cuda.get_device_capability()
        assert (major, minor) >= (8, 9), f"FP8 GEMMs need sm_89+, this GPU is sm_{major}{minor}"
        print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}")
    rows = check()
    if SMOKE:
        report("bench_fp8_gemm", "FP8 GEMM correctness (--smoke, CPU interpreter)\n" + markdown(rows),
               dict(correctness=rows))
        return
    timed: list[dict] = []
    large(timed)
    small(timed)
    report("bench_fp8_gemm", "FP8 GEMM vs torch._scaled_mm and the bf16 matmul\n" + markdown(timed),
           dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                correctness=rows, timing=timed))


if __name__ == "__main__":
    main()
