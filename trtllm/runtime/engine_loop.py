"""`EngineLoop`: the engine stepping on its own thread, for many callers at once.

Callers (the `LLM` API, the HTTP server) submit requests from any thread or asyncio
task and read `RequestOutput`s from a `RequestStream`. The loop thread is the only one
that touches the engine; submissions and aborts reach it through a queue, so a slow
reader never blocks a step, and a request that fails at admission fails alone.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import traceback
import uuid

from trtllm.runtime.engine import Engine
from trtllm.runtime.outputs import CompletionOutput, RequestOutput
from trtllm.sampling_params import SamplingParams

log = logging.getLogger("trtllm")
_request_numbers = itertools.count()


def new_request_id() -> str:
    """Unique in this process and unlikely to collide with a client's own ids."""
    return f"req-{next(_request_numbers)}-{uuid.uuid4().hex[:8]}"


class RequestStream:
    """The outputs of one request, as they come. Iterate (sync) or `async for`."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None):
        self.request_id = request_id
        self._sync: queue.Queue[RequestOutput] = queue.Queue()
        self._loop = loop
        self._async: asyncio.Queue | None = asyncio.Queue() if loop is not None else None
        self.last: RequestOutput | None = None

    def put(self, output: RequestOutput) -> None:  # called on the loop thread
        if self._async is not None:
            try:
                self._loop.call_soon_threadsafe(self._async.put_nowait, output)
            except RuntimeError:  # the reader's event loop is closed: no one is left to read
                pass
        else:
            self._sync.put(output)

    def __iter__(self):
        while self.last is None or not self.last.finished:
            self.last = self._sync.get()
            yield self.last

    async def __aiter__(self):
        while self.last is None or not self.last.finished:
            self.last = await self._async.get()
            yield self.last

    async def next_merged(self, live: bool = False) -> RequestOutput:
        """The next output, or if several are queued, the latest of them (each carries the
        whole text so far): a reader slower than the engine skips, never falls behind.
        (`live`: see MirrorStream; these outputs are snapshots either way.)"""
        out = await self._async.get()
        while not out.finished and not self._async.empty():
            out = self._async.get_nowait()
        self.last = out
        return out

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return self.last

    async def aresult(self) -> RequestOutput:
        async for _ in self:
            pass
        return self.last


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, RequestStream] = {}
        self._stopping = threading.Event()
        self.idle = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trtllm-engine", daemon=True)
        self._thread.start()

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               prompt: str | None = None, loop: asyncio.AbstractEventLoop | None = None,
               streaming: bool = False) -> RequestStream:
        """With streaming, the stream gets every step's progress; else only the end."""
        stream = RequestStream(request_id, loop)
        self._inbox.put(("add", stream, (request_id, prompt_token_ids, params, prompt, streaming)))
        return stream

    def submit_many(self, requests: list[tuple]) -> list[RequestStream]:
        """Requests (request_id, prompt_token_ids, params, prompt), not streamed, added
        together: no step runs between two of them."""
        streams = [RequestStream(r[0]) for r in requests]
        self._inbox.put(("add_many", streams, [(*r, False) for r in requests]))
        return streams

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None, None))
        self._thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            busy = self.engine.has_unfinished()
            self.idle.clear() if busy else self.idle.set()
            try:
                self._take(block=not busy)
            except queue.Empty:
                pass
            if self._stopping.is_set():
                break
            if self.engine.has_unfinished():
                self._step()
        for request_id in list(self._streams):  # shutting down: end every open stream
            self._deliver(self.engine.abort(request_id) or _failed(request_id, "the engine shut down"))

    def _take(self, block: bool) -> None:
        item = self._inbox.get(block=block, timeout=0.1 if block else None)
        while True:
            kind, a, b = item
            if kind == "add":
                self._add(a, *b)
            elif kind == "add_many":
                for stream, request in zip(a, b):
                    self._add(stream, *request)
            elif kind == "abort" and a in self._streams:
                self._deliver(self.engine.abort(a))
            item = self._inbox.get_nowait()

    def _add(self, stream: RequestStream, request_id, prompt_token_ids, params, prompt, streaming) -> None:
        if request_id in self._streams:
            stream.put(_failed(request_id, f"request id {request_id!r} is already in flight", prompt,
                               prompt_token_ids, params))
            return
        try:
            self.engine.add_request(request_id, prompt_token_ids, params, prompt, stream=streaming)
        except ValueError as e:
            stream.put(_failed(request_id, str(e), prompt, prompt_token_ids, params))
            return
        self._streams[request_id] = stream

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception:  # a bug, not a bad request: fail what is in flight, keep the loop
            message = traceback.format_exc()
            log.error("engine step failed:\n%s", message)
            for request_id in list(self._streams):
                self.engine.abort(request_id)
                self._deliver(_failed(request_id, "internal error in the engine step"))
            return
        # one wake-up per event loop per step, not one per request (256 streams at
        # ~100 steps/s would otherwise be 25k cross-thread calls a second)
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for output in outputs:
            stream = self._route(output)
            if stream is None:
                continue
            if stream._async is not None:
                batches.setdefault(stream._loop, []).append((stream._async, output))
            else:
                stream._sync.put(output)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: no one is left to read
                pass

    def _route(self, output: RequestOutput) -> RequestStream | None:
        """The stream an output goes to (forgotten once the request is finished)."""
        stream = self._streams.get(output.request_id)
        if stream is not None and output.finished:
            del self._streams[output.request_id]
        return stream

    def _deliver(self, output: RequestOutput | None) -> None:
        if output is None:
            return
        stream = self._streams.get(output.request_id)
        if stream is None:
            return
        if output.finished:
            del self._streams[output.request_id]
        stream.put(output)


def _put_all(items) -> None:  # on the reader's event loop
    for queue_, output in items:
        queue_.put_nowait(output)


def _failed(request_id: str, error: str, prompt: str | None = None, prompt_token_ids=None,
            params: SamplingParams | None = None) -> RequestOutput:
    n = params.n if params is not None else 1
    return RequestOutput(request_id, prompt, list(prompt_token_ids or []),
                         [CompletionOutput(i, finish_reason="error") for i in range(n)],
                         finished=True, error=error)
