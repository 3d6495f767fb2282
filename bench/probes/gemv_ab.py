"""The GEMV pass (use_gemv_linear) on and off, step by step, on one machine.

    PYTHONPATH=$PWD python bench/probes/gemv_ab.py

bench_e2e.py --no-gemv showed the pass +13% at batch 1 and -18% on 512 requests
offline. This says where: for each variant (compiled with and without the pass; Llama-3-8B
shapes, random bf16 weights, bench_e2e's build settings, a KV pool of 80K tokens), one
LLM.generate of 512 x 128/128 with every Engine.step timed and classed by what it ran
(a decode graph, launched ahead or not, or an eager prefill/mixed step), then the decode
graphs of batch 1/16/64/256 replayed back to back, and one eager 8,192-token prefill
forward. Table last; $OUT/gemv_ab.{md,json}.
"""
import gc
import time
from collections import defaultdict

import torch

from bench.bench_e2e import LLAMA3_8B, NEW, PROMPT, build_models, prompts
from bench.probes.decode_breakdown import replay_seconds
from bench.report import report
from trtllm.config import BuildConfig, KvCacheConfig
from trtllm.runtime.llm import LLM
from trtllm.sampling_params import SamplingParams


def step_classes(engine) -> dict:
    """Wrap engine.step: seconds per class of step ("graph", "eager") into the dict."""
    runner, times = engine.runner, defaultdict(list)
    real_step, real_execute = engine.step, runner.execute
    kind = {}

    def execute(scheduled):
        launched = real_execute(scheduled)
        kind["k"] = "graph" if launched.picks is not None else "eager"
        return launched

    def step():
        kind["k"] = "ahead"  # a step that launched nothing itself: its work was launched ahead
        t = time.perf_counter()
        out = real_step()
        times[kind["k"]].append(time.perf_counter() - t)
        return out
    runner.execute, engine.step = execute, step
    return times


def measure(model, vocab: int, gemv: bool) -> dict:
    llm = LLM(model, build_config=BuildConfig(max_batch_size=256, max_num_tokens=8192, max_seq_len=2048),
              kv_cache_config=KvCacheConfig(max_tokens=80_000), compile_options=None if gemv else dict(decode_graph_passes=[]))
    greedy = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)
    batch = prompts(512, vocab, seed=512).tolist()
    llm.generate(batch[:64], greedy, use_tqdm=False)  # warm-up
    times = step_classes(llm.engine)
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(batch, greedy, use_tqdm=False)
    wall = time.perf_counter() - t
    got = dict(gemv=gemv, offline_tok_s=512 * NEW / wall, wall_s=wall,
               steps={k: dict(n=len(v), total_s=sum(v), mean_ms=sum(v) / len(v) * 1e3) for k, v in times.items()})
    for b in (1, 16, 64, 256):
        got[f"graph_b{b}_ms"] = replay_seconds(llm.engine.runner.cuda_graphs.decode[b][0], 20, warmup=3) * 1e3
    ids = torch.randint(0, vocab, (1, 8192), device="cuda")
    pos = torch.arange(8192, device="cuda")[None]
    with torch.no_grad():
        for _ in range(2):
            llm.compiled(ids, pos, torch.tensor([8191], device="cuda"))
        torch.cuda.synchronize()
        t = time.perf_counter()
        llm.compiled(ids, pos, torch.tensor([8191], device="cuda"))
        host = time.perf_counter() - t
        torch.cuda.synchronize()
        got["prefill_8192_ms"] = (time.perf_counter() - t) * 1e3
        got["prefill_8192_host_ms"] = host * 1e3
    llm.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return got


def main():
    hf_config, model = build_models(LLAMA3_8B)
    rows = [measure(model, LLAMA3_8B["vocab_size"], gemv) for gemv in (True, False)]
    table = ["| measure | GEMV pass | no GEMV pass |", "|---|---:|---:|"]
    table.append(f"| 512 x {PROMPT}/{NEW} offline tok/s | {rows[0]['offline_tok_s']:,.0f} | {rows[1]['offline_tok_s']:,.0f} |")
    for k in ("graph", "ahead", "eager"):
        cells = [f"{r['steps'][k]['n']} x {r['steps'][k]['mean_ms']:.2f} ms = {r['steps'][k]['total_s']:.2f} s"
                 if k in r["steps"] else "-" for r in rows]
        table.append(f"| Engine.step, {k} steps | {cells[0]} | {cells[1]} |")
    for b in (1, 16, 64, 256):
        table.append(f"| decode graph b{b} replay | {rows[0][f'graph_b{b}_ms']:.3f} ms | {rows[1][f'graph_b{b}_ms']:.3f} ms |")
    table.append(f"| eager prefill 8,192 tokens (host part) | {rows[0]['prefill_8192_ms']:.1f} ms "
                 f"({rows[0]['prefill_8192_host_ms']:.1f}) | {rows[1]['prefill_8192_ms']:.1f} ms "
                 f"({rows[1]['prefill_8192_host_ms']:.1f}) |")
    report("gemv_ab", "\n".join(table), dict(rows=rows))


if __name__ == "__main__":
    main()
