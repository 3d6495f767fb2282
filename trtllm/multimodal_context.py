"""How image features reach a compiled language model: fixed-address buffers and one graph op.

A multimodal model's forward stays `forward(input_ids, positions)`. After its token embedding it
calls `torch.ops.trtllm.splice_embeddings(x)`, which takes no features as arguments: it reads
the *active multimodal context*, set by the runtime around each forward, as
attention_context.py does for the KV cache:

    mm = MultimodalEmbeddings(max_num_tokens, hidden_size, dtype, device)
    mm.fill(rows, features)             # refills the same buffers in place
    with multimodal_context(mm):
        logits = compiled(input_ids, positions)      # [1, T] flat ragged batch

- `rows` [max_num_tokens] int64: for token t of the step, the row of `embeds` that replaces
  its token embedding, -1 for a text token (keeps its own);
- `embeds` [max_num_tokens, hidden]: this step's image features, in the model's dtype.

Both are allocated once and written in place, so a CUDA graph captured with the context set
replays correctly after the runtime refills them; a step with no image token leaves every row
-1 and costs the graph one gather and select over its tokens. Outside any context (text-only
calls, the probe) the op returns its input. The runtime (runtime/multimodal_stager.py) fills
the rows of a chunk from the encoder's output for the image positions that chunk holds, so a
prefill chunk may end anywhere inside an image.
"""
from __future__ import annotations

import contextlib

import torch

from trtllm.kernels.registry import register_op

# A multimodal model's language model is its `language_model`; the rest (vision tower, projector)
# is its vision side, run before the step in the model's dtype: never quantized, held by rank 0
# alone under parallelism
LANGUAGE_MODEL = "language_model."


def is_vision_side(model, path: str) -> bool:
    """Whether the module path or tensor name `path` of `model` is on a multimodal model's vision side."""
    return hasattr(model, "encode_images") and not path.startswith(LANGUAGE_MODEL)


class MultimodalEmbeddings:
    def __init__(self, max_num_tokens: int, hidden_size: int, dtype: torch.dtype, device):
        device = torch.device(device)
        self.rows = torch.full((max_num_tokens,), -1, dtype=torch.long, device=device)
        self.embeds = torch.zeros((max_num_tokens, hidden_size), dtype=dtype, device=device)
        # the rows' pinned staging: copied without waiting for the GPU (a pageable copy would
        # wait for every step queued before it)
        self._host_rows = torch.empty((max_num_tokens,), dtype=torch.long, pin_memory=device.type == "cuda")
        self.max_num_tokens = max_num_tokens
        self._num_rows = 0  # rows the last fill set (the rest hold -1)
        # the last fill's (token_rows [T] host, features [K, hidden]), None after an image-free step:
        # what rank 0 hands the other ranks of a parallel model with the step (parallel/workers.py)
        self.staged: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def for_model(cls, module, max_num_tokens: int, device=None) -> MultimodalEmbeddings:
        """Buffers of a multimodal model's hidden size and dtype (its language model's embedding),
        on `device` (None: the embedding's; a parallel rank's embedding may be a stand-in)."""
        embed = module.get_input_embeddings().weight
        return cls(max_num_tokens, embed.shape[1], embed.dtype, embed.device if device is None else device)

    def fill(self, token_rows: torch.Tensor | None, features: torch.Tensor | None) -> None:
        """token_rows [T] int64 (host): embeds row per token, -1 for text; features [K, hidden]:
        the rows. None, None: a step without image tokens (a no-op when the last was one too).
        The caller must not fill again before the GPU has run the copies of the last fill (the
        model runner's fills follow its wait for the previous step's input copies)."""
        self.staged = None
        if token_rows is None:
            if self._num_rows:
                self.rows[:self._num_rows].fill_(-1)
                self._num_rows = 0
            return
        t, k = token_rows.shape[0], features.shape[0]
        if t > self.max_num_tokens or k > self.max_num_tokens:
            raise ValueError(f"{t} tokens / {k} image features exceed the multimodal buffers' "
                             f"{self.max_num_tokens}")
        if self._num_rows > t:
            self.rows[t:self._num_rows].fill_(-1)
        self._host_rows[:t].copy_(token_rows)
        self.rows[:t].copy_(self._host_rows[:t], non_blocking=True)
        self.embeds[:k].copy_(features, non_blocking=True)
        self._num_rows = t
        self.staged = (token_rows, features)


_active: MultimodalEmbeddings | None = None


@contextlib.contextmanager
def multimodal_context(embeddings: MultimodalEmbeddings | None):
    """Make `embeddings` the buffers every `trtllm.splice_embeddings` reads (None: none)."""
    global _active
    previous, _active = _active, embeddings
    try:
        yield embeddings
    finally:
        _active = previous


def active_embeddings() -> MultimodalEmbeddings | None:
    """The buffers the running step's splice reads (None outside any context)."""
    return _active


def _splice_embeddings(x: torch.Tensor) -> torch.Tensor:
    """x [B, S, hidden] token embeddings -> the same with the active context's image features in
    place of the tokens whose row is >= 0 (token t of the B*S flat tokens reads rows[t])."""
    mm = _active
    if mm is None:
        return x.clone()
    b, s, h = x.shape
    if b * s > mm.max_num_tokens:
        raise ValueError(f"{b * s} tokens exceed the multimodal buffers' {mm.max_num_tokens}")
    rows = mm.rows[:b * s]
    picked = mm.embeds.index_select(0, rows.clamp(min=0)).to(x.dtype)  # [T, hidden]
    return torch.where((rows >= 0)[:, None], picked, x.reshape(b * s, h)).view(b, s, h)


def _splice_embeddings_fake(x):
    return torch.empty_like(x)


splice_embeddings = register_op("splice_embeddings", impl=_splice_embeddings, fake=_splice_embeddings_fake)
