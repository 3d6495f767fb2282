"""Tiny FP8 checkpoints in the three layouts people download, written here (no downloads),
and the reference they must reproduce.

    write_fp8_checkpoint(src, dst, layout, granularity, static) -> {module path: Fp8Linear}
    fp8_reference(src, linears) -> the HF model of `src` computing what the FP8 model computes

`src` is an unquantized checkpoint (tests/models/checkpoints.py); every decoder linear is
quantized with trtllm.quantization.quantize_weight, static input scales calibrated as
amax / 448 of each linear's input over CALIBRATION. The reference is the HF model with each
quantized linear's weight dequantized and its input quantized and dequantized (per token,
per 1x128 group, or with the static scale): the FP8 GEMM's semantics in fp32.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.models.checkpoints import hf_model
from trtllm.config import QuantAlgo
from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, SCALE_BLOCK
from trtllm.kernels.quantize_fp8 import quantize_fp8_ref
from trtllm.quantization import Fp8Linear, quantize_weight

LAYOUTS = ("hf_fp8", "compressed_tensors", "modelopt")
CALIBRATION = torch.tensor([[5, 17, 99, 3, 250, 31, 8, 60, 61, 62, 63, 400, 3, 9, 77, 120]])
_ALGO = {"tensor": QuantAlgo.FP8, "channel": QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN, "block": QuantAlgo.FP8_BLOCK_SCALES}


def _is_decoder_linear(name: str) -> bool:
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _input_amax(src: Path) -> dict[str, float]:
    model, amax = hf_model(src), {}
    hooks = [m.register_forward_pre_hook(lambda m, a, path=path: amax.__setitem__(
        path, max(amax.get(path, 0.0), a[0].abs().max().item())))
        for path, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _is_decoder_linear(path + ".weight")]
    with torch.no_grad():
        model(CALIBRATION)
    for h in hooks:
        h.remove()
    return amax


def _quantization_config(layout: str, granularity: str, static: bool) -> tuple[dict | None, dict | None]:
    """(config.json's quantization_config, hf_quant_config.json) for the layout."""
    if layout == "hf_fp8":
        qc = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
        if granularity == "block":
            qc["weight_block_size"] = [SCALE_BLOCK, SCALE_BLOCK]
        return qc, None
    if layout == "compressed_tensors":
        weights = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": granularity}
        if granularity == "block":
            weights["block_structure"] = [SCALE_BLOCK, SCALE_BLOCK]
        acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
                "strategy": "tensor" if static else ("group" if granularity == "block" else "token")}
        return {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": acts}},
                "kv_cache_scheme": None}, None
    algo = "FP8" if granularity == "tensor" else "FP8_PER_CHANNEL_PER_TOKEN"
    return None, {"producer": {"name": "modelopt", "version": "0.19.0"},
                  "quantization": {"quant_algo": algo, "kv_cache_quant_algo": "FP8", "exclude_modules": ["lm_head"]}}


def write_fp8_checkpoint(src: Path, dst: Path, layout: str, granularity: str, static: bool) -> dict[str, Fp8Linear]:
    """`src` (one model.safetensors) quantized into `dst` in `layout`; returns the linears written."""
    dst.mkdir(parents=True, exist_ok=True)
    tensors, out, linears = load_file(str(src / "model.safetensors")), {}, {}
    amax = _input_amax(src) if static else {}
    scale_name = "weight_scale_inv" if layout == "hf_fp8" else "weight_scale"
    for name, t in tensors.items():
        if not _is_decoder_linear(name):
            out[name] = t
            continue
        path = name.removesuffix(".weight")
        q = quantize_weight(t, _ALGO[granularity])
        if static:
            # (transformers' 3-D experts are no modules the calibration hooks see: 1.0 as their amax)
            q.input_scale = torch.tensor([max(amax.get(path, 1.0), 1e-6) / FP8_MAX])
            out[f"{path}.input_scale"] = q.input_scale.reshape(()) if layout == "modelopt" else q.input_scale
        out[name] = q.weight
        per_tensor_scalar = layout == "modelopt" and granularity == "tensor"
        out[f"{path}.{scale_name}"] = q.weight_scale.reshape(()) if per_tensor_scalar else q.weight_scale
        linears[path] = q
    if layout == "modelopt":  # KV scales, handed on (not applied by the linears' path)
        for name in list(out):
            if name.endswith("self_attn.k_proj.weight"):
                out[name.replace(".weight", ".k_scale")] = torch.tensor(0.5)
                out[name.replace("k_proj.weight", "v_proj.v_scale")] = torch.tensor(0.25)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    qc, modelopt = _quantization_config(layout, granularity, static)
    if qc is not None:
        config["quantization_config"] = qc
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    if modelopt is not None:
        (dst / "hf_quant_config.json").write_text(json.dumps(modelopt, indent=1))
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return linears


def fake_quantize_input(x: torch.Tensor, q: Fp8Linear) -> torch.Tensor:
    """x as the FP8 GEMM sees it: quantized to e4m3 and back, in fp32."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    if q.input_scale is not None:
        s = q.input_scale.float()
        return ((x2 / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s).view(x.shape).to(x.dtype)
    group = SCALE_BLOCK if q.block else None
    xq, xs = quantize_fp8_ref(x2, group)
    if group is not None:
        xs = xs.repeat_interleave(group, 1)[:, : x2.shape[1]]
    return (xq.float() * xs).view(x.shape).to(x.dtype)


def fp8_reference(src: Path, linears: dict[str, Fp8Linear]) -> torch.nn.Module:
    """The HF fp32 model of `src`, its quantized linears computing the FP8 GEMM's semantics."""
    model = hf_model(src)
    for path, q in linears.items():
        module = model.get_submodule(path)
        module.weight = torch.nn.Parameter(q.dequantized(), requires_grad=False)
        module.register_forward_pre_hook(lambda m, args, q=q: (fake_quantize_input(args[0], q),))
    return model
