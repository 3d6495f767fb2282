"""LLaVA-1.5 and LLaVA-NeXT: a CLIP vision tower, a projector and a Llama language model.

Two entry points, as plain modules:

    encode_images(images: list[ImageInput]) -> list[features [n_i, hidden]]   # eager or compiled
    forward(input_ids [B, S], positions [B, S]) -> logits [B, S, V]            # the contract

`forward` is the language model under the compilable-model contract; after the token
embedding it calls `torch.ops.trtllm.splice_embeddings`, which puts the image features the
runtime staged (trtllm/multimodal_context.py) in place of the image placeholder tokens. The
vision tower runs before the step, in runtime/multimodal_stager.py (its features cached by the
image's content hash).

LLaVA-1.5: an image is one 336x336 crop, 576 features (24x24 patches, the class token
dropped with vision_feature_select_strategy "default"). LLaVA-NeXT ("anyres"): the image is
resized to one of `image_grid_pinpoints`, cut into crops of the tower's size, plus a base
crop of the whole; the crops' features are laid out as a grid, the padding the resize added
cut away, and an `image_newline` feature ends each row (HF's `pack_image_features`, whose
helpers this file calls so the layout is theirs exactly).

Checkpoint names: transformers 5 writes `language_model.model.*`, `language_model.lm_head`,
`vision_tower.*`, `multi_modal_projector.*`, `image_newline` (NeXT), the module names below;
`checkpoint_name` maps the other layouts in use (`vision_tower.vision_model.*`, and
`model.language_model.*` / `model.vision_tower.*` / `model.multi_modal_projector.*` /
`model.image_newline`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trtllm.models.clip_vision import CLIPVisionConfig, CLIPVisionTower
from trtllm.models.llama import LlamaConfig, LlamaForCausalLM
from trtllm.multimodal_context import splice_embeddings

HF_ARCHITECTURES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
_PROJECTOR_ACTS = {"gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
                   "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x), "silu": F.silu}


@dataclass
class ImageInput:
    """One image as the model takes it: the processor's pixel values ([C, H, W] for LLaVA-1.5,
    [num_crops, C, H, W] for NeXT, the crops past this image's count dropped; Qwen2.5-VL
    [patches, C*T*P*P]) and, for NeXT, its original (height, width); for Qwen2.5-VL its grid of
    patches (t, h, w)."""
    pixel_values: torch.Tensor
    image_size: tuple[int, int] | None = None
    grid_thw: tuple[int, int, int] | None = None


@dataclass
class LlavaConfig:
    text: LlamaConfig
    vision: CLIPVisionConfig
    image_token_id: int
    vision_feature_layer: int | list[int] = -2
    vision_feature_select_strategy: str = "default"  # "default": drop the class token; "full": keep it
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)  # NeXT; empty: LLaVA-1.5
    model_type: str = "llava"
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlavaConfig:
        model_type = d.get("model_type")
        if model_type not in ("llava", "llava_next"):
            raise ValueError(f"model_type={model_type!r} is not LLaVA-1.5 / LLaVA-NeXT")
        text = dict(d["text_config"])
        text.setdefault("model_type", "llama")
        if text["model_type"] not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"text_config.model_type={text['model_type']!r}: LLaVA with a Llama-family language "
                             "model only")
        strategy = d.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy={strategy!r} (expected 'default' or 'full')")
        act = d.get("projector_hidden_act", "gelu")
        if act not in _PROJECTOR_ACTS:
            raise ValueError(f"projector_hidden_act={act!r} is not supported ({sorted(_PROJECTOR_ACTS)})")
        image_token = d.get("image_token_id", d.get("image_token_index"))
        if image_token is None:
            raise ValueError("config.json names no image_token_id / image_token_index")
        pinpoints = (d.get("image_grid_pinpoints") or []) if model_type == "llava_next" else []
        if model_type == "llava_next" and not pinpoints:
            raise ValueError("a llava_next config needs image_grid_pinpoints")
        return cls(text=LlamaConfig.from_hf(text), vision=CLIPVisionConfig.from_hf(d["vision_config"]),
                   image_token_id=int(image_token), vision_feature_layer=d.get("vision_feature_layer", -2),
                   vision_feature_select_strategy=strategy, projector_hidden_act=act,
                   projector_bias=bool(d.get("multimodal_projector_bias", True)),
                   image_grid_pinpoints=[list(p) for p in pinpoints], model_type=model_type,
                   eos_token_id=d.get("eos_token_id", text.get("eos_token_id")))

    @property
    def feature_layers(self) -> tuple[int, ...]:
        """The tower's hidden-state indices the projector reads (HF's hidden_states[k]; 0 = the
        embeddings), negative ones resolved."""
        layers = self.vision_feature_layer if isinstance(self.vision_feature_layer, list) \
            else [self.vision_feature_layer]
        n = self.vision.num_hidden_layers + 1
        resolved = tuple(k + n if k < 0 else k for k in layers)
        if not all(0 <= k < n for k in resolved):
            raise ValueError(f"vision_feature_layer={self.vision_feature_layer} outside the tower's {n} hidden states")
        return resolved

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


class MultiModalProjector(nn.Module):
    def __init__(self, config: LlavaConfig):
        super().__init__()
        d_in = config.vision.hidden_size * len(config.feature_layers)
        self.linear_1 = nn.Linear(d_in, config.text.hidden_size, bias=config.projector_bias)
        self.act = _PROJECTOR_ACTS[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.text.hidden_size, config.text.hidden_size, bias=config.projector_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, P, D_vision * layers] -> [N, P, hidden]
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaForConditionalGeneration(nn.Module):
    """LLaVA-1.5 and LLaVA-NeXT (config.model_type says which)."""

    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision)
        self.multi_modal_projector = MultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text)
        if config.model_type == "llava_next":
            self.image_newline = nn.Parameter(torch.zeros(config.text.hidden_size))
        # the vision tower's own compiled form (trtllm.compile_encoder), None: eager
        self.compiled_tower = None

    @staticmethod
    def checkpoint_name(name: str) -> str:
        """A checkpoint tensor's name -> this module's (see the module docstring)."""
        if name.startswith("model."):
            rest = name[len("model."):]
            if rest.startswith("language_model."):
                return "language_model.model." + rest[len("language_model."):]
            return rest
        if name.startswith("lm_head."):
            return "language_model." + name
        return name.replace("vision_tower.vision_model.", "vision_tower.", 1)

    def get_input_embeddings(self) -> nn.Embedding:
        """The language model's token embedding (the vision tower holds embeddings of its own)."""
        return self.language_model.model.embed_tokens

    def init_buffers(self, device=None) -> None:
        self.language_model.init_buffers(device)

    # -- the language model: the contract ----------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [B, S] -> logits [B, S, V]; image placeholder tokens take the
        staged image features (trtllm/multimodal_context.py)."""
        lm = self.language_model.model
        x = splice_embeddings(lm.embed_tokens(input_ids))  # [B, S, hidden]
        cos, sin = lm.rotary_emb(positions, x.dtype)
        for layer in lm.layers:
            x = layer(x, cos, sin)
        return self.language_model.lm_head(lm.norm(x))

    # -- the vision side ----------------------------------------------------------------
    def tower_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] crops -> projected features [N, P, hidden] (P: patches, plus the class
        token under the "full" strategy)."""
        tower = self.compiled_tower or self.vision_tower
        hidden = tower(pixel_values.to(self.multi_modal_projector.linear_1.weight.dtype),
                       self.config.feature_layers)
        x = torch.cat(hidden, dim=-1)
        if self.config.vision_feature_select_strategy == "default":
            x = x[:, 1:]
        return self.multi_modal_projector(x)

    def encode_images(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """Each image's features [n_i, hidden], its crops encoded in one batch with the others'."""
        crops = [self._crops(im) for im in images]
        device = self.multi_modal_projector.linear_1.weight.device
        features = self.tower_features(torch.cat(crops).to(device))  # [sum crops, P, hidden]
        out, start = [], 0
        for im, c in zip(images, crops):
            per_crop = features[start:start + c.shape[0]]
            start += c.shape[0]
            out.append(self._pack(im, per_crop) if self.config.model_type == "llava_next" else per_crop[0])
        return out

    def _crops(self, image: ImageInput) -> torch.Tensor:
        pv = image.pixel_values
        if self.config.model_type != "llava_next":
            return pv[None] if pv.dim() == 3 else pv
        return pv[:_num_crops(self.config, image)]

    def _pack(self, image: ImageInput, per_crop: torch.Tensor) -> torch.Tensor:
        """NeXT: the crops' features [crops, P, hidden] -> [n, hidden] in HF's layout."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image
        base, rest = per_crop[0], per_crop[1:]
        if rest.shape[0] == 0:
            return torch.cat((base, self.image_newline[None].to(base)), dim=0)
        v = self.config.vision
        side = v.image_size // v.patch_size
        rows, cols = get_anyres_image_grid_shape(image.image_size, self.config.image_grid_pinpoints, v.image_size)
        grid = rest.view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
        grid = unpad_image(grid.flatten(1, 2).flatten(2, 3), torch.tensor(image.image_size))  # [hidden, h, w]
        newline = self.image_newline[:, None, None].expand(*grid.shape[:-1], 1).to(grid)
        grid = torch.cat((grid, newline), dim=-1).flatten(1, 2).transpose(0, 1)  # [h * (w + 1), hidden]
        return torch.cat((base, grid), dim=0)


def _num_crops(config: LlavaConfig, image: ImageInput) -> int:
    if image.image_size is None:
        raise ValueError("a LLaVA-NeXT image needs its original image_size (height, width)")
    return num_crops(image.image_size, config.image_grid_pinpoints, config.vision.image_size)


def num_crops(image_size, grid_pinpoints, crop_size: int) -> int:
    """LLaVA-NeXT: the crops of an image of `image_size` (height, width): its anyres grid's,
    plus the base image (HF's count, so the processor's pixel values and ours agree)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
    return image_size_to_num_patches(list(image_size), grid_pinpoints, crop_size)
