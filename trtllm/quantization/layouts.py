"""Which FP8 layout a checkpoint directory uses, read from config.json's quantization_config or
NVIDIA ModelOpt's hf_quant_config.json (the table in quantization/checkpoint.py); anything
else quantized is refused naming the field."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trtllm.kernels.fp8_gemm import SCALE_BLOCK
from trtllm.models.checkpoint_config import read_json

SUPPORTED = ("fp8 (HF transformers' FP8: quant_method \"fp8\")",
             "compressed-tensors (FP8 weights and activations)",
             "modelopt (NVIDIA ModelOpt FP8, hf_quant_config.json)")
_KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


@dataclass(frozen=True)
class CheckpointLayout:
    name: str                 # as messages say it: "HF fp8", "compressed-tensors", "ModelOpt"
    weight_scale: str         # the tensor suffix: "weight_scale_inv" or "weight_scale"
    static_inputs: bool       # input_scale tensors required (static activation scales)
    block: bool               # 128x128 block weight scales
    kv_cache_format: str | None = None  # "fp8" / "int8": what the checkpoint's k_scale / v_scale calibrate

    def describe(self) -> str:
        parts = ["128x128 block" if self.block else "per-tensor/per-channel", "weights",
                 "static input scales" if self.static_inputs else "dynamic activations"]
        return f"{self.name} checkpoint ({' '.join(parts[:2])}, {parts[2]})"


class CheckpointError(ValueError):
    """A quantized checkpoint trtllm cannot read; the message names the tensor or field."""


def _unsupported(method) -> CheckpointError:
    return CheckpointError(f"quantization_config.quant_method={method!r} is not supported; trtllm loads "
                           f"FP8 checkpoints of these layouts: {'; '.join(SUPPORTED)}")


def checkpoint_layout(path: Path, hf_config: dict) -> CheckpointLayout | None:
    """The FP8 layout of checkpoint directory `path` (config.json already read into
    `hf_config`), None if it is not quantized; anything else quantized is refused by name."""
    modelopt_file = Path(path) / "hf_quant_config.json"
    qc = hf_config.get("quantization_config")
    if modelopt_file.is_file():
        if isinstance(qc, dict) and qc.get("quant_method") not in (None, "modelopt"):
            raise CheckpointError(f"{modelopt_file} (ModelOpt) and config.json's quantization_config (quant_method="
                                  f"{qc.get('quant_method')!r}) both describe the weights: remove the one that does not")
        return _modelopt(_object(read_json(modelopt_file), "quantization", modelopt_file.name), modelopt_file.name)
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"config.json: quantization_config is {type(qc).__name__}, expected an object")
    method = qc.get("quant_method")
    if method == "fp8":
        return _hf_fp8(qc)
    if method == "compressed-tensors":
        return _compressed_tensors(qc)
    if method == "modelopt":
        return _modelopt(qc, "config.json quantization_config")
    raise _unsupported(method)


def _hf_fp8(qc: dict) -> CheckpointLayout:
    scheme = qc.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise CheckpointError(f"quantization_config.activation_scheme={scheme!r}: expected 'dynamic' or 'static'")
    block = qc.get("weight_block_size")
    if block not in (None, [SCALE_BLOCK, SCALE_BLOCK]):
        raise CheckpointError(f"quantization_config.weight_block_size={block!r}: only "
                              f"[{SCALE_BLOCK}, {SCALE_BLOCK}] blocks (or none) are supported")
    if block and scheme == "static":
        raise CheckpointError("quantization_config: block weight scales with static activation scales are not "
                              "supported (block weights take per-token-group activations)")
    return CheckpointLayout("HF fp8", "weight_scale_inv", scheme == "static", block is not None)


def _is_fp8(args: dict | None) -> bool:
    return isinstance(args, dict) and args.get("num_bits") == 8 and args.get("type") == "float"


def _object(section: dict, key: str, where: str) -> dict:
    """section[key], which must be a JSON object (absent: {}); a list or a string is named, where
    `.get` on it failed with an AttributeError."""
    if not isinstance(section, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(section).__name__}")
    value = section.get(key) or {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: {key} is {type(value).__name__} ({value!r}), expected an object")
    return value


# compressed-tensors' formats whose FP8 tensors are stored as they are (e4m3 weights, fp32 scales)
_CT_FORMATS = (None, "float-quantized", "naive-quantized")


def _compressed_tensors(qc: dict) -> CheckpointLayout:
    groups = _object(qc, "config_groups", "config.json quantization_config")
    if not groups:
        raise CheckpointError("compressed-tensors quantization_config has no config_groups")
    _ct_format(qc.get("format"), "quantization_config.format")
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, dict) and sparsity.get("format") not in (None, "dense"):
        raise CheckpointError(f"quantization_config.sparsity_config.format={sparsity.get('format')!r}: sparse "
                              "(compressed) weights are not supported; trtllm reads dense FP8 weights")
    layouts = set()
    for name, group in groups.items():
        if not isinstance(group, dict):
            raise CheckpointError(f"quantization_config.config_groups.{name} is {type(group).__name__}, expected an "
                                  "object (weights, input_activations)")
        w, a = group.get("weights"), group.get("input_activations")
        where = f"quantization_config.config_groups.{name}"
        _ct_format(group.get("format"), f"{where}.format")
        for part, args in (("weights", w), ("input_activations", a)):
            if isinstance(args, dict) and args.get("symmetric") is False:  # a zero point per scale
                raise CheckpointError(f"{where}.{part}.symmetric=false: asymmetric quantization (zero points) is "
                                      "not supported; trtllm's FP8 GEMMs take symmetric scales")
        if isinstance(w, dict) and w.get("dynamic") not in (None, False):
            raise CheckpointError(f"{where}.weights.dynamic={w.get('dynamic')!r}: weights quantized at run time are "
                                  "not supported; trtllm reads weights stored in FP8 with their scales")
        if not _is_fp8(w):
            raise CheckpointError(f"{where}.weights={w!r}: only FP8 weights (num_bits 8, type 'float') are "
                                  f"supported; {'; '.join(SUPPORTED)}")
        if w.get("strategy") not in ("tensor", "channel", "block"):
            raise CheckpointError(f"{where}.weights.strategy={w.get('strategy')!r}: expected 'tensor', "
                                  "'channel' or 'block'")
        if w.get("strategy") == "block" and w.get("block_structure") != [SCALE_BLOCK, SCALE_BLOCK]:
            raise CheckpointError(f"{where}.weights.block_structure={w.get('block_structure')!r}: only "
                                  f"[{SCALE_BLOCK}, {SCALE_BLOCK}] is supported")
        if not _is_fp8(a):
            raise CheckpointError(f"{where}.input_activations={a!r}: weight-only FP8 is not supported (the FP8 "
                                  "GEMM quantizes the activations too: FP8 num_bits 8, type 'float')")
        static = not a.get("dynamic", False)
        if static and a.get("strategy") != "tensor":
            raise CheckpointError(f"{where}.input_activations: static strategy {a.get('strategy')!r}: only "
                                  "per-tensor static activation scales are supported")
        if not static and a.get("strategy") not in ("token", "group", "tensor", None):
            raise CheckpointError(f"{where}.input_activations.strategy={a.get('strategy')!r} is not supported")
        block = w.get("strategy") == "block"
        if not static and a.get("strategy") == "group" and not (block and a.get("group_size") in (None, SCALE_BLOCK)):
            raise CheckpointError(f"{where}.input_activations: dynamic groups of {a.get('group_size')!r} with "
                                  f"{w.get('strategy')!r} weights are not supported: the FP8 GEMMs quantize "
                                  f"activations per token, or per 1x{SCALE_BLOCK} group beside block weights (they "
                                  "would run coarser than the checkpoint says)")
        if block and static:
            raise CheckpointError(f"{where}: block weights with static activation scales are not supported")
        layouts.add(CheckpointLayout("compressed-tensors", "weight_scale", static, block,
                                     _ct_kv_format(qc.get("kv_cache_scheme"))))
    if len(layouts) != 1:
        raise CheckpointError("compressed-tensors config_groups differ in granularity or activation scheme; "
                              "one scheme for all linears is supported")
    return layouts.pop()


def _ct_format(fmt, where: str) -> None:
    if fmt not in _CT_FORMATS:
        raise CheckpointError(f"{where}={fmt!r} is not supported: trtllm reads FP8 tensors stored as they are "
                              f"({', '.join(repr(f) for f in _CT_FORMATS[1:])}), not packed or compressed ones")


def _modelopt(q: dict, where: str) -> CheckpointLayout:
    algo = q.get("quant_algo")
    if algo not in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        raise CheckpointError(f"{where}: ModelOpt quant_algo={algo!r} is not supported; of ModelOpt's "
                              "algorithms trtllm loads FP8 and FP8_PER_CHANNEL_PER_TOKEN")
    kv = {"FP8": "fp8", "INT8": "int8"}.get(q.get("kv_cache_quant_algo"))
    return CheckpointLayout("ModelOpt", "weight_scale", algo == "FP8", False, kv)


def _ct_kv_format(scheme: dict | None) -> str | None:
    if not scheme or scheme.get("num_bits") != 8:
        return None
    return {"float": "fp8", "int": "int8"}.get(scheme.get("type"))


def is_quantization_tensor(layout: CheckpointLayout, name: str) -> bool:
    """A tensor the layout adds beside the model's own (scales)."""
    return name.endswith(("." + layout.weight_scale, ".input_scale", *_KV_SCALE_SUFFIXES))
