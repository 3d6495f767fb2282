"""A prompt with images -> token ids with the placeholders expanded, and the images as the
engine takes them (`MultimodalData`): the client's half of multimodal requests.

    llm.generate({"prompt": "USER: <image>\\nWhat is this? ASSISTANT:", "multi_modal_data": {"image": [img]}})
    llm.generate(inputs={"text": "...<image>...", "image": img})        # TensorRT-LLM's other spelling

An image is a PIL image, a numpy array or a torch tensor ([H, W], [H, W, C] or [C, H, W], C of
1, 3 or 4; uint8 0-255, uint16 0-65535 or float 0-1; a PIL image of 16-bit, int32 or float
samples as its array), of at most MAX_IMAGE_PIXELS pixels and an aspect ratio within
MAX_IMAGE_ASPECT_RATIO:1. The checkpoint's own processor (transformers'
AutoProcessor: its image processor and tokenizer) resizes, normalises and expands each
placeholder into the image's number of tokens; the prompt must hold exactly one placeholder
per image. Each image's token span is recorded with a 128-bit hash of its processed pixels:
the engine's encoder cache and the prefix cache key on it (runtime/multimodal_stager.py,
block_manager.py).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field

import numpy as np
import torch

# images per request and decoded pixels per image: the server's defaults (serve/media.py), and
# the API's, so one huge image cannot take the engine's memory
MAX_IMAGES_PER_REQUEST = 16
MAX_IMAGE_PIXELS = 4096 * 4096
# a processor resizes an image's short side up to its size (LLaVA's CLIP: 336), so a 1 x 400,000
# image (well within MAX_IMAGE_PIXELS) was scaled to 336 x 134,400,000 before its center crop: tens
# of GB. Qwen2.5-VL's processor refuses past this ratio itself; every model does now
MAX_IMAGE_ASPECT_RATIO = 200


@dataclass
class ImageSpan:
    """One image of a prompt: its placeholder tokens are prompt positions offset .. offset + length."""
    hash: bytes
    offset: int
    length: int
    pixel_values: torch.Tensor                 # the processor's, CPU ([C, H, W]; NeXT [crops, C, H, W])
    image_size: tuple[int, int] | None = None  # NeXT: the original (height, width)
    grid_thw: tuple[int, int, int] | None = None  # Qwen2.5-VL: its grid of patches (pixel_values [t*h*w, ...])


@dataclass
class MultimodalData:
    images: list[ImageSpan] = field(default_factory=list)
    mrope: object | None = None  # M-RoPE models: the prompt's positions (runtime/mrope_positions.py), made once

    def block_key(self, start: int, end: int) -> bytes:
        """The hashes of the images with tokens in prompt positions [start, end): what a KV
        block of those positions holds besides its token ids (block_manager.block_hash)."""
        return b"".join(im.hash for im in self.images if im.offset < end and start < im.offset + im.length)


def is_multimodal_prompt(prompt) -> bool:
    return isinstance(prompt, dict) and ("multi_modal_data" in prompt or "image" in prompt)


def split_prompt(prompt: dict) -> tuple[str, list]:
    """(text, images) of either spelling; ValueError naming what is wrong."""
    unknown = set(prompt) - {"prompt", "text", "multi_modal_data", "image"}
    if unknown:
        raise ValueError(f"a multimodal prompt has the keys 'prompt' (or 'text') and 'multi_modal_data' (or "
                         f"'image'); got also {sorted(unknown)}")
    text = prompt.get("prompt", prompt.get("text"))
    if not isinstance(text, str):
        raise ValueError("a multimodal prompt needs its text as 'prompt' (or 'text'), a string")
    if "multi_modal_data" in prompt:
        data = prompt["multi_modal_data"]
        if not isinstance(data, dict) or set(data) - {"image"}:
            raise ValueError(f"multi_modal_data takes 'image' only (video and audio are not supported); got "
                             f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
        images = data.get("image", [])
    else:
        images = prompt.get("image", [])
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) > MAX_IMAGES_PER_REQUEST:
        raise ValueError(f"{len(images)} images in one prompt; at most {MAX_IMAGES_PER_REQUEST}")
    return text, [check_image(im, i) for i, im in enumerate(images)]


def check_image(image, index: int = 0):
    """The image as the processor takes it (a PIL image), checked."""
    what = f"image {index}"
    if type(image).__module__.startswith("PIL."):
        w, h = image.size
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"{what}: {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS} allowed")
        if w * h == 0:
            raise ValueError(f"{what}: {w}x{h} pixels, an empty image")
        _check_aspect(what, w, h)
        if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
            return image.convert("RGB") if image.mode not in ("RGB", "L") else image
        # 16-bit (a 16-bit PNG), 32-bit int or float samples: PIL's convert("RGB") clips them at
        # 255 (a white image); as an array they follow the array rules below
        image = np.asarray(image)
    if isinstance(image, torch.Tensor):
        if image.is_meta:
            raise ValueError(f"{what}: a tensor on the meta device holds no pixels")
        image = image.detach().cpu()
        if image.is_floating_point() and image.dtype not in (torch.float16, torch.float32, torch.float64):
            image = image.float()  # bfloat16, float8: numpy has no such dtype
        if image.dim() == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
            image = image.permute(1, 2, 0)  # [C, H, W] -> [H, W, C]
        image = image.numpy()
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what}: a PIL image, numpy array or torch tensor, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[0] in (1, 3, 4) and image.shape[-1] not in (1, 3, 4):
        image = image.transpose(1, 2, 0)
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (1, 3, 4)) or 0 in image.shape:
        raise ValueError(f"{what}: shape {tuple(image.shape)} is not an image ([H, W], [H, W, C] or [C, H, W] with "
                         "C of 1, 3 or 4)")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise ValueError(f"{what}: {image.shape[1]}x{image.shape[0]} pixels, more than the {MAX_IMAGE_PIXELS} "
                         "allowed")
    _check_aspect(what, image.shape[1], image.shape[0])
    if image.dtype == np.uint16:  # 0-65535 (a 16-bit PNG): to 8 bits
        image = (image / 257.0).round().astype(np.uint8)
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.floating) or not np.isfinite(image).all():
            raise ValueError(f"{what}: dtype {image.dtype}; uint8 (0-255), uint16 (0-65535) or finite floats (0-1)")
        lo, hi = float(image.min()), float(image.max())
        if lo < -0.1 or hi > 1.1:  # e.g. 0-255 as floats: clipped, the image would turn white. A resize's
            # overshoot (bicubic: a few percent past 0 and 1) is clipped
            raise ValueError(f"{what}: float values span [{lo:g}, {hi:g}]; floats are 0-1 (divide 0-255 values "
                             "by 255, or pass uint8)")
        image = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.shape[-1] == 4:
        image = image[:, :, :3]
    # as a PIL image: given an array, the processor guesses its channel axis, and takes an
    # [H, W, 3] of H 1, 3 or 4 for [C, H, W] (a (3, 20, 3) image read as 20x3, a (1, W, 3) refused)
    from PIL import Image
    return Image.fromarray(np.ascontiguousarray(image))


def _check_aspect(what: str, w: int, h: int) -> None:
    if max(w, h) > MAX_IMAGE_ASPECT_RATIO * min(w, h):
        raise ValueError(f"{what}: {w}x{h} pixels, an aspect ratio past {MAX_IMAGE_ASPECT_RATIO}:1 (its resize to "
                         "the processor's size would take gigabytes)")


def check_image_tokens(image_token_id: int | None, multimodal: MultimodalData | None, prompt_token_ids) -> None:
    """ValueError where the prompt's image tokens are not the images' (a text or token-id prompt
    holding the placeholder: the model read the placeholder's own embedding and answered about
    no image, silently). image_token_id None: a text-only model, nothing to check."""
    if image_token_id is None:
        return
    found = list(prompt_token_ids).count(image_token_id)
    filled = sum(im.length for im in multimodal.images) if multimodal is not None else 0
    if found != filled:
        raise ValueError(f"the prompt holds {found} image token(s) (id {image_token_id}, the image placeholder) but "
                         f"its images fill {filled}: send images as {{'prompt': text, 'multi_modal_data': "
                         "{'image': [...]}} with one placeholder per image, or drop the placeholder")


def image_hash(pixel_values: torch.Tensor, image_size) -> bytes:
    """128-bit blake2b of the processed pixels, their shape and the original size: two images
    the model would see the same share it, any other two do not."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((tuple(pixel_values.shape), str(pixel_values.dtype), image_size)).encode())
    h.update(pixel_values.contiguous().numpy().tobytes())
    return h.digest()


def process_prompt(processor, text: str, images: list, image_token_id: int) -> tuple[list[int], MultimodalData]:
    """Token ids with each placeholder expanded, and the images' spans; ValueError when the
    placeholders and images do not pair up."""
    token = getattr(processor, "image_token", "<image>")
    placeholders = text.count(token)
    if placeholders != len(images):
        raise ValueError(f"the prompt has {placeholders} image placeholder(s) {token!r} but {len(images)} image(s) "
                         "were given: one placeholder per image")
    # a text that starts with the BOS (a chat template that writes it: Llama 3's) gets no second one,
    # transformers' rule in processor.apply_chat_template
    bos = getattr(processor.tokenizer, "bos_token", None)
    special = not (isinstance(bos, str) and bos and text.startswith(bos))
    if not images:
        return processor.tokenizer(text, add_special_tokens=special)["input_ids"], MultimodalData()
    try:
        out = processor(text=text, images=images, return_tensors="pt", add_special_tokens=special)
    except Exception as e:  # the processor's own complaint, named
        raise ValueError(f"the image processor refused the images: {type(e).__name__}: {e}") from None
    ids = out["input_ids"][0].tolist()
    pixel_values = out["pixel_values"]
    sizes = [tuple(int(v) for v in s) for s in out["image_sizes"].tolist()] if "image_sizes" in out else None
    grids = None
    if "image_grid_thw" in out:  # Qwen2.5-VL: every image's patches in one tensor, each image a grid of them
        grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"].tolist()]
        pixel_values = pixel_values.split([t * h * w for t, h, w in grids])
        merge = processor.image_processor.merge_size
        counts = [t * h * w // merge ** 2 for t, h, w in grids]
    else:
        counts = _tokens_per_image(processor, images, sizes)
    positions = [i for i, t in enumerate(ids) if t == image_token_id]
    if sum(counts) != len(positions):
        raise ValueError(f"the processor wrote {len(positions)} image tokens for images of {counts} tokens")
    spans, k = [], 0
    for i, n in enumerate(counts):
        offset = positions[k]
        if positions[k + n - 1] != offset + n - 1:
            raise ValueError(f"image {i}'s {n} tokens are not consecutive in the prompt")
        pv = pixel_values[i]
        size = sizes[i] if sizes is not None else None
        if pv.dim() == 4 and size is not None:  # LLaVA-NeXT: its own crops, not the batch's padding
            pv = pv[:_num_crops(processor, size)]
        grid = grids[i] if grids is not None else None
        spans.append(ImageSpan(image_hash(pv, size if grid is None else grid), offset, n, pv, size, grid))
        k += n
    return ids, MultimodalData(spans)


def _num_crops(processor, size: tuple[int, int]) -> int:
    """LLaVA-NeXT: the crops of an image of `size` (its grid's, plus the base image). The
    processor pads every image of a prompt to the most any has: an image's hash then hung on
    its batch mates (the same image hashed anew, encoded again, its cached blocks missed)."""
    from trtllm.models.llava import num_crops
    ip = processor.image_processor
    return num_crops(size, ip.image_grid_pinpoints, ip.crop_size["height"])


def _tokens_per_image(processor, images: list, sizes) -> list[int]:
    if sizes is None:
        sizes = [(im.size[1], im.size[0]) if hasattr(im, "size") and not isinstance(im, np.ndarray)
                 else im.shape[:2] for im in images]
    return list(processor._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes]).num_image_tokens)


def load_processor(path):
    """The checkpoint's AutoProcessor (image processor, tokenizer, chat template); ValueError if
    it has none."""
    from transformers import AutoProcessor
    try:
        processor = AutoProcessor.from_pretrained(str(path))
    except Exception as e:
        from trtllm.runtime.qwen_vl_processor import qwen_vl_processor
        fallback = qwen_vl_processor(path, e)  # a Qwen2.5-VL checkpoint on a machine without torchvision
        if fallback is not None:
            return fallback
        raise ValueError(f"{path}: no image processor could be loaded ({type(e).__name__}: {e}); a multimodal "
                         "checkpoint needs its preprocessor_config.json / processor_config.json") from None
    if not hasattr(processor, "image_processor"):
        raise ValueError(f"{path}: AutoProcessor gave a {type(processor).__name__}, which has no image processor")
    return processor


class Processor:
    """A front end's image processing for one engine: the processor given, else the checkpoint
    directory's, loaded at the first prompt with images. image_token_id None: a text-only model."""

    def __init__(self, processor, model, tokenizer, image_token_id: int | None):
        self._processor, self._model, self._tokenizer = processor, model, tokenizer
        self.image_token_id = image_token_id

    @property
    def takes_images(self) -> bool:
        return self.image_token_id is not None

    @property
    def image_token(self) -> str:
        """The placeholder text of one image (the processor's); for Qwen2.5-VL's `<|image_pad|>` the
        whole vision span its chat template writes for an image part."""
        token = getattr(self.get(), "image_token", "<image>")
        return "<|vision_start|><|image_pad|><|vision_end|>" if token == "<|image_pad|>" else token

    def process(self, prompt: dict) -> tuple[str, list[int], MultimodalData]:
        """(text, token ids, images) of a multimodal prompt; ValueError naming what is wrong."""
        text, images = split_prompt(prompt)
        if not self.takes_images:
            if images:
                raise ValueError("this model takes no images (a text-only model); send text only")
            if self._tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or LLM(tokenizer=...)")
            return text, self._tokenizer.encode(text), MultimodalData()
        return (text, *process_prompt(self.get(), text, images, self.image_token_id))

    def get(self):
        if self._processor is None:
            if not isinstance(self._model, (str, os.PathLike)):
                raise ValueError("an LLM built on a module in memory needs LLM(processor=...) (a transformers "
                                 "AutoProcessor) for prompts with images")
            self._processor = load_processor(self._model)
        return self._processor


def check_multimodal_encoder(encoder, model) -> None:
    """TensorRT-LLM's `multimodal_encoder=MultimodalEncoder(vision_encoder_path=...)`: here the
    LLaVA checkpoint holds its vision tower, so only a path naming that same checkpoint is taken."""
    if encoder is None:
        return
    path = getattr(encoder, "vision_encoder_path", encoder)
    if not isinstance(model, (str, os.PathLike)) or os.path.realpath(path) != os.path.realpath(model):
        raise ValueError(f"multimodal_encoder={path!r}: a separate vision encoder is not supported; trtllm runs the "
                         "vision tower of the LLaVA checkpoint given as model= (leave multimodal_encoder unset)")


@dataclass
class MultimodalEncoder:
    """TensorRT-LLM's spelling (`LLM(..., multimodal_encoder=MultimodalEncoder(vision_encoder_path=p))`),
    taken when p is the model's own checkpoint directory."""
    vision_encoder_path: str


def split_chat_images(messages: list[dict], image_token: str | None) -> tuple[list[dict], list]:
    """`llm.chat` messages whose content may be a list of parts ({"type": "text", "text": ...},
    {"type": "image", "image": <image>}) -> the messages with each image part as `image_token`
    in its place (plain string content, for any chat template) and the images in order."""
    images, out = [], []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            out.append(m)
            continue
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                pieces.append(part.get("text") or "")
            elif kind == "image":
                if image_token is None:
                    raise ValueError("an image content part, but this model takes no images (a text-only model)")
                images.append(part.get("image"))
                pieces.append(image_token)
            else:
                raise ValueError(f"a chat content part is {{'type': 'text', 'text': ...}} or {{'type': 'image', "
                                 f"'image': ...}}, got type {kind!r}")
        out.append(dict(m, content="".join(pieces)))
    return out, images
