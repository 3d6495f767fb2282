"""Where the GPU time of a decode step goes, kernel by kernel.

    PYTHONPATH=$PWD python bench/probes/decode_kernels.py [--model llama-3-8b|llama-3.2-1b|gemma-3-1b|MOE_PRESET]
        [--batch 1] [--layers 32] [--replays 20] [--quantization FP8_PER_CHANNEL_PER_TOKEN]
        [--prefill TOKENS]

Random bf16 weights: Llama-3-8B shapes (bench_e2e.build_models; --layers), the
llama-3.2-1b preset, Gemma-3-1B shapes through models/gemma.py (family_speed.py's), or a MoE
preset of trtllm-bench (qwen3-30b-a3b, mixtral-8x7b, deepseek-v2-lite: transformers' module,
its MoE blocks fused by passes/fuse_moe.py; the experts' 3-D weights count as read in full
only at batches that choose every expert, so the matmul line covers the linears alone).
One LLM with only the decode CUDA graph of --batch sequences; with --quantization, QuantConfig's
FP8 weights (all linears but the LM head) and an fp8 KV cache. With --prefill T, the engine's
prefill graph of the T-token bucket (one sequence of T tokens, as captured; T one of
runtime/cuda_graphs.prefill_token_sizes, up to 2,048) instead of the decode graph, and the
matmuls' TFLOP/s (2 T x the layers' linear weights) instead of their bandwidth. `--ab fuse_x,fuse_y`: a
second LLM of the same model compiled without those passes, the two graphs' replays timed
by turns (7 rounds, medians) on the same GPU: what the passes save on the wall clock, which
kernel sums under the profiler do not tell where a graph runs independent kernels (q's and
k's) side by side. The graph is replayed under torch.profiler; per replay:
- time per kernel family (matmul, attention, norms, rotary, silu_mul, the LM head's
  argmax, copies) and launches per family;
- the sum of kernel times against the replay's wall time: the difference is the GPU
  idle between kernels (launch gaps, what programmatic dependent launch can hide);
- the matmuls' achieved bandwidth: the weights they read (every linear layer's weight,
  the LM head included; the embedding table is only gathered) over their summed time,
  against a device-to-device copy of 2 GB.
Under programmatic dependent launch (kernels/pdl.py, sm_90) each kernel starts early and waits
for the one before, so the profiler counts that wait as its time: run with `TRTLLM_PDL=0` for
per-kernel times that add up (and the wall time without PDL beside the default run's).
Table last; $OUT/decode_kernels.{md,json}.
"""
import argparse
import statistics
import sys
from collections import defaultdict

import torch

from bench.bench_e2e import LLAMA3_8B, build_models
from bench.probes.decode_breakdown import copy_tbs, replay_seconds
from bench.report import report
from trtllm.config import BuildConfig, KvCacheConfig, QuantConfig
from trtllm.passes import PASSES
from trtllm.quantization.fp8_linears import quantizable_linears
from trtllm.runtime.llm import LLM

MOE_PRESETS = ("qwen3-30b-a3b", "mixtral-8x7b", "deepseek-v2-lite")
FAMILIES = [  # (family, substrings of the kernel name), first match wins
    ("moe experts", ("gate_up_kernel", "down_kernel")),
    ("sum (the MoE combine)", ("sum_functor", "_decode_combine_kernel")),
    # the one-row FP8 GEMVs that quantize their own input (o_proj, down): GEMVs, not quantizations
    ("matmul", ("_quantize_fp8_gemv_kernel",)),
    ("moe routing / align", ("moe_routing", "_count_kernel", "_scatter_kernel")),
    ("attention", ("_decode_kernel", "attention")),
    ("quantize_fp8 (activations)", ("_quantize_fp8",)),
    ("rms_norm", ("rms_norm",)),
    ("rotary", ("rotary",)),
    ("silu_mul", ("silu_mul",)),
    ("matmul", ("gemm", "gemv", "nvjet", "cutlass", "sm90", "xmma", "splitk", "matmul")),
    ("argmax / isfinite", ("argmax", "reduce", "isfinite", "arg_")),
    ("copy / fill", ("copy", "fill", "memcpy", "memset", "cat", "stack")),
]


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, keys in FAMILIES if any(k in low for k in keys)), "other")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", choices=("llama-3-8b", "llama-3.2-1b", "gemma-3-1b", *MOE_PRESETS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--quantization", default=None, help="QuantConfig.quant_algo (FP8 weights, fp8 KV cache)")
    ap.add_argument("--prefill", type=int, default=0, help="profile the prefill graph of this token bucket")
    ap.add_argument("--ab", default="", help="comma-separated PASSES to leave out of a second, timed-by-turns LLM")
    args = ap.parse_args()
    without = {name for name in args.ab.split(",") if name}
    unknown = without - {p.__name__ for p in PASSES}
    if unknown:
        sys.exit(f"--ab: no such pass {sorted(unknown)} (trtllm.passes.PASSES)")
    from torch.profiler import ProfilerActivity, profile

    if args.model == "llama-3-8b":
        _, model = build_models(dict(LLAMA3_8B, num_hidden_layers=args.layers))
    elif args.model in MOE_PRESETS:
        from trtllm.cli.model_arg import resolve_model
        model = resolve_model(args.model).llm_kwargs(dtype="bfloat16")["model"]
    else:
        from bench.probes import family_speed
        model = family_speed.BUILDERS["llama" if args.model == "llama-3.2-1b" else "own"]()
    quantized = set(quantizable_linears(model)) if args.quantization else set()
    linears = [(path, m) for path, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linear_bytes = sum(m.weight.numel() * (1 if path in quantized else m.weight.element_size()) for path, m in linears)
    layer_params = sum(m.weight.numel() for path, m in linears if path.split(".")[-1] != "lm_head")
    tokens = max(2048, args.prefill)

    def build(passes=None):
        return LLM(model, build_config=BuildConfig(max_batch_size=args.batch, max_num_tokens=tokens,
                                                   max_seq_len=tokens + 64),
                   kv_cache_config=KvCacheConfig(max_tokens=max(8192, 64 * args.batch), dtype="fp8" if args.quantization else "auto"),
                   quant_config=QuantConfig(quant_algo=args.quantization) if args.quantization else None,
                   compile_options=None if passes is None else dict(passes=passes))

    def step_graph(engine_llm):
        graphs = engine_llm.engine.runner.cuda_graphs
        if not args.prefill:
            return graphs.decode[args.batch][0]
        if args.prefill not in graphs.prefill:
            sys.exit(f"--prefill {args.prefill}: no such bucket; captured {sorted(graphs.prefill)}")
        return graphs.prefill[args.prefill][0]

    llm = build()
    graph = step_graph(llm)
    wall_us = replay_seconds(graph, args.replays) * 1e6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per_family_us, per_family_n, per_name_us = defaultdict(float), defaultdict(int), defaultdict(float)
    per_name_n = defaultdict(int)
    for e in kernels:
        us = e.time_range.elapsed_us()
        f = family(e.name)
        per_family_us[f] += us / args.replays
        per_family_n[f] += 1
        per_name_us[e.name] += us / args.replays
        per_name_n[e.name] += 1
    busy_us = sum(per_family_us.values())
    ceiling = copy_tbs()
    ab = None
    if without:
        llm_b = build([p for p in PASSES if p.__name__ not in without])
        graph_b = step_graph(llm_b)
        with_us, without_us = [], []
        for _ in range(7):
            with_us.append(replay_seconds(graph, args.replays) * 1e6)
            without_us.append(replay_seconds(graph_b, args.replays) * 1e6)
        ab = dict(without=sorted(without), with_us=statistics.median(with_us),
                  without_us=statistics.median(without_us), rounds_with=with_us, rounds_without=without_us)
        llm_b.shutdown()
    llm.shutdown()
    matmul_s = per_family_us["matmul"] * 1e-6
    matmul_tbs = linear_bytes / matmul_s / 1e12 if matmul_s else 0.0
    matmul_tflops = 2 * args.prefill * layer_params / matmul_s / 1e12 if matmul_s and args.prefill else None
    rows = dict(ab=ab, model=args.model, quantization=args.quantization, batch=args.batch, prefill=args.prefill,
                layers=args.layers, wall_us_per_replay=wall_us, kernel_busy_us=busy_us,
                idle_us=wall_us - busy_us, linear_weight_gb=linear_bytes / 1e9, matmul_tbs=matmul_tbs,
                matmul_tflops=matmul_tflops,
                copy_tbs=ceiling, launches_per_replay=len(kernels) / args.replays,
                families={f: dict(us=per_family_us[f], launches=per_family_n[f] / args.replays)
                          for f in per_family_us},
                top_kernels=sorted(((n, u, per_name_n[n] / args.replays) for n, u in per_name_us.items()),
                                   key=lambda x: -x[1])[:40])
    print("top kernels (us per replay, launches per replay):")
    for name, us, n in rows["top_kernels"]:
        print(f"  {us:9.1f} {n:5.0f}  {name[:140]}")
    what = f"{args.model} {args.quantization or 'bf16'}"
    step = f"{args.prefill}-token prefill step" if args.prefill else f"batch-{args.batch} decode step"
    table = [f"| part of one {what} {step} | µs | launches | share |",
             "|---|---:|---:|---:|"]
    for f, us in sorted(per_family_us.items(), key=lambda x: -x[1]):
        table.append(f"| {f} | {us:,.1f} | {per_family_n[f] / args.replays:.0f} | {us / wall_us:.1%} |")
    table += [f"| GPU idle between kernels | {wall_us - busy_us:,.1f} | - | {(wall_us - busy_us) / wall_us:.1%} |",
              f"| whole replay (wall, unprofiled) | {wall_us:,.1f} | {len(kernels) / args.replays:.0f} | 100% |",
              "",
              f"matmuls at {matmul_tflops:.0f} TFLOP/s (2 x {args.prefill} tokens x {layer_params / 1e9:.2f} G "
              f"layer weights)" if matmul_tflops else
              f"matmuls read {linear_bytes / 1e9:.2f} GB of weights at {matmul_tbs:.2f} TB/s "
              f"(device copy {ceiling:.2f} TB/s); the whole step at {linear_bytes / wall_us / 1e6:.2f} TB/s"]
    if ab:
        table += ["", f"A/B by turns, same GPU: all passes {ab['with_us']:,.1f} µs a replay, without "
                      f"{', '.join(ab['without'])} {ab['without_us']:,.1f} µs (medians of 7 rounds)"]
    shape = f"p{args.prefill}" if args.prefill else f"b{args.batch}"
    report(f"decode_kernels_{args.model}_{args.quantization or 'bf16'}_{shape}", "\n".join(table), rows)


if __name__ == "__main__":
    main()
