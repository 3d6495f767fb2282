"""A checkpoint's engine defaults: what `trtllm-build` was told, for `LLM(model=dir)` to use.

    write_build_defaults(dir, {"max_batch_size": 8, ...}, kv_cache_quant_algo=QuantAlgo.FP8)
    defaults = read_build_defaults(dir)   # BuildDefaults, or None when the file is absent

The file is `trtllm_build.json` beside config.json:

    {"build_config": {"max_batch_size": 8, "max_seq_len": 512}, "kv_cache_quant_algo": "FP8"}

`build_config` holds only the limits given to trtllm-build (the rest keep BuildConfig's
defaults); `kv_cache_quant_algo` says which quantized KV cache the checkpoint's k/v scales
were calibrated for. `build_engine` takes them when its caller gives none: a BuildConfig
the user passes replaces the file's whole; a KV format the user names (KvCacheConfig.dtype
or QuantConfig.kv_cache_quant_algo) wins over the file's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from trtllm.config import BuildConfig, QuantAlgo

BUILD_DEFAULTS_FILE = "trtllm_build.json"


@dataclass(frozen=True)
class BuildDefaults:
    build_config: BuildConfig | None
    kv_cache_quant_algo: QuantAlgo | None


def write_build_defaults(directory: str | Path, build_config: dict, kv_cache_quant_algo: QuantAlgo | None) -> Path:
    """Write the file (build_config checked as a BuildConfig first)."""
    BuildConfig(**build_config)
    file = Path(directory) / BUILD_DEFAULTS_FILE
    algo = kv_cache_quant_algo.value if kv_cache_quant_algo is not None else None
    file.write_text(json.dumps({"build_config": build_config, "kv_cache_quant_algo": algo}, indent=2))
    return file


def read_build_defaults(directory: str | Path) -> BuildDefaults | None:
    """The file's defaults; None when `directory` has no such file. A bad file raises naming it."""
    file = Path(directory) / BUILD_DEFAULTS_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or set(data) - {"build_config", "kv_cache_quant_algo"}:
        raise ValueError(f"{file}: expected an object with 'build_config' and 'kv_cache_quant_algo'")
    build = data.get("build_config") or {}
    if not isinstance(build, dict):
        raise ValueError(f"{file}: build_config must be an object, got {type(build).__name__}")
    try:
        config = BuildConfig(**build) if build else None
        algo = QuantAlgo(data["kv_cache_quant_algo"]) if data.get("kv_cache_quant_algo") else None
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None
    return BuildDefaults(config, algo)
