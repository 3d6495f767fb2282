"""Rank 0's side of starting a tensor- or pipeline-parallel engine (build_engine.py calls it):
the sizes checked, the workers started (each loads its own stage and slices), the KV cache's
scales split by rank or calibrated across the ranks. Under torchrun, a rank other than 0 serves
rank 0's steps here and exits when rank 0 stops (docs/parallel.md)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from trtllm.config import KvCacheConfig
from trtllm.kernels.paged_attention.kv_quant import kv_scales_tensor
from trtllm.models.checkpoint_config import read_json
from trtllm.parallel import process_group
from trtllm.parallel.checks import check_parallel
from trtllm.parallel.kv_calibration import calibrate_across_ranks
from trtllm.parallel.rank_model import RankLora, RankSpec, rank_kv_scales
from trtllm.parallel.worker import run_torchrun_worker
from trtllm.parallel.workers import start_parallel
from trtllm.runtime.kv_cache_quant import CALIBRATION_TEXTS
from trtllm.runtime.tokenizer import load_tokenizer


def start_parallel_engine(model, dtype: torch.dtype | None, device, compile_options: dict | None, kv_cache_config: KvCacheConfig,
                    size: int, pp: int, pp_partition, moe_expert_parallel_size: int = 1, quant_algo=None,
                    kv_format: str = "auto", kv_cache_scales=None, lora: RankLora | None = None,
                    max_num_tokens: int = 0):
    """Rank 0's compiled model, its workers started (each loads its own stage and slices), and
    rank 0's share of kv_cache_scales (its layers' and KV heads'; None if none were given). Under
    torchrun, a rank other than 0 serves rank 0's steps here and exits when rank 0 stops."""
    for name, n in (("tensor_parallel_size", size), ("pipeline_parallel_size", pp)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive integer, got {n!r}")
    if model is None or isinstance(model, nn.Module):
        what = f"tensor_parallel_size={size}" if pp == 1 else f"pipeline_parallel_size={pp}"
        raise ValueError(f"{what} takes a checkpoint directory (each rank loads its own "
                         "slices of it), not a module in memory")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    stages, tied = check_parallel(model, size, device.type, pp, pp_partition, moe_expert_parallel_size, quant_algo)
    scales = None
    if kv_cache_scales is not None:  # the whole model's, checked before any process starts
        scales = kv_scales_tensor(kv_cache_scales, *_layers_and_kv_heads(model))
    spec = RankSpec(str(model), dtype, size * pp, device.type, kv_cache_config.tokens_per_block,
                    dict(compile_options or {}), process_group.COLLECTIVE_TIMEOUT_S, size, stages, tied,
                    moe_expert_parallel_size, quant_algo, kv_format, scales, lora, max_num_tokens)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["RANK"]) != 0:
        run_torchrun_worker(spec)  # until rank 0 shuts down; the caller's code after LLM(...) is rank 0's
        raise SystemExit(0)
    compiled, _ = start_parallel(spec)
    return compiled, rank_kv_scales(scales, spec, 0)  # [L0, 2, Hkv0]: a (k, v) pair a layer, as given


def calibrate_parallel(compiled, tokenizer, fmt: str) -> torch.Tensor:
    """An INT8 KV cache's scales with none given: calibrated across the ranks on the built-in text
    (parallel/kv_calibration.py), handed to every worker; rank 0's share returned."""
    workers = compiled.tensor_parallel.workers
    try:
        tokenizer = load_tokenizer(tokenizer)
    except Exception as e:  # noqa: BLE001 - named below
        raise ValueError(f"INT8 KV cache needs k/v scales: none were given (kv_cache_scales, a checkpoint's k_scale "
                         f"/ v_scale) and the tokenizer to calibrate them with did not load ({e})") from None
    whole = calibrate_across_ranks(compiled, workers, workers.spec, [tokenizer.encode(t) for t in CALIBRATION_TEXTS],
                                   fmt, *_layers_and_kv_heads(workers.spec.path))
    workers.set_kv_scales(whole)
    return rank_kv_scales(whole, workers.spec, 0)


def _layers_and_kv_heads(path) -> tuple[int, int]:
    """(decoder layers, KV heads) of a checkpoint's (language) model, from its config.json."""
    config = read_json(Path(path) / "config.json")
    text = config.get("text_config") or config  # a multimodal model's language model
    return text["num_hidden_layers"], text.get("num_key_value_heads") or text["num_attention_heads"]
