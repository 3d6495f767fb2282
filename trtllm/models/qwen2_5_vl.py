"""Qwen2.5-VL: a windowed ViT (models/qwen2_5_vl_vision.py) and a Qwen2 language model with
M-RoPE (models/llama.py with `mrope_section`). Qwen2-VL is the same model with its own vision
blocks (LayerNorm, fc1-act-fc2 MLP, no windows: `Qwen25VisionConfig.from_hf(..., qwen2_vl=True)`).

Two entry points, as plain modules (as models/llava.py):

    encode_images(images: list[ImageInput]) -> list[features [n_i, hidden]]   # eager or compiled
    forward(input_ids [B, S], positions [3, B, S]) -> logits [B, S, V]         # the contract

`forward` takes M-RoPE positions (temporal, height, width; `config.position_axes` = 3): the
runtime computes them on the host per sequence (runtime/mrope_positions.py, HF's
`get_rope_index`); [B, S] positions are taken too (text only: all three axes equal). After the
token embedding `torch.ops.trtllm.splice_embeddings` puts the staged image features in place of
the `<|image_pad|>` tokens (trtllm/multimodal_context.py).

An image is the processor's patches [N, C*T*P*P] and its grid (t, h, w) in patches; it becomes
N / spatial_merge_size^2 tokens. Videos are not supported (refused by the prompt checks:
multi_modal_data takes images only).

Checkpoint names: the hub's layout (`model.*` the language model, `visual.*`, `lm_head`) and
transformers 5's (`model.language_model.*`, `model.visual.*`, `lm_head`); `checkpoint_name`
maps both onto this module (`language_model.model.*`, `language_model.lm_head`, `visual.*`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.models.qwen2_5_vl_vision import (
    Qwen25VisionConfig,
    Qwen25VisionTransformer,
    merged_tokens,
    vision_layout,
)
from trtllm.multimodal_context import splice_embeddings

HF_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "Qwen2VLForConditionalGeneration")
# the text config's own keys that are not Llama-family ones (ignored: they concern HF's cache or init)
_TEXT_KEYS_DROPPED = ("rope_parameters", "rope_scaling", "model_type")


@dataclass
class Qwen25VLConfig:
    text: LlamaConfig
    vision: Qwen25VisionConfig
    image_token_id: int
    vision_start_token_id: int | None = None
    model_type: str = "qwen2_5_vl"
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> Qwen25VLConfig:
        if d.get("model_type") not in ("qwen2_5_vl", "qwen2_vl"):
            raise ValueError(f"model_type={d.get('model_type')!r} is not Qwen2.5-VL or Qwen2-VL")
        # transformers 5 writes a text_config; the hub's checkpoints keep the text keys at the top
        text = dict(d["text_config"]) if d.get("text_config") else {
            k: v for k, v in d.items() if k not in ("vision_config", "architectures")}
        rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or d.get("rope_scaling") or {})
        section = rope.pop("mrope_section", None)
        if not section:
            raise ValueError("a Qwen2.5-VL config needs rope mrope_section (M-RoPE's temporal/height/width split)")
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope_type not in ("default", "mrope"):
            raise ValueError(f"Qwen2.5-VL rope_type={rope_type!r} is not supported (only the default M-RoPE)")
        rope["rope_type"] = "default"
        rope.setdefault("rope_theta", text.get("rope_theta", 1000000.0))
        text = {k: v for k, v in text.items() if k not in _TEXT_KEYS_DROPPED}
        text.update(model_type="qwen2", rope_parameters=rope)
        text.setdefault("tie_word_embeddings", d.get("tie_word_embeddings", False))
        llama = LlamaConfig.from_hf(text)
        llama.mrope_section = list(section)
        llama.tie_word_embeddings = bool(d.get("tie_word_embeddings", text["tie_word_embeddings"]))
        if llama.head_dim // 2 != sum(section):
            raise ValueError(f"mrope_section {section} sums to {sum(section)}, not head_dim / 2 = {llama.head_dim // 2}")
        vision = Qwen25VisionConfig.from_hf(d["vision_config"], qwen2_vl=d["model_type"] == "qwen2_vl")
        if vision.out_hidden_size != llama.hidden_size:
            raise ValueError(f"vision out_hidden_size {vision.out_hidden_size} != the language model's hidden size "
                             f"{llama.hidden_size}")
        image_token = d.get("image_token_id")
        if image_token is None:
            raise ValueError("config.json names no image_token_id")
        return cls(text=llama, vision=vision, image_token_id=int(image_token),
                   vision_start_token_id=d.get("vision_start_token_id"),
                   model_type=d["model_type"], eos_token_id=d.get("eos_token_id", text.get("eos_token_id")))

    # what the rest of the runtime reads off a model's config
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def max_position_embeddings(self) -> int:
        return self.text.max_position_embeddings

    @property
    def layer_windows(self) -> list[int]:
        return self.text.layer_windows

    @property
    def position_axes(self) -> int:
        return 3


class Qwen25VLForConditionalGeneration(nn.Module):
    config_class = Qwen25VLConfig

    def __init__(self, config: Qwen25VLConfig):
        super().__init__()
        self.config = config
        self.visual = Qwen25VisionTransformer(config.vision)
        self.language_model = LlamaForCausalLM(config.text)
        self.compiled_tower = None  # the vision tower's compiled form (trtllm.compile_encoder), None: eager

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """A checkpoint tensor's name -> this module's (see the module docstring)."""
        if name.startswith("model.visual."):
            return name[len("model."):]
        if name.startswith("model.language_model."):
            return "language_model.model." + name[len("model.language_model."):]
        if name.startswith("model."):
            return "language_model." + name
        if name.startswith("lm_head."):
            return "language_model." + name
        return name

    def get_input_embeddings(self) -> nn.Embedding:
        """The language model's token embedding (the vision tower holds embeddings of its own)."""
        return self.language_model.model.embed_tokens

    def init_buffers(self, device=None) -> None:
        self.language_model.init_buffers(device)
        self.visual.init_buffers(device if device is not None else self.language_model.model.embed_tokens.weight.device)

    # -- the language model: the contract ----------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids [B, S], positions [3, B, S] (or [B, S]) -> logits [B, S, V]."""
        lm = self.language_model.model
        x = splice_embeddings(lm.embed_tokens(input_ids))  # [B, S, hidden]
        cos, sin = lm.rotary_emb(positions, x.dtype)  # [B, S, D]
        for layer in lm.layers:
            x = layer(x, cos, sin)
        return self.language_model.lm_head(lm.norm(x))

    # -- the vision side ----------------------------------------------------------------
    def encode_images(self, images: list) -> list[torch.Tensor]:
        """Each image's features [n_i, hidden] (ImageInput with pixel_values [N_i, C*T*P*P] and
        grid_thw), all images packed into one sequence for the tower."""
        grids = []
        for i, im in enumerate(images):
            grid = getattr(im, "grid_thw", None)
            if grid is None:
                raise ValueError(f"image {i}: a Qwen2.5-VL image needs its grid_thw (the processor's image_grid_thw)")
            if im.pixel_values.dim() != 2 or im.pixel_values.shape[0] != grid[0] * grid[1] * grid[2] or \
                    im.pixel_values.shape[1] != self.config.vision.patch_dim:
                raise ValueError(f"image {i}: pixel_values {tuple(im.pixel_values.shape)} do not match grid {grid} "
                                 f"of patches of {self.config.vision.patch_dim} values")
            grids.append(tuple(int(g) for g in grid))
        weight = self.visual.patch_embed.proj.weight
        pixels = torch.cat([im.pixel_values for im in images]).to(weight.device, weight.dtype)
        features = self.tower_features(pixels, grids)
        return list(features.split([merged_tokens(self.config.vision, g) for g in grids]))

    def tower_features(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        layout = vision_layout(self.config.vision, grids)
        tower = self.compiled_tower or self.visual
        return tower(pixels, *layout.tensors(pixels.device))

    def warm_up_vision(self) -> None:
        """Run the tower (compiled: `compiled_tower`, set by runtime/multimodal_stager.py) on two
        image sizes, so the patch count is dynamic before the first request, not in its TTFT."""
        v, m = self.config.vision, self.config.vision.spatial_merge_size
        weight = self.visual.patch_embed.proj.weight
        for grid in ((1, 2 * m, 2 * m), (1, m, 3 * m)):
            pixels = torch.zeros((grid[1] * grid[2], v.patch_dim), device=weight.device, dtype=weight.dtype)
            self.tower_features(pixels, [grid])
