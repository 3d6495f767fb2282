"""Batch-1 decode on Llama-3-8B shapes: GPU time of one step vs what the engine takes.

    PYTHONPATH=$PWD python bench/probes/decode_breakdown.py [--layers 32]

One LLM (max_batch_size 1: one decode CUDA graph; `--e2e-config`: bench_e2e.py's
max_batch_size 256 and 0.85 of free memory for the KV pool), random bf16 weights as bench_e2e.py:
1. engine: `LLM.generate` of 1 request, 128-token prompt, N new tokens, ms per step and
   the share spent inside `Engine.step` (the loop thread's own time), with the overlap
   scheduler on (the default) and off;
2. graph back to back: the batch-1 decode graph replayed N times, one sync at the end
   (the GPU's time for a step: the floor with no host gaps);
3. graph + wait: replay, wait for it, read the greedy pick (launch latency included);
4. the weights' bytes / step time: achieved GB/s against the copy ceiling.
Host overhead per step = (1) - (2); with the overlap scheduler it should be ~0. Table last; $OUT/decode_breakdown.{md,json}.
"""
import argparse
import time

import torch

from bench.bench_e2e import LLAMA3_8B, build_models
from bench.report import report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams


def copy_tbs() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    return 2 * x.numel() * 10 / (time.perf_counter() - t) / 1e12


def time_steps(engine) -> tuple[list[float], object]:
    """Wrap engine.step so each call's seconds go to the returned list; returns (the list,
    the original step, to put back)."""
    inner, step = [], engine.step

    def timed_step():
        t = time.perf_counter()
        out = step()
        inner.append(time.perf_counter() - t)
        return out

    engine.step = timed_step
    return inner, step


def replay_seconds(graph, replays: int, warmup: int = 10) -> float:
    """Seconds per replay of a CUDA graph, replayed back to back (one sync at the end)."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / replays


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--e2e-config", action="store_true", help="bench_e2e.py's LLM settings")
    args = ap.parse_args()
    _, model = build_models(dict(LLAMA3_8B, num_hidden_layers=args.layers))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if args.e2e_config:
        llm = LLM(model, build_config=BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=2048),
                  kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=0.85))
    else:
        llm = LLM(model, build_config=BuildConfig(max_batch_size=1, max_num_tokens=2048, max_seq_len=2048),
                  kv_cache_config=KvCacheConfig(max_tokens=8192))
    engine = llm.engine
    inner, step = time_steps(engine)
    prompt = list(range(1, 129))
    params = SamplingParams(max_tokens=args.new, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    engine_runs = {}
    for overlap in (True, False):
        engine.overlap = overlap
        walls = []
        for _ in range(3):
            inner.clear()
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            walls.append((time.perf_counter() - t, sum(inner[1:]) / (len(inner) - 1), len(inner)))
        engine_runs[overlap] = min(walls)
    engine.overlap = True
    wall, inside, steps = engine_runs[True]
    per_step = wall / steps
    per_step_off = engine_runs[False][0] / engine_runs[False][2]
    engine.step = step

    graph, _, greedy = engine.runner.cuda_graphs.decode[1]
    back_to_back = replay_seconds(graph, args.new)
    t = time.perf_counter()
    for _ in range(args.new):
        graph.replay()
        greedy.tolist()
    replay_wait = (time.perf_counter() - t) / args.new
    ceiling = copy_tbs()
    llm.shutdown()
    rows = dict(layers=args.layers, weight_gb=weight_bytes / 1e9, steps=steps, ms_per_step_engine=per_step * 1e3,
                ms_per_step_engine_overlap_off=per_step_off * 1e3, e2e_config=args.e2e_config,
                ms_inside_step=inside * 1e3, ms_graph_back_to_back=back_to_back * 1e3,
                ms_graph_replay_wait=replay_wait * 1e3, tok_s_engine=1 / per_step,
                tok_s_graph_floor=1 / back_to_back, weights_tbs_graph=weight_bytes / back_to_back / 1e12,
                copy_tbs=ceiling)
    table = ["| measure | value |", "|---|---:|",
             f"| weights read per step | {weight_bytes / 1e9:.2f} GB |",
             f"| engine (LLM.generate, {steps} steps incl. prefill) | {per_step * 1e3:.3f} ms/step = {1 / per_step:.1f} tok/s |",
             f"| engine, overlap scheduler off | {per_step_off * 1e3:.3f} ms/step = {1 / per_step_off:.1f} tok/s |",
             f"| inside Engine.step (decode steps, overlap on) | {inside * 1e3:.3f} ms |",
             f"| decode graph back to back | {back_to_back * 1e3:.3f} ms = {1 / back_to_back:.1f} tok/s |",
             f"| decode graph + wait + read | {replay_wait * 1e3:.3f} ms |",
             f"| weights / graph time | {weight_bytes / back_to_back / 1e12:.2f} TB/s (copy {ceiling:.2f} TB/s) |",
             f"| host gap per step (engine - graph), overlap on / off | {(per_step - back_to_back) * 1e3:.3f} / "
             f"{(per_step_off - back_to_back) * 1e3:.3f} ms |"]
    report("decode_breakdown", "\n".join(table), rows)


if __name__ == "__main__":
    main()
