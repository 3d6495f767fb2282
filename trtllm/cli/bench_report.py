"""What `trtllm-bench` writes: the machine it ran on, the engine's own figures, the table
at the end, the --iteration_log lines and the --profile summary.

    environment() -> dict               GPU, versions, git commit: what makes two reports comparable
    run_config(llm, args, model, requests, mode, options) -> dict   the configuration, in full
    startup_figures(startup, load_s) -> dict       LLM(...) split: load / compile / capture / other
    engine_figures(llm, records, before) -> dict   KV pool, concurrency, prefix hits, preemptions, memory,
                                        tokens per expert (--expert_load)
    iteration_lines(records, t0) -> list[dict]     one per engine step (--iteration_log)
    top_ops(profiler, n) -> list[dict]  the profiled kernels (CPU: ops) by their own time
    format_table(report) -> str
"""
from __future__ import annotations

import datetime
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from trtllm.runtime.engine_stats import StepRecord

GIB = 1 << 30


def environment() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    commit, dirty = _git_state()
    return {
        "device": "cuda" if cuda else "cpu",
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "trtllm": _version("trtllm"),  # None when run from a checkout without an install (git_commit says)
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_state() -> tuple[str | None, bool | None]:
    """(commit, tracked files changed) of the checkout trtllm runs from; (None, None) if none."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if commit.returncode != 0:
        return None, None
    return commit.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def run_config(llm, args, model: dict, requests, mode: dict, options: dict) -> dict:
    """Every option, the model, the engine as built (`options`: LLM's, the flags' and the file's), the
    workload and the environment."""
    bm, build, kv = llm.block_manager, options["build_config"], options["kv_cache_config"]
    return {
        "options": dict(vars(args)), "model": model, "concurrency": mode["concurrency"],
        "streaming": mode["streaming"], "temperature": args.temperature,
        "engine": {**build.model_dump(), **vars(llm.engine.limits),
                   "dtype": str(llm.compiled.attention.dtype).removeprefix("torch."),
                   "quantization": _weights_quantization(llm),
                   "kv_cache": {"free_gpu_memory_fraction": kv.free_gpu_memory_fraction,
                                "max_tokens": kv.max_tokens, "tokens_per_block": bm.block_size,
                                "enable_block_reuse": bm.enable_block_reuse},
                   "overlap_scheduler": llm.engine.overlap,
                   "cuda_graph_batch_sizes": sorted(llm.engine.runner.cuda_graphs.decode),
                   "cuda_graph_prefill_tokens": sorted(llm.engine.runner.cuda_graphs.prefill)},
        "dataset": {"path": getattr(args, "dataset", None), "num_requests": len(requests),
                    "input_len": _spread([r.input_len for r in requests]),
                    "output_len": _spread([r.output_tokens for r in requests])},
        "environment": environment(),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _weights_quantization(llm) -> str | None:
    """What the engine's linears run in, as the model's FP8 description says it ("42 FP8
    linears (per-channel) from ..."): --quantization's or a pre-quantized checkpoint's."""
    from trtllm.quantization.fp8_linears import fp8_linears_of

    fp8 = fp8_linears_of(llm.compiled.module)
    return fp8.summary() if fp8 is not None else None


def _spread(values: list[int]) -> dict:
    return {"min": min(values), "mean": sum(values) / len(values), "max": max(values)}


def startup_figures(startup, load_s: float) -> dict:
    """`engine.startup` (a StartupTimes), plus `load_s` spent before LLM(...) (a preset's
    weights, a checkpoint loaded by the command itself)."""
    return {"load": load_s + startup.load_s, "compile": startup.compile_s,
            "cuda_graph_capture": startup.cuda_graph_capture_s,
            "other": startup.total_s - startup.load_s - startup.compile_s - startup.cuda_graph_capture_s,
            "total": load_s + startup.total_s}


def engine_figures(llm, records: list[StepRecord], before: dict) -> dict:
    """The engine's side of a run: `records` its steps, `before` the counters at its start
    (`counters(llm)`)."""
    import torch

    now = counters(llm)
    queried = now["prefix_queried_tokens"] - before["prefix_queried_tokens"]
    hits = now["prefix_hit_tokens"] - before["prefix_hit_tokens"]
    bm = llm.block_manager
    cache = llm.engine.runner.cache
    pool_bytes = cache.nbytes  # an FP8 / INT8 cache: half a 16-bit one's bytes a token
    cuda = torch.cuda.is_available()
    return {
        "kv_pool": {"blocks": bm.num_blocks, "tokens_per_block": bm.block_size, "tokens": bm.num_blocks * bm.block_size,
                    "dtype": str(cache.k.dtype).removeprefix("torch."), "bytes": pool_bytes, "gib": pool_bytes / GIB},
        "max_concurrent_requests": max((r.stats.num_running for r in records), default=0),
        "prefix_hit_rate": hits / queried if queried else 0.0,
        "num_preemptions": now["num_preemptions"] - before["num_preemptions"],
        "speculative": _speculative_figures(now, before),
        "engine_steps": len(records),
        "expert_load": expert_load_figures(now["expert_load"], before["expert_load"], len(records)),
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
        "peak_gpu_memory_reserved_gib": torch.cuda.max_memory_reserved() / GIB if cuda else None,
    }


def counters(llm) -> dict:
    bm, scheduler, spec = llm.block_manager, llm.engine.scheduler, llm.engine.speculative
    return {"prefix_queried_tokens": bm.prefix_queried_tokens, "prefix_hit_tokens": bm.prefix_hit_tokens,
            "num_preemptions": scheduler.num_preemptions,
            "spec_draft_tokens": spec.num_draft_tokens if spec else 0,
            "spec_accepted_tokens": spec.num_accepted_tokens if spec else 0,
            "spec_verify_steps": spec.num_verify_steps if spec else 0,
            "expert_load": load.snapshot() if (load := llm.compiled.expert_load) is not None else None}


def expert_load_figures(now: dict | None, before: dict | None, steps: int) -> dict | None:
    """Per MoE block, the run's tokens routed to each expert (ExpertLoad counters, after minus
    before): their max and mean over the experts, imbalance = max / mean (1.0: even; what EP
    would make one rank wait for), and per engine step. None without --expert_load or MoE blocks."""
    if not now:
        return None
    blocks = {}
    for block, counts in now.items():
        got = [a - b for a, b in zip(counts, (before or {}).get(block, [0] * len(counts)))]
        mean = sum(got) / len(got)
        blocks[block] = {"experts": len(got), "tokens": sum(got), "max": max(got), "mean": mean, "min": min(got),
                         "imbalance": max(got) / mean if mean else None,
                         "max_per_step": max(got) / steps if steps else None, "tokens_per_expert": got}
    ratios = [b["imbalance"] for b in blocks.values() if b["imbalance"] is not None]
    return {"blocks": blocks, "worst_imbalance": max(ratios, default=None),
            "mean_imbalance": sum(ratios) / len(ratios) if ratios else None}


def _speculative_figures(now: dict, before: dict) -> dict | None:
    """Draft tokens verified and accepted in the run, and the acceptance length (tokens a
    verify step gained); None without speculative decoding."""
    drafts, accepted, steps = (now[k] - before[k] for k in ("spec_draft_tokens", "spec_accepted_tokens",
                                                             "spec_verify_steps"))
    if not steps:
        return None
    return {"draft_tokens": drafts, "accepted_tokens": accepted, "verify_steps": steps,
            "acceptance_rate": accepted / drafts if drafts else 0.0, "acceptance_length": 1 + accepted / steps}


def iteration_lines(records: list[StepRecord], t0: float) -> list[dict]:
    return [{"step": i, "time_s": r.start_s - t0, "duration_ms": r.duration_s * 1e3,
             "num_sequences": r.num_sequences, "num_tokens": r.num_tokens, "launched_ahead": r.launched_ahead,
             "num_running": r.stats.num_running, "num_waiting": r.stats.num_waiting,
             "num_preemptions": r.stats.num_preemptions, "kv_blocks_used": r.stats.blocks_used,
             "kv_blocks_free": r.stats.blocks_free, "kv_blocks_cached": r.stats.blocks_cached}
            for i, r in enumerate(records)]


def top_ops(profiler, n: int = 10) -> tuple[str, list[dict]]:
    """("kernels" | "CPU ops", the n with the most self time): CUDA kernels when the
    profiler saw any, else the CPU ops of the engine's thread."""
    from torch.autograd import DeviceType

    events = profiler.key_averages()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    if kernels:
        kind, rows = "kernels", [(e, _device_us(e)) for e in kernels]
    else:
        kind, rows = "CPU ops", [(e, e.self_cpu_time_total) for e in events]
    total = sum(us for _, us in rows) or 1.0
    rows.sort(key=lambda row: -row[1])
    return kind, [{"name": e.key, "calls": e.count, "total_ms": us / 1e3, "share": us / total} for e, us in rows[:n]]


def _device_us(event) -> float:
    # torch >= 2.4 names it self_device_time_total; older, self_cuda_time_total
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:,.2f}"


def _speculative_lines(spec: dict | None) -> list[str]:
    if spec is None:
        return []
    return [f"  speculative decoding  {spec['accepted_tokens']:,} of {spec['draft_tokens']:,} draft tokens accepted "
            f"({spec['acceptance_rate']:.1%}), acceptance length {spec['acceptance_length']:.2f}"]


def _expert_load_lines(load: dict | None) -> list[str]:
    if load is None:
        return []
    lines = [f"  expert load           {len(load['blocks'])} MoE blocks, tokens per expert max / mean (imbalance): "
             f"worst {_ratio(load['worst_imbalance'])}, mean {_ratio(load['mean_imbalance'])}"]
    for block, b in load["blocks"].items():
        lines.append(f"    {block:<40} {b['max']:>10,} / {b['mean']:>12,.1f} ({_ratio(b['imbalance'])}) "
                     f"over {b['experts']} experts, min {b['min']:,}")
    return lines


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(report: dict) -> str:
    cfg, res = report["config"], report["results"]
    env, engine, start = cfg["environment"], cfg["engine"], res["startup_s"]
    kv = res["kv_pool"]
    lines = [f"trtllm-bench {report['command']}: model {cfg['model']['name']} ({cfg['model']['kind']}), "
             f"{res['num_requests']} requests, {'streaming' if cfg['streaming'] else 'not streaming'}, "
             f"concurrency {cfg['concurrency'] or 'all'}",
             f"  device                {env['gpu'] or 'CPU'} (torch {env['torch']}, commit "
             f"{(env['git_commit'] or 'unknown')[:12]}{'+changes' if env['git_dirty'] else ''})",
             f"  engine                max_batch_size {engine['max_batch_size']}, max_num_tokens "
             f"{engine['max_num_tokens']}, max_seq_len {engine['max_seq_len']}, dtype {engine['dtype']}"
             + (f", weights {engine['quantization']}" if engine.get("quantization") else ""),
             f"  KV pool               {kv['blocks']:,} blocks x {kv['tokens_per_block']} tokens = "
             f"{kv['tokens']:,} tokens ({kv['dtype']}), {kv['gib']:.2f} GiB",
             f"  startup               {start['total']:.1f} s: load {start['load']:.1f}, compile "
             f"{start['compile']:.1f}, CUDA-graph capture {start['cuda_graph_capture']:.1f}, other "
             f"{start['other']:.1f} (compiled after startup: {res['compile_after_startup_s']:.1f} s, "
             f"{res['compile_during_run_s']:.1f} of them in the timed run)",
             "throughput",
             f"  requests              {res['num_requests'] - res['num_failed']} done, {res['num_failed']} failed, "
             f"in {res['duration_s']:.3f} s",
             f"  request/s             {_ms(res['request_throughput_req_s'])}",
             f"  output tokens/s       {_ms(res['output_throughput_tok_s'])}",
             f"  total tokens/s        {_ms(res['total_throughput_tok_s'])}",
             f"  tokens/s per user     {_ms(res['per_user_output_throughput_tok_s'])}",
             f"latency (ms)            {'mean':>10} {'p50':>10} {'p90':>10} {'p99':>10}"]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("end-to-end", "e2e_latency_ms")):
        s = res[key]
        if s is None:
            lines.append(f"  {name:<21} (needs --streaming)")
        else:
            lines.append(f"  {name:<21} " + " ".join(f"{_ms(s[k]):>10}" for k in ("mean", "p50", "p90", "p99")))
    memory = "n/a (no GPU)" if res["peak_gpu_memory_gib"] is None else \
        f"{res['peak_gpu_memory_gib']:.2f} GiB allocated, {res['peak_gpu_memory_reserved_gib']:.2f} GiB reserved"
    lines += ["engine",
              f"  max concurrent reqs   {res['max_concurrent_requests']}",
              f"  prefix-hit rate       {res['prefix_hit_rate']:.1%}",
              f"  preemptions           {res['num_preemptions']}",
              f"  engine steps          {res['engine_steps']}",
              *_speculative_lines(res.get("speculative")),
              *_expert_load_lines(res.get("expert_load")),
              f"  peak GPU memory       {memory}"]
    return "\n".join(lines)
