"""trtllm-bench throughput's max_batch_size when the user gives none: as many sequences as the KV
pool will hold for the dataset's lengths, as TensorRT-LLM's trtllm-bench sizes its engines.

    kv_tokens  = (GPU memory x free_gpu_memory_fraction - weight bytes) / KV bytes a token
    fit        = kv_tokens / mean(prompt + output tokens)
    batch      = fit x 0.9 rounded down to a multiple of 64, within [256, 1024] and at most the
                 requests rounded up to a multiple of 64

A larger decode batch makes each step's GEMMs more efficient: Llama-3.1-8B, 1,024 x 128/128 on an
H100 (2026-12-06, iteration logs): 256 a step, decode steps 10.8 ms (42 us a token), the run
8.70 s; 512 a step, 17.9 ms (35 us a token), 7.88 s. The floor 256 is the default this replaces;
the cap 1,024 bounds the decode CUDA graphs captured (powers of two up to it) and the engine's
per-step host work. The estimate's weight bytes come from the config (dense, MoE and latent-attention
layouts); where it is off the 0.9 absorbs it, and the scheduler never admits more than the pool
holds. Without a GPU the default stays (the dev CPU runs tiny models).
"""
from __future__ import annotations

import math

DEFAULT_BATCH = 256
MAX_BATCH = 1024
_STEP = 64


def _heads(config: dict) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a config."""
    heads = config["num_attention_heads"]
    return heads, config.get("num_key_value_heads") or heads, config.get("head_dim") or config["hidden_size"] // heads


def weight_bytes(config: dict, bytes_per_weight: float) -> float:
    """The weights of a decoder config, estimated: embeddings and LM head, attention, MLP or experts."""
    h, layers, vocab = config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]
    heads, kv_heads, head_dim = _heads(config)
    if config.get("kv_lora_rank"):  # latent attention (DeepSeek-V2/V3): q, the latent down / up, o
        nope, rope = config.get("qk_nope_head_dim", 128), config.get("qk_rope_head_dim", 64)
        v, rank, q_rank = config.get("v_head_dim", 128), config["kv_lora_rank"], config.get("q_lora_rank")
        q = h * q_rank + q_rank * heads * (nope + rope) if q_rank else h * heads * (nope + rope)
        attention = q + h * (rank + rope) + rank * heads * (nope + v) + heads * v * h
    else:
        attention = h * head_dim * (heads + 2 * kv_heads) + heads * head_dim * h
    dense = 3 * h * config["intermediate_size"]
    experts = config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0
    dense_layers = min(layers, config.get("first_k_dense_replace") or 0) if experts else layers  # DeepSeek's first k
    inter = config.get("moe_intermediate_size") or config["intermediate_size"]
    shared = config.get("n_shared_experts") or 0
    moe = 3 * h * inter * (experts + shared) + h * experts  # experts, shared ones, the router
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    mlps = dense_layers * dense + (layers - dense_layers) * moe
    return (embeddings + layers * attention + mlps) * bytes_per_weight


def kv_bytes_per_token(config: dict, bytes_per_element: float) -> float:
    """K and V (or the latent row) of every layer for one token."""
    if config.get("kv_lora_rank"):
        return config["num_hidden_layers"] * (config["kv_lora_rank"] + config.get("qk_rope_head_dim", 64)) \
            * bytes_per_element
    _, kv_heads, head_dim = _heads(config)
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * bytes_per_element


def kv_tokens(config: dict, gpu_memory: float, memory_fraction: float, bytes_per_weight: float,
              bytes_per_kv: float) -> float | None:
    """Tokens the KV pool will hold, estimated as the engine sizes it (None: a config this cannot read)."""
    try:
        weights, per_token = weight_bytes(config, bytes_per_weight), kv_bytes_per_token(config, bytes_per_kv)
    except (KeyError, TypeError, ZeroDivisionError):
        return None
    return (gpu_memory * memory_fraction - weights) / per_token


def throughput_batch(requests: list, pool_tokens: float | None) -> int:
    """max_batch_size for an offline run of `requests` over a KV pool of `pool_tokens` (module
    docstring); DEFAULT_BATCH where the pool is unknown (no GPU, an unreadable config)."""
    if pool_tokens is None or not requests:
        return DEFAULT_BATCH
    mean_len = sum(r.input_len + r.output_tokens for r in requests) / len(requests)
    batch = _STEP * math.floor(0.9 * pool_tokens / mean_len / _STEP)
    most = _STEP * math.ceil(len(requests) / _STEP)
    return max(DEFAULT_BATCH, min(batch, MAX_BATCH, most))


def batch_for_run(requests: list, config: dict, options: dict) -> int:
    """throughput_batch for trtllm-bench's engine options (its flags with the options file over them):
    the GPU's memory, the weights' and the KV cache's bytes a value (dtype, quant_config, the KV cache's
    dtype), kv_cache_config.free_gpu_memory_fraction; kv_cache_config.max_tokens, when set, is the pool."""
    import torch

    if not torch.cuda.is_available():
        return throughput_batch(requests, None)
    kv, quant = options["kv_cache_config"], options.get("quant_config")
    dtype = options.get("dtype") or "auto"
    dtype = dtype if dtype != "auto" else config.get("torch_dtype", "bfloat16")
    width = 4.0 if dtype == "float32" else 2.0
    quantized = quant is not None and quant.quant_algo is not None
    kv_one_byte = kv.dtype in ("fp8", "int8") or (quant is not None and quant.kv_cache_quant_algo is not None)
    pool = kv.max_tokens or kv_tokens(
        config, torch.cuda.get_device_properties(0).total_memory, kv.free_gpu_memory_fraction,
        1.0 if quantized else width, 1.0 if kv_one_byte else width)
    return throughput_batch(requests, pool)
