"""FP8 linears as data: what passes/quantize_linears.py needs to place an FP8 GEMM.

    Fp8Linear(weight [N, K] float8_e4m3fn, weight_scale fp32, input_scale fp32 [1] or None)
    Fp8Linears(linears: {module path: Fp8Linear}, kv_scales: {name: tensor}, source: str)
    quantize_weight(w [N, K], algo) -> Fp8Linear          # online quantization of one weight
    quantize_model(model, algo) -> Fp8Linears             # every linear but the LM head, in place,
                                                          # and transformers' 3-D MoE experts (Fp8Experts)

Scales are multipliers (real ~ fp8 * scale), in kernels/fp8_gemm.py's shapes: weight_scale
[1] per tensor, [N, 1] per output channel, [ceil(N/128), ceil(K/128)] per 128x128 block.
input_scale [1] is a static (calibrated) activation scale; None means the activations are
quantized at run time per token (per 1x128 group with block weights).

A quantized layer keeps no bf16 weight: its `nn.Linear.weight` becomes a placeholder of
the right shape and dtype that holds no memory (one NaN, expanded) and that the pass
recognises by identity. The model run eagerly therefore returns NaN, loudly, rather than
a plausible wrong answer; compiled (trtllm.compile / LLM), the pass replaces each such
linear by the FP8 GEMM and refuses a graph where a placeholder is used any other way.
The description travels on the model (`Fp8Linears.attach`, read back by `fp8_linears_of`),
so `trtllm.compile(trtllm.load_model(fp8_checkpoint))` needs nothing more.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from trtllm.config import FP8_WEIGHT_ALGOS, QuantAlgo
from trtllm.kernels.fp8_gemm import FP8_DTYPE, FP8_MAX, SCALE_BLOCK, dequantize_fp8
from trtllm.multimodal_context import is_vision_side

# the weight algorithms QuantConfig(quant_algo=...) quantizes at load time
ONLINE_ALGOS = FP8_WEIGHT_ALGOS
MIN_AMAX = 1e-12  # the scale of an all-zero tensor / row / block is MIN_AMAX / 448, not 0
_ATTRIBUTE = "trtllm_fp8_linears"  # where Fp8Linears.attach puts the description on a model


@dataclass
class Fp8Linear:
    weight: torch.Tensor                     # [N, K] float8_e4m3fn, contiguous
    weight_scale: torch.Tensor               # fp32 [1], [N, 1] or [ceil(N/128), ceil(K/128)]
    input_scale: torch.Tensor | None = None  # fp32 [1]: static activation scale; None: dynamic
    placeholder: torch.Tensor | None = None  # the module's weight in the model (no memory)
    # a row-parallel slice's tensor-parallel group: its dynamic activation amax (per token, or per
    # 1x128 group) is all-reduced (max) over it, so the activations quantize as one rank's whole row
    # (quantization/fp8_slices.py); None: this linear's own input alone
    activation_group: str | None = None

    @property
    def block(self) -> bool:
        """128x128 block weight scales (activations then in 1x128 groups)."""
        n, k = self.weight.shape
        return tuple(self.weight_scale.shape) not in ((1,), (n, 1)) and \
            tuple(self.weight_scale.shape) == (-(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK))

    @property
    def granularity(self) -> str:
        if self.block:
            return "128x128 blocks"
        return "per-tensor" if self.weight_scale.numel() == 1 else "per-channel"

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the FP8 one stands for, [N, K] in `dtype` (references and tests)."""
        block = (SCALE_BLOCK, SCALE_BLOCK) if self.block else None
        return dequantize_fp8(self.weight, self.weight_scale, block).to(dtype)


@dataclass
class Fp8Experts:
    """One MoE block's experts in FP8, as kernels/fused_moe_fp8.py takes them: transformers'
    3-D `gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `down_proj` [E, H, I] quantized
    expert by expert. Scales [E, N, 1] per output channel (a per-tensor expert scale repeated
    over its rows: the same products) or [E, ceil(N/128), ceil(K/128)] per 128x128 block."""
    w13: torch.Tensor               # [E, 2I, H] float8_e4m3fn
    w13_scale: torch.Tensor         # fp32
    w2: torch.Tensor                # [E, H, I] float8_e4m3fn
    w2_scale: torch.Tensor          # fp32
    granularity: str                # "per-tensor", "per-channel" or "128x128 blocks", as quantized
    placeholders: tuple[torch.Tensor, torch.Tensor] | None = None  # the module's two weights (no memory)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(W13, W2) the FP8 ones stand for, in `dtype` (references and tests)."""
        block = (SCALE_BLOCK, SCALE_BLOCK) if self.granularity == "128x128 blocks" else None
        return tuple(torch.stack([dequantize_fp8(w[e], s[e], block) for e in range(w.shape[0])]).to(dtype)
                     for w, s in ((self.w13, self.w13_scale), (self.w2, self.w2_scale)))


@dataclass
class Fp8Linears:
    """A model's quantization description: its FP8 linears by module path, and the KV-cache
    scales a checkpoint carries (handed on by name to the KV cache's quantization, not
    applied here)."""
    linears: dict[str, Fp8Linear] = field(default_factory=dict)
    kv_scales: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. "model.layers.0.self_attn.k_scale"
    kv_cache_format: str | None = None  # "fp8" / "int8": the cache kv_scales calibrate (the checkpoint says)
    source: str = ""  # what made it: "QuantConfig(quant_algo=FP8)", "HF fp8 checkpoint", ...
    # MoE blocks' experts by the experts module's path (passes/fuse_moe.py places fused_moe_fp8)
    experts: dict[str, Fp8Experts] = field(default_factory=dict)
    # a checkpoint's FP8 linears this rank did not load (tensor parallelism: it reads its slice as
    # stored, quantization/fp8_slices.py), by module path: the weight a stand-in of the whole
    # shape that holds no memory, the scales whole
    unloaded: dict[str, Fp8Linear] = field(default_factory=dict)

    def by_placeholder(self) -> dict[int, Fp8Linear]:
        """id(placeholder weight) -> its FP8 linear: how the pass knows a graph input."""
        return {id(q.placeholder): q for q in self.linears.values() if q.placeholder is not None}

    def experts_by_placeholder(self) -> dict[int, Fp8Experts]:
        """id(placeholder of gate_up_proj or down_proj) -> its block's FP8 experts."""
        return {id(p): q for q in self.experts.values() for p in (q.placeholders or ())}

    def attach(self, model: nn.Module) -> None:
        """Put each layer's placeholder in place of its weight, and the description on the model."""
        for path, q in self.linears.items():
            module = model.get_submodule(path)
            if q.placeholder is None:
                q.placeholder = placeholder_weight(q.weight.shape, module.weight.dtype, q.weight.device)
            module._parameters["weight"] = q.placeholder
        setattr(model, _ATTRIBUTE, self)

    def summary(self) -> str:
        kinds = sorted({q.granularity + (", static input scale" if q.input_scale is not None else "")
                        for q in self.linears.values()})
        experts = sorted({q.granularity for q in self.experts.values()})
        blocks = f", FP8 experts of {len(self.experts)} MoE blocks ({'; '.join(experts)})" if self.experts else ""
        return f"{len(self.linears)} FP8 linears ({'; '.join(kinds)}){blocks} from {self.source}"


def fp8_linears_of(model: nn.Module) -> Fp8Linears | None:
    """The description `Fp8Linears.attach` put on `model` (None for an unquantized one)."""
    return getattr(model, _ATTRIBUTE, None)


def placeholder_weight(shape, dtype: torch.dtype, device) -> nn.Parameter:
    """An [N, K] weight that holds one NaN: the shape the model's code expects, no memory."""
    return nn.Parameter(torch.full((), float("nan"), dtype=dtype, device=device).expand(shape),
                        requires_grad=False)


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).contiguous()


def quantize_weight(weight: torch.Tensor, algo: QuantAlgo) -> Fp8Linear:
    """Round-to-nearest FP8 of one [N, K] weight at the algorithm's granularity: per tensor
    (FP8), per output channel (FP8_PER_CHANNEL_PER_TOKEN), per 128x128 block
    (FP8_BLOCK_SCALES); each scale = amax / 448 of what it covers, in fp32."""
    if weight.dim() != 2:
        raise ValueError(f"FP8 weight quantization takes an [N, K] matrix, got {tuple(weight.shape)}")
    w = weight.detach().float()
    n, k = w.shape
    if algo == QuantAlgo.FP8:
        scale = (w.abs().amax().clamp(min=MIN_AMAX) / FP8_MAX).reshape(1)
        return Fp8Linear(_to_fp8(w, scale), scale)
    if algo == QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN:
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=MIN_AMAX) / FP8_MAX
        return Fp8Linear(_to_fp8(w, scale), scale.contiguous())
    if algo == QuantAlgo.FP8_BLOCK_SCALES:
        nb, kb = -(-n // SCALE_BLOCK), -(-k // SCALE_BLOCK)
        padded = torch.nn.functional.pad(w, (0, kb * SCALE_BLOCK - k, 0, nb * SCALE_BLOCK - n))
        blocks = padded.view(nb, SCALE_BLOCK, kb, SCALE_BLOCK)
        scale = blocks.abs().amax(dim=(1, 3)).clamp(min=MIN_AMAX) / FP8_MAX  # [nb, kb]
        q = _to_fp8(blocks, scale[:, None, :, None]).view(nb * SCALE_BLOCK, kb * SCALE_BLOCK)[:n, :k]
        return Fp8Linear(q.contiguous(), scale.contiguous())
    raise ValueError(f"quant_algo={algo.value if isinstance(algo, QuantAlgo) else algo!r}: online FP8 "
                     f"quantization supports {', '.join(a.value for a in ONLINE_ALGOS)}")


def quantize_expert_weights(weight: torch.Tensor, algo: QuantAlgo) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, N, K] -> (fp8 [E, N, K], scale): each expert as `quantize_weight` quantizes a linear;
    a per-tensor scale repeated over the expert's N rows ([E, N, 1], what fused_moe_fp8 takes)."""
    qs = [quantize_weight(weight[e], algo) for e in range(weight.shape[0])]
    scales = [q.weight_scale.reshape(1, 1).expand(weight.shape[1], 1) if q.weight_scale.numel() == 1
              and not q.block else q.weight_scale for q in qs]
    return torch.stack([q.weight for q in qs]), torch.stack(scales).contiguous()


EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")  # transformers' 3-D expert tensors ([E, 2I, H], [E, H, I])


def quantizable_experts(model: nn.Module) -> list[str]:
    """Module paths of transformers' MoE experts modules (Mixtral, Qwen2/3-MoE, OLMoE,
    DeepSeek-V2/V3 in transformers 5: 3-D `gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]).
    Experts with biases or other 3-D layouts are refused by name: never left unquantized
    while the model is called FP8."""
    paths = []
    for path, m in model.named_modules():
        params = dict(m.named_parameters(recurse=False))
        if not any(name in params and params[name].dim() == 3 for name in EXPERT_WEIGHTS):
            continue
        w13, w2 = params.get("gate_up_proj"), params.get("down_proj")
        other = [n for n in params if n not in EXPERT_WEIGHTS]
        if (w13 is None or w2 is None or w13.dim() != 3 or w2.dim() != 3 or other
                or w13.shape[0] != w2.shape[0] or w13.shape[2] != w2.shape[1] or w13.shape[1] != 2 * w2.shape[2]):
            raise ValueError(f"{path or type(m).__name__}: MoE experts of another layout (parameters "
                             f"{ {n: tuple(p.shape) for n, p in params.items()} }): FP8 quantization takes 3-D "
                             "gate_up_proj [E, 2I, H] and down_proj [E, H, I] without biases; refused rather than "
                             "leaving the experts unquantized")
        paths.append(path)
    return paths


def quantize_experts(module: nn.Module, algo: QuantAlgo) -> Fp8Experts:
    """Quantize one experts module's gate_up_proj and down_proj in place (each replaced by its
    placeholder at once)."""
    quantized = []
    for name in EXPERT_WEIGHTS:
        w = module._parameters[name]
        with torch.no_grad():
            q, scale = quantize_expert_weights(w, algo)
        placeholder = placeholder_weight(w.shape, w.dtype, w.device)
        module._parameters[name] = placeholder  # the bf16 weight is freed here
        quantized.append((q, scale, placeholder))
    (w13, s13, p13), (w2, s2, p2) = quantized
    granularity = {QuantAlgo.FP8: "per-tensor", QuantAlgo.FP8_PER_CHANNEL_PER_TOKEN: "per-channel",
                   QuantAlgo.FP8_BLOCK_SCALES: "128x128 blocks"}[algo]
    return Fp8Experts(w13, s13, w2, s2, granularity, (p13, p2))


def quantizable_linears(model: nn.Module) -> list[str]:
    """Module paths of the nn.Linear layers online quantization takes: all but the LM head
    (kept in the model's dtype, as TensorRT-LLM keeps it), a multimodal model's vision side (its
    tower and projector run eagerly before the step), any linear whose weight is
    shared with an embedding (tied), and multi-head latent attention's kv_b_proj (DeepSeek-V2/V3:
    trtllm.mla_attention reads it in the model dtype to expand and absorb the latent)."""
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    modules = dict(model.named_modules())
    paths = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head or path.split(".")[-1] == "lm_head" \
                or is_vision_side(model, path):
            continue
        if id(m.weight) in embedding_weights:
            continue
        parent = modules[path.rpartition(".")[0]]
        if path.endswith("kv_b_proj") and isinstance(getattr(parent, "kv_lora_rank", None), int):
            continue
        paths.append(path)
    return paths


def quantize_model(model: nn.Module, algo: QuantAlgo, leave=None) -> Fp8Linears:
    """Quantize `model`'s linears (quantizable_linears) in place, one layer at a time: each
    bf16 weight is replaced by its placeholder as soon as its FP8 copy exists, so at most
    one layer's weight is held twice. Returns the description, also attached to the model.
    leave(weight) -> True: a weight left as it is (a parallel rank's stand-ins: the passes
    quantize its split ones as they slice them; other pipeline stages' are never run)."""
    if algo not in ONLINE_ALGOS:
        quantize_weight(torch.zeros(1, 1), algo)  # raises, naming what is supported
    if fp8_linears_of(model) is not None:
        raise ValueError("the model is already FP8-quantized (a pre-quantized checkpoint, or quantized once "
                         "already): quantizing it again is refused")
    paths, expert_paths = quantizable_linears(model), quantizable_experts(model)
    if leave is not None:
        paths = [p for p in paths if not leave(model.get_submodule(p).weight)]
        expert_paths = [p for p in expert_paths if not leave(model.get_submodule(p).gate_up_proj)]
    elif not paths and not expert_paths:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to quantize besides its LM head (e.g. "
                         "GPT-2's Conv1D layers are not nn.Linear): FP8 quantization is refused rather than "
                         "leaving the model unquantized")
    linears = Fp8Linears(source=f"QuantConfig(quant_algo={algo.value})")
    for path in paths:
        module = model.get_submodule(path)
        with torch.no_grad():
            q = quantize_weight(module.weight, algo)
        q.placeholder = placeholder_weight(module.weight.shape, module.weight.dtype, module.weight.device)
        module._parameters["weight"] = q.placeholder  # the bf16 weight is freed here
        linears.linears[path] = q
    for path in expert_paths:  # MoE experts: kernels/fused_moe_fp8.py, placed by passes/fuse_moe.py
        linears.experts[path] = quantize_experts(model.get_submodule(path), algo)
    linears.attach(model)
    return linears
