"""Time to first token by prompt length: prefill steps replayed from CUDA graphs (runtime/cuda_graphs.py,
`CudaGraphConfig.max_prefill_tokens`) against the same engine's eager prefill steps, one run.

    PYTHONPATH=$PWD python bench/bench_ttft.py [--model llama-3.1-8b] [--quantization FP8_PER_CHANNEL_PER_TOKEN]
                                               [--lengths 16 128 512 1000 1800 2048 4096] [--runs 7] [--smoke]

The model: a preset of trtllm-bench (random weights; bf16, or --quantization's FP8 weights with an
FP8 KV cache), engine limits as trtllm-bench throughput's (max_batch_size 256, max_num_tokens 8192).
TTFT here is `LLM.generate([prompt], max_tokens=1)` wall time: the request through the engine loop,
one prefill step, the sample, the output; the median of --runs prompts per length and path, the
two paths by turns on the same prompts (the prefix cache is off, so every run prefills). The
eager path is the same engine with its prefill graphs set aside (`cuda_graphs.prefill` emptied),
so the ratio is the graphs' alone. A length above max_prefill_tokens (4096 by default) runs
eagerly both times: the control row.
Correctness, same script: per length, the prefill step's logits by graph against eager (relative
error; the graph's kernels are the eager path's, launched with wider bounds) and the first tokens.
--smoke: the tiny preset in fp32 on whatever device there is (on CPU no graph is captured, so the
two paths are one; it checks the script). Table last; JSON under $OUT when set.
"""
import argparse
import statistics
import time

import torch

from bench.report import markdown, report
from trtllm.cli.model_arg import PRESETS, build_preset
from trtllm.config import BuildConfig, KvCacheConfig, QuantConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams

MAX_REL_ERR = 2e-2  # bf16 logits of the same kernels, another tile bound at most: ~1e-3 expected


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3.1-8b", choices=sorted(PRESETS))
    ap.add_argument("--quantization", default=None, help="QuantConfig.quant_algo; with it the KV cache is fp8")
    # 1,000 and 1,800 pad to the 1,024 and 2,048 buckets: what padding near the top bucket costs
    ap.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512, 1000, 1800, 2048, 4096])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.model, args.lengths, args.runs = "tiny-llama", [16, 40], 3
    dtype = "float32" if args.smoke else "bfloat16"
    model = build_preset(PRESETS[args.model], dtype)
    vocab = PRESETS[args.model]["vocab_size"]
    kv = dict(enable_block_reuse=False, free_gpu_memory_fraction=0.85)
    if args.smoke:
        kv["max_tokens"] = 4 * 4096
    if args.quantization:
        kv["dtype"] = "fp8"
    started = time.perf_counter()
    llm = LLM(model, dtype=dtype, kv_cache_config=KvCacheConfig(**kv),
              build_config=BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=max(args.lengths) + 8),
              quant_config=QuantConfig(quant_algo=args.quantization) if args.quantization else None)
    startup = llm.engine.startup
    graphs = llm.engine.runner.cuda_graphs
    captured = dict(graphs.prefill)
    print(f"LLM ready in {time.perf_counter() - started:.1f} s (capture {startup.cuda_graph_capture_s:.1f} s); "
          f"prefill graphs for {sorted(captured)} tokens", flush=True)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    runner, real_execute, seen = llm.engine.runner, llm.engine.runner.execute, []

    def recording(scheduled):  # the step's logits, cloned in stream order before any later step
        launched = real_execute(scheduled)
        seen.append(launched.logits.float().clone())
        return launched

    def use_graphs(on: bool) -> None:
        graphs.prefill = dict(captured) if on else {}

    rows, record = [], {"model": args.model, "quantization": args.quantization, "captured": sorted(captured),
                        "startup": vars(startup)}
    g = torch.Generator().manual_seed(0)
    for length in args.lengths:
        prompts = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(args.runs + 1)]
        check = {}
        runner.execute = recording
        for on in (True, False):  # correctness first: one prompt both ways
            use_graphs(on)
            seen.clear()
            out = llm.generate([prompts[0]], one, use_tqdm=False)[0]
            check[on] = (seen[0], out.outputs[0].token_ids)
        runner.execute = real_execute
        (a, tok_a), (b, tok_b) = check[True], check[False]
        rel = ((a - b).norm() / b.norm()).item()
        times = {True: [], False: []}
        for p in prompts[1:]:
            for on in (True, False):
                use_graphs(on)
                t0 = time.perf_counter()
                llm.generate([p], one, use_tqdm=False)
                times[on].append(time.perf_counter() - t0)
        use_graphs(True)
        med = {on: statistics.median(ts) * 1e3 for on, ts in times.items()}
        bucket = next((t for t in sorted(captured) if t >= length), None)
        rows.append({"prompt tokens": length, "graph bucket": bucket or "none (eager)",
                     "TTFT graphs (ms)": f"{med[True]:.1f}", "TTFT eager steps (ms)": f"{med[False]:.1f}",
                     "speed-up": f"{med[False] / med[True]:.2f}x", "logits rel err": f"{rel:.1e}",
                     "first token equal": tok_a == tok_b})
        record[f"len{length}"] = {"graphs_ms": times[True], "eager_ms": times[False], "rel_err": rel,
                                  "tokens": [tok_a, tok_b]}
        print(rows[-1], flush=True)
        assert rel < MAX_REL_ERR, f"{length} tokens: prefill graph vs eager logits rel err {rel:.2e}"
    llm.shutdown()
    title = f"TTFT, {args.model} {args.quantization or dtype}, prefill graphs vs eager steps (same engine)"
    report("bench_ttft" + ("_" + args.quantization if args.quantization else ""), f"## {title}\n" + markdown(rows),
           record)


if __name__ == "__main__":
    main()
