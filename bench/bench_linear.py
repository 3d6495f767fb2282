"""Decode GEMMs: the Triton GEMV (kernels/linear.py) vs cuBLAS (F.linear), bf16, and its tuning.

    PYTHONPATH=$PWD python3 bench/bench_linear.py            # H100, about 2 minutes
    PYTHONPATH=$PWD python3 bench/bench_linear.py --smoke    # CPU: interpreter, tiny shapes
    PYTHONPATH=$PWD python3 bench/bench_linear.py --model llama-3.2-1b --ms 1,2,4,8,16,32,64

Llama-3-8B decode shapes y[M, N] = x[M, K] @ W[N, K]^T: qkv 6144x4096, o_proj 4096x4096,
gate_up 28672x4096, down 14336 -> 4096, lm_head 128256x4096; M (tokens) in 1, 2, 4, 8, 16
(--model: the same five shapes of Llama-3.2-1B or Gemma-3-1B, or Qwen3-30B-A3B's dense linears
and router; --ms: other row counts).

1. Correctness first: every config tried, on fresh random bf16 inputs, against the fp32
   reference (`linear_ref` of the same bf16 inputs): rel. error ||y - ref|| / ||ref||
   printed (cuBLAS's beside it); exit 1 if any is above MAX_REL_ERR. One bias check per
   shape with the op's own config.
2. Timing: a CUDA graph calls the GEMM on `calls` DIFFERENT weight matrices in turn
   (up to 32, about 8 GB per shape), so every call streams its weight from HBM rather
   than the 50 MB L2; us per call = replay time / calls. cuBLAS (F.linear), the op as
   configured now (torch.ops.trtllm.linear: linear_configs' `TUNED` and `default_config`, `GEMV_MAX_M`),
   and each candidate config. TB/s = weight bytes / time; a 1 GiB device-to-device
   copy's TB/s is the ceiling.
3. A decode step's GEMMs per M: (qkv + o_proj + gate_up + down) x 32 layers + lm_head,
   in ms: cuBLAS, the op as configured, the best config everywhere, and the best of
   the two per shape (what the suggested table does).
4. The suggestion: `TUNED` entries (the best config per (N, K, M), or None where cuBLAS
   is faster) and `GEMV_MAX_M`, printed ready to paste into trtllm/kernels/linear_configs.py
   and linear.py.
5. Host cost per call outside graphs (prefill and mixed steps are not graphed): the op
   vs F.linear on a small GEMM, for the GEMV and the cuBLAS branch.
Table last; $OUT/bench_linear.{md,json}.

--smoke runs the same pipeline on CPU under TRITON_INTERPRET=1 with tiny fp16 shapes and
two configs; "timing" there is one eager pass's wall time, meaningless but exercised.
"""
import argparse
import math
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: @triton.jit reads it when a kernel is defined
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

import trtllm.kernels.linear as linear_mod  # noqa: E402
from bench.report import report  # noqa: E402
from trtllm.kernels.linear import gemv, linear_ref  # noqa: E402
from trtllm.kernels.linear_configs import GemvConfig  # noqa: E402

MODELS = {  # name: (layers, {shape: (N, K)})
    "llama-3-8b": (32, {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096),
                        "down": (4096, 14336), "lm_head": (128256, 4096)}),
    "llama-3.2-1b": (16, {"qkv": (3072, 2048), "o_proj": (2048, 2048), "gate_up": (16384, 2048),
                          "down": (2048, 8192), "lm_head": (128256, 2048)}),
    "gemma-3-1b": (26, {"qkv": (1536, 1152), "o_proj": (1152, 1024), "gate_up": (13824, 1152),
                        "down": (1152, 6912), "lm_head": (262144, 1152)}),
    # the dense linears of an MoE model (its experts are kernels/fused_moe_decode.py's)
    "qwen3-30b-a3b": (48, {"qkv": (5120, 2048), "o_proj": (2048, 4096), "router": (128, 2048),
                           "lm_head": (151936, 2048)}),
}
LAYERS, SHAPES = MODELS["llama-3-8b"]
PER_LAYER = ("qkv", "o_proj", "gate_up", "down", "router")
MS = (1, 2, 4, 8, 16)
MAX_REL_ERR = 1e-2
WEIGHT_BUDGET = 8e9  # bytes of weight copies per shape
MAX_CALLS = 32
MIN_WIN = 0.01  # a config must beat cuBLAS by 1% to be suggested over it

C = GemvConfig
CANDIDATES = [
    # CUDA-core variant (rows <= 8): no software pipelining; loads in flight come from the
    # tile size and the programs resident per SM.
    C(False, 8, 512, 4, 1), C(False, 8, 1024, 4, 1), C(False, 4, 1024, 4, 1),
    C(False, 16, 256, 4, 1), C(False, 16, 512, 8, 1), C(False, 32, 256, 8, 1),
    # tl.dot variant (rows padded to 16): W tiles through shared memory, num_stages deep.
    C(True, 16, 128, 4, 4), C(True, 16, 256, 4, 3), C(True, 16, 256, 4, 4),
    C(True, 16, 512, 4, 3), C(True, 32, 256, 4, 3), C(True, 64, 128, 4, 4),
    # small weights (1-2 B models): more, smaller programs for 132 SMs
    C(False, 4, 512, 4, 1), C(False, 2, 1024, 4, 1), C(False, 4, 256, 2, 1), C(False, 8, 256, 4, 1),
    C(False, 8, 512, 4, 3), C(True, 16, 128, 4, 3), C(True, 32, 128, 4, 4),
]

if SMOKE:
    LAYERS = 2
    SHAPES = {"qkv": (96, 64), "o_proj": (64, 64), "gate_up": (192, 64), "down": (64, 96),
              "lm_head": (256, 64)}
    MS = (1, 2, 4)
    WEIGHT_BUDGET = 4 * 256 * 64 * 2
    MAX_CALLS = 2
    CANDIDATES = [C(False, 32, 64, 4, 1), C(True, 32, 32, 4, 2)]


def fits(config: GemvConfig, m: int) -> bool:
    return (config.dot or m <= 8) and max(16, m) <= 64


def cfg_str(c) -> str:
    if c is None:
        return "cuBLAS"
    return f"{'dot' if c.dot else 'fma'} {c.block_n}x{c.block_k} w{c.num_warps} s{c.num_stages}"


def cfg_code(c) -> str:
    if c is None:
        return "None"
    return (f"GemvConfig(dot={c.dot}, block_n={c.block_n}, block_k={c.block_k}, "
            f"num_warps={c.num_warps}, num_stages={c.num_stages})")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


class Timer:
    """us per call of fn(x, weights[i]) over the weights in turn: a CUDA graph of the
    calls, replayed; on CPU (smoke) one eager pass's wall time."""

    def __init__(self, device):
        self.device = device
        self.stream = torch.cuda.Stream() if device.type == "cuda" else None

    def __call__(self, fn, x, weights) -> float:
        calls = weights.shape[0]
        if self.device.type != "cuda":
            t = time.perf_counter()
            for i in range(calls):
                fn(x, weights[i])
            return (time.perf_counter() - t) * 1e6 / calls
        with torch.cuda.stream(self.stream):  # compile, cuBLAS workspace: outside the graph
            fn(x, weights[0])
        self.stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self.stream):
            for i in range(calls):
                fn(x, weights[i])
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        reps = max(3, min(200, math.ceil(25.0 / max(start.elapsed_time(end), 1e-3))))  # ~25 ms
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        us = start.elapsed_time(end) * 1e3 / (reps * calls)
        del graph
        return us


def copy_tbs(device) -> float:
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    us = timer(lambda s, d: d.copy_(s), src, dst[None])
    return 2 * src.numel() / (us * 1e-6) / 1e12


def host_us_per_call(device, dtype) -> dict:
    """Wall time per call on the host, launches queued (tiny GEMMs: the GPU keeps up)."""
    w = torch.randn(512, 512, device=device, dtype=dtype)
    out = {}
    for m in (1, 64):  # the GEMV branch and the cuBLAS branch of the op
        x = torch.randn(m, 512, device=device, dtype=dtype)
        for name, fn in (("F.linear", F.linear), ("trtllm.linear", torch.ops.trtllm.linear)):
            n = 20 if SMOKE else 2000
            fn(x, w)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                fn(x, w)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[f"{name} M={m}"] = (time.perf_counter() - t) * 1e6 / n
    return out


def bench_shape(name, n, k, device, dtype, timer, failures):
    wbytes = n * k * torch.finfo(dtype).bits // 8
    calls = int(min(MAX_CALLS, max(2, WEIGHT_BUDGET // wbytes)))
    weights = torch.randn(calls, n, k, device=device, dtype=dtype).mul_(k ** -0.5)
    x_all = torch.randn(max(MS), k, device=device, dtype=dtype)
    ref_all = linear_ref(x_all.float(), weights[0].float())  # fp32 from the same 16-bit inputs
    print(f"\n{name} [{n} x {k}]: {wbytes / 1e6:.1f} MB per weight, {calls} distinct weights per graph",
          flush=True)

    # the op's bias path, once per shape
    bias = torch.randn(n, device=device, dtype=dtype)
    y = torch.ops.trtllm.linear(x_all[:1], weights[0], bias)
    err = rel_err(y, linear_ref(x_all[:1].float(), weights[0].float(), bias.float()))
    if not err <= MAX_REL_ERR:
        failures.append(f"{name} M=1 with bias (op): rel err {err:.2e}")

    rows = []
    for m in MS:
        x, ref = x_all[:m].contiguous(), ref_all[:m]
        row = dict(shape=name, n=n, k=k, m=m, weight_bytes=wbytes, calls=calls, configs=[])
        row["cublas_rel_err"] = rel_err(F.linear(x, weights[0]), ref)
        row["cublas_us"] = timer(F.linear, x, weights)
        row["op_rel_err"] = rel_err(torch.ops.trtllm.linear(x, weights[0]), ref)
        row["op_us"] = timer(torch.ops.trtllm.linear, x, weights)
        row["op_config"] = cfg_str(linear_mod.gemv_config(m, n, k) if m <= linear_mod.GEMV_MAX_M else None)
        for c in CANDIDATES:
            if not fits(c, m):
                continue

            def fn(x, w, c=c):
                return gemv(x, w, None, torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype), c)

            err = rel_err(fn(x, weights[0]), ref)
            if not err <= MAX_REL_ERR:
                failures.append(f"{name} M={m} {cfg_str(c)}: rel err {err:.2e} > {MAX_REL_ERR:.0e}")
                print(f"FAIL {failures[-1]}", flush=True)
                continue
            row["configs"].append(dict(config=c._asdict(), name=cfg_str(c), rel_err=err, us=timer(fn, x, weights)))
        best = min(row["configs"], key=lambda r: r["us"]) if row["configs"] else None
        row["best"] = best
        row["best_config"] = GemvConfig(**best["config"]) if best else None
        for key in ("cublas", "op"):
            row[f"{key}_tbs"] = wbytes / (row[f"{key}_us"] * 1e-6) / 1e12
        if best:
            best["tbs"] = wbytes / (best["us"] * 1e-6) / 1e12
        errs = max((r["rel_err"] for r in row["configs"]), default=float("nan"))
        line = " ".join(f"{r['name']}={r['us']:.1f}" for r in sorted(row["configs"], key=lambda r: r["us"]))
        print(f"  M={m:<2} cuBLAS {row['cublas_us']:8.1f} us {row['cublas_tbs']:.2f} TB/s | op {row['op_us']:8.1f} us "
              f"| best {cfg_str(row['best_config'])} {best['us'] if best else float('nan'):8.1f} us "
              f"{best['tbs'] if best else float('nan'):.2f} TB/s | rel err <= {errs:.1e} "
              f"(cuBLAS {row['cublas_rel_err']:.1e})\n       all: {line}", flush=True)
        rows.append(row)
    del weights
    return rows


def step_totals(rows):
    """Per M: ms of a decode step's GEMMs (LAYERS x the per-layer shapes + lm_head) by each choice."""
    by = {(r["shape"], r["m"]): r for r in rows}
    totals = []
    for m in MS:
        t = dict(m=m, cublas=0.0, op=0.0, best=0.0, mixed=0.0)
        for shape in SHAPES:
            r = by[(shape, m)]
            times = dict(cublas=r["cublas_us"], op=r["op_us"],
                         best=r["best"]["us"] if r["best"] else r["cublas_us"])
            times["mixed"] = min(times["best"], r["cublas_us"])
            for key, us in times.items():
                t[key] += us * (LAYERS if shape in PER_LAYER else 1) / 1e3
        totals.append(t)
    return totals


def suggestion(rows, totals):
    """`TUNED` entries and `GEMV_MAX_M`: GEMV where a config beats cuBLAS by MIN_WIN."""
    wins = {}
    for r in rows:
        b = r["best"]
        wins[(r["n"], r["k"], r["m"])] = (
            r["best_config"] if b and b["us"] * (1 + MIN_WIN) < r["cublas_us"] else None, r)
    better = [t["m"] for t in totals if t["mixed"] * (1 + MIN_WIN / 2) < t["cublas"]]
    max_m = max(better) if better else 0
    lines = [f"GEMV_MAX_M = {max_m}", "", "TUNED: dict[tuple[int, int, int], GemvConfig | None] = {"]
    for (n, k, m), (c, r) in wins.items():
        if m > max_m:
            continue
        note = (f"{r['best']['us']:.1f} us vs cuBLAS {r['cublas_us']:.1f} us" if r["best"]
                else f"cuBLAS {r['cublas_us']:.1f} us")
        lines.append(f"    ({n}, {k}, {m}): {cfg_code(c)},  # {r['shape']}: {note}")
    lines.append("}")
    return max_m, "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU, interpreter, tiny fp16 shapes")
    ap.add_argument("--model", default="llama-3-8b", choices=sorted(MODELS))
    ap.add_argument("--ms", default=None, help="row counts, comma-separated (default 1,2,4,8,16)")
    args = ap.parse_args()
    global LAYERS, SHAPES, MS
    if not SMOKE:
        LAYERS, SHAPES = MODELS[args.model]
    if args.ms:
        MS = tuple(int(m) for m in args.ms.split(","))
    if SMOKE:
        device, dtype = torch.device("cpu"), torch.float16  # the interpreter's bf16 tl.dot is wrong
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_linear.py needs a CUDA device (or --smoke)")
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            sys.exit("unset TRITON_INTERPRET: the interpreter would time the CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference stays fp32
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ceiling = copy_tbs(device)
    print(f"device-to-device copy: {ceiling:.2f} TB/s", flush=True)
    timer = Timer(device)
    failures, rows = [], []
    for name, (n, k) in SHAPES.items():
        rows += bench_shape(name, n, k, device, dtype, timer, failures)
    totals = step_totals(rows)
    max_m, paste = suggestion(rows, totals)
    host = host_us_per_call(device, dtype)
    elapsed = time.perf_counter() - t0

    dev_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter, smoke)"
    table = [
        f"{args.model if not SMOKE else 'smoke'} shapes; {dev_name}, {dtype}; torch {torch.__version__}, triton {triton.__version__}; "
        f"device-to-device copy {ceiling:.2f} TB/s; {elapsed:.0f} s",
        "",
        "Per call, each call streaming a different weight inside a CUDA graph. TB/s = weight bytes / time.",
        "",
        "| shape | N x K | M | cuBLAS µs | cuBLAS TB/s | best GEMV µs | GEMV TB/s | % copy | cuBLAS / GEMV "
        "| best config | op now µs | rel err (GEMV / cuBLAS) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|",
    ]
    for r in rows:
        b = r["best"] or dict(us=float("nan"), tbs=float("nan"), rel_err=float("nan"))
        table.append(
            f"| {r['shape']} | {r['n']}x{r['k']} | {r['m']} | {r['cublas_us']:.1f} | {r['cublas_tbs']:.2f} "
            f"| {b['us']:.1f} | {b['tbs']:.2f} | {100 * b['tbs'] / ceiling:.0f}% | {r['cublas_us'] / b['us']:.2f}x "
            f"| {cfg_str(r['best_config'])} | {r['op_us']:.1f} | {b['rel_err']:.1e} / {r['cublas_rel_err']:.1e} |")
    table += [
        "",
        f"A decode step's GEMMs: ({' + '.join(s for s in SHAPES if s in PER_LAYER)}) x {LAYERS} layers + lm_head, ms "
        "(mixed = per shape the faster of best GEMV and cuBLAS, what the suggested table does):",
        "",
        "| M | cuBLAS ms | op now ms | best GEMV ms | mixed ms | cuBLAS / mixed |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for t in totals:
        table.append(f"| {t['m']} | {t['cublas']:.3f} | {t['op']:.3f} | {t['best']:.3f} | {t['mixed']:.3f} "
                     f"| {t['cublas'] / t['mixed']:.3f}x |")
    table += ["", "Host time per call outside CUDA graphs (512x512 weight, launches queued):", ""]
    table += [f"- {k}: {v:.1f} µs" for k, v in host.items()]
    table += ["", "Suggested for trtllm/kernels/linear.py:", "", "```python", paste, "```"]
    if failures:
        table += ["", "ACCURACY FAILURES:"] + [f"- {f}" for f in failures]

    def plain(r):
        r = dict(r)
        r["best_config"] = r["best_config"]._asdict() if r["best_config"] else None
        return r

    report(f"bench_linear_{args.model}", "\n".join(table), dict(
        device=dev_name, torch=torch.__version__, triton=triton.__version__, dtype=str(dtype),
        copy_tbs=ceiling, rows=[plain(r) for r in rows], totals=totals, host_us=host,
        suggested_max_m=max_m, suggested=paste, failures=failures, seconds=elapsed))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
