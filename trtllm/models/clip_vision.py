"""CLIP's vision tower (ViT) as LLaVA-1.5 / LLaVA-NeXT use it: a plain module, eager or compiled
by `trtllm.compile_encoder` (its SDPA is bidirectional: every patch attends to every patch).

    forward(pixel_values [N, C, H, W], num_layers) -> hidden [N, 1 + P, D]

P = (H / patch)^2 patches plus the class token; `num_layers` encoder layers run (LLaVA reads
the hidden states after layer L-1 of L, `vision_feature_layer=-2`, so the last layer and the
post-layernorm are loaded but not run). Module names mirror transformers 5's CLIPVisionModel
inside a LLaVA checkpoint (`vision_tower.embeddings...`, `vision_tower.encoder.layers.{i}...`;
older checkpoints' `vision_tower.vision_model.` prefix is mapped in models/llava.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "gelu": F.gelu,
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class CLIPVisionConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> CLIPVisionConfig:
        model_type = d.get("model_type", "clip_vision_model")
        if model_type != "clip_vision_model":
            raise ValueError(f"vision_config.model_type={model_type!r}: only CLIP vision towers are supported "
                             "(SigLIP and Qwen2.5-VL's ViT are not yet)")
        act = d.get("hidden_act", "quick_gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={act!r} is not supported ({sorted(_ACTIVATIONS)})")
        return cls(hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
                   num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
                   image_size=d["image_size"], patch_size=d["patch_size"], num_channels=d.get("num_channels", 3),
                   layer_norm_eps=d.get("layer_norm_eps", 1e-5), hidden_act=act)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Embeddings(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_patches + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:  # [N, C, H, W] -> [N, 1 + P, D]
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(w.dtype)).flatten(2).transpose(1, 2)  # [N, P, D]
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # [N, 1, D]
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # [N, 1 + P, D]


class Attention(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, d // config.num_attention_heads
        self.scale = self.head_dim ** -0.5
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, S, D]
        N, S, _ = x.shape
        q = self.q_proj(x).view(N, S, self.n_heads, self.head_dim).transpose(1, 2)  # [N, H, S, Dh]
        k = self.k_proj(x).view(N, S, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(N, S, self.n_heads, self.head_dim).transpose(1, 2)
        # bidirectional: every patch sees every patch of its image (compile_encoder's pass
        # makes this trtllm.bidirectional_attention)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # [N, H, S, Dh]
        return self.out_proj(y.transpose(1, 2).reshape(N, S, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPVisionTower(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # sic: HF's name
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)  # unused by LLaVA

    def forward(self, pixel_values: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """The hidden states [N, 1 + P, D] after each of `layers` encoder layers (0: the
        embeddings after pre_layrnorm), as HF's `hidden_states[k]`."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        out = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(layers)]):
            x = layer(x)
            out[i + 1] = x
        return [out[k] for k in layers]
