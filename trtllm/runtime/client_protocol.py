"""`EngineClient`: what a server (trtllm/serve/) asks of an engine. Two implement it: `LLM`
(the engine on a thread of this process) and `EngineCoreClient` (the engine in a process of
its own, what trtllm-serve runs by default).

    stream = client.generate_async(prompt, SamplingParams(...), streaming=True)
    async for out in stream: ...      # RequestOutputs: each the whole output so far
    client.abort(stream.request_id)   # its stream ends with finish_reason "abort"
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from trtllm.lora_request import LoRARequest
from trtllm.runtime.engine_limits import EngineLimits
from trtllm.runtime.engine_stats import EngineStats
from trtllm.runtime.request_stream import RequestStream
from trtllm.sampling_params import SamplingParams


@runtime_checkable
class EngineClient(Protocol):
    tokenizer: object | None  # a transformers tokenizer (chat templates, prompt text), or None
    limits: EngineLimits

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError naming what is wrong with this request, before submitting it."""

    def generate_async(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       streaming: bool = False, request_id: str | None = None,
                       lora_request: LoRARequest | None = None, cache_salt: str | None = None) -> RequestStream:
        """Submit a request (called on the event loop its stream is read on), with a LoRA
        adapter if `lora_request` names one (the engine checks it: a bad one fails the request). With
        `streaming`, an output per step (per stream_interval tokens), else only the last. A
        request that fails (bad, a duplicate id, the engine gone) ends with `.error` set.
        cache_salt: its cached prefixes are shared only with requests of the same salt."""

    def abort(self, request_id: str) -> None:
        """End a request in flight (finish_reason "abort"); nothing if it is not."""

    def has_unfinished(self) -> bool:
        """Requests submitted and not yet finished."""

    def is_alive(self) -> bool:
        """The engine is running and takes requests."""

    def dead_reason(self) -> str | None:
        """None while the engine runs; else why it does not (shut down; the engine process
        exited, with its exit code or signal), for /health and the server's log."""

    def engine_stats(self) -> EngineStats:
        """The scheduler's and KV pool's counters (/metrics)."""

    def shutdown(self) -> None:
        """Stop the engine; open requests end with finish_reason "abort"."""
