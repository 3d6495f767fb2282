"""`trtllm-bench`'s command line: the options of the flat form, of each run command and of
prepare-dataset (trtllm/cli/bench.py's docstring is the --help text), and their checks.

    parser(doc) -> argparse.ArgumentParser
    check_run_options(args, spec)       a run's options checked, their defaults filled in
    check_prepare_options(args)         prepare-dataset's: no run option given before it

An option whose default matters only with another one (--profile_steps without --profile,
--max_draft_len without --speculative) parses to None when not given, so that one given
alone is refused by name rather than silently unused; its default is filled in afterwards
(speculative_config_from_options fills the speculative ones).
"""
from __future__ import annotations

import argparse

from trtllm.cli.llm_api_options import HELP as LLM_API_OPTIONS_HELP
from trtllm.models.checkpoint_config import EXPERT_COUNT_FIELDS
from trtllm.runtime.speculative.config import SPECULATIVE_KINDS

COMMANDS = ("throughput", "latency", "prepare-dataset")
DEFAULT_TRACE = "trtllm-bench-trace.json"


# the defaults of the options that parse to None when not given (the speculative ones: theirs)
RUN_DEFAULTS = {"dtype": "auto", "seed": 0, "disable_overlap_scheduler": False, "expert_load": False,
                "temperature": 0.0, "warmup": 2, "profile": False, "profile_trace": DEFAULT_TRACE, "profile_steps": 8}
_FLAT_OPTIONS = ("batch_size", "input_len", "output_len")


class BenchError(ValueError):
    """Input the benchmark refuses: reported as one line, exit code 2."""


def _add(parser, name: str, **kw) -> None:
    """--name_with_underscores, and its dashed spelling."""
    dashed = name.replace("_", "-")
    parser.add_argument(*([name] if dashed == name else [name, dashed]), **kw)


def _run_options(parser, suppress: bool) -> None:
    """Engine and report options: on the top level (the flat form) and on each run command,
    None when not given (RUN_DEFAULTS fills them in). `suppress`: a command's copy leaves what
    the top level parsed alone when not given."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: None)
    _add(parser, "--max_batch_size", type=int, default=d(None),
         help="sequences in one engine step at most (default: throughput, as many as the KV pool holds for the "
              "dataset's lengths, 256 to 1024; latency 1; flat form --batch_size)")
    _add(parser, "--max_num_tokens", type=int, default=d(None), help="tokens in one engine step at most (default 8192)")
    _add(parser, "--max_seq_len", type=int, default=d(None),
         help="prompt + output tokens at most (default: the workload's longest request)")
    _add(parser, "--kv_cache_free_gpu_memory_fraction", type=float, default=d(None),
         help="fraction of free GPU memory for the KV cache (default 0.9)")
    _add(parser, "--kv_cache_max_tokens", type=int, default=d(None), help="KV-cache capacity in tokens at most")
    _add(parser, "--kv_cache_dtype", choices=["auto", "fp8", "int8"], default=d(None),
         help="KV-cache element: auto (the model's dtype, default), fp8 (e4m3) or int8 (KvCacheConfig.dtype)")
    _add(parser, "--quantization", default=d(None),
         help="quantize the weights as they load (QuantConfig.quant_algo: FP8, FP8_PER_CHANNEL_PER_TOKEN, "
              "FP8_BLOCK_SCALES; TensorRT-LLM's QuantAlgo names); an FP8 checkpoint needs none")
    _add(parser, "--disable_overlap_scheduler", action="store_true", default=d(False),
         help="wait for each decode step before launching the next")
    _add(parser, "--cuda_graph_max_prefill_tokens", type=int, default=d(None),
         help="prefill steps of at most N tokens replay CUDA graphs (CudaGraphConfig.max_prefill_tokens, default "
              "2048; 0: none)")
    _add(parser, "--extra_llm_api_options", default=d(None), metavar="FILE", help=LLM_API_OPTIONS_HELP)
    _add(parser, "--expert_load", action="store_true", default=d(False),
         help="MoE models: count the tokens routed to each expert of each MoE block (one small kernel a block a "
              "step, trtllm/expert_load.py) and report max / mean per expert and their ratio")
    _add(parser, "--speculative", choices=SPECULATIVE_KINDS, default=d(None),
         help="speculative decoding: n-gram lookup (NGramDecodingConfig), a draft model (DraftTargetDecodingConfig) or "
              "an EAGLE-3 head (EagleDecodingConfig), both from --speculative_model_dir, or DeepSeek-V3's MTP layer "
              "(MTPDecodingConfig); docs/speculative_decoding.md")
    _add(parser, "--max_draft_len", type=int, default=d(None), help="draft tokens a step at most (default 4)")
    _add(parser, "--max_matching_ngram_size", type=int, default=d(None),
         help="n-gram: the longest suffix looked up (default 3)")
    _add(parser, "--speculative_model_dir", default=d(None), help="draft_target: the draft model's checkpoint; eagle3: the EAGLE-3 head's")
    _add(parser, "--temperature", type=float, default=d(0.0), help="0 = greedy (default)")
    _add(parser, "--warmup", type=int, default=d(2), help="requests run before timing, untimed (default 2)")
    _add(parser, "--report_json", default=d(None), help="write every figure and the configuration to FILE")
    _add(parser, "--iteration_log", default=d(None), help="write one JSON line per engine step to FILE")
    _add(parser, "--profile", action="store_true", default=d(False),
         help="afterwards, profile a few decode steps: a torch profiler trace and the top kernels")
    _add(parser, "--profile_trace", default=d(DEFAULT_TRACE), help=f"the trace file (default {DEFAULT_TRACE})")
    _add(parser, "--profile_steps", type=int, default=d(8), help="engine steps to profile (default 8)")


def parser(doc: str) -> argparse.ArgumentParser:
    # no abbreviations: the top level sees the commands' options too (--output is not --output_len)
    ap = argparse.ArgumentParser(prog="trtllm-bench", description=doc.split("\n\n")[0], allow_abbrev=False,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    _add(ap, "--model", default=None, help="checkpoint directory, 'demo' (default) or a preset")
    _add(ap, "--dtype", default=None, choices=["auto", "float32", "float16", "bfloat16"], help="(default auto)")
    _add(ap, "--seed", type=int, default=None, help="preset weights and flat-form prompts (default 0)")
    _add(ap, "--batch_size", type=int, default=None, help="flat form: requests, all at once")
    _add(ap, "--input_len", type=int, default=None, help="flat form: prompt tokens of each request")
    _add(ap, "--output_len", type=int, default=None, help="flat form: tokens each request generates")
    _run_options(ap, suppress=False)
    sub = ap.add_subparsers(dest="command", metavar="{throughput,latency,prepare-dataset}")
    for name, help_ in (("throughput", "all requests offline, or at most --concurrency in flight"),
                        ("latency", "one request at a time, streamed: TTFT and per-token latency")):
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False)
        _add(p, "--dataset", required=True, help="JSONL requests (TensorRT-LLM's layout; prepare-dataset writes one)")
        _add(p, "--num_requests", type=int, default=None, help="the first N requests (default: all)")
        if name == "throughput":
            _add(p, "--concurrency", type=int, default=None, help="requests in flight at most (default: all)")
            _add(p, "--streaming", action="store_true", help="stream each request's tokens: TTFT, TPOT and ITL")
        _add(p, "--model", default=argparse.SUPPRESS, help="as before the command")
        _add(p, "--dtype", default=argparse.SUPPRESS, choices=["auto", "float32", "float16", "bfloat16"])
        _run_options(p, suppress=True)
    p = sub.add_parser("prepare-dataset", help="synthetic token-id prompts of normal-distributed lengths",
                       allow_abbrev=False)
    _add(p, "--model", default=argparse.SUPPRESS, help="as before the command: its vocabulary and context")
    _add(p, "--num_requests", type=int, required=True)
    _add(p, "--input_mean", type=float, required=True, help="mean prompt tokens")
    _add(p, "--input_stdev", type=float, default=0.0)
    _add(p, "--output_mean", type=float, required=True, help="mean output tokens")
    _add(p, "--output_stdev", type=float, default=0.0)
    _add(p, "--seed", type=int, default=argparse.SUPPRESS, help="(default 0)")
    _add(p, "--output", default=None, help="JSONL file (default: stdout)")
    _add(p, "--stdout", action="store_true", help="write to stdout (the default; TensorRT-LLM's spelling)")
    p.add_argument("distribution", nargs="?", choices=["token-norm-dist"], default="token-norm-dist",
                   help="TensorRT-LLM's subcommand name, accepted: the lengths are normal-distributed")
    return ap


def check_prepare_options(args: argparse.Namespace) -> None:
    """prepare-dataset reads --model and --seed only: a run's option given before it is refused
    by name (it was silently unused)."""
    probe = argparse.ArgumentParser(add_help=False)
    _run_options(probe, suppress=False)
    stray = [f"--{n}" for n in ("dtype", *_FLAT_OPTIONS, *vars(probe.parse_args([]))) if getattr(args, n) is not None]
    if stray:
        raise BenchError(f"{', '.join(stray)}: not {'options' if len(stray) > 1 else 'an option'} of prepare-dataset "
                         "(before its name it reads only --model and --seed)")
    args.seed = RUN_DEFAULTS["seed"] if args.seed is None else args.seed


def names_experts(config: dict) -> bool:
    """config.json (or a multimodal model's text_config) counts experts: a MoE model (Qwen-MoE's
    num_experts 0 turns its MoE layers off)."""
    return any(isinstance(section, dict) and any(section.get(k) for k in EXPERT_COUNT_FIELDS)
               for section in (config, config.get("text_config")))


def check_run_options(args: argparse.Namespace, spec) -> None:
    """A run's options, before anything loads (BenchError naming one): an option given that the
    run would not read (--profile_steps / --profile_trace without --profile; --seed where there
    is neither a preset's weights nor the flat form's prompts to draw; --expert_load on a model
    whose config names no experts), a count out of range,
    a bad --temperature, an output file that cannot be written. Then RUN_DEFAULTS fills in
    the options not given."""
    from trtllm.cli.output_paths import unwritable_reason
    from trtllm.config import ConfigError
    from trtllm.sampling_params import SamplingParams

    profile = [f"--{n}" for n in ("profile_trace", "profile_steps") if getattr(args, n) is not None]
    if profile and not args.profile:
        raise BenchError(f"{', '.join(profile)} {'need' if len(profile) > 1 else 'needs'} --profile")
    if args.seed is not None and args.command is not None and spec.kind != "preset":
        raise BenchError(f"--seed draws a preset's weights and the flat form's prompts: model {spec.name!r} is a "
                         f"checkpoint and {args.command}'s requests come from --dataset")
    if args.expert_load and not names_experts(spec.config):
        raise BenchError("--expert_load: the model has no MoE layers (its config names no experts: "
                         f"{', '.join(EXPERT_COUNT_FIELDS)})")
    for name, default in RUN_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name, least in (("warmup", 0), ("profile_steps", 1)):
        if getattr(args, name) < least:
            raise BenchError(f"--{name} must be >= {least}, got {getattr(args, name)}")
    try:  # --temperature: refused now, not as a traceback once the engine is built
        SamplingParams(temperature=args.temperature)
    except ConfigError as e:
        raise BenchError(f"bad option: {'; '.join(str(e).splitlines())}") from None
    outputs = [args.report_json, args.iteration_log] + ([args.profile_trace] if args.profile else [])
    for path in filter(None, outputs):  # before minutes of loading, compiling and running
        why = unwritable_reason(path)
        if why is not None:
            raise BenchError(f"cannot write {path!r}: {why}")
