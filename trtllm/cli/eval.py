"""`trtllm-eval`: a model's quality, measured on our engine (the one `LLM` runs).

    trtllm-eval --model demo perplexity                   # the demo model's held-out sample
    trtllm-eval --model demo demo-mc                      # its multiple-choice task
    trtllm-eval --model DIR perplexity --text FILE [--window 1024 --stride 512]
    trtllm-eval --model DIR mmlu --dataset_path test.parquet [--num_fewshot 5 --fewshot_path dev.parquet]
    trtllm-eval --model DIR gsm8k|hellaswag|arc --dataset_path FILE [--num_fewshot N] [--limit N]
    trtllm-eval --model DIR lm-eval --tasks NAME[,NAME] [--include_path DIR]
    ... --report_json report.json                         # every figure, the configuration, versions, commit

Datasets are local files in their published layouts (trtllm/eval/tasks.py); nothing is
fetched. Bad input (an unknown task, a missing file, a malformed row, a sequence longer
than the engine takes) is one line on stderr and exit status 2, before the evaluation runs.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

from trtllm.cli.llm_api_options import HELP as LLM_API_OPTIONS_HELP
from trtllm.cli.output_paths import unwritable_reason

DATASET_TASKS = ("mmlu", "gsm8k", "hellaswag", "arc")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints its usage too)
        self.exit(2, f"trtllm-eval: {message} (see trtllm-eval --help)\n")


def _engine_options(ap: argparse.ArgumentParser, default=None) -> None:
    """The model and engine options; on a task's parser with SUPPRESS, so that they may
    follow the task's name without overriding what came before it."""
    def d(value):
        return value if default is None else default

    ap.add_argument("--model", default=d("demo"), help='"demo" (the built-in model) or a checkpoint directory')
    ap.add_argument("--tokenizer", default=d(None), help="tokenizer directory (default: the model's)")
    ap.add_argument("--dtype", default=d("auto"), choices=DTYPES)
    ap.add_argument("--quant", default=d(None), help="quantization algorithm (TensorRT-LLM's QuantAlgo names)")
    ap.add_argument("--max_batch_size", type=int, default=d(64))
    ap.add_argument("--max_num_tokens", type=int, default=d(4096), help="tokens in one engine step at most")
    ap.add_argument("--max_seq_len", type=int, default=d(None), help="default: the model's max_position_embeddings")
    ap.add_argument("--max_input_len", type=int, default=d(None), help="default: max_seq_len, at most 4096")
    ap.add_argument("--kv_cache_free_gpu_memory_fraction", type=float, default=d(0.9))
    ap.add_argument("--kv_cache_dtype", choices=["auto", "fp8", "int8"], default=d("auto"),
                    help="KV-cache element: auto (the model's dtype), fp8 (e4m3) or int8")
    ap.add_argument("--extra_llm_api_options", "--extra-llm-api-options", default=d(None), metavar="FILE",
                    help=LLM_API_OPTIONS_HELP)
    ap.add_argument("--report_json", default=d(None), help="write every figure and the configuration here")
    ap.add_argument("--no_progress", action="store_true", default=d(False), help="no progress bars")


def parse_args(argv=None) -> argparse.Namespace:
    ap = _Parser(prog="trtllm-eval", description=__doc__.splitlines()[0],
                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:10]))
    _engine_options(ap)
    tasks = ap.add_subparsers(dest="task", metavar="TASK", required=True, parser_class=_Parser)

    p = tasks.add_parser("perplexity", help="token-level perplexity and bits per byte of a text, sliding windows")
    p.add_argument("--text", default=None, help="a UTF-8 text file (default for --model demo: its held-out sample)")
    p.add_argument("--entries", action="store_true",
                   help="the text is blank-line-separated entries, each scored as bos entry eos (the demo "
                        "model's training layout; the default for its held-out sample)")
    p.add_argument("--window", type=int, default=None, help="tokens a window (default: the longest the engine "
                                                              "scores, at most 4096)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: window / 2)")

    for name in (*DATASET_TASKS, "demo-mc"):
        demo = name == "demo-mc"
        p = tasks.add_parser(name, help="the demo model's multiple-choice task (trtllm/demo_model/eval_mc.jsonl)"
                             if demo else f"{name} from a local dataset file")
        p.add_argument("--dataset_path", required=not demo, default=None,
                       help="a .jsonl / .json / .parquet file, or a directory of them")
        p.add_argument("--num_fewshot", type=int, default=0)
        p.add_argument("--fewshot_path", default=None, help="few-shot examples (default: the dataset's other rows)")
        p.add_argument("--limit", type=int, default=None, help="the first N rows only")
        if name == "gsm8k":
            p.add_argument("--max_gen_tokens", type=int, default=256)

    p = tasks.add_parser("lm-eval", help="lm-evaluation-harness tasks, with local data")
    p.add_argument("--tasks", required=True, help="comma-separated task (or group) names")
    p.add_argument("--include_path", default=None, help="a directory of task YAMLs")
    p.add_argument("--only_include_path", action="store_true",
                   help="index only --include_path's tasks, not lm-eval's ~14,000 built-in ones (saves ~6 s)")
    p.add_argument("--num_fewshot", type=int, default=None, help="default: each task's own")
    p.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    p.add_argument("--max_gen_tokens", type=int, default=256, help="for tasks that name no max_gen_toks")
    p.add_argument("--bootstrap_iters", type=int, default=1000,
                   help="resamples for bootstrapped stderrs (default 1000; 0: none, those stderrs N/A)")
    for p in tasks.choices.values():  # the engine's options also after the task's name
        _engine_options(p, argparse.SUPPRESS)
    args = ap.parse_args(argv)
    for name in ("max_batch_size", "max_num_tokens", "window", "stride", "limit", "max_gen_tokens"):
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            ap.error(f"--{name} must be positive, got {value}")
    limit = getattr(args, "limit", None)  # lm-eval's: a float, nan and inf parsed (nan <= 0 is False)
    if limit is not None and not (0 < limit < 1 or (math.isfinite(limit) and limit == int(limit))):
        ap.error(f"--limit must be a fraction of the examples (0 < F < 1) or a whole number of them, got {limit}")
    for name in ("num_fewshot", "bootstrap_iters"):
        value = getattr(args, name, None)
        if value is not None and value < 0:
            ap.error(f"--{name} must be >= 0, got {value}")
    if getattr(args, "fewshot_path", None) is not None and args.num_fewshot == 0:  # 0: the default
        ap.error("--fewshot_path needs --num_fewshot N > 0 (with no shots it would be unused)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from trtllm.eval.scorer import EvalInputError

    try:
        return _run(args)
    except (EvalInputError, ValueError, OSError) as e:
        print(f"trtllm-eval: {_one_line(e)}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the engine failed a request (NaN logits, a dead engine thread)
        print(f"trtllm-eval: {_one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__


def _model_path(name: str) -> Path:
    """--model: "demo" or a checkpoint directory (cli/model_arg.py, as trtllm-bench reads
    it). A preset has random weights and no tokenizer: nothing to evaluate."""
    from trtllm.cli.model_arg import UnknownModel, resolve_model
    from trtllm.eval.scorer import EvalInputError

    try:
        spec = resolve_model(name)
    except UnknownModel as e:
        raise EvalInputError(str(e)) from None
    if spec.kind == "preset":
        raise EvalInputError(f"--model {name!r} is a trtllm-bench preset (random weights, no tokenizer): "
                             "trtllm-eval needs a checkpoint directory or 'demo'")
    return spec.path


def _inputs(args) -> dict:
    """The task's input, read and checked before the engine is built (a bad row costs no load)."""
    from trtllm.eval import datasets, gsm8k, tasks
    from trtllm.eval.scorer import EvalInputError

    if args.task == "perplexity":
        if args.text is None and args.model != "demo":
            raise EvalInputError("perplexity needs --text FILE (only the demo model has a default text)")
        from trtllm.demo import DEMO_MODEL_DIR, HELDOUT_SAMPLE
        path = Path(args.text) if args.text is not None else DEMO_MODEL_DIR / HELDOUT_SAMPLE
        if not path.is_file():
            raise EvalInputError(f"--text {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise EvalInputError(f"--text {str(path)!r} is not UTF-8 text (byte {e.start})") from None
        return {"text": text, "path": path, "entries": args.entries or args.text is None}
    if args.task == "lm-eval":
        names = [t.strip() for t in args.tasks.split(",") if t.strip()]
        if not names:
            raise EvalInputError("--tasks names no task")
        if args.only_include_path and args.include_path is None:  # before the engine is built, not after
            raise EvalInputError("--only_include_path needs --include_path")
        return {"tasks": names}
    path = args.dataset_path
    if path is None:  # demo-mc
        from trtllm.demo import DEMO_MODEL_DIR
        path = DEMO_MODEL_DIR / "eval_mc.jsonl"
    read = gsm8k.read_docs if args.task == "gsm8k" else tasks.MC_TASKS[args.task].read
    docs = read(datasets.read_rows(path))[: args.limit]
    fewshot = read(datasets.read_rows(args.fewshot_path)) if args.fewshot_path else None
    return {"docs": docs, "fewshot": fewshot, "path": path}


def _evaluate(args, inputs: dict, scorer) -> dict:
    if args.task == "perplexity":
        from trtllm.demo import read_entries
        from trtllm.eval import perplexity as ppl

        text = inputs["text"]
        ids = ppl.entry_tokens(scorer, read_entries(inputs["path"])) if inputs["entries"] \
            else ppl.text_tokens(scorer, text)
        window, stride = args.window, args.stride
        if window is None and args.model == "demo":  # as trained, and as its training.json measured
            window, stride = _demo_window(), stride or _demo_window() - 1
        window = window or min(scorer.max_len, 4096)
        result = ppl.perplexity(scorer, ids, len(text.encode("utf-8")), window, stride or max(1, window // 2))
        return result.as_dict()
    if args.task == "lm-eval":
        from trtllm.eval.lm_eval_adapter import run_lm_eval

        return run_lm_eval(scorer, inputs["tasks"], args.include_path, args.num_fewshot, args.limit,
                           args.max_gen_tokens, include_defaults=not args.only_include_path,
                           bootstrap_iters=args.bootstrap_iters)
    if args.task == "gsm8k":
        from trtllm.eval.gsm8k import evaluate_gsm8k

        return evaluate_gsm8k(scorer, inputs["docs"], inputs["fewshot"], args.num_fewshot, args.max_gen_tokens)
    from trtllm.eval.multiple_choice import evaluate_mc
    from trtllm.eval.tasks import MC_TASKS

    return evaluate_mc(scorer, MC_TASKS[args.task], inputs["docs"], inputs["fewshot"], args.num_fewshot)


def _demo_window() -> int:
    """The demo model saw windows of seq_len tokens in training (256; its positions past that
    are untrained, though config.json allows 512): score windows of seq_len + 1, the first
    token of each the context of the next, as training.json's held-out figure was measured."""
    import json

    from trtllm.demo import DEMO_MODEL_DIR

    return json.loads((DEMO_MODEL_DIR / "training.json").read_text())["heldout_sample"]["seq_len"] + 1


def _run(args) -> int:
    from trtllm.config import BuildConfig, KvCacheConfig, QuantConfig

    model_path = _model_path(args.model)
    inputs = _inputs(args)
    why = unwritable_reason(args.report_json) if args.report_json else None
    if why is not None:  # before the evaluation
        from trtllm.eval.scorer import EvalInputError
        raise EvalInputError(f"--report_json {args.report_json}: {why}")
    build = BuildConfig(max_batch_size=args.max_batch_size, max_num_tokens=args.max_num_tokens,
                        max_seq_len=args.max_seq_len,
                        # `is not None`: 0 is BuildConfig's to refuse (it silently meant the default)
                        **({"max_input_len": args.max_input_len} if args.max_input_len is not None else {}))
    kv = KvCacheConfig(free_gpu_memory_fraction=args.kv_cache_free_gpu_memory_fraction, dtype=args.kv_cache_dtype)
    quant = QuantConfig(quant_algo=args.quant) if args.quant else None
    from trtllm.cli.llm_api_options import apply_llm_api_options  # (the file's LLM arguments win)
    options = apply_llm_api_options(dict(dtype=args.dtype, build_config=build, kv_cache_config=kv, quant_config=quant),
                                    args.extra_llm_api_options, "trtllm-eval")
    from trtllm.eval.report import environment, table, write_json
    from trtllm.eval.scorer import Scorer
    from trtllm.runtime.llm import LLM

    started = time.perf_counter()
    llm = LLM(str(model_path), tokenizer=args.tokenizer, **options)
    with llm:
        built = time.perf_counter()
        scorer = Scorer(llm, progress=not args.no_progress and sys.stderr.isatty())
        results = _evaluate(args, inputs, scorer)
        finished = time.perf_counter()
        limits = llm.limits
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(model_path=str(model_path), dataset=str(inputs.get("path")) if inputs.get("path") else None,
                  entries=inputs.get("entries"),
                  engine={"max_seq_len": limits.max_seq_len, "max_input_len": limits.max_input_len,
                          "max_num_seqs": limits.max_num_seqs, "max_num_tokens": limits.max_num_tokens,
                          "dtype": str(llm.compiled.attention.dtype).removeprefix("torch."),
                          "kv_cache_dtype": str(llm.engine.runner.cache.k.dtype).removeprefix("torch.")})
    kv_note = "" if options["kv_cache_config"].dtype == "auto" else f", {config['engine']['kv_cache_dtype']} KV cache"
    print(f"trtllm-eval {args.task} on {args.model} ({config['engine']['dtype']}{kv_note}): "
          f"{finished - built:.1f} s (engine built in {built - started:.1f} s)")
    print(table(results))
    if args.report_json:
        write_json(args.report_json, {"task": args.task, "results": results, "config": config, **environment(),
                                      "seconds": {"build": round(built - started, 3),
                                                  "evaluate": round(finished - built, 3)},
                                      "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return 0


if __name__ == "__main__":
    sys.exit(main())
