"""Load a local HF checkpoint directory: into one of our model modules where
ARCHITECTURES names one, else into the HF module transformers builds for it.

    load_model(path, dtype=None, device=None, quant_algo=None) -> nn.Module

The model is built on the meta device (no memory), then every tensor is streamed in,
shard by shard, with `safetensors.safe_open`: read, cast, moved to the device and
assigned as the module's Parameter in place of the meta one, so the weights are never
held twice. Checkpoint names map to parameter names by identity (our model files mirror
HF's module names). Any other decoder-only causal LM transformers can build (without
`trust_remote_code`) is loaded as its HF module by models/hf.py's `load_hf_module`,
which `trtllm.compile` runs under our attention interface; a family whose attention
does not go through that interface is refused by name. FP8 checkpoints (the layouts of
trtllm/quantization/checkpoint.py) and `quant_algo` (online FP8 quantization, one weight
at a time as it streams in) leave the quantized linears' FP8 weights and scales in the
description `trtllm.quantization.fp8_linears_of(model)` (the model's own weights for those
layers are placeholders; passes/quantize_linears.py places the FP8 GEMMs). Pickle checkpoints (`pytorch_model*.bin`, `*.pt`) are never
unpickled: loading one could run arbitrary code.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from trtllm.models.bloom import BloomForCausalLM
from trtllm.models.checkpoint_config import read_config
from trtllm.models.checkpoint_tensors import (
    check_checkpoint,
    check_finite,
    check_stored_ties,
    expected_tensors,
    open_safetensors,
    weight_files,
)
from trtllm.models.expert_tensors import ExpertSlots
from trtllm.models.falcon import FalconForCausalLM
from trtllm.models.gemma import GemmaForCausalLM
from trtllm.models.llama import LlamaForCausalLM
from trtllm.models.llava import LlavaForConditionalGeneration
from trtllm.models.mixtral import MixtralForCausalLM
from trtllm.models.mpt import MptForCausalLM
from trtllm.models.olmoe import OlmoeForCausalLM
from trtllm.models.phi3 import Phi3ForCausalLM
from trtllm.models.qwen2_5_vl import Qwen25VLForConditionalGeneration
from trtllm.models.qwen2_moe import Qwen2MoeForCausalLM
from trtllm.models.qwen3_moe import Qwen3MoeForCausalLM
from trtllm.parallel.tensor_parallel import unloaded
from trtllm.quantization.checkpoint import Fp8CheckpointTensors, checkpoint_layout, is_quantization_tensor
from trtllm.quantization.fp8_linears import (
    ONLINE_ALGOS,
    Fp8Linears,
    placeholder_weight,
    quantizable_experts,
    quantizable_linears,
    quantize_experts,
    quantize_model,
    quantize_weight,
)

# config.json "architectures"[0] -> model class. Add a line per supported architecture.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,  # on one GPU; parallel ranks load transformers' (parallel/)
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,  # on one GPU; parallel ranks load transformers' (parallel/)
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,  # likewise
    "OlmoeForCausalLM": OlmoeForCausalLM,  # likewise
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": GemmaForCausalLM,
    "Gemma3ForCausalLM": GemmaForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "BloomForCausalLM": BloomForCausalLM,
    "MptForCausalLM": MptForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
    "LlavaForConditionalGeneration": LlavaForConditionalGeneration,
    "LlavaNextForConditionalGeneration": LlavaForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen25VLForConditionalGeneration,
    "Qwen2VLForConditionalGeneration": Qwen25VLForConditionalGeneration,
}
# multimodal families not supported yet, refused by name (transformers would build them, but
# not as a causal LM under our contract)
REFUSED_ARCHITECTURES = {
    "Gemma3ForConditionalGeneration": "Gemma-3 (multimodal)",
}

_DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_PROGRESS_BYTES = 1 << 30  # show a progress bar above 1 GB of weights


def load_model(path: str | os.PathLike, dtype: torch.dtype | str | None = None,
               device: torch.device | str | None = None, progress: bool | None = None,
               quant_algo=None, leave_unloaded: Callable[[str], bool] | None = None) -> nn.Module:
    """Build the model of `path`/config.json and stream its safetensors weights in.

    dtype: None = the config's `dtype` / `torch_dtype` (float32 if absent), else
    bf16/fp16/fp32 as torch.dtype or string (for an FP8 checkpoint: the unquantized
    tensors' dtype). device: None = cuda if available else cpu. progress: None = a tqdm
    bar only for checkpoints over 1 GB. quant_algo: a QuantAlgo of ONLINE_ALGOS (FP8,
    FP8_PER_CHANNEL_PER_TOKEN, FP8_BLOCK_SCALES) quantizes every linear but the LM head
    as it loads; refused for an already quantized checkpoint.
    leave_unloaded: names of tensors not to read (a tensor-parallel rank reads only its slices
    of those, later): each is a stand-in of its shape that holds no memory.
    """
    path = Path(path)
    if not path.is_dir():
        if path.exists():  # e.g. the model.safetensors or config.json itself
            raise NotADirectoryError(f"checkpoint {str(path)!r} is a file: give the checkpoint's directory")
        raise FileNotFoundError(f"checkpoint directory {str(path)!r} does not exist")
    hf_config = read_config(path)
    layout = checkpoint_layout(path, hf_config)  # None: not quantized; an unsupported one raises
    if quant_algo is not None and quant_algo not in ONLINE_ALGOS:
        quantize_weight(torch.zeros(1, 1), quant_algo)  # raises, naming what is supported
    if layout is not None and quant_algo is not None:
        raise ValueError(f"{path} is a pre-quantized {layout.describe()}; QuantConfig(quant_algo="
                         f"{getattr(quant_algo, 'value', quant_algo)}) would quantize it again: leave quant_algo "
                         "unset to load it as it is")
    dtype = _resolve_dtype(dtype, hf_config)
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    files = weight_files(path)
    architecture = (hf_config.get("architectures") or [None])[0]
    if architecture in REFUSED_ARCHITECTURES:
        raise ValueError(f"{path}: {REFUSED_ARCHITECTURES[architecture]} checkpoints ({architecture}) are not "
                         "supported yet; multimodal models supported: LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL (docs/multimodal.md)")
    model_cls = ARCHITECTURES.get(architecture)
    if model_cls is None:  # no model file of ours: the HF module (imported here: transformers is slow to load)
        if layout is not None:
            raise ValueError(f"{path}: pre-quantized checkpoints load into trtllm's own model files only "
                             f"({', '.join(sorted(ARCHITECTURES))}); "
                             f"{(hf_config.get('architectures') or ['?'])[0]} would load through transformers")
        from trtllm.models.hf import load_hf_module
        model = load_hf_module(path, dtype, device)
        if quant_algo is not None:  # loaded whole by transformers, then quantized layer by layer
            quantize_model(model, quant_algo)
        return model

    with torch.device("meta"):  # the model file builds unquantized layers; the layout is read here
        model = model_cls(_model_config(model_cls, hf_config, path))
    expert_slot = ExpertSlots(getattr(model_cls, "expert_tensors", None))
    expected, aliases = expected_tensors(model)
    rename = getattr(model_cls, "checkpoint_name", None) or (lambda name: name)  # checkpoint -> module names
    tensor_file = check_checkpoint(files, expected, aliases,
                                    (lambda name: is_quantization_tensor(layout, name)) if layout else None, rename,
                                    expert_slot)
    check_stored_ties(files, aliases, rename)
    fp8 = Fp8CheckpointTensors(layout, str(path)) if layout is not None else None
    online = Fp8Linears(source=f"QuantConfig(quant_algo={quant_algo.value})") if quant_algo is not None else None
    online_weights = {f"{p}.weight": p for p in quantizable_linears(model)} if online is not None else {}

    parameters = {name for name, _ in model.named_parameters()}
    total = sum(f.stat().st_size for f in files)
    bar = _progress_bar(total, progress)
    for file in files:
        with open_safetensors(file) as f:
            for stored in f.keys():
                name = rename(stored)
                slot = expert_slot(name)
                if slot is not None:  # one expert's projection: its rows of a 3-D parameter
                    t = f.get_tensor(stored)
                    if fp8 is None and t.dtype == torch.float8_e4m3fn:
                        raise ValueError(f"{file.name}: tensor {name!r} is float8 but the checkpoint names no "
                                         "quantization: without its scales it cannot be read")
                    if not t.is_floating_point():  # copied into the float stack it would pass as weights
                        raise ValueError(f"{file.name}: tensor {name!r} is {t.dtype}, but it is an expert's weight: "
                                         "weights are floating point")
                    stored_dtype = t.dtype  # checked on the device: a MoE's experts are most of its bytes
                    t = t.to(device=device, dtype=dtype if t.dtype != torch.float8_e4m3fn else t.dtype)
                    check_finite(t, name, file.name, stored_dtype)
                    expert_slot.put(slot, t, expected[slot[0]], dtype, device)
                    if bar is not None:
                        bar.update(t.numel() * t.element_size())
                    continue
                if tensor_file.get(name) != file:
                    continue  # an alias (tied lm_head) or a harmless extra
                if leave_unloaded is not None and leave_unloaded(name):
                    if fp8 is None or fp8.leave(name, f.get_slice(stored), leave_unloaded, device):
                        _assign(model, name, unloaded(expected[name], dtype, device))
                    continue
                t = f.get_tensor(stored)
                nbytes = t.numel() * t.element_size()
                if fp8 is None and t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    raise ValueError(f"{file.name}: tensor {name!r} is {t.dtype} but the checkpoint names no "
                                     "quantization (config.json quantization_config, hf_quant_config.json): "
                                     "without its scales it cannot be read (docs/quantization.md)")
                if t.dtype == torch.float8_e4m3fn:  # an FP8 weight: its values as stored (a scale: when placed)
                    check_finite(t, name, file.name)
                if fp8 is not None and fp8.take(name, t, device):
                    pass  # an FP8 weight or a scale: fp8.finish places it below
                elif name in online_weights:  # quantized now; the weight in `dtype` is dropped at once
                    w = t.to(device=device, dtype=dtype)
                    check_finite(w, name, file.name, t.dtype)
                    q = quantize_weight(w, quant_algo)
                    del w
                    q.placeholder = placeholder_weight(t.shape, dtype, device)
                    online.linears[online_weights[name]] = q
                else:
                    if not t.is_floating_point() and name in parameters:  # a buffer may hold integers
                        raise ValueError(f"{file.name}: tensor {name!r} is {t.dtype}, but it is a weight: "
                                         "weights are floating point (an integer-quantized checkpoint whose "
                                         "config.json names no quantization_config?)")
                    stored_dtype, t = t.dtype, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
                    check_finite(t, name, file.name, stored_dtype)
                    _assign(model, name, t)
                del t
                if bar is not None:
                    bar.update(nbytes)
    if bar is not None:
        bar.close()

    for param, stack in expert_slot.stacks.items():
        _assign(model, param, stack)
    if expert_slot.fp8_stacks:  # a pre-quantized checkpoint's FP8 experts, their scales stacked alike
        fp8.experts(model, expert_slot, dtype)
    if fp8 is not None:
        fp8.finish(model, dtype)
    if online is not None:
        for expert_path in quantizable_experts(model):  # whole 3-D experts now: quantized as transformers' are
            online.experts[expert_path] = quantize_experts(model.get_submodule(expert_path), quant_algo)
        online.attach(model)
    for alias, target in aliases.items():  # re-tie: point aliases at the loaded Parameter
        _assign(model, alias, model.get_parameter(target))
    if hasattr(model, "init_buffers"):
        model.init_buffers(device)
    meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if meta:
        raise RuntimeError(f"{path}: tensors left on the meta device after loading: {meta}")
    return model.eval().requires_grad_(False)


def _model_config(model_cls: type[nn.Module], hf_config: dict, path: Path):
    """The model file's config from config.json; a field it needs and config.json lacks is named
    (from_hf reads them as d[key]: a bare KeyError otherwise)."""
    try:
        return model_cls.config_class.from_hf({k: v for k, v in hf_config.items() if k != "quantization_config"})
    except KeyError as e:
        raise ValueError(f"{path / 'config.json'}: no {e.args[0]!r} field, which {model_cls.__name__} "
                         "needs") from None


def _resolve_dtype(dtype: torch.dtype | str | None, hf_config: dict) -> torch.dtype:
    where = "dtype"
    if dtype is None or dtype == "auto":
        dtype = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        where = "config.json's dtype (no dtype given)"
    if isinstance(dtype, str):
        key = dtype.removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"{where} {dtype!r} is not supported (use one of {sorted(_DTYPES)})")
        dtype = _DTYPES[key]
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"{where} {dtype!r} is not supported (bf16, fp16 or fp32)")
    return dtype


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the (meta) Parameter or buffer `name` of `model` by `value`."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[leaf] = value


def _progress_bar(total_bytes: int, progress: bool | None):
    if not (progress or (progress is None and total_bytes > _PROGRESS_BYTES)):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="loading weights")
