"""Write an FP8-quantized model as a checkpoint directory that trtllm's loader (and, for its
standard layouts, transformers / vLLM) reads back: what `trtllm-build` saves.

    layout = export_layout(algo)                                    # "compressed-tensors" | "HF fp8"
    export_fp8_checkpoint(model, src, out, algo, kv=None, progress=False)

The layout follows the algorithm (docs/quantization.md, "trtllm-build"):

| algo | layout | weight scale tensor | activations |
|---|---|---|---|
| FP8 | compressed-tensors, weights strategy "tensor" | `weight_scale` [1] | dynamic, per token |
| FP8_PER_CHANNEL_PER_TOKEN | compressed-tensors, weights strategy "channel" | `weight_scale` [N, 1] | dynamic, per token |
| FP8_BLOCK_SCALES | HF `quant_method: "fp8"`, `weight_block_size: [128, 128]` | `weight_scale_inv` [ceil(N/128), ceil(K/128)] | dynamic, 1x128 groups |

With static input scales (trtllm-build --activation_scheme static: one calibrated scale per
linear, `input_scale` [1]) the compressed-tensors layouts say `input_activations` static,
strategy "tensor"; block weights take no static scales (refused).

compressed-tensors is the one standard layout that says "per-tensor or per-channel FP8
weights with dynamic per-token activations" (HF's fp8 layout has no per-channel weights;
ModelOpt's FP8 means static activation scales) and the one with a KV-cache scheme
(`kv_cache_scheme`, `self_attn.k_scale` / `v_scale`). Block scales are written as Qwen3-FP8
and DeepSeek-V3 ship them. KV scales (`kv`: [L, 2, Hkv] from calibrate_kv_scales) go in as
`model.layers.{i}.self_attn.k_scale` / `v_scale`, one number a layer ([1]), in both layouts
(HF's fp8 layout has no field for them: trtllm reads them, transformers ignores them).

A MoE model file's FP8 experts (Fp8Experts: 3-D stacks) are written as checkpoints hold them, one
tensor per expert and projection with its scale, named by the model file's `expert_tensors`
(`_expert_tensors`); the loader stacks them back.

Only tensors the model holds are written, once each (a tied head is not written twice), in
safetensors shards of at most `max_shard_bytes` with an index when there are several. The
source's config.json is copied with `quantization_config` added, and its tokenizer and
generation files beside it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file

from trtllm.config import QuantAlgo
from trtllm.kernels.fp8_gemm import SCALE_BLOCK
from trtllm.quantization.fp8_linears import fp8_linears_of

# the files beside the weights that travel with the checkpoint (tokenizer, generation defaults)
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                "generation_config.json")
MAX_SHARD_BYTES = 5 * 1024**3
_KV_SCHEME_TYPE = {"fp8": "float", "int8": "int"}


def export_layout(algo: QuantAlgo) -> str:
    """The checkpoint layout trtllm-build writes for `algo` (module docstring's table)."""
    if algo == QuantAlgo.FP8_BLOCK_SCALES:
        return "HF fp8"
    if algo in (QuantAlgo.FP8, QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN):
        return "compressed-tensors"
    raise ValueError(f"quant_algo={getattr(algo, 'value', algo)!r}: trtllm-build writes FP8, "
                     "FP8_PER_CHANNEL_PER_TOKEN or FP8_BLOCK_SCALES checkpoints")


def quantization_config(algo: QuantAlgo, kv_fmt: str | None, static: bool = False) -> dict:
    """config.json's `quantization_config` for `algo` (and a KV cache in `kv_fmt`, or None;
    static: per-tensor static input scales instead of dynamic per-token activations)."""
    if export_layout(algo) == "HF fp8":
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [SCALE_BLOCK, SCALE_BLOCK]}
    strategy = "tensor" if algo == QuantAlgo.FP8 else "channel"
    weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": strategy}
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
            "strategy": "tensor" if static else "token"}
    kv = None if kv_fmt is None else {"num_bits": 8, "type": _KV_SCHEME_TYPE[kv_fmt], "symmetric": True,
                                      "dynamic": False, "strategy": "tensor"}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "ignore": ["lm_head"], "kv_cache_scheme": kv,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}}}


def checkpoint_tensors(model: nn.Module, algo: QuantAlgo, kv: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """name -> tensor (views of what the model holds, no copies) of the checkpoint to write."""
    fp8 = fp8_linears_of(model)
    if fp8 is None or not fp8.linears:
        raise ValueError("the model carries no FP8 linears (quantize it first: load_model(..., quant_algo=...))")
    scale_name = "weight_scale_inv" if export_layout(algo) == "HF fp8" else "weight_scale"
    placeholders = {id(q.placeholder): path for path, q in fp8.linears.items()}
    expert_placeholders = {id(p) for q in fp8.experts.values() for p in q.placeholders or ()}
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen or id(t) in expert_placeholders:
            continue  # tied: written once, under its first name (the loader re-ties it); experts: below
        seen.add(id(t))
        path = placeholders.get(id(t))
        if path is None:
            out[name] = t.detach()
            continue
        q = fp8.linears[path]
        out[f"{path}.weight"] = q.weight
        out[f"{path}.{scale_name}"] = q.weight_scale
        if q.input_scale is not None:
            out[f"{path}.input_scale"] = q.input_scale
    for path, q in fp8.experts.items():
        out.update(_expert_tensors(model, path, q, scale_name))
    static = {q.input_scale is not None for q in fp8.linears.values()}
    if static == {True} and fp8.experts:
        raise ValueError("static input scales with FP8 experts: the fused MoE quantizes its activations per token, "
                         "and a checkpoint saying static scales for every linear would leave the experts without")
    if len(static) != 1:
        raise ValueError("some FP8 linears have static input scales and some not: one scheme for all is written")
    if static == {True} and export_layout(algo) == "HF fp8":
        raise ValueError("static input scales with 128x128 block weights: no layout holds them (block weights "
                         "take per-token-group activations)")
    missing = [p for p, q in fp8.linears.items() if f"{p}.weight" not in out]
    if missing:
        raise ValueError(f"FP8 linears whose placeholder is not in the model's state_dict: {missing}")
    if kv is not None:
        for i in range(kv.shape[0]):
            k_max, v_max = kv[i, 0].amax(), kv[i, 1].amax()  # one scale a layer: per-tensor, as the schemes say
            out[f"model.layers.{i}.self_attn.k_scale"] = k_max.reshape(1).float()
            out[f"model.layers.{i}.self_attn.v_scale"] = v_max.reshape(1).float()
    return out


def _expert_tensors(model: nn.Module, path: str, q, scale_name: str) -> dict[str, torch.Tensor]:
    """One MoE block's FP8 experts (`q`: Fp8Experts of the experts module at `path`) as the
    per-expert tensors checkpoints hold (`{path}.{e}.{projection}.weight` and its scale), named as
    the model file's `expert_tensors` says (models/loader.py stacks them back): a per-tensor scale as
    [1], per-channel rows as [n, 1], 128x128 blocks of a projection of n rows (n a multiple of 128)."""
    layout = getattr(type(model), "expert_tensors", None)
    if layout is None:
        raise ValueError(f"{path}: FP8 experts of {type(model).__name__}, which has no per-expert checkpoint layout "
                         "(a model file's expert_tensors): writing them is not supported; quantize the MoE model "
                         "at load time instead (LLM(..., quant_config=QuantConfig(quant_algo=...)))")
    stacked = {"gate_up_proj": (q.w13, q.w13_scale), "down_proj": (q.w2, q.w2_scale)}
    parts = {param: 1 + max(r for p, r in layout.values() if p == param) for param, _ in layout.values()}
    out = {}
    for projection, (param, row_block) in layout.items():
        w, scale = stacked[param]
        n = w.shape[1] // parts[param]
        rows = slice(row_block * n, (row_block + 1) * n)
        if q.granularity == "128x128 blocks":
            if n % SCALE_BLOCK and parts[param] > 1:
                raise ValueError(f"{path}: 128x128 block scales of expert projections of {n} rows (not a multiple "
                                 f"of {SCALE_BLOCK}) cannot be written apart")
            s = scale[:, row_block * n // SCALE_BLOCK:-(-(row_block + 1) * n // SCALE_BLOCK)]
        elif q.granularity == "per-tensor":
            s = scale[:, row_block * n].reshape(-1, 1)  # [E, 1]: the expert's one scale
        else:
            s = scale[:, rows]
        for e in range(w.shape[0]):
            out[f"{path}.{e}.{projection}.weight"] = w[e, rows]
            out[f"{path}.{e}.{projection}.{scale_name}"] = s[e]
    return out


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def export_fp8_checkpoint(model: nn.Module, src: Path, out: Path, algo: QuantAlgo, kv: torch.Tensor | None = None,
                          kv_fmt: str | None = None, progress: bool = False,
                          max_shard_bytes: int = MAX_SHARD_BYTES) -> list[Path]:
    """Write `model` (its FP8 linears from fp8_linears_of) into directory `out` (created) as the
    module docstring says; returns the weight files written."""
    src, out = Path(src), Path(out)
    if (kv is None) != (kv_fmt is None):
        raise ValueError("KV scales and their format (kv_fmt 'fp8' or 'int8') go together")
    tensors = checkpoint_tensors(model, algo, kv)
    out.mkdir(parents=True, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(t.numel() * t.element_size() for t in tensors.values()), unit="B", unit_scale=True,
                   desc="writing checkpoint")
    for file, shard in zip(names, shards):
        # one shard on the CPU at a time (a GPU model's weights are copied shard by shard)
        save_file({n: tensors[n].to("cpu").contiguous() for n in shard}, str(out / file), metadata={"format": "pt"})
        if bar is not None:
            bar.update(sum(tensors[n].numel() * tensors[n].element_size() for n in shard))
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total},
                 "weight_map": {n: file for file, shard in zip(names, shards) for n in shard}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    static = any(q.input_scale is not None for q in fp8_linears_of(model).linears.values())
    config["quantization_config"] = quantization_config(algo, kv_fmt, static)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    return [out / n for n in names]
