"""The engine's half of multimodal requests: encode the images a step needs (once per image,
cached by content hash) and stage their features for the compiled language model.

Before each step the model runner calls `MultimodalStager.stage(scheduled)`: for every
scheduled chunk (sequence, new tokens) the image spans it overlaps are looked up in the
`EncoderCache`, the missing images are encoded in one batch by the model's `encode_images`
(the vision tower and projector, eager or compiled by `trtllm.compile_encoder`), and for each
image token of the chunk the row of its feature is written into the fixed-address buffers the
graph's `trtllm.splice_embeddings` reads (trtllm/multimodal_context.py). A chunk that ends
inside an image takes that image's first rows and the next chunk the rest: chunked prefill may
cut an image anywhere. A step without image tokens costs nothing here after the first.

`EncoderCache`: image hash -> features on the device, least recently used evicted past
`capacity` images; `num_encoded` counts images the encoder ran on (what the tests read).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from trtllm.multimodal_context import MultimodalEmbeddings
from trtllm.runtime.multimodal_inputs import check_image_tokens
from trtllm.runtime.speculative.config import MTPDecodingConfig


class EncoderCache:
    def __init__(self, encode, capacity: int = 256):
        if capacity < 1:
            raise ValueError(f"encoder cache capacity must be >= 1, got {capacity}")
        self.encode, self.capacity = encode, capacity
        self._features: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.num_encoded = 0   # images the encoder ran on
        self.num_hits = 0      # images served from the cache

    def get(self, images: list) -> list[torch.Tensor]:
        """Features [n_i, hidden] per image (ImageSpan); the missing ones encoded in one batch."""
        missing = {}
        for im in images:
            if im.hash in self._features:
                self._features.move_to_end(im.hash)
            elif im.hash not in missing:
                missing[im.hash] = im
        self.num_hits += len(images) - len(missing)
        if missing:
            from trtllm.models.llava import ImageInput
            todo = list(missing.values())
            with torch.no_grad():
                features = self.encode([ImageInput(im.pixel_values, im.image_size, im.grid_thw) for im in todo])
            for im, f in zip(todo, features):
                if f.shape[0] != im.length:
                    raise ValueError(f"an image encoded to {f.shape[0]} features but its prompt holds {im.length} "
                                     "placeholder tokens (processor and model configs disagree)")
                self._features[im.hash] = f
            self.num_encoded += len(todo)
        out = [self._features[im.hash] for im in images]
        while len(self._features) > max(self.capacity, len(images)):  # this step's images stay
            self._features.popitem(last=False)
        return out


class MultimodalStager:
    def __init__(self, encode, embeddings: MultimodalEmbeddings, cache_capacity: int = 256,
                 image_token_id: int | None = None):
        self.cache = EncoderCache(encode, cache_capacity)
        self.embeddings = embeddings
        self.image_token_id = image_token_id  # the placeholder's id, which only an image's features may fill

    def stage(self, scheduled) -> None:
        """Fill the buffers for a step of (sequence, new tokens) chunks, in flat-batch order."""
        pieces = []  # (flat token index of the first, image, first feature row, count)
        t = 0
        for seq, n in scheduled:
            mm = seq.multimodal
            if mm is not None:
                start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
                for im in mm.images:
                    lo, hi = max(start, im.offset), min(end, im.offset + im.length)
                    if lo < hi:
                        pieces.append((t + lo - start, im, lo - im.offset, hi - lo))
            t += n
        if not pieces:
            self.embeddings.fill(None, None)
            return
        features = self.cache.get([im for _, im, _, _ in pieces])
        rows = torch.full((t,), -1, dtype=torch.long)
        chunks, k = [], 0
        for (first, _, row, count), f in zip(pieces, features):
            rows[first:first + count] = torch.arange(k, k + count)
            chunks.append(f[row:row + count])
            k += count
        self.embeddings.fill(rows, torch.cat(chunks))

    def reset(self) -> None:
        """A step without image tokens (the overlap scheduler's decode steps)."""
        self.embeddings.fill(None, None)


def check_multimodal_request(stager: MultimodalStager | None, multimodal, prompt_token_ids: list[int]) -> None:
    """ValueError naming why a request (with images or not) cannot run on this engine (before any work)."""
    images = multimodal.images if multimodal is not None else []
    if stager is None:
        if images:
            raise ValueError("this model takes no images (a text-only model); send text only")
        return
    for i, im in enumerate(images):
        if not 0 <= im.offset <= im.offset + im.length <= len(prompt_token_ids):
            raise ValueError(f"image {i}'s tokens {im.offset}..{im.offset + im.length} lie outside the prompt")
    check_image_tokens(stager.image_token_id, multimodal, prompt_token_ids)


def multimodal_stager(module, compiled, max_num_tokens: int, speculative=None,
                      cuda_graphs: bool = True) -> MultimodalStager | None:
    """The stager of a model with a vision side (`encode_images`), else None; what multimodal
    cannot run with yet is refused by name. cuda_graphs (on a GPU): a LLaVA tower replays CUDA
    graphs at small batches of crops (runtime/encoder_graphs.py)."""
    if not hasattr(module, "encode_images"):
        return None
    name = type(module).__name__
    # drafts are proposals the target verifies: a draft model reads the image placeholders as text, an
    # EAGLE-3 head the target's states at the image rows (fewer accepted, never other tokens); MTP layers
    # are DeepSeek-V3's, which no multimodal family has
    if isinstance(speculative, MTPDecodingConfig):
        raise ValueError(f"{name} (a multimodal model) with {type(speculative).__name__} is not supported "
                         "(it has no MTP layers; n-gram, draft-model and EAGLE-3 speculation are)")
    embeddings = MultimodalEmbeddings.for_model(module, max_num_tokens)
    from trtllm.compile_encoder import compile_encoder
    if hasattr(module, "warm_up_vision"):  # Qwen2.5-VL: its tower takes patches and grids
        module.compiled_tower = compile_encoder(module.visual)
        module.warm_up_vision()
        return MultimodalStager(module.encode_images, embeddings, image_token_id=module.config.image_token_id)
    module.compiled_tower = compile_encoder(module.vision_tower)
    v = module.config.vision
    device = embeddings.embeds.device
    for n in (2, 1):  # compiled now, not in the first request's TTFT: any batch of >= 2 images, and 1
        module.tower_features(torch.zeros((n, v.num_channels, v.image_size, v.image_size), device=device))
    if cuda_graphs and device.type == "cuda":
        from trtllm.runtime.encoder_graphs import EncoderGraphs
        module.compiled_tower = EncoderGraphs(module.compiled_tower, (v.num_channels, v.image_size, v.image_size),
                                              args=(module.config.feature_layers,), device=device,
                                              dtype=module.multi_modal_projector.linear_1.weight.dtype)
    return MultimodalStager(module.encode_images, embeddings, image_token_id=module.config.image_token_id)
