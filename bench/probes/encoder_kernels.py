"""Where a vision encoder's GPU time goes, kernel family by kernel family (issue 26's encoder row).

    PYTHONPATH=$PWD python bench/probes/encoder_kernels.py [--batch 64] [--layers 24] [--reps 10] [--smoke]

bench_multimodal.py's tower (CLIP ViT-L/14-336 shapes, random bf16 weights, batch 64 images:
577 tokens each), four ways, each checked against an fp32 copy of the tower first:
- eager: the plain module (torch SDPA: FlashAttention), bench_multimodal's peer;
- torch.compile: the plain module through Inductor (SDPA kept), the stock compiler's answer;
- trtllm: `compile_encoder` (ENCODER_PASSES: SDPA -> trtllm.bidirectional_attention, then Inductor);
- trtllm, no passes: `compile_encoder(passes=[])`, our pipeline with SDPA kept;
- with --max-autotune: `compile_encoder(max_autotune=True)`, Inductor's GEMM templates with fused
  epilogues raced against cuBLAS.
--sweep times bidirectional_attention's launch configs at the tower's shape.
For each: wall time of one pass (median of --reps), TFLOP/s, and one pass under torch.profiler
grouped by kernel family (matmul, attention, layer norm, Inductor's fused elementwise, conv,
copies), with the matmuls' own TFLOP/s. Two ceilings measured in the same run:
- cuBLAS alone: the tower's linears (q, k, v, o, fc1, fc2 with bias, M = batch x 577) timed
  back to back with F.linear, x layers; the attention kernels alone: SDPA and ours on
  [batch, 16, 577, 64], x layers;
- so the best ratio over eager any compiler can reach is eager / (GEMMs + attention), with
  the norms and the activation fused into the GEMMs' epilogues for free.
Table last; $OUT/encoder_kernels.{md,json}.
"""
import argparse
import copy
from collections import defaultdict

import torch
import torch.nn.functional as F

from bench.bench_multimodal import CLIP_L_336, SMOKE_VISION, bench_time, encoder_flops, sync
from bench.report import report
from trtllm.compile_encoder import compile_encoder
from trtllm.models.clip_vision import CLIPVisionConfig, CLIPVisionTower

FAMILIES = [  # (family, substrings of the kernel name), first match wins
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90", "xmma", "matmul", "splitk")),
    ("conv (patch embedding)", ("conv", "implicit", "im2col")),
    ("layer norm", ("layer_norm", "layernorm")),
    ("inductor fused (norm / gelu / add)", ("triton_",)),
    ("elementwise (eager)", ("elementwise", "vectorized", "unrolled")),
    ("copy / cat", ("copy", "memcpy", "cat", "fill")),
]


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")


def seconds(fn, reps: int) -> float:
    """Median seconds of fn over reps calls, after a second warm-up call (bench_time's one)."""
    fn()
    return bench_time(fn, reps)


def kernel_families(fn) -> dict[str, float]:
    """Microseconds of one call of fn per kernel family (CUDA kernels under torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    out = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            out[family(e.name)] += e.time_range.elapsed_us()
    return dict(out)


def linear_flops(v: CLIPVisionConfig, layers: int, images: int) -> float:
    m, d, f = images * (v.num_patches + 1), v.hidden_size, v.intermediate_size
    return layers * 2 * m * (4 * d * d + 2 * d * f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny fp32 shapes on the CPU (the default without a GPU)")
    ap.add_argument("--batch", type=int, default=None, help="images a pass (64; smoke 2)")
    ap.add_argument("--layers", type=int, default=None, help="encoder layers run (24, LLaVA's -2 feature layer: 23)")
    ap.add_argument("--reps", type=int, default=None, help="timed passes (10; smoke 2)")
    ap.add_argument("--max-autotune", action="store_true",
                    help="a fifth way: compile_encoder(max_autotune=True), GEMM epilogues fused (minutes to compile)")
    ap.add_argument("--sweep", action="store_true", help="time bidirectional_attention's launch configs at the shape")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.smoke
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    batch, reps = args.batch or (64 if cuda else 2), args.reps or (10 if cuda else 2)
    v = CLIPVisionConfig(**(CLIP_L_336 if cuda else SMOKE_VISION))
    layers = args.layers or v.num_hidden_layers
    torch.manual_seed(0)
    with torch.device(device):
        tower = CLIPVisionTower(v).to(dtype)
    with torch.no_grad():
        for p in tower.parameters():  # bench_multimodal's random weights
            p.normal_(1.0, 0.05) if p.dim() == 1 else p.normal_(0.0, p[0].numel() ** -0.5)
    tower.eval().requires_grad_(False)
    pixels = torch.randn((batch, 3, v.image_size, v.image_size), device=device, dtype=dtype)
    flops = encoder_flops(v, layers, batch)
    record = {"device": torch.cuda.get_device_name() if cuda else "cpu", "batch": batch, "layers": layers,
              "flops": flops, "variants": {}}

    with torch.no_grad():
        exact = copy.deepcopy(tower).float()(pixels.float(), (layers,))[0]
    variants = {
        "eager (torch SDPA)": tower,
        "torch.compile (Inductor, SDPA)": torch.compile(tower, fullgraph=True) if cuda else tower,
        "trtllm compile_encoder": compile_encoder(tower),
        "trtllm compile_encoder, no passes (SDPA)": compile_encoder(tower, passes=[]),
    }
    if args.max_autotune:
        variants["trtllm compile_encoder, max_autotune"] = compile_encoder(tower, max_autotune=cuda)
    rows = []
    eager_s = None
    for name, fn in variants.items():
        def run(fn=fn):
            with torch.no_grad():
                return fn(pixels, (layers,))[0]
        got = run()
        err = ((got.float() - exact).norm() / exact.norm()).item()
        s = seconds(run, reps)
        eager_s = eager_s or s
        fams = kernel_families(run) if cuda else {}
        mm_us = fams.get("matmul", 0.0)
        rec = dict(seconds=s, tflops=flops / s / 1e12, rel_err_vs_fp32=err, families_us=fams,
                   matmul_tflops=linear_flops(v, layers, batch) / (mm_us * 1e-6) / 1e12 if mm_us else None)
        record["variants"][name] = rec
        top = ", ".join(f"{f} {us / 1e3:.2f}" for f, us in sorted(fams.items(), key=lambda kv: -kv[1]))
        rows.append((name, f"{s * 1e3:.2f}", f"{rec['tflops']:.1f}", f"{eager_s / s:.2f}x", f"{err:.1e}", top or "-"))
        print(rows[-1], flush=True)

    # -- ceilings: cuBLAS for the linears, the two attention kernels alone ----------------------
    m, d, f = batch * (v.num_patches + 1), v.hidden_size, v.intermediate_size
    x, h = torch.randn(m, d, device=device, dtype=dtype), torch.randn(m, f, device=device, dtype=dtype)
    w_dd, w_fd, w_df = (torch.randn(a, b, device=device, dtype=dtype) * b ** -0.5 for a, b in ((d, d), (f, d), (d, f)))
    b_d, b_f = torch.randn(d, device=device, dtype=dtype), torch.randn(f, device=device, dtype=dtype)

    def linears():
        for _ in range(4):
            F.linear(x, w_dd, b_d)
        F.linear(x, w_fd, b_f)
        F.linear(h, w_df, b_d)
    gemm_s = seconds(linears, reps) * layers
    heads = v.num_attention_heads
    q, k, vv = (torch.randn(batch, heads, v.num_patches + 1, d // heads, device=device, dtype=dtype) for _ in range(3))
    sdpa_s = seconds(lambda: F.scaled_dot_product_attention(q, k, vv), reps) * layers
    ours_s = seconds(lambda: torch.ops.trtllm.bidirectional_attention(q, k, vv, (d // heads) ** -0.5), reps) * layers
    if args.sweep and cuda:
        from trtllm.kernels.bidirectional_attention import bidirectional_attention_triton
        sweep = {}
        for launch in [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3),
                       (128, 128, 8, 3), (64, 32, 4, 3), (128, 64, 8, 4)]:
            try:
                ms = seconds(lambda launch=launch: bidirectional_attention_triton(q, k, vv, (d // heads) ** -0.5,
                                                                                   launch=launch), reps) * 1e3
            except Exception as e:  # out of shared memory / registers: say so, go on
                print(f"launch {launch}: {type(e).__name__}: {str(e)[:120]}")
                continue
            sweep[str(launch)] = ms
            print(f"bidirectional_attention launch {launch}: {ms * layers:.2f} ms x {layers} layers", flush=True)
        record["attention_sweep_ms_per_layer"] = sweep
    best = gemm_s + min(sdpa_s, ours_s)
    record.update(gemm_seconds=gemm_s, gemm_tflops=linear_flops(v, layers, batch) / gemm_s / 1e12,
                  sdpa_seconds=sdpa_s, trtllm_attention_seconds=ours_s, ceiling_ratio=eager_s / best)
    rows.append(("cuBLAS linears alone (x layers)", f"{gemm_s * 1e3:.2f}",
                 f"{linear_flops(v, layers, batch) / gemm_s / 1e12:.1f} (linears)", "-", "-", "-"))
    rows.append(("attention alone (x layers): SDPA / trtllm", f"{sdpa_s * 1e3:.2f} / {ours_s * 1e3:.2f}",
                 "-", "-", "-", "-"))
    rows.append(("ceiling: GEMMs + the faster attention", f"{best * 1e3:.2f}", f"{flops / best / 1e12:.1f}",
                 f"{eager_s / best:.2f}x", "-", "-"))
    header = "| variant | ms a pass | TFLOP/s | vs eager | rel err vs fp32 | kernel ms by family |\n|---|---:|---:|---:|---:|---|\n"
    table = header + "\n".join("| " + " | ".join(r) + " |" for r in rows)
    report("encoder_kernels", f"batch {batch} images, {layers} layers, {record['device']}\n\n" + table, record)


if __name__ == "__main__":
    main()
