"""How many KV-cache blocks fit: `KvCacheConfig.max_tokens`, or on a GPU the given
fraction of the memory left after the weights and a profiling forward pass. A block's
bytes follow the cache's element: an FP8 or INT8 cache (KvCacheConfig.dtype) holds twice
the tokens of a 16-bit one in the same memory."""
from __future__ import annotations

import math

import torch

from trtllm.attention_context import AttentionMetadata, PagedKVCache, attention_context
from trtllm.compile import CompiledModel
from trtllm.config import KvCacheConfig
from trtllm.runtime.mrope_positions import widen_positions

# Without a GPU to measure, a pool of this many tokens (CPU runs are tests and demos).
CPU_DEFAULT_TOKENS = 65536
# The most blocks a pool sized from free GPU memory gets: a tiny model on an H200 would get
# ~20 M blocks (a 2-layer MLA test checkpoint: 6 KB a block), whose books live in Python lists
# and are checked over each time the engine goes idle (1.9 ms per 11,810 blocks on the dev
# CPU: seconds at 20 M; the GPU test of such a model ran past 200 s). 2**20 blocks of 32
# tokens is 33.5 M tokens; an 8B model gets 26,472 on the H200. max_tokens is not capped.
MAX_MEASURED_BLOCKS = 1 << 20


def bytes_per_block(compiled: CompiledModel, block_size: int, cache_dtype: torch.dtype | None = None) -> int:
    """K and V (an MLA cache: the latent rows) of one block in every layer; cache_dtype None: the
    model's (spec.dtype). Plus the hidden states kept beside them for an EAGLE-3 head (trtllm/hidden_states.py)."""
    spec = compiled.attention
    element = torch.empty((), dtype=cache_dtype or spec.dtype).element_size()
    pools = 1 if spec.latent else 2  # MLA: one latent row per token, no V (AttentionSpec.latent)
    stash = getattr(compiled, "hidden_stash", None)
    hidden = block_size * stash.width * spec.dtype.itemsize if stash is not None else 0
    return pools * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * element + hidden


def blocks_in(budget_bytes: float, compiled: CompiledModel, block_size: int,
              cache_dtype: torch.dtype | None = None) -> int:
    return int(budget_bytes // bytes_per_block(compiled, block_size, cache_dtype))


def num_kv_blocks(compiled: CompiledModel, config: KvCacheConfig, max_num_tokens: int,
                  max_num_seqs: int, max_seq_len: int, cache_dtype: torch.dtype | None = None) -> int:
    block = config.tokens_per_block
    if config.max_tokens is not None:
        blocks = math.ceil(config.max_tokens / block)
    elif compiled.device.type != "cuda":
        # every sequence at max_seq_len at once, each in whole blocks (or CPU_DEFAULT_TOKENS)
        blocks = min(math.ceil(CPU_DEFAULT_TOKENS / block), max_num_seqs * math.ceil(max_seq_len / block))
    else:
        activations = _profile_peak(compiled, max_num_tokens, max_num_seqs, block)
        free, _ = torch.cuda.mem_get_info(compiled.device)
        budget = (free - activations) * config.free_gpu_memory_fraction
        blocks = min(blocks_in(budget, compiled, block, cache_dtype), MAX_MEASURED_BLOCKS)
        tp = compiled.tensor_parallel
        if tp is not None and tp.workers is not None:  # every rank's pool has these blocks: the fewest
            others = tp.workers.min_kv_blocks(config.free_gpu_memory_fraction, block)
            blocks = blocks if others is None else min(blocks, others)
    needed = math.ceil(max_seq_len / block)
    if blocks < needed:
        raise ValueError(f"the KV cache holds {blocks} blocks of {block} tokens, fewer than one "
                         f"sequence of max_seq_len={max_seq_len} needs ({needed}); raise "
                         "KvCacheConfig.max_tokens / free_gpu_memory_fraction or lower max_seq_len")
    return blocks


@torch.no_grad()
def _profile_peak(compiled: CompiledModel, max_num_tokens: int, max_num_seqs: int, block: int) -> int:
    """Activation memory of the largest step: one forward of max_num_tokens tokens."""
    device, spec = compiled.device, compiled.attention
    seqs = min(max_num_seqs, max_num_tokens)
    per_seq = max_num_tokens // seqs
    lens = [per_seq] * seqs
    lens[0] += max_num_tokens - per_seq * seqs
    blocks_each = math.ceil(max(lens) / block)
    cache = PagedKVCache.allocate(spec.num_layers, seqs * blocks_each, block, spec.num_kv_heads,
                                  spec.head_dim, spec.dtype, device, values=not spec.latent)
    meta = AttentionMetadata(max_num_tokens, seqs, blocks_each, device)
    meta.fill(lens, lens, [list(range(i * blocks_each, (i + 1) * blocks_each)) for i in range(seqs)], block)
    ids = torch.zeros((1, max_num_tokens), dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])[None]
    if getattr(getattr(compiled.module, "config", None), "position_axes", 1) == 3:  # M-RoPE: as the runtime's
        pos = widen_positions(pos)
    rows = torch.cumsum(torch.tensor(lens, device=device), 0) - 1
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with attention_context(cache, meta):
        compiled(ids, pos, rows)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del cache, meta
    torch.cuda.empty_cache()
    return peak
