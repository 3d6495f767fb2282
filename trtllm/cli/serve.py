"""`trtllm-serve`: an OpenAI-compatible HTTP server on a checkpoint (see docs/serve.md).

    trtllm-serve MODEL_DIR --host 127.0.0.1 --port 8000 [--max_batch_size N] [--max_num_tokens N]
                 [--kv_cache_free_gpu_memory_fraction F] [--kv_cache_dtype auto|fp8|int8] [--api-key KEY]
                 [--served-model-name NAME] [--lora_modules NAME=PATH ...] [--max_lora_rank R]
                 [--max_loras N] [--max_cpu_loras N] [--allowed_local_media_path DIR]
                 [--max_images_per_request N] [--max_image_pixels N] [--extra_llm_api_options FILE.yml]

With no MODEL_DIR it serves the built-in demo model. The engine runs in a process of its
own (trtllm/runtime/engine_core.py), so HTTP and SSE work never delays a GPU step. The
port is bound before the model loads: a port in use fails at once. SIGTERM or Ctrl-C: the
server stops accepting connections, lets in-flight requests finish for up to
--shutdown-timeout seconds, aborts the rest, shuts the engine down and exits 0 (1 if the
engine process had died meanwhile: that is logged at ERROR when it happens, and /health
answers 503 with the reason).

LoRA (vLLM's convention): each --lora_modules NAME=PATH (a PEFT adapter directory; or vLLM's
'{"name": NAME, "path": PATH, "base_model_name": the served model}') is listed
in /v1/models, and a request whose `model` is NAME runs through that adapter; the adapters are
checked against the model when the engine is built. /metrics counts requests per adapter.

Images (a LLaVA checkpoint; docs/multimodal.md): chat content parts {"type": "image_url",
"image_url": {"url": "data:image/png;base64,..."}}. Remote http(s) URLs are refused (the server
makes no outbound requests); local files only under --allowed_local_media_path; at most
--max_images_per_request images, each of at most --max_image_pixels decoded pixels (413 past it,
read from the image's header before decoding).
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from pathlib import Path

from trtllm.cli.llm_api_options import HELP as LLM_API_OPTIONS_HELP, apply_llm_api_options
from trtllm.cli.serve_options import check_server_options, media_policy
from trtllm.runtime.speculative.config import SPECULATIVE_KINDS

API_KEY_ENV = "TRTLLM_API_KEY"
# the API's caps (trtllm/runtime/multimodal_inputs.py), repeated: --help must not import torch
MAX_IMAGES_PER_REQUEST = 16
MAX_IMAGE_PIXELS = 4096 * 4096


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="trtllm-serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=None,
                    help="HF checkpoint directory (default: the built-in demo model)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max_batch_size", "--max-batch-size", type=int, default=None,
                    help="sequences in one engine step at most")
    ap.add_argument("--max_num_tokens", "--max-num-tokens", type=int, default=None,
                    help="tokens in one engine step at most")
    ap.add_argument("--max_seq_len", "--max-seq-len", type=int, default=None,
                    help="prompt + generated tokens at most (default: the model's)")
    ap.add_argument("--max_beam_width", "--max-beam-width", type=int, default=None,
                    help="beams a beam search request (use_beam_search, best_of) may use at most (default 1)")
    ap.add_argument("--kv_cache_free_gpu_memory_fraction", "--kv-cache-free-gpu-memory-fraction", type=float,
                    default=None, help="fraction of free GPU memory for the KV cache")
    ap.add_argument("--kv_cache_max_tokens", "--kv-cache-max-tokens", type=int, default=None,
                    help="KV-cache capacity in tokens at most")
    ap.add_argument("--kv_cache_dtype", "--kv-cache-dtype", choices=["auto", "fp8", "int8"], default=None,
                    help="KV-cache element: auto (the model's dtype, default), fp8 (e4m3) or int8")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    ap.add_argument("--tp_size", "--tp-size", type=int, default=1,
                    help="tensor-parallel ranks (one process, and GPU, each; default 1)")
    ap.add_argument("--ep_size", "--ep-size", type=int, default=None,
                    help="MoE models: the experts split over this many of the --tp_size ranks (each expert's "
                         "width over tp_size / ep_size); default 1, TensorRT-LLM's moe_expert_parallel_size")
    ap.add_argument("--pp_size", "--pp-size", type=int, default=1,
                    help="pipeline stages (tp_size ranks each; default 1); across nodes, start every rank "
                         "with torchrun (docs/parallel.md)")
    ap.add_argument("--pp_partition", "--pp-partition", type=int, nargs="+", default=None,
                    help="decoder layers per pipeline stage (default: balanced by parameter count)")
    ap.add_argument("--api-key", "--api_key", default=None,
                    help=f"require 'Authorization: Bearer KEY' on every route but /health "
                         f"(or set ${API_KEY_ENV})")
    ap.add_argument("--served-model-name", "--served_model_name", default=None,
                    help="the model name clients send (default: MODEL_DIR as given)")
    ap.add_argument("--max-concurrent-requests", "--max_concurrent_requests", type=int, default=None,
                    help="generation requests in flight at most; beyond it, 429 (default 1024)")
    ap.add_argument("--shutdown-timeout", "--shutdown_timeout", type=float, default=10.0,
                    help="seconds in-flight requests get to finish on SIGTERM before they are aborted")
    ap.add_argument("--log-level", "--log_level", default="info",
                    choices=["critical", "error", "warning", "info", "debug"])
    ap.add_argument("--no-access-log", action="store_true", help="do not log one line per request")
    ap.add_argument("--stream_interval", "--stream-interval", type=int, default=1,
                    help="streamed responses get an event every N tokens (the first at once): fewer, larger "
                         "events when many streams run (default 1: every token)")
    ap.add_argument("--disable_overlap_scheduler", "--disable-overlap-scheduler", action="store_true",
                    help="wait for each decode step before launching the next (default: the next greedy "
                         "decode step is launched while the host finishes the current one)")
    ap.add_argument("--tool_parser", "--tool-parser", choices=["hermes", "llama3"], default="hermes",
                    help="how a chat reply's tool calls are written (tools with tool_choice auto): hermes "
                         "(Hermes / Qwen: <tool_call>{json}</tool_call>) or llama3 (Llama-3.x JSON); default hermes")
    ap.add_argument("--speculative", choices=SPECULATIVE_KINDS, default=None,
                    help="speculative decoding: n-gram lookup, a draft model or an EAGLE-3 head (--speculative_model_dir), "
                         "DeepSeek-V3's MTP layer; "
                         "docs/speculative_decoding.md (the overlap scheduler is then off)")
    ap.add_argument("--max_draft_len", "--max-draft-len", type=int, default=None, help="draft tokens a step at most (default 4)")
    ap.add_argument("--max_matching_ngram_size", "--max-matching-ngram-size", type=int, default=None,
                    help="n-gram: the longest suffix looked up (default 3)")
    ap.add_argument("--speculative_model_dir", "--speculative-model-dir", default=None,
                    help="draft_target: the draft model's checkpoint; eagle3: the EAGLE-3 head's")
    ap.add_argument("--lora_modules", "--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                    help="LoRA adapters (PEFT directories) served by name: a request's `model` picks one (or "
                         "vLLM's JSON form, '{\"name\": ..., \"path\": ...}')")
    ap.add_argument("--max_lora_rank", "--max-lora-rank", type=int, default=None,
                    help="the largest adapter rank accepted (default: the largest of --lora_modules)")
    ap.add_argument("--max_loras", "--max-loras", type=int, default=None,
                    help="LoRA adapters resident on the GPU at once (default 4)")
    ap.add_argument("--max_cpu_loras", "--max-cpu-loras", type=int, default=None,
                    help="LoRA adapters kept in host memory (default: max(4, the number of --lora_modules))")
    ap.add_argument("--allowed_local_media_path", "--allowed-local-media-path", default=None, metavar="DIR",
                    help="image_url parts may name local files (file:// or a path) under DIR; default: none")
    ap.add_argument("--max_images_per_request", "--max-images-per-request", type=int, default=None,
                    help=f"images in one chat request at most (default {MAX_IMAGES_PER_REQUEST})")
    ap.add_argument("--max_image_pixels", "--max-image-pixels", type=int, default=None,
                    help=f"decoded pixels of one image at most (default {MAX_IMAGE_PIXELS}); larger: 413")
    ap.add_argument("--extra_llm_api_options", "--extra-llm-api-options", default=None, metavar="FILE",
                    help=LLM_API_OPTIONS_HELP)
    ap.add_argument("--engine-in-thread", action="store_true",
                    help="run the engine on a thread of the server process instead of a process of its own "
                         "(less memory and startup; streaming throughput suffers: both share one GIL)")
    return ap.parse_args(argv)


def engine_options(args: argparse.Namespace) -> dict:
    """The engine's options from the command line, --extra_llm_api_options's over them; ConfigError
    naming each bad one (LlmApiOptionsError, a ValueError, the file's)."""
    from trtllm.config import BuildConfig, KvCacheConfig
    from trtllm.runtime.speculative.config import speculative_config_from_options

    build = {k: v for k, v in (("max_batch_size", args.max_batch_size), ("max_num_tokens", args.max_num_tokens),
                               ("max_seq_len", args.max_seq_len), ("max_beam_width", args.max_beam_width))
             if v is not None}
    kv = {k: v for k, v in (("free_gpu_memory_fraction", args.kv_cache_free_gpu_memory_fraction),
                            ("max_tokens", args.kv_cache_max_tokens), ("dtype", args.kv_cache_dtype)) if v is not None}
    options = dict(dtype=args.dtype, build_config=BuildConfig(**build), kv_cache_config=KvCacheConfig(**kv),
                   stream_interval=args.stream_interval, disable_overlap_scheduler=args.disable_overlap_scheduler,
                   tensor_parallel_size=args.tp_size, pipeline_parallel_size=args.pp_size,
                   pp_partition=args.pp_partition, moe_expert_parallel_size=args.ep_size,
                   speculative_config=speculative_config_from_options(args.speculative, args.max_draft_len,
                                                                      args.max_matching_ngram_size,
                                                                      args.speculative_model_dir))
    lora_modules = parse_lora_modules(args.lora_modules, served_model_name(args))
    if lora_modules:
        options["lora_config"] = lora_config(args, lora_modules)
    return apply_llm_api_options(options, args.extra_llm_api_options, "trtllm-serve")


def served_model_name(args: argparse.Namespace) -> str:
    """The name requests give as `model` for the base model."""
    return args.served_model_name or (args.model if args.model is not None else "trtllm-demo")


def parse_lora_modules(specs: list[str] | None, served_name: str) -> dict:
    """--lora_modules NAME=PATH or vLLM's JSON form ... -> {NAME: LoRARequest(NAME, i, PATH)}; ValueError
    naming a bad one."""
    from trtllm.lora_request import LoRARequest

    modules = {}
    for spec in specs or []:
        name, path = _lora_module(spec, served_name)
        if name in modules:
            raise ValueError(f"--lora_modules: {name!r} given twice")
        if name == served_name:  # a request's `model` names the base model first (serve/jobs.py check_model)
            raise ValueError(f"--lora_modules {name!r}: the served model's name; requests naming it get the base "
                             "model, never the adapter (name the adapter otherwise, or the model: --served-model-name)")
        modules[name] = LoRARequest(name, len(modules) + 1, path)
    return modules


def _lora_module(spec: str, served_name: str) -> tuple[str, str]:
    """(name, path) of NAME=PATH or of vLLM's {"name": ..., "path": ..., "base_model_name": ...}."""
    if not spec.lstrip().startswith("{"):
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora_modules {spec!r}: expected NAME=PATH or a JSON object")
        return name, path
    import json
    try:
        entry = json.loads(spec)
    except ValueError as e:
        raise ValueError(f"--lora_modules {spec!r}: not a JSON object: {e}") from None
    unknown = sorted(set(entry) - {"name", "path", "base_model_name"}) if isinstance(entry, dict) else []
    for key in ("name", "path"):
        if not isinstance(entry, dict) or not isinstance(entry.get(key), str) or not entry[key] or unknown:
            why = f"unknown key {unknown[0]!r}" if unknown else f"{key!r} must be a non-empty string"
            raise ValueError(f"--lora_modules {spec!r}: {why} (vLLM's form: name, path, base_model_name)")
    base = entry.get("base_model_name")
    if base is not None and base != served_name:  # (it is the adapter's `parent` in /v1/models)
        raise ValueError(f"--lora_modules {entry['name']!r}: base_model_name {base!r} is not the served model "
                         f"{served_name!r}")
    return entry["name"], entry["path"]


def lora_config(args: argparse.Namespace, modules: dict):
    """The engine's LoraConfig for the adapters: checked when it is built (lora_dir)."""
    import json

    from trtllm.lora_config import LoraConfig
    from trtllm.runtime.peft_config import PEFT_DEFAULT_R

    rank = args.max_lora_rank
    if rank is None:  # the largest adapter's (a missing or bad one is named when the engine checks it)
        ranks = []
        for lora in modules.values():
            try:
                config = json.loads((Path(lora.lora_path) / "adapter_config.json").read_text())
                ranks.append(int(config.get("r", PEFT_DEFAULT_R)))
            except (OSError, ValueError, KeyError, TypeError):
                pass
        rank = max(ranks, default=64)
    return LoraConfig(lora_dir=[lora.lora_path for lora in modules.values()], max_lora_rank=rank,
                      **{k: v for k, v in (("max_loras", args.max_loras),) if v is not None},
                      max_cpu_loras=max(4, len(modules)) if args.max_cpu_loras is None else args.max_cpu_loras)


def build_llm(args: argparse.Namespace, options: dict):
    """The engine the app serves: in a process of its own (default), or on a thread of
    this one (--engine-in-thread). Either way it answers the same calls."""
    import functools

    from trtllm.runtime.build_engine import build_engine
    from trtllm.runtime.llm import LLM

    if args.engine_in_thread:
        return LLM(args.model, **options)
    from trtllm.demo import demo_model_path
    from trtllm.runtime.engine_client import EngineCoreClient

    model = args.model if args.model is not None else str(demo_model_path())
    if not os.path.isdir(model):
        raise FileNotFoundError(f"model directory {model!r} does not exist")
    return EngineCoreClient(functools.partial(build_engine, model, **options), tokenizer=model)


def bind_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not listening (connections are refused until the
    server starts). OSError if the port is in use or the address is not this machine's."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _serve_torchrun_rank(args: argparse.Namespace) -> int:
    """Under torchrun, a rank other than 0 serves no HTTP: it runs rank 0's steps on its stage
    and slices until rank 0 stops (build_engine does, then exits)."""
    from trtllm.runtime.build_engine import build_engine

    try:
        build_engine(args.model, **engine_options(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def _exit_quietly(signum, frame):
    raise SystemExit(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("trtllm.serve")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    # a signal while the model loads: leave at once, cleanly
    signal.signal(signal.SIGTERM, _exit_quietly)
    signal.signal(signal.SIGINT, _exit_quietly)
    if int(os.environ.get("RANK", "0")) != 0 and "WORLD_SIZE" in os.environ:
        return _serve_torchrun_rank(args)

    try:
        check_server_options(args)
    except ValueError as e:
        print(f"trtllm-serve: bad option: {e}", file=sys.stderr)
        return 2
    try:  # before any import of the engine, and the model load (minutes, for a big one)
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        print(f"trtllm-serve: cannot listen on {args.host}:{args.port}: {e.strerror or e} "
              "(another server on this port? choose one with --port)", file=sys.stderr)
        return 2
    with sock:
        from trtllm.config import ConfigError
        from trtllm.serve.app import DEFAULT_MAX_CONCURRENT_REQUESTS, build_app, run_server

        try:
            options = engine_options(args)
            lora_modules = parse_lora_modules(args.lora_modules, served_model_name(args))
            media = media_policy(args)
        except ConfigError as e:
            print(f"trtllm-serve: bad option:\n{e}", file=sys.stderr)
            return 2
        except ValueError as e:
            print(f"trtllm-serve: bad option: {e}", file=sys.stderr)
            return 2
        try:
            llm = build_llm(args, options)
        except (ValueError, FileNotFoundError, OSError, RuntimeError) as e:
            print(f"trtllm-serve: cannot load the model: {e}", file=sys.stderr)
            return 2
        name = served_model_name(args)
        app = build_app(llm, name, api_key=api_key,
                        max_concurrent_requests=args.max_concurrent_requests or DEFAULT_MAX_CONCURRENT_REQUESTS,
                        tool_parser=args.tool_parser, lora_modules=lora_modules, media=media)
        log.info("loaded %s as %r (API key %s; limits %s)", args.model or "the demo model", name,
                 "required" if api_key else "not required", llm.limits)
        # uvicorn handles SIGTERM/SIGINT while it runs (graceful stop), then restores these
        # handlers and re-raises the signal: let that re-raise be a no-op so we exit 0.
        signal.signal(signal.SIGTERM, lambda *_: None)
        signal.signal(signal.SIGINT, lambda *_: None)
        try:
            started = run_server(app, args.host, args.port, shutdown_timeout=args.shutdown_timeout,
                                 log_level=args.log_level, access_log=not args.no_access_log, sock=sock)
            engine_failure = llm.dead_reason()  # before our own shutdown stops it
        finally:
            llm.shutdown()
    if engine_failure is not None:
        log.error("trtllm-serve stopped; the engine had failed: %s", engine_failure)
        return 1
    log.info("trtllm-serve stopped")
    return 0 if started else 1


if __name__ == "__main__":
    sys.exit(main())
