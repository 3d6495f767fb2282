"""`trtllm-bench`: how fast an engine serves a workload, through the public `LLM` API (docs/bench.md).

    trtllm-bench --model NAME_OR_DIR prepare-dataset --num_requests N --input_mean 128 --output_mean 128 \\
                 [--input_stdev S] [--output_stdev S] [--seed 0] [--output FILE.jsonl]
    trtllm-bench --model NAME_OR_DIR throughput --dataset FILE.jsonl [--num_requests N] [--concurrency N]
                 [--streaming] [--max_batch_size N] [--max_num_tokens N] [--kv_cache_free_gpu_memory_fraction F]
                 [--kv_cache_dtype auto|fp8|int8] [--quantization FP8|FP8_PER_CHANNEL_PER_TOKEN|FP8_BLOCK_SCALES]
                 [--warmup N] [--report_json FILE] [--iteration_log FILE] [--profile]
                 [--extra_llm_api_options FILE.yml]   # TensorRT-LLM's LLM arguments, over the flags'
    trtllm-bench --model NAME_OR_DIR latency --dataset FILE.jsonl [...]      one request at a time, streamed
    trtllm-bench --model NAME_OR_DIR --batch_size 8 --input_len 128 --output_len 128 [--profile]

NAME_OR_DIR: a checkpoint directory, "demo" (the default), or a preset with random
weights at a real model's shapes (trtllm/cli/model_arg.py: llama-3.1-8b, llama-3.2-1b,
qwen3-8b, tiny-llama, tiny-qwen3). Bad input (a dataset line that is not JSON or lacks a
field, an unknown model, a missing file, a request longer than the model's context) is
refused before anything runs: one line on stderr, exit code 2. A request that fails in the
warm-up, the timed run or the --profile run stops the benchmark: one line (how many failed, the
first error), no figures and no report files, exit code 1.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from trtllm.cli.bench_args import COMMANDS, BenchError, check_prepare_options, check_run_options, parser
from trtllm.cli.bench_dataset import DatasetError
from trtllm.cli.model_arg import UnknownModel


class RequestsFailed(RuntimeError):
    """A request of the warm-up, the timed run or the profile run failed: reported as one line, no figures, exit code 1."""


def parse_args(argv=None) -> argparse.Namespace:
    return parser(__doc__).parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "prepare-dataset":
            from trtllm.cli.bench_dataset import prepare_dataset
            check_prepare_options(args)
            return prepare_dataset(args)
        return _bench(args)
    except (BenchError, DatasetError, UnknownModel, FileNotFoundError) as e:
        print(f"trtllm-bench: {e}", file=sys.stderr)
        return 2
    except RequestsFailed as e:
        print(f"trtllm-bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _workload(args, spec) -> tuple[str, list, dict]:
    """(command, requests with token ids, the run's mode: concurrency, streaming, max_batch_size)."""
    from trtllm.cli.bench_dataset import read_dataset, synthetic_requests, tokenize_prompts

    command = args.command or "flat"
    if command == "flat":
        missing = [f"--{n}" for n in ("batch_size", "input_len", "output_len") if getattr(args, n) is None]
        if missing:
            raise BenchError(f"give a command ({', '.join(COMMANDS)}) or the flat form's --batch_size, "
                             f"--input_len and --output_len (missing: {', '.join(missing)})")
        requests = synthetic_requests(args.batch_size, args.input_len, 0, args.output_len, 0, spec.vocab_size,
                                      args.seed)
        return command, requests, dict(concurrency=None, streaming=True, max_batch_size=args.batch_size)
    flat = [f"--{n}" for n in ("batch_size", "input_len", "output_len") if getattr(args, n) is not None]
    if flat:
        raise BenchError(f"{', '.join(flat)}: the flat form's options, not {command}'s (its requests come "
                         "from --dataset)")
    requests = read_dataset(args.dataset)
    if args.num_requests is not None:
        if not 1 <= args.num_requests <= len(requests):
            raise BenchError(f"--num_requests {args.num_requests}: the dataset has {len(requests)} requests")
        requests = requests[: args.num_requests]
    if any(r.input_ids is None for r in requests):
        requests = tokenize_prompts(requests, spec.tokenizer(), spec.name)
    if command == "latency":
        return command, requests, dict(concurrency=1, streaming=True, max_batch_size=1)
    if args.concurrency is not None and args.concurrency < 1:
        raise BenchError(f"--concurrency must be >= 1, got {args.concurrency}")
    # max_batch_size None: as many as the KV pool holds for these lengths (cli/bench_tuning.py)
    return command, requests, dict(concurrency=args.concurrency, streaming=args.streaming, max_batch_size=None)


def _engine_configs(args, requests, spec, mode_batch: int | None):
    """BuildConfig and KvCacheConfig for the workload; BenchError if a request cannot fit. With no
    --max_batch_size and no mode_batch (the command's own: latency's 1) the build config leaves
    max_batch_size unset: _build_llm sizes it from the KV pool once the options file is applied."""
    from trtllm.cli.bench_dataset import check_requests
    from trtllm.config import BuildConfig, ConfigError, KvCacheConfig

    context = spec.max_position_embeddings
    if args.max_seq_len is not None:
        check_requests(requests, spec.vocab_size, args.max_seq_len, "--max_seq_len")
        if context is not None and args.max_seq_len > context:
            raise BenchError(f"--max_seq_len {args.max_seq_len} exceeds the model's context of {context} tokens "
                             "(max_position_embeddings)")
    else:
        check_requests(requests, spec.vocab_size, context, "the model's context (max_position_embeddings)")
    max_seq_len = args.max_seq_len or max(r.input_len + r.output_tokens for r in requests)
    build = dict(max_seq_len=max_seq_len, max_input_len=max(r.input_len for r in requests))
    batch = mode_batch if args.max_batch_size is None else args.max_batch_size
    if batch is not None:  # (--max_batch_size 0 is BuildConfig's to refuse, not a silent "default" as -1 is)
        build["max_batch_size"] = batch
    if args.max_num_tokens is not None:
        build["max_num_tokens"] = args.max_num_tokens
    kv = {k: v for k, v in (("free_gpu_memory_fraction", args.kv_cache_free_gpu_memory_fraction),
                            ("max_tokens", args.kv_cache_max_tokens), ("dtype", args.kv_cache_dtype)) if v is not None}
    try:
        return BuildConfig(**build), KvCacheConfig(**kv)
    except ConfigError as e:
        raise BenchError(f"bad option: {'; '.join(str(e).splitlines())}") from None


def _bench(args) -> int:
    from trtllm.cli.bench_run import StepRecorder
    from trtllm.cli.model_arg import resolve_model

    spec = resolve_model(args.model)
    check_run_options(args, spec)
    command, requests, mode = _workload(args, spec)
    build, kv = _engine_configs(args, requests, spec, mode.pop("max_batch_size"))
    llm, load_s, options = _build_llm(args, spec, build, kv, requests)
    build = options["build_config"]  # (--extra_llm_api_options may set its limits)
    recorder = StepRecorder()
    with llm:
        llm.engine.on_step = recorder
        report, t0 = _measure(llm, args, command, spec, requests, mode, options, load_s, recorder)
        records = list(recorder.records)
        if args.profile:
            report["results"]["profile"] = _profile(llm, args, requests[: build.max_batch_size], recorder)
    _write_outputs(args, report, records, t0)
    return 0


def _build_llm(args, spec, build, kv, requests):
    """(the LLM, seconds spent loading before it, its options: the flags' with the file's over them;
    a max_batch_size neither gave: as many as the KV pool the options make holds, cli/bench_tuning.py)."""
    from trtllm.cli.llm_api_options import LlmApiOptionsError, apply_llm_api_options
    from trtllm.config import BuildConfig, ConfigError, QuantConfig
    from trtllm.runtime.llm import LLM

    try:  # the options' configs first: a bad one is refused before a preset's weights are made
        quant = QuantConfig(quant_algo=args.quantization) if args.quantization else None
        options = dict(build_config=build, kv_cache_config=kv, quant_config=quant, dtype=args.dtype,
                       disable_overlap_scheduler=args.disable_overlap_scheduler,
                       speculative_config=_speculative_config(args))
        if args.cuda_graph_max_prefill_tokens is not None:
            from trtllm.config import CudaGraphConfig
            options["cuda_graph_config"] = CudaGraphConfig(max_prefill_tokens=args.cuda_graph_max_prefill_tokens)
        options = apply_llm_api_options(options, args.extra_llm_api_options, "trtllm-bench")
        if "max_batch_size" not in options["build_config"].model_fields_set:
            from trtllm.cli.bench_tuning import batch_for_run
            options["build_config"] = BuildConfig(**options["build_config"].model_dump(exclude_unset=True),
                                                  max_batch_size=batch_for_run(requests, spec.config, options))
        started = time.perf_counter()
        kwargs = spec.llm_kwargs(options["dtype"], seed=args.seed)
        load_s = time.perf_counter() - started  # a preset's weights, a module loaded here (else: in LLM)
        if args.expert_load:
            from trtllm.expert_load import ExpertLoad
            kwargs["compile_options"] = {**kwargs.get("compile_options", {}), "expert_load": ExpertLoad()}
        llm = LLM(**kwargs, **{k: v for k, v in options.items() if k != "dtype"})
        return llm, load_s, options
    except LlmApiOptionsError as e:
        raise BenchError(f"bad option: {e}") from None
    except ConfigError as e:
        raise BenchError(f"bad option: {'; '.join(str(e).splitlines())}") from None
    except (ValueError, OSError) as e:
        raise BenchError(f"cannot build the engine: {e}") from None


def _speculative_config(args):
    """--speculative and its options as the LLM's speculative_config (None: off)."""
    from trtllm.runtime.speculative.config import speculative_config_from_options
    return speculative_config_from_options(args.speculative, args.max_draft_len, args.max_matching_ngram_size,
                                           args.speculative_model_dir)


def _measure(llm, args, command, spec, requests, mode, options, load_s, recorder):
    """Warm up, then the timed run: (the report, the time of its first submission)."""
    from trtllm.cli import bench_report
    from trtllm.cli.bench_run import run_requests
    from trtllm.cli.bench_stats import request_figures
    from trtllm.sampling_params import SamplingParams

    for r in requests:  # the engine's own checks, before any request runs
        try:
            llm.validate(r.input_ids, SamplingParams(max_tokens=r.output_tokens, ignore_eos=True))
        except ValueError as e:
            raise BenchError(f"{r.where}: {e}") from None
    startup, compiled = llm.engine.startup, llm.compiled
    if args.warmup:
        warm = [requests[i % len(requests)] for i in range(args.warmup)]
        _check_finished("the warm-up", run_requests(llm, warm, temperature=args.temperature, progress="warm-up",
                                                     **mode))
        _check_expert_load(llm)
    before, compile_before = bench_report.counters(llm), compiled.compile_s
    recorder.clear()
    timings = run_requests(llm, requests, temperature=args.temperature, progress=command, **mode)
    _check_finished("the timed run", timings)
    _check_expert_load(llm)  # (no warm-up: the graphs compiled in the timed run)
    records = list(recorder.records)
    results = request_figures(timings, mode["streaming"])
    results["first_error"] = None  # (a run with a failed request reports no figures: _check_finished)
    results.update(bench_report.engine_figures(llm, records, before))
    results["startup_s"] = bench_report.startup_figures(startup, load_s)
    results["compile_after_startup_s"] = compiled.compile_s - startup.compile_s
    results["compile_during_run_s"] = compiled.compile_s - compile_before
    config = bench_report.run_config(llm, args, spec.describe(), requests, mode, options)
    return {"command": command, "config": config, "results": results}, min(t.submitted_s for t in timings)


def _check_finished(what: str, timings) -> None:
    """RequestsFailed if a request of the run failed: figures over the requests that finished
    would look like a valid result, and a failed warm-up leaves the timed run cold."""
    errors = [t.error or "it did not finish" for t in timings if t.error is not None or t.finished_s is None]
    if errors:
        first = "; ".join(line.strip() for line in str(errors[0]).splitlines() if line.strip())
        raise RequestsFailed(f"{what}: {len(errors)} of {len(timings)} request(s) failed; the first: {first} "
                             "(no figures reported)")


def _check_expert_load(llm) -> None:
    """--expert_load, once the model's graphs have compiled (a MoE block's counter is made then):
    no block counted is refused, never reported as no figures. check_run_options refused a model
    whose config names no experts; this is one whose layers are all dense even so (Qwen-MoE's
    mlp_only_layers), or whose blocks passes/fuse_moe.py left unfused (its note says why)."""
    load = llm.compiled.expert_load
    if load is None or load.counters or not llm.compiled.graphs:
        return
    unfused = [note for note in llm.compiled.notes if note.startswith("fuse_moe:")]
    raise BenchError(f"--expert_load: no MoE block to count: {unfused[0]}" if unfused
                     else "--expert_load: the model has no MoE layers")


def _profile(llm, args, requests, recorder) -> dict:
    """A torch profiler over `--profile_steps` decode steps of up to max_batch_size of the
    requests, all at once (not timed); the trace written, the top kernels printed."""
    from trtllm.cli.bench_report import top_ops
    from trtllm.cli.bench_run import ProfileWindow, prepare_profiler, run_requests

    prepare_profiler()
    window = ProfileWindow(args.profile_steps)
    recorder.profile = window
    try:
        timings = run_requests(llm, requests, temperature=args.temperature, progress="profile", stop=window.done)
    finally:
        recorder.profile = None
    _check_finished("the profile run", timings)  # its own aborts are no failure: they end with no error
    if window.error is not None or window.profiler is None:
        why = window.error or "no decode step ran (requests of one output token?)"
        print(f"trtllm-bench: nothing profiled: {why}", file=sys.stderr)
        return {"trace": None, "steps": 0, "error": why, "top": []}
    window.profiler.export_chrome_trace(args.profile_trace)
    kind, top = top_ops(window.profiler)
    return {"trace": args.profile_trace, "steps": window.seen, "requests": len(requests), "kind": kind, "top": top}


def _write_outputs(args, report: dict, records, t0: float) -> None:
    from trtllm.cli.bench_report import format_table, iteration_lines

    print(format_table(report))
    profile = report["results"].get("profile")
    if profile and profile["trace"]:
        print(f"profile: {profile['steps']} engine steps of {profile['requests']} requests -> {profile['trace']}\n"
              f"  top {profile['kind']} by self time:")
        for row in profile["top"]:
            print(f"  {row['share']:6.1%} {row['total_ms']:10.3f} ms {row['calls']:6d}x  {row['name'][:90]}")
    if args.report_json:
        with open(args.report_json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
    if args.iteration_log:
        with open(args.iteration_log, "w", encoding="utf-8") as f:
            for line in iteration_lines(records, t0):
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    sys.exit(main())
