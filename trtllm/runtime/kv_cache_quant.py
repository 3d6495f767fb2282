"""A quantized KV cache's format and scales: what `build_engine` gives the ModelRunner.

    kv = kv_cache_quant(fmt, compiled, scales=None, tokenizer=None)   # a KvCacheQuant
    scales = calibrate_kv_scales(compiled, [token_ids, ...], fmt)      # [L, 2, Hkv] fp32

fmt is "fp8" (e4m3) or "int8" (config.kv_cache_dtype: KvCacheConfig.dtype or
QuantConfig.kv_cache_quant_algo). The kernels store x / scale and read x_q * scale
(kernels/paged_attention/kv_quant.py), with a scale per layer for K and one for V (per
kv head if given so). Where the scales come from, first that applies:

1. **The checkpoint** (the loader's hook): `scales`, one `(k_scale, v_scale)` per attention
   layer in the model's layer order (the order of its SDPA calls), each a number or a
   0-d / 1-element tensor (ModelOpt's `model.layers.{i}.self_attn.k_scale` / `v_scale`,
   compressed-tensors' kv_cache scheme's `k_scale` / `v_scale`), or Hkv numbers (per kv
   head). `LLM(..., kv_cache_scales=...)` and `build_engine(..., kv_cache_scales=...)`
   take them; `build_engine` fills that argument from an FP8 checkpoint's k/v scales
   (quantization/checkpoint.py `kv_cache_scales_by_layer`) when the caller gives none. They
   are checked against the model (count, shape, finite and > 0), naming the bad layer.
2. **FP8 without scales: 1.0, with a warning.** e4m3 holds magnitudes up to 448 with 3
   mantissa bits, which covers the keys and values of the models we know (vLLM and
   TensorRT-LLM default to 1.0 as well); larger ones clamp to 448.
3. **INT8 without scales: calibrated when the engine is built**, over CALIBRATION_TEXTS
   (a few built-in paragraphs, tokenized with the model's tokenizer): per layer, the
   largest |K| and |V| seen, / 127. Values past what calibration saw clamp to +-127; a
   short calibration sees less than a long one, so checkpoint scales are better. With no
   tokenizer to calibrate with, INT8 is refused by name (1.0 would be useless for int8:
   most keys would round to a handful of levels).

`calibrate_kv_scales` is also what trtllm-build's KV calibration runs over its own
calibration data. It runs the compiled model over whole sequences on an unquantized
scratch cache and takes the amax over what was written: the keys after rotary, the
values, exactly what the cache stores.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from trtllm.attention_context import whole_sequences_context
from trtllm.compile import CompiledModel
from trtllm.kernels.paged_attention.kv_quant import KV_CACHE_DTYPES, KV_QMAX, ScaleValue, kv_scales_tensor
from trtllm.kernels.quantize_fp8 import require_fp8_gpu

MIN_AMAX = 1e-6  # a layer whose keys (or values) were all zero still gets a positive scale

# Calibration text for an INT8 cache without checkpoint scales: prose, dialogue, a list,
# code and numbers, so that the activations calibration sees are not those of one genre.
CALIBRATION_TEXTS = (
    "The river had been rising for three days when the village council met in the school hall. "
    "Nobody wanted to leave, but the older farmers remembered the flood of their childhood, when "
    "the water reached the church steps and stayed there for a week. By midnight they had agreed "
    "to move the animals to the high pasture and to keep watch on the bridge in turns.",
    "\"Are you sure this is the right train?\" she asked, looking at the board again.\n"
    "\"Platform four, departing at 10:42, calling at every station to the coast,\" he said. "
    "\"We change once, and the second train waits for this one. We will be there before dark.\"",
    "To make bread you need flour, water, salt and yeast. 1. Mix 500 g of flour with 10 g of salt. "
    "2. Dissolve 7 g of yeast in 350 ml of warm water. 3. Knead for ten minutes, then let the dough "
    "rise for an hour. 4. Shape it, let it rise again, and bake at 230 degrees for 35 minutes.",
    "def merge(a, b):\n    out, i, j = [], 0, 0\n    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
    "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n",
    "In 2023 the company reported revenue of 4.7 billion dollars, up 12 percent from the year "
    "before, while operating costs rose by only 3 percent. The board proposed a dividend of 0.85 "
    "per share and announced plans to open 40 new stores across Europe and Asia.",
    "Photosynthesis converts light energy into chemical energy. In the chloroplasts, water is split "
    "and oxygen released, while carbon dioxide is fixed into sugars through the Calvin cycle. The "
    "rate depends on light intensity, temperature and the concentration of carbon dioxide.",
)


@dataclass(frozen=True)
class KvCacheQuant:
    """A quantized KV cache: its format, scales [L, 2, Hkv] fp32 (K's, V's; on the CPU: the
    cache copies them to its device) and where they came from ("checkpoint", "calibration",
    "default 1.0")."""
    fmt: str
    scales: torch.Tensor
    source: str

    @property
    def dtype(self) -> torch.dtype:
        return KV_CACHE_DTYPES[self.fmt]


def kv_cache_quant(fmt: str, compiled: CompiledModel, scales: Sequence[tuple[ScaleValue, ScaleValue]] | None = None,
                   tokenizer=None) -> KvCacheQuant | None:
    """The quantized cache `fmt` asks for ("auto": None), its scales as the module docstring says."""
    if fmt == "auto":
        if scales is not None:
            raise ValueError("kv_cache_scales given for an unquantized KV cache: set KvCacheConfig(dtype='fp8' or "
                             "'int8') or QuantConfig(kv_cache_quant_algo=...) to use them")
        return None
    if fmt not in KV_CACHE_DTYPES:
        raise ValueError(f"KV cache format {fmt!r}: expected 'auto', 'fp8' or 'int8'")
    if compiled.attention.latent:
        raise ValueError(f"a {fmt.upper()} KV cache with multi-head latent attention (DeepSeek-V2/V3) is not "
                         "supported: the MLA kernels read the latent cache in the model dtype")
    if fmt == "fp8":  # refused by name when the engine is built, not at its first decode step
        require_fp8_gpu(compiled.device, "an FP8 KV cache (KvCacheConfig(dtype='fp8'))")
    spec = compiled.attention
    if scales is not None:
        return KvCacheQuant(fmt, kv_scales_tensor(scales, spec.num_layers, spec.num_kv_heads), "checkpoint")
    if fmt == "fp8":
        warnings.warn("FP8 KV cache without k/v scales (none given from the checkpoint): every scale is 1.0, "
                      "so keys and values past +-448 clamp; pass kv_cache_scales (a checkpoint's k_scale / "
                      "v_scale) or calibrate (runtime/kv_cache_quant.calibrate_kv_scales)", stacklevel=3)
        return KvCacheQuant(fmt, torch.ones((spec.num_layers, 2, spec.num_kv_heads)), "default 1.0")
    if tokenizer is None:
        raise ValueError("INT8 KV cache needs k/v scales: none were given (kv_cache_scales, from a checkpoint's "
                         "k_scale / v_scale) and there is no tokenizer to calibrate them with on the built-in "
                         "calibration text; pass either, or use KvCacheConfig(dtype='fp8')")
    prompts = [tokenizer.encode(text) for text in CALIBRATION_TEXTS]
    return KvCacheQuant(fmt, calibrate_kv_scales(compiled, prompts, fmt), "calibration")


@torch.no_grad()
def calibrate_kv_scales(compiled: CompiledModel, prompts: Sequence[Sequence[int]], fmt: str,
                        per_head: bool = False) -> torch.Tensor:
    """[L, 2, Hkv] fp32 (on the CPU): per layer the largest |K| and |V| the model writes to
    its cache over `prompts` (token-id lists, each run as one whole sequence), / the format's
    largest stored magnitude (448 for fp8, 127 for int8); per kv head if per_head, else one
    amax for all heads of a layer (a per-tensor scale, as ModelOpt's)."""
    if fmt not in KV_QMAX:
        raise ValueError(f"KV cache format {fmt!r}: expected 'fp8' or 'int8'")
    prompts = [list(p) for p in prompts if len(p)]
    if not prompts:
        raise ValueError("KV calibration needs at least one non-empty prompt")
    spec = compiled.attention
    amax = torch.zeros((spec.num_layers, 2, spec.num_kv_heads), dtype=torch.float32)
    for ids in prompts:
        n = len(ids)
        with whole_sequences_context(1, n, compiled.block_size, spec.num_layers, spec.num_kv_heads, spec.head_dim,
                                     spec.dtype, compiled.device) as ctx:
            tokens = torch.tensor([ids], dtype=torch.long, device=compiled.device)
            compiled(tokens, torch.arange(n, device=compiled.device)[None])
            for i, cache in enumerate((ctx.cache.k, ctx.cache.v)):  # [L, NB, BS, Hkv, D]; unwritten slots 0
                seen = cache.abs().amax(dim=(1, 2, 4)).float().cpu()  # [L, Hkv]
                amax[:, i] = torch.maximum(amax[:, i], seen)
    if not per_head:
        amax = amax.amax(dim=2, keepdim=True).expand_as(amax)
    if not torch.isfinite(amax).all():
        raise ValueError("KV calibration: the model wrote non-finite keys or values")
    return (amax.clamp(min=MIN_AMAX) / KV_QMAX[fmt]).contiguous()
