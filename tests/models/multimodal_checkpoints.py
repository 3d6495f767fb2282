"""Tiny random LLaVA-1.5 / LLaVA-NeXT checkpoints with their processors, written offline.

    write_llava(directory, family="llava" | "llava_next", num_text_layers=2) -> Path
    hf_llava(directory) -> the HF LlavaForConditionalGeneration / LlavaNextForConditionalGeneration, fp32, eval
    random_images(n, seed) -> n small uint8 RGB arrays of different sizes

The vision tower is a CLIP ViT of 28x28 images, patch 7 (16 patches), 3 layers of width 32;
the language model a Llama of hidden 64, 2 layers, vocab 512. The tokenizer is
tests/runtime/tokenizers.py's byte-level BPE with "<image>" added (id 400); the processor
(CLIPImageProcessor or LlavaNextImageProcessor with grid pinpoints 28x56, 56x28, 56x56) and a
LLaVA-style chat template are saved beside the weights, so `AutoProcessor.from_pretrained`
loads them. Every parameter is random (norm weights around 1, biases nonzero).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import transformers

from tests.runtime.tokenizers import SPECIAL_TOKENS, make_tokenizer

IMAGE_TOKEN = "<image>"
PINPOINTS = [[28, 56], [56, 28], [56, 56]]
# LLaVA-1.5's conversation format; content parts {"type": "image"} become the placeholder
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def write_llava(directory: str | Path, family: str = "llava", seed: int = 0, num_text_layers: int = 2) -> Path:
    directory = Path(directory)
    make_tokenizer(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16)
    text = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=num_text_layers,
                                    num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                                    rms_norm_eps=1e-5, eos_token_id=0, bos_token_id=1)
    common = dict(vision_config=vision, text_config=text, image_token_id=image_token_id, vision_feature_layer=-2,
                  vision_feature_select_strategy="default")
    size = dict(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    if family == "llava":
        config = transformers.LlavaConfig(**common)
        model_cls, processor_cls = transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor
        image_processor = transformers.CLIPImageProcessor(**size)
    elif family == "llava_next":
        config = transformers.LlavaNextConfig(**common, image_grid_pinpoints=PINPOINTS)
        model_cls, processor_cls = transformers.LlavaNextForConditionalGeneration, transformers.LlavaNextProcessor
        image_processor = transformers.LlavaNextImageProcessor(**size, image_grid_pinpoints=PINPOINTS)
    else:
        raise ValueError(f"unknown family {family!r}")
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(directory)
    processor = processor_cls(image_processor=image_processor, tokenizer=tokenizer, patch_size=7,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=CHAT_TEMPLATE)
    processor.save_pretrained(directory)
    return directory


def hf_llava(directory: Path):
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = {"llava": transformers.LlavaForConditionalGeneration,
           "llava_next": transformers.LlavaNextForConditionalGeneration}[config.model_type]
    return cls.from_pretrained(directory, dtype=torch.float32).eval()


def random_images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(40, 30), (20, 50), (28, 28), (60, 33)]
    return [rng.integers(0, 256, (*shapes[i % len(shapes)], 3), dtype=np.uint8) for i in range(n)]
