"""TensorRT-LLM's `--extra_llm_api_options FILE.yml` for trtllm-serve, trtllm-bench and trtllm-eval:
a YAML (or JSON) mapping of `LLM` arguments, applied over the engine options the command's flags
made; the file wins.

    options = apply_llm_api_options(options, path, "trtllm-serve")   # build_engine's / LLM's keywords

What a key becomes:
    kv_cache_config, build_config, quant_config,     merged field by field over the config the flags
    scheduler_config, cuda_graph_config, lora_config made (KvCacheConfig, BuildConfig, ...)
    max_batch_size, max_num_tokens, max_seq_len,     set in the build config, as LLM's limits are
    max_input_len, max_beam_width
    cuda_graph_config: null                          CUDA graphs off (enable_cuda_graph: false too)
    speculative_config: {decoding_type: ..., ...}    MTP, Eagle / Eagle3, NGram or DraftTarget's config,
                                                     its other keys its fields; null: none
    dtype, stream_interval, disable_overlap_scheduler, enable_chunked_prefill, tensor_parallel_size,
    pipeline_parallel_size, pp_partition, moe_expert_parallel_size, moe_tensor_parallel_size:
                                                     as LLM takes them
TensorRT-LLM's keys that mean nothing here (enable_attention_dp, print_iter_log, backend,
trust_remote_code, guided_decoding_backend, kv_cache_config.event_buffer_max_size, ...) are taken
at the value that changes nothing only. Any other value, an unknown key, or a LoRA option with no adapter to serve is refused by
name (LlmApiOptionsError, a ValueError naming the file), before the model loads. Nothing is
dropped. Unlike TensorRT-LLM, whose file replaces a nested config whole, a nested mapping here
changes only the fields it names.
"""
from __future__ import annotations

import difflib

OPTION = "--extra_llm_api_options"
HELP = ("a YAML (or JSON) file of LLM arguments, TensorRT-LLM's: applied over the flags' values (the file wins); "
        "the keys taken: docs/serve.md")
DTYPES = ("auto", "float32", "float16", "bfloat16")
LIMITS = ("max_batch_size", "max_num_tokens", "max_seq_len", "max_input_len", "max_beam_width")
_BOOLS = ("disable_overlap_scheduler", "enable_chunked_prefill", "enable_cuda_graph")
_SIZES = ("stream_interval", "tensor_parallel_size", "pipeline_parallel_size")
_OPTIONAL_SIZES = ("moe_expert_parallel_size", "moe_tensor_parallel_size")
# LLM's TensorRT-LLM arguments that runtime/llm_args.py check_tensorrt_llm_args holds to what trtllm does
_CHECKED = ("trust_remote_code", "backend", "guided_decoding_backend", "tokenizer_mode", "revision",
            "tokenizer_revision", "load_format")
# TensorRT-LLM's arguments that mean nothing here: (the value that changes nothing, why another is refused)
_NO_OP = {
    "enable_attention_dp": (False, "attention data parallelism is not implemented (tensor parallelism splits "
                                   "every sequence's attention over the ranks)"),
    "print_iter_log": (False, "no per-iteration log is printed (trtllm-bench --iteration_log writes each step's)"),
    "enable_iter_perf_stats": (False, "these commands read no LLM.get_stats() (trtllm-bench --iteration_log "
                                      "writes each step's figures)"),
    "iter_stats_max_iterations": (None, "these commands keep no iteration stats"),
}
_CONFIGS = ("kv_cache_config", "build_config", "quant_config", "scheduler_config", "cuda_graph_config",
            "lora_config")
KEYS = frozenset((*LIMITS, *_BOOLS, *_SIZES, *_OPTIONAL_SIZES, *_CHECKED, *_NO_OP, *_CONFIGS, "dtype",
                  "pp_partition", "speculative_config", "enable_lora", "skip_tokenizer_init"))
# TensorRT-LLM's decoding_type -> trtllm's config class (runtime/speculative/config.py)
# values (scalars, lists, mappings) a file may hold, its aliases expanded: a handful of options, never
# YAML's "billion laughs" (nine anchors of nine aliases each: 9**9 strings, a 2 GB error message)
MAX_VALUES = 10_000
MAX_BYTES = 1 << 20  # a file's size: TensorRT-LLM's are a few hundred bytes (PyYAML reads ~0.5 MB a second)
DECODING_TYPES = {"MTP": "MTPDecodingConfig", "Eagle": "EagleDecodingConfig", "Eagle3": "EagleDecodingConfig",
                  "NGram": "NGramDecodingConfig", "DraftTarget": "DraftTargetDecodingConfig"}


class LlmApiOptionsError(ValueError):
    """A bad --extra_llm_api_options file: one line naming the file, the key and the value."""

    def __init__(self, path, what: str):
        super().__init__(f"{OPTION} {path}: {what}")


def read_llm_api_options(path) -> dict:
    """The file's mapping (an empty file: none); LlmApiOptionsError if it is missing, not YAML (its
    line), not a mapping, has a key that is not a string, or a key twice (YAML would keep the last)."""
    import yaml

    class Twice(yaml.YAMLError):
        pass

    class UniqueKeys(yaml.SafeLoader):  # safe_load's loader, refusing a duplicated key
        def construct_mapping(self, node, deep=False):
            seen = set()  # (a set: 100,000 keys compared each with those before took minutes)
            for key, _ in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":
                    if key.value in seen:
                        raise Twice(f"key {key.value!r} given twice (line {key.start_mark.line + 1})")
                    seen.add(key.value)
            return super().construct_mapping(node, deep)

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_BYTES + 1)  # (characters: at least as many bytes)
        if len(text) > MAX_BYTES:
            raise LlmApiOptionsError(path, "over 1 MiB: not an options file (LLM's arguments are a handful)")
        data = yaml.load(text, Loader=UniqueKeys)  # noqa: S506 (a SafeLoader)
    except FileNotFoundError:
        raise LlmApiOptionsError(path, "no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LlmApiOptionsError(path, f"cannot read it: {e}") from None
    except Twice as e:
        raise LlmApiOptionsError(path, str(e)) from None
    except RecursionError:  # (the composer recurses a level at a time)
        raise LlmApiOptionsError(path, "nested too deeply to read (lists or mappings inside each other)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise LlmApiOptionsError(path, f"not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if _num_values(data, {}, set()) > MAX_VALUES:
        raise LlmApiOptionsError(path, f"holds more than {MAX_VALUES} values once its aliases are expanded "
                                       "(anchors of anchors?): LLM's arguments are a handful")
    if not isinstance(data, dict):
        raise LlmApiOptionsError(path, f"must be a mapping of LLM arguments (key: value), got a "
                                       f"{type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise LlmApiOptionsError(path, f"key {bad[0]!r}: must be a string (an LLM argument's name)")
    return data


def _num_values(value, counted: dict, open_: set) -> int:
    """The values `value` holds with every alias expanded; each list or mapping counted once (`counted`,
    by id), one that holds itself (`open_`: still being counted) as one value."""
    if not isinstance(value, (list, dict)):
        return 1
    if id(value) in open_:
        return 1
    if id(value) not in counted:
        open_.add(id(value))
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        counted[id(value)] = 1 + sum(_num_values(v, counted, open_) for v in items)
        open_.discard(id(value))
    return counted[id(value)]


def apply_llm_api_options(options: dict, path, command: str) -> dict:
    """`options` (build_engine's keywords, which LLM takes too, as the command's flags made them)
    with the file's LLM arguments applied over them; None: no file. LlmApiOptionsError naming the
    file and the key for anything refused."""
    if path is None:
        return options
    given = read_llm_api_options(path)
    try:
        return _apply(dict(options), given, command)
    except ValueError as e:  # ConfigError too: one line each
        raise LlmApiOptionsError(path, "; ".join(line for line in str(e).splitlines() if line.strip())) from None


def _apply(options: dict, given: dict, command: str) -> dict:
    from trtllm.runtime.llm_args import check_tensorrt_llm_args

    unknown = sorted(set(given) - KEYS)
    if unknown:
        raise ValueError("; ".join(f"{key}: unknown key{_close(key)}" for key in unknown))
    for key, (neutral, why) in _NO_OP.items():
        if key in given and given[key] is not neutral:  # (0 is not false: a number where a flag belongs)
            raise ValueError(f"{key}={given[key]!r}: {why}; only {'null' if neutral is None else 'false'} is taken")
    _check_scalars(given)
    checked = {k: given[k] for k in _CHECKED if k in given}  # check_tensorrt_llm_args's ValueError names the key
    check_tensorrt_llm_args(checked.pop("trust_remote_code", False), checked.pop("backend", None), **checked)
    if given.get("skip_tokenizer_init", False) is not False and command != "trtllm-bench":
        raise ValueError(f"skip_tokenizer_init={given['skip_tokenizer_init']!r}: {command} needs the checkpoint's "
                         "tokenizer (only false is taken)")
    options.update({k: given[k] for k in (*_BOOLS, *_SIZES, *_OPTIONAL_SIZES, "dtype", "pp_partition",
                                          "skip_tokenizer_init") if k in given and k != "enable_cuda_graph"})
    build = _build_config(options.get("build_config"), given)
    if build is not None:
        options["build_config"] = build
    for key in ("kv_cache_config", "quant_config", "scheduler_config"):
        if key in given:
            options[key] = _merged(key, options.get(key), given[key])
    events = getattr(options.get("kv_cache_config"), "event_buffer_max_size", 0) if "kv_cache_config" in given else 0
    if events:  # (recorded for nobody, as enable_iter_perf_stats would be)
        raise ValueError(f"kv_cache_config.event_buffer_max_size={events}: these commands read no "
                         "LLM.get_kv_cache_events() (nothing serves KV-cache events); only 0 is taken")
    _cuda_graphs(options, given)
    _lora(options, given)
    if "speculative_config" in given:
        options["speculative_config"] = _speculative_config(given["speculative_config"])
    return options


def _close(key: str) -> str:
    match = difflib.get_close_matches(key, sorted(KEYS), n=1, cutoff=0.8)
    return f" (did you mean {match[0]!r}?)" if match else " (docs/serve.md lists the keys taken)"


def _check_scalars(given: dict) -> None:
    """The plain arguments' types and ranges, by name (the engine's own checks run in its process)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)
    for key in (*_BOOLS, "trust_remote_code", "skip_tokenizer_init", "enable_lora"):
        if key in given and not isinstance(given[key], bool):
            raise ValueError(f"{key}={given[key]!r}: must be true or false")
    for key in (*_SIZES, *_OPTIONAL_SIZES):
        value = given.get(key)
        if key in given and not (value is None and key in _OPTIONAL_SIZES) and not (is_int(value) and value >= 1):
            raise ValueError(f"{key}={value!r}: must be an integer >= 1")
    if "dtype" in given and given["dtype"] not in DTYPES:
        raise ValueError(f"dtype={given['dtype']!r}: must be one of {', '.join(DTYPES)}")
    partition = given.get("pp_partition")
    if partition is not None and not (isinstance(partition, list) and partition
                                      and all(is_int(n) and n >= 1 for n in partition)):
        raise ValueError(f"pp_partition={partition!r}: must be a list of layer counts >= 1, one a pipeline stage")


def _merged(key: str, current, given):
    """The config `key` names: `given`'s fields over `current`'s (a config, a dict or None)."""
    from trtllm.config import BuildConfig, CudaGraphConfig, KvCacheConfig, QuantConfig, SchedulerConfig
    from trtllm.lora_config import LoraConfig
    from trtllm.validated_config import as_config

    cls = dict(kv_cache_config=KvCacheConfig, build_config=BuildConfig, quant_config=QuantConfig,
               scheduler_config=SchedulerConfig, cuda_graph_config=CudaGraphConfig, lora_config=LoraConfig)[key]
    if not isinstance(given, dict):
        raise ValueError(f"{key}={given!r}: must be a mapping of {cls.__name__}'s fields")
    bad = [k for k in given if not isinstance(k, str)]
    if bad:
        raise ValueError(f"{key}: key {bad[0]!r} must be a string (a {cls.__name__} field)")
    current = as_config(key, current, cls)
    try:
        return cls(**{**(current.model_dump(exclude_unset=True) if current is not None else {}), **given})
    except ValueError as e:
        raise ValueError(f"{key}: {'; '.join(str(e).splitlines())}") from None


def _build_config(current, given: dict):
    """The build config: the flags', the file's build_config over it, its top-level limits over that
    (a limit given both ways, with two values, refused as LLM refuses it)."""
    limits = {k: given[k] for k in LIMITS if k in given}
    nested = given.get("build_config", {})
    if isinstance(nested, dict):
        clash = [f"{k}={v!r} and build_config.{k}={nested[k]!r}" for k, v in limits.items()
                 if k in nested and nested[k] != v]
        if clash:
            raise ValueError(f"two values for one limit: {'; '.join(clash)}; give it once")
    if "build_config" not in given and not limits:
        return current
    return _merged("build_config", current, {**nested, **limits} if isinstance(nested, dict) else nested)


def _cuda_graphs(options: dict, given: dict) -> None:
    """cuda_graph_config (null: off; a mapping: merged over the flags') and enable_cuda_graph; never
    cuda_graph_config=None in `options` (build_engine reads None as the defaults, LLM as off)."""
    from trtllm.runtime.llm_args import DEFAULT_CUDA_GRAPHS, cuda_graph_options

    if "cuda_graph_config" not in given and "enable_cuda_graph" not in given:
        return
    enable = given.get("enable_cuda_graph", options.get("enable_cuda_graph", True))
    config = options.pop("cuda_graph_config", None) or DEFAULT_CUDA_GRAPHS
    if given.get("cuda_graph_config", DEFAULT_CUDA_GRAPHS) is None:
        config = None  # TensorRT-LLM's "off"
    elif "cuda_graph_config" in given:
        config = _merged("cuda_graph_config", None if config is DEFAULT_CUDA_GRAPHS else config,
                         given["cuda_graph_config"])
    elif not enable:
        config = DEFAULT_CUDA_GRAPHS  # the file's enable_cuda_graph: false wins over a flag's config
    enable, config = cuda_graph_options(enable, config)  # a config with enable_cuda_graph: false refused
    options["enable_cuda_graph"] = enable
    if config is not None:
        options["cuda_graph_config"] = config


def _lora(options: dict, given: dict) -> None:
    """enable_lora / lora_config: over the adapters the command serves (trtllm-serve's --lora_modules,
    whose config is options' lora_config); with none, no request could name an adapter: refused."""
    enable = given.get("enable_lora", False)
    if not enable and "lora_config" not in given:
        return
    if options.get("lora_config") is None:
        key = "lora_config" if "lora_config" in given else "enable_lora=True"
        raise ValueError(f"{key}: no adapter is served (trtllm-serve --lora_modules NAME=PATH names each; "
                         "trtllm-bench and trtllm-eval run none)")
    if "lora_config" in given:
        if isinstance(given["lora_config"], dict) and "lora_dir" in given["lora_config"]:
            raise ValueError("lora_config.lora_dir: the adapters are --lora_modules' (each served by its name)")
        options["lora_config"] = _merged("lora_config", options["lora_config"], given["lora_config"])


def _speculative_config(given):
    """speculative_config's mapping as our config (TensorRT-LLM's decoding_type picks it); None: none."""
    from trtllm.runtime.speculative import config as spec

    if given is None:
        return None
    if not isinstance(given, dict) or not isinstance(given.get("decoding_type"), str):
        raise ValueError(f"speculative_config={given!r}: must be a mapping with decoding_type (one of "
                         f"{', '.join(DECODING_TYPES)}) and the config's fields")
    fields = {k: v for k, v in given.items() if k != "decoding_type"}
    name = DECODING_TYPES.get(given["decoding_type"])
    if name is None:
        raise ValueError(f"speculative_config.decoding_type={given['decoding_type']!r}: not implemented; one of "
                         f"{', '.join(DECODING_TYPES)} (docs/speculative_decoding.md)")
    bad = [k for k in fields if not isinstance(k, str)]
    if bad:
        raise ValueError(f"speculative_config: key {bad[0]!r} must be a string (a {name} field)")
    try:
        return getattr(spec, name)(**fields)
    except ValueError as e:
        raise ValueError(f"speculative_config: {'; '.join(str(e).splitlines())}") from None
