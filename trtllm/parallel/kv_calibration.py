"""A quantized KV cache's scales calibrated across the ranks of a parallel LLM at start-up (as
runtime/kv_cache_quant.py's `calibrate_kv_scales` calibrates one rank's): the calibration prompts
run as whole sequences on every rank (rank 0's calls reach the workers), after each the ranks
gather the largest |K| and |V| their caches hold (their stage's layers, their KV heads), and rank
0 lays them out as the whole model's [L, 2, Hkv] and hands the scales back to every rank.

    scales = calibrate_across_ranks(compiled, workers, spec, prompts, "int8")   # [L, 2, Hkv]

Per tensor (one amax a layer over every head), as one rank calibrates: one rank's numbers.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from trtllm.attention_context import whole_sequences_context
from trtllm.kernels.paged_attention.kv_quant import KV_QMAX
from trtllm.parallel.rank_model import RankSpec
from trtllm.parallel.tensor_parallel import head_range
from trtllm.parallel.worker import cache_amax
from trtllm.runtime.kv_cache_quant import MIN_AMAX


@torch.no_grad()
def calibrate_across_ranks(compiled, workers, spec: RankSpec, prompts: Sequence[Sequence[int]], fmt: str,
                           num_layers: int, num_kv_heads: int) -> torch.Tensor:
    """The whole model's [L, 2, Hkv] fp32 scales (amax / the format's largest stored magnitude)."""
    attn = compiled.attention  # rank 0's: its stage's layers, its KV heads
    amax = torch.zeros((num_layers, 2, num_kv_heads), dtype=torch.float32)
    for ids in [list(p) for p in prompts if len(p)]:
        n = len(ids)
        with whole_sequences_context(1, n, compiled.block_size, attn.num_layers, attn.num_kv_heads, attn.head_dim,
                                     attn.dtype, compiled.device) as ctx:
            compiled(torch.tensor([ids], device=compiled.device), torch.arange(n, device=compiled.device)[None])
            if compiled.pending is not None:  # a pipeline's first stage: the last one's logits, taken
                compiled.take_pending().synchronize()
            seen = workers.kv_amax(cache_amax(ctx.cache))
        for rank, part in enumerate(seen):
            stage, tp_rank = spec.place(rank)
            first = spec.stages[stage][0] if spec.pp > 1 else 0
            head, count = head_range(num_kv_heads, spec.tp, tp_rank, kv=True)
            where = amax[first:first + part.shape[0], :, head:head + count]
            where.copy_(torch.maximum(where, part))
    amax = amax.amax(dim=2, keepdim=True).expand_as(amax)
    if not torch.isfinite(amax).all():
        raise ValueError("KV calibration: the model wrote non-finite keys or values")
    return (amax.clamp(min=MIN_AMAX) / KV_QMAX[fmt]).contiguous()
