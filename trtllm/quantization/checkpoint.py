"""Pre-quantized FP8 checkpoints: which layout a directory uses, and its tensors as Fp8Linears.

    layout = checkpoint_layout(path, hf_config)     # None for an unquantized checkpoint
    tensors = Fp8CheckpointTensors(layout)
    tensors.take(name, tensor) -> bool               # True: a quantization tensor, kept here
    fp8 = tensors.finish(model)                      # Fp8Linears, every scale checked

The three layouts people download (all scales multipliers: real ~ fp8 * scale):

| layout | where it is said | weight scale | activations | KV scales |
|---|---|---|---|---|
| HF `quant_method: "fp8"` (Qwen3-FP8, DeepSeek-V3) | config.json `quantization_config` | `weight_scale_inv`: [1] / scalar, or [ceil(N/128), ceil(K/128)] with `weight_block_size: [128, 128]` | `activation_scheme` "dynamic" (per token, 1x128 groups with blocks) or "static" (`input_scale`) | - |
| compressed-tensors (llm-compressor) | config.json `quantization_config`, `quant_method: "compressed-tensors"`, `config_groups` with 8-bit float weights | `weight_scale`: [1] (strategy "tensor"), [N, 1] ("channel"), blocks ("block", [128, 128]) | `input_activations` dynamic (per token) or static "tensor" (`input_scale`) | `self_attn.k_scale`, `v_scale` |
| NVIDIA ModelOpt | `hf_quant_config.json` (`quantization.quant_algo` FP8 / FP8_PER_CHANNEL_PER_TOKEN), or config.json `quant_method: "modelopt"` | `weight_scale`: scalar ([N, 1] per channel) | `input_scale` (static) or none (per token) | `k_proj.k_scale`, `v_proj.v_scale` |

A linear is quantized where its checkpoint weight is float8_e4m3fn; its scales must then be
there, of a shape the layout allows, or loading fails naming the tensor. KV scales are
collected into `Fp8Linears.kv_scales` for the KV cache's quantization; this module does not
apply them. An LM head stored in FP8 is dequantized to the model's dtype (the head stays
unquantized, as TensorRT-LLM keeps it). Which layout a directory uses: quantization/layouts.py.
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open

from trtllm.kernels.fp8_gemm import FP8_DTYPE, SCALE_BLOCK
from trtllm.models.checkpoint_config import read_config
from trtllm.models.checkpoint_tensors import weight_files
from trtllm.parallel.tensor_parallel import unloaded
from trtllm.quantization.fp8_linears import EXPERT_WEIGHTS, Fp8Experts, Fp8Linear, Fp8Linears, placeholder_weight
from trtllm.quantization.layouts import (  # noqa: F401 (importers take the layouts from here)
    _KV_SCALE_SUFFIXES,
    SUPPORTED,
    CheckpointError,
    CheckpointLayout,
    checkpoint_layout,
    is_quantization_tensor,
)


def kv_cache_scales_by_layer(fp8: Fp8Linears, fmt: str, num_layers: int | None = None,
                             where: str = "the checkpoint") -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The checkpoint's KV-cache scales as runtime/kv_cache_quant.py takes them, one
    (k_scale, v_scale) per layer in layer order, for a cache of format `fmt` ("auto", "fp8",
    "int8"); None where there are none, or where they calibrate another format (with a
    warning: an FP8 scale is amax / 448, an INT8 one amax / 127). `num_layers`: the model's
    attention layers, which the scales must cover (the message names `where` and the layers)."""
    if not fp8.kv_scales or fmt == "auto":
        return None
    if fp8.kv_cache_format != fmt:
        warnings.warn(f"the checkpoint's KV-cache scales are for a {fp8.kv_cache_format or 'unnamed'} cache, not "
                      f"the {fmt} cache asked for: they are not used")
        return None
    layers: dict[int, dict[str, torch.Tensor]] = {}
    named: dict[tuple[int, str], str] = {}  # (layer, kind) -> the tensor that gave it
    for name, t in fp8.kv_scales.items():
        found = re.search(r"layers\.(\d+)\.", name)
        if found is None:
            raise CheckpointError(f"KV-cache scale {name!r}: no layer index (model.layers.<i>.) in its name")
        key = (int(found.group(1)), name.rsplit(".", 1)[1])
        if key in named:  # the one read last would win (another naming, or another tower's layers)
            raise CheckpointError(f"KV-cache scales {named[key]!r} and {name!r} both give layer {key[0]}'s {key[1]}")
        named[key] = name
        layers.setdefault(key[0], {})[key[1]] = t
    count = num_layers if num_layers is not None else len(layers)
    if num_layers is not None and max(layers) >= num_layers:
        raise CheckpointError(f"{where}: KV-cache scales for layers {_spans(layers)}, but the model has "
                              f"{num_layers} layers (0-{num_layers - 1})")
    out = []
    for i in range(count):
        pair = layers.get(i, {})
        for kind in ("k_scale", "v_scale"):
            if kind not in pair:
                missing = [j for j in range(count) if kind not in layers.get(j, {})]
                raise CheckpointError(f"{where}: KV-cache scales: layers {_spans(missing)} have no {kind} (it has "
                                      f"{kind}s for layers {_spans([j for j in layers if kind in layers[j]])} of "
                                      f"{count})")
        out.append((pair["k_scale"], pair["v_scale"]))
    return out


def _spans(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    spans: list[list[int]] = []
    for i in sorted(indices):
        if spans and i == spans[-1][1] + 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


class Fp8CheckpointTensors:
    """Collects a quantized checkpoint's FP8 weights and scales as the loader streams it."""

    def __init__(self, layout: CheckpointLayout, where: str):
        self.layout, self.where = layout, where
        self.weights: dict[str, torch.Tensor] = {}   # module path -> fp8 weight
        self.scales: dict[str, torch.Tensor] = {}    # tensor name -> scale
        self.kv_scales: dict[str, torch.Tensor] = {}
        self.left: dict[str, torch.Tensor] = {}      # module path -> stand-in of an FP8 weight not loaded
        self.fp8_experts: dict[str, Fp8Experts] = {}  # experts module path -> its FP8 experts (`experts`)

    def leave(self, name: str, stored, leave_unloaded, device) -> bool:
        """A tensor the loader does not read (`leave_unloaded(name)`; `stored`: its safetensors
        slice, which holds no data yet): False for a scale (nothing of the model's to stand in
        for: another pipeline stage's), True for the model's tensors. An FP8 weight whose scales
        this rank reads is a tensor-parallel split one: kept as a stand-in, its rank's slice is
        read by the pass (Fp8Linears.unloaded)."""
        if is_quantization_tensor(self.layout, name):
            return False
        path = name.removesuffix(".weight")
        if name.endswith(".weight") and stored.get_dtype() == "F8_E4M3" and \
                not leave_unloaded(f"{path}.{self.layout.weight_scale}"):
            self.left[path] = unloaded(stored.get_shape(), FP8_DTYPE, device)
        return True

    def take(self, name: str, tensor: torch.Tensor, device) -> bool:
        """Keep `tensor` if it is an FP8 weight or a scale (True); else the loader loads it."""
        if name.endswith(_KV_SCALE_SUFFIXES):
            self.kv_scales[name] = tensor.float().to(device)
            return True
        if name.endswith(".input_scale") and not self.layout.static_inputs:
            raise CheckpointError(f"{self.where}: {name!r} is a static input scale, but the config names "
                                  f"{self.layout.describe()}: the scale would be ignored (the config or the "
                                  "tensors are not what the checkpoint was quantized with; docs/quantization.md)")
        if is_quantization_tensor(self.layout, name):
            self.scales[name] = tensor.to(device)
            return True
        if name.endswith(".weight") and tensor.dtype == FP8_DTYPE:
            self.weights[name.removesuffix(".weight")] = tensor.to(device).contiguous()
            return True
        if tensor.dtype not in (torch.float32, torch.float16, torch.bfloat16) and tensor.is_floating_point():
            raise CheckpointError(f"{self.where}: tensor {name!r} is {tensor.dtype}; of the low-precision types "
                                  f"only {FP8_DTYPE} (e4m3) weights are supported")
        return False

    def _scale(self, path: str, suffix: str, allowed: list[tuple[int, ...]], kind: str) -> torch.Tensor:
        name = f"{path}.{suffix}"
        if name not in self.scales:
            raise CheckpointError(f"{self.where}: {name!r} is missing: the FP8 weight {path}.weight needs its "
                                  f"{kind} ({self.layout.describe()})")
        s = self.scales.pop(name)
        shape = tuple(s.shape)
        if shape == ():  # ModelOpt's scalars
            s, shape = s.reshape(1), (1,)
        if len(allowed) > 1 and shape == (allowed[1][0],) and allowed[1][1:] == (1,):  # a [N] per-channel vector
            s, shape = s.reshape(-1, 1), allowed[1]
        if shape not in allowed:
            raise CheckpointError(f"{self.where}: {name!r} has shape {tuple(s.shape)}; for weight "
                                  f"{path}.weight the {self.layout.name} layout allows {allowed}")
        if not s.is_floating_point():
            raise CheckpointError(f"{self.where}: {name!r} is {s.dtype}: scales are floating point")
        bad = ~torch.isfinite(s.float()) | (s.float() <= 0)
        if bad.any():
            raise CheckpointError(f"{self.where}: {name!r} must hold finite positive scales; it holds "
                                  f"{s.float()[bad].flatten()[:4].tolist()}")
        return s.float().contiguous()

    def experts(self, model: nn.Module, slots, dtype: torch.dtype) -> None:
        """The FP8 experts of a model file's MoE blocks: `slots.fp8_stacks` (models/expert_tensors.py:
        the per-expert FP8 tensors stacked into [E, 2I, H] gate_up_proj and [E, H, I] down_proj as
        stored) with each expert's scales stacked alike, as kernels/fused_moe_fp8.py takes them
        (a per-tensor scale repeated over its rows; 128x128 blocks of gate and up side by side, so
        I must be a multiple of 128). The model's 3-D parameters become placeholders (no memory);
        finish() hands the experts on in Fp8Linears.experts."""
        if self.layout.static_inputs:
            raise CheckpointError(f"{self.where}: FP8 experts with static input scales ({self.layout.describe()}) "
                                  "are not supported: the fused MoE quantizes its activations per token")
        modules = sorted({param.rpartition(".")[0] for param in slots.fp8_stacks})
        for module in modules:
            stacked = []
            for leaf in EXPERT_WEIGHTS:  # gate_up_proj, down_proj
                param = f"{module}.{leaf}"
                if param not in slots.fp8_stacks:
                    raise CheckpointError(f"{self.where}: {module}'s experts are float8 in one projection and not "
                                          f"in {leaf}")
                w = slots.fp8_stacks.pop(param)
                projections = slots.projections(param)
                scales = [torch.stack([self._expert_scale(f"{module}.{e}.{proj}", w.shape[1] // len(projections),
                                                          w.shape[2], len(projections) > 1)
                                       for e in range(w.shape[0])]) for proj in projections]
                placeholder = placeholder_weight(w.shape, dtype, w.device)
                model.get_submodule(module)._parameters[leaf] = placeholder
                stacked.append((w, torch.cat(scales, dim=1).contiguous(), placeholder))
            (w13, s13, p13), (w2, s2, p2) = stacked
            self.fp8_experts[module] = Fp8Experts(w13, s13, w2, s2, "128x128 blocks" if self.layout.block
                                                  else "per-channel", (p13, p2))

    def _expert_scale(self, path: str, n: int, k: int, side_by_side: bool) -> torch.Tensor:
        """One expert projection's weight scale ([n, k] weight) as fused_moe_fp8 stacks it: blocks as
        they are, a per-tensor scale repeated over the n rows, per-channel [n, 1]."""
        nb, kb = -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK)
        if self.layout.block and side_by_side and n % SCALE_BLOCK:
            raise CheckpointError(f"{self.where}: {path}: 128x128 block scales of an expert projection of {n} rows "
                                  "(not a multiple of 128) cannot stack with gate and up side by side")
        s = self._scale(path, self.layout.weight_scale, [(nb, kb)] if self.layout.block else [(1,), (n, 1)],
                        "weight scale")
        return s if self.layout.block or s.numel() > 1 else s.reshape(1, 1).expand(n, 1)

    def finish(self, model: nn.Module, dtype: torch.dtype) -> Fp8Linears:
        """The Fp8Linears of what was taken, attached to `model`; an FP8 LM head is dequantized
        into the model instead. Raises naming any scale that is missing, mis-shaped or unused."""
        if not (self.weights or self.left or self.fp8_experts):  # correct answers, but not what was asked for
            warnings.warn(f"{self.where}: config.json names {self.layout.describe()}, but no weight of the "
                          "checkpoint is FP8: it runs unquantized, in its own dtype", stacklevel=2)
        out = Fp8Linears(kv_scales=self.kv_scales, kv_cache_format=self.layout.kv_cache_format,
                         source=self.layout.describe(), experts=self.fp8_experts)
        for path, w in [*self.weights.items(), *self.left.items()]:
            q = self._linear(path, w)
            module = model.get_submodule(path)
            if not isinstance(module, nn.Linear):
                raise CheckpointError(f"{self.where}: {path}.weight is FP8 but {path} is a "
                                      f"{type(module).__name__}, not a linear layer")
            head = path.split(".")[-1] == "lm_head" or module is _output_embeddings(model)
            if path in self.left:
                if head:
                    raise CheckpointError(f"{self.where}: {path}.weight is FP8: an FP8 LM head split by "
                                          "vocabulary under tensor parallelism is not supported")
                out.unloaded[path] = q
            elif head:
                module._parameters["weight"] = nn.Parameter(q.dequantized(dtype), requires_grad=False)
            else:  # the placeholder in the loaded dtype: the model was built in config.json's
                q.placeholder = placeholder_weight(w.shape, dtype, w.device)
                out.linears[path] = q
        if self.scales:
            raise CheckpointError(f"{self.where}: scales with no FP8 weight beside them: {sorted(self.scales)}")
        out.attach(model)
        return out

    def _linear(self, path: str, w: torch.Tensor) -> Fp8Linear:
        """The FP8 weight `w` ([N, K]; a stand-in for one not loaded) with its scales, checked."""
        n, k = w.shape
        nb, kb = -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK)
        allowed = [(nb, kb)] if self.layout.block else [(1,), (n, 1)]
        weight_scale = self._scale(path, self.layout.weight_scale, allowed, "weight scale")
        input_scale = self._scale(path, "input_scale", [(1,)], "static input scale") \
            if self.layout.static_inputs else None
        return Fp8Linear(w, weight_scale, input_scale)


def checkpoint_kv_cache_scales(path: str | Path, fmt: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The KV-cache scales (k_scale, v_scale) per layer that the FP8 checkpoint at `path` carries
    for a cache of format `fmt`, read alone (as `kv_cache_scales_by_layer` takes them from a loaded
    model): what every rank of a parallel engine needs before any of them loads. None where the
    checkpoint is not quantized or has none for `fmt`."""
    path = Path(path)
    config = read_config(path)
    layout = checkpoint_layout(path, config)
    if layout is None or fmt == "auto":
        return None
    scales = {}
    for file in weight_files(path):  # the checkpoint's own files: not any other *.safetensors beside them
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(_KV_SCALE_SUFFIXES):
                    scales[name] = f.get_tensor(name).float()
    num_layers = config.get("num_hidden_layers") if isinstance(config.get("num_hidden_layers"), int) else None
    return kv_cache_scales_by_layer(Fp8Linears(kv_scales=scales, kv_cache_format=layout.kv_cache_format), fmt,
                                    num_layers, str(path))


def _output_embeddings(model: nn.Module):
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
