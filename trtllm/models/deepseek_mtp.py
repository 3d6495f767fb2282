"""DeepSeek-V3 multi-token prediction (MTP) as a draft: the checkpoint's first MTP layer
(DeepSeek-V3 technical report, section 2.2), run as TensorRT-LLM's "MTP Eagle" does it.

At position t the MTP layer reads token t + 1 and h_t, the state leaving the target's last
decoder layer (before its final norm), and predicts token t + 2:

    x       = eh_proj(cat(enorm(embed(tok_{t+1})), hnorm(h_t)))   # [H]
    prenorm = decoder_layer(x; rope at t)        # one DeepSeek-V3 layer: MLA, then MoE (or a dense MLP)
    logits  = shared_head.head(shared_head.norm(prenorm))           # [V]: the target's vocabulary

A proposal's later steps feed the layer its own `prenorm` of the position before as h: the
one layer drafts max_draft_len tokens ("MTP Eagle"; "MTP vanilla", a different layer a step,
is refused in runtime/speculative/build.py). The forward keeps the compilable-model contract,
`forward(input_ids, positions) -> logits`: h comes from `trtllm.draft_hidden_input`, which
reads the stores the runtime fills (trtllm/hidden_states.py), and passes/stash_hidden_states.py
stashes `prenorm` (the state leaving `layers.0`): the EAGLE-3 machinery
(runtime/speculative/eagle3.py), with the target stashing its last layer's state.

The decoder layer is transformers' own `DeepseekV3DecoderLayer` (the layer the target's HF
module is made of), its attention through trtllm's interface (models/hf.py), so the same
passes page its latent and fuse its experts.

Checkpoint names: `model.layers.{L}.*` with L = num_hidden_layers (DeepSeek-V3 ships layer 61):
`enorm`, `hnorm`, `eh_proj` [H, 2H], `shared_head.norm`, `shared_head.head` [V, H] (absent:
the target's lm_head), `embed_tokens` (the target's is used: the published copy is the
same tensor), and the decoder layer's own (`self_attn.*`, `mlp.*` with experts one by one
or stacked, `input_layernorm`, `post_attention_layernorm`). Block-quantized FP8 tensors
(`weight_scale_inv`, the published checkpoint's) are dequantized to the model dtype.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from trtllm.hidden_states import draft_hidden_input  # noqa: F401  registers torch.ops.trtllm.draft_hidden_input
from trtllm.models.checkpoint_config import read_json
from trtllm.models.checkpoint_tensors import check_finite
from trtllm.models.eagle3 import input_embedding

MTP_MODEL_TYPES = ("deepseek_v3",)
_OWN = ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight")


class MTPDraft(nn.Module):
    """The MTP layer as a causal LM over the target's vocabulary: logits [B, S, V]."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
            DeepseekV3DecoderLayer,
            DeepseekV3RMSNorm,
            DeepseekV3RotaryEmbedding,
        )
        config = copy.deepcopy(config)
        config._attn_implementation = "trtllm"  # models/hf.py's interface: paged by compile
        config._experts_implementation = "batched_mm"  # one graph for the experts (models/hf.py: HFCausalLM)
        self.config = config
        h = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, h)
        self.enorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([DeepseekV3DecoderLayer(config, layer_idx=config.num_hidden_layers)])
        self.norm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)  # shared_head.norm
        self.lm_head = nn.Linear(h, config.vocab_size, bias=False)  # shared_head.head
        self.rotary_emb = DeepseekV3RotaryEmbedding(config)
        self.register_buffer("draft_to_target", torch.arange(config.vocab_size), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)  # [B, S, H]
        hidden = torch.ops.trtllm.draft_hidden_input(input_ids, embeds.shape[-1], embeds.dtype)  # [B, S, H]
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))  # [B, S, H]
        cos_sin = self.rotary_emb(x, positions)
        x = self.layers[0](x, attention_mask=None, position_ids=positions, position_embeddings=cos_sin)
        return self.lm_head(self.norm(x))  # [B, S, V]; x [B, S, H] stashed for the next draft step


def load_mtp(path: str | Path, target: nn.Module, dtype: torch.dtype | None = None,
             device: torch.device | str | None = None) -> MTPDraft:
    """The first MTP layer of the checkpoint in `path`, whose target (an HF DeepSeek-V3 module,
    or the models/hf.py wrapper of one) is `target`; every tensor's name and shape checked."""
    path = Path(path)
    config = getattr(target, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in MTP_MODEL_TYPES:
        raise ValueError(f"MTP speculative decoding needs a DeepSeek-V3 checkpoint (model_type "
                         f"{' or '.join(MTP_MODEL_TYPES)}), the target is {model_type or type(target).__name__}")
    layer = config.num_hidden_layers
    if not (getattr(config, "num_nextn_predict_layers", 0) or 0) >= 1:
        raise ValueError(f"{path}/config.json: num_nextn_predict_layers is "
                         f"{getattr(config, 'num_nextn_predict_layers', None)}: the checkpoint has no MTP layer")
    embedding = input_embedding(target)
    device = torch.device(device) if device is not None else embedding.weight.device
    dtype = dtype or embedding.weight.dtype
    weights = _read_layer(path, layer, _block_size(config), dtype)
    with torch.device("meta"):
        draft = MTPDraft(config)
    expected = {name: p.shape for name, p in draft.named_parameters()}
    expected.update({name: b.shape for name, b in draft.named_buffers() if name.startswith("layers.")})
    renamed = {"shared_head.norm.weight": "norm.weight", "shared_head.head.weight": "lm_head.weight"}
    state = {renamed.get(name, name if name in _OWN or name == "embed_tokens.weight" else f"layers.0.{name}"): t
             for name, t in weights.items()}
    _stack_experts(state, path, layer)
    for key in state:
        if key not in expected:
            raise ValueError(f"MTP layer {path}: unexpected tensor model.layers.{layer}.{_checkpoint_name(key)} (not "
                             "in DeepSeek-V3's MTP layout)")
    state.pop("embed_tokens.weight", None)  # the target's, shared (module docstring)
    shared_head = "lm_head.weight" not in state  # no shared_head.head: the target's lm_head
    for key, shape in expected.items():
        if key == "embed_tokens.weight" or (key == "lm_head.weight" and shared_head):
            continue
        if key not in state:
            raise ValueError(f"MTP layer {path}: tensor model.layers.{layer}.{_checkpoint_name(key)} is missing")
        if tuple(state[key].shape) != tuple(shape):
            raise ValueError(f"MTP layer {path}: model.layers.{layer}.{_checkpoint_name(key)} is "
                             f"{tuple(state[key].shape)}, the config says {tuple(shape)}")
    # assigned, not copied into the meta module's fp32 tensors: the module takes the tensors' dtype
    # (`dtype`; the router's score-correction bias fp32, as transformers keeps it: _keep_in_fp32_modules_strict)
    draft.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=False, assign=True)
    draft.embed_tokens.weight = embedding.weight  # shared, not copied
    if shared_head:
        draft.lm_head.weight = _output_embedding(target).weight
    draft.rotary_emb = type(draft.rotary_emb)(draft.config).to(device)  # its buffers were on meta
    draft.draft_to_target = torch.arange(config.vocab_size, device=device)
    left = [n for n, t in [*draft.named_parameters(), *draft.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"MTP layer {path}: nothing loaded for {left}")
    return draft.requires_grad_(False).eval()


def _checkpoint_name(key: str) -> str:
    names = {"norm.weight": "shared_head.norm.weight", "lm_head.weight": "shared_head.head.weight"}
    return names.get(key, key.removeprefix("layers.0."))


def _output_embedding(target: nn.Module) -> nn.Linear:
    """The target's lm_head: the HF module's, itself or inside models/hf.py's wrapper."""
    for module in (target, getattr(target, "model", None)):
        get = getattr(module, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if isinstance(head, nn.Linear):
            return head
    raise ValueError("MTP: the checkpoint has no shared_head.head and the target's lm_head cannot be found")


def _block_size(config) -> tuple[int, int] | None:
    q = getattr(config, "quantization_config", None)
    q = q if isinstance(q, dict) else (q.to_dict() if q is not None else {})
    size = q.get("weight_block_size")
    return tuple(size) if size else None


def _read_layer(path: Path, layer: int, block: tuple[int, int] | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors `model.layers.{layer}.*` of the checkpoint, prefix removed, in `dtype` one
    by one as read (FP8 ones dequantized: weight * weight_scale_inv, a scale per block of
    `block`); the router's correction bias in fp32."""
    prefix = f"model.layers.{layer}."
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index)
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no weight_map object")
        files = sorted({f for name, f in weight_map.items() if name.startswith(prefix)})
    else:
        files = [f.name for f in sorted(path.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"MTP layer: no *.safetensors in {path}")
    raw: dict[str, torch.Tensor] = {}
    for name in files:
        with safe_open(path / name, framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    raw[key.removeprefix(prefix)] = f.get_tensor(key)
    if not raw:
        raise ValueError(f"MTP layer {path}: no tensor model.layers.{layer}.* (num_nextn_predict_layers says the "
                         f"checkpoint has one after its {layer} decoder layers)")
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        scale = raw.get(name + "_scale_inv")
        if scale is not None:
            if block is None:
                raise ValueError(f"MTP layer {path}: {name} has a weight_scale_inv but config.json's "
                                 "quantization_config names no weight_block_size")
            t = dequantize_blocks(t, scale, block, f"MTP layer {path}: tensor {prefix}{name}")
        keep = not t.is_floating_point() or name.endswith("e_score_correction_bias")
        out[name] = t if keep else t.to(dtype)
        check_finite(out[name], prefix + name, f"MTP layer {path}", t.dtype)
    return out


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      name: str = "weight") -> torch.Tensor:
    """[N, K] FP8 weight times its [ceil(N / bn), ceil(K / bk)] per-block scales, in fp32. A scale
    grid of another shape (another block size, transposed) is refused naming `name`: repeated and
    cut to [N, K] it gave wrong scales silently."""
    n, k = weight.shape
    bn, bk = block
    want = (-(-n // bn), -(-k // bk))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"{name}: weight_scale_inv has shape {tuple(scale_inv.shape)}; {bn}x{bk} blocks of the "
                         f"{n}x{k} weight need {want}")
    if not (torch.isfinite(scale_inv.float()).all() and (scale_inv.float() > 0).all()):
        raise ValueError(f"{name}: weight_scale_inv must hold finite positive scales")
    scales = scale_inv.float().repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return weight.float() * scales


def _stack_experts(state: dict, path: Path, layer: int) -> None:
    """Experts saved one by one (`mlp.experts.{e}.gate_proj.weight`, the published layout) into
    transformers' stacked `mlp.experts.gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]."""
    prefix = "layers.0.mlp.experts."
    single = {k: state.pop(k) for k in [k for k in state if k.startswith(prefix) and k[len(prefix)].isdigit()]}
    if not single:
        return
    count = 1 + max(int(k[len(prefix):].split(".")[0]) for k in single)

    def stacked(proj: str) -> torch.Tensor:
        names = [f"{prefix}{e}.{proj}.weight" for e in range(count)]
        missing = [n for n in names if n not in single]
        if missing:
            raise ValueError(f"MTP layer {path}: tensor model.layers.{layer}.{missing[0].removeprefix('layers.0.')} "
                             "is missing")
        return torch.stack([single.pop(n) for n in names])

    gate, up, down = stacked("gate_proj"), stacked("up_proj"), stacked("down_proj")
    if single:
        raise ValueError(f"MTP layer {path}: unexpected tensor model.layers.{layer}."
                         f"{next(iter(single)).removeprefix('layers.0.')}")
    state[prefix + "gate_up_proj"] = torch.cat([gate, up], dim=1)
    state[prefix + "down_proj"] = down
