"""TensorRT-LLM's logits hooks: a per-request `LogitsProcessor` (`SamplingParams(logits_processor=...)`)
and a `BatchedLogitsProcessor` (`LLM(batched_logits_processor=...)`)."""
from __future__ import annotations

from abc import ABC, abstractmethod


class LogitsProcessor(ABC):
    """TensorRT-LLM's per-request logits hook: subclass it (or pass any callable of this
    signature) as `SamplingParams(logits_processor=...)`. Called once per generated token, before
    the grammar mask and the sampler, with the request's logits row to edit in place.

        req_id     the request's id (a str here; an int in TensorRT-LLM)
        logits     [1, 1, V] (beam width 1), the model's dtype, on the model's device
        token_ids  [[prompt + output so far]] (one list per beam)
        stream_ptr the CUDA stream the logits are on (None on CPU)
        client_id  None"""

    @abstractmethod
    def __call__(self, req_id, logits, token_ids: list[list[int]], stream_ptr: int | None,
                 client_id: int | None) -> None: ...


class BatchedLogitsProcessor(ABC):
    """TensorRT-LLM's batched hook, given to `LLM(batched_logits_processor=...)` and applied to
    the requests with `SamplingParams(apply_batched_logits_processor=True)`: one call per step with
    lists (req_ids, logits rows [1, 1, V] each, token_ids [[...]] each, stream_ptr, client_ids)."""

    @abstractmethod
    def __call__(self, req_ids: list, logits: list, token_ids: list[list[list[int]]], stream_ptr: int | None,
                 client_ids: list) -> None: ...
