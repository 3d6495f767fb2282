"""Tiny random Qwen2.5-VL / Qwen2-VL checkpoints with their processors, written offline.

    write_qwen2_5_vl(directory, family="qwen2_5_vl" | "qwen2_vl") -> Path
    hf_qwen2_5_vl(directory) -> HF Qwen2_5_VLForConditionalGeneration (or Qwen2VL...), fp32, eval

The vision tower: patches of 7x7 pixels over 2 frames, hidden 32, 2 heads, 3 blocks (block 1
full attention, blocks 0 and 2 windowed, windows of 28 pixels = 2x2 merged tokens), merge 2x2
-> 64. Images are resized by the processor to multiples of 14 pixels between 14x14 and
56x56, so images of different shapes get grids of different sizes and ragged windows. The
language model: Qwen2 of hidden 64, 2 layers, 4 heads (2 kv), head dim 16, M-RoPE sections
[2, 3, 3]. The tokenizer is tests/runtime/tokenizers.py's byte-level BPE with Qwen's vision
tokens added; a ChatML template with image parts. Every parameter is random. Qwen2-VL: the
same, its tower 2 LayerNorm blocks of width 32 with a quick-GELU MLP, no windows.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

from tests.runtime.tokenizers import SPECIAL_TOKENS, make_tokenizer

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def write_qwen2_5_vl(directory: str | Path, seed: int = 0, family: str = "qwen2_5_vl", num_text_layers: int = 2) -> Path:
    directory = Path(directory)
    make_tokenizer(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:] + VISION_TOKENS})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, in_chans=3, out_hidden_size=64,
                  patch_size=7, spatial_merge_size=2, temporal_patch_size=2, window_size=28,
                  fullatt_block_indexes=[1], hidden_act="silu")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_text_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                eos_token_id=0, bos_token_id=1)
    config_cls, model_cls = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, in_channels=3, patch_size=7,
                      spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")
        config_cls, model_cls = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif family != "qwen2_5_vl":
        raise ValueError(f"unknown family {family!r}")
    config = config_cls(vision_config=vision, text_config=text,
                                           image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                                           vision_start_token_id=ids["<|vision_start|>"],
                                           vision_end_token_id=ids["<|vision_end|>"], eos_token_id=0)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
                    or name.endswith("ln_q.weight") or name.endswith("layernorm.weight"):  # LayerNorm biases below
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.save_pretrained(directory)
    # the image processor and the tokenizer with its chat template. Not a Qwen2_5_VLProcessor:
    # its video processor needs torchvision, which CI has not (trtllm then assembles the
    # checkpoint's image processor and tokenizer itself: runtime/qwen_vl_processor.py)
    transformers.Qwen2VLImageProcessor(patch_size=7, merge_size=2, temporal_patch_size=2,
                                       size={"shortest_edge": 14 * 14, "longest_edge": 56 * 56}).save_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def hf_inputs(directory: Path, text: str, images: list) -> dict:
    """HF generate()'s inputs for a prompt with IMAGE placeholders: each <|image_pad|> expanded
    to its image's grid / merge^2 tokens, as Qwen2_5_VLProcessor.replace_image_token does, and
    mm_token_type_ids (1 on image tokens), which HF's get_rope_index reads."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    out = {}
    if images:
        ip = transformers.Qwen2VLImageProcessor.from_pretrained(directory)
        out = dict(ip(images=images, return_tensors="pt"))
        counts = (out["image_grid_thw"].prod(-1) // ip.merge_size ** 2).tolist()
        pieces = text.split("<|image_pad|>")
        assert len(pieces) == len(counts) + 1
        text = pieces[0] + "".join("<|image_pad|>" * n + p for n, p in zip(counts, pieces[1:]))
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return dict(out, input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == image_id).int())


def hf_qwen2_5_vl(directory: Path):
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen2_vl": transformers.Qwen2VLForConditionalGeneration}[config.model_type]
    return cls.from_pretrained(directory, dtype=torch.float32).eval()
