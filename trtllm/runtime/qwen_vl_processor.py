"""Qwen2.5-VL's image prompts where transformers' Qwen2_5_VLProcessor cannot be built.

`AutoProcessor.from_pretrained` of a Qwen2.5-VL checkpoint builds a video processor too, which
needs torchvision; without it the whole processor fails to load, though images need none of
it. `QwenVLImageProcessor` is then assembled from the checkpoint's own image processor
(Qwen2VLImageProcessor, whose PIL backend needs no torchvision) and tokenizer, and does for
images what Qwen2_5_VLProcessor does (`replace_image_token`): each `<|image_pad|>` becomes
grid_t * grid_h * grid_w / merge_size^2 copies, then the text is tokenized. Where torchvision
is installed, AutoProcessor's own processor is used and this file is not involved.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

IMAGE_TOKEN = "<|image_pad|>"


class QwenVLImageProcessor:
    def __init__(self, image_processor, tokenizer, image_token: str = IMAGE_TOKEN):
        self.image_processor, self.tokenizer, self.image_token = image_processor, tokenizer, image_token

    def __call__(self, text: str, images: list | None = None, return_tensors: str = "pt",
                 add_special_tokens: bool = True) -> dict:
        out = {}
        if images:
            out = dict(self.image_processor(images=images, return_tensors="pt"))
            merge = self.image_processor.merge_size
            counts = (out["image_grid_thw"].prod(-1) // merge ** 2).tolist()
            pieces = text.split(self.image_token)
            if len(pieces) != len(counts) + 1:
                raise ValueError(f"the prompt has {len(pieces) - 1} {self.image_token!r} placeholder(s) for "
                                 f"{len(counts)} image(s)")
            text = pieces[0] + "".join(self.image_token * n + rest for n, rest in zip(counts, pieces[1:]))
        ids = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return dict(out, input_ids=torch.tensor([ids]))


def qwen_vl_processor(path, error: Exception) -> QwenVLImageProcessor | None:
    """The fallback for a Qwen2.5-VL checkpoint whose AutoProcessor failed (`error`) for want of
    torchvision; None for any other checkpoint or failure."""
    config = Path(path) / "config.json"
    if "torchvision" not in str(error).lower() or not config.is_file():
        return None
    if json.loads(config.read_text()).get("model_type") not in ("qwen2_5_vl", "qwen2_vl"):
        return None
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    return QwenVLImageProcessor(Qwen2VLImageProcessor.from_pretrained(str(path)), AutoTokenizer.from_pretrained(str(path)))
