"""A request's outputs as its reader sees them, and the table of open ones a front end keeps.

- `RequestStream`: the outputs of a request on the engine thread (`LLM`), each a snapshot;
  iterate (sync) or `async for`.
- `MirrorStream`: a request on the engine process (`EngineCoreClient`): one RequestOutput,
  grown on the reader's event loop by the core's per-step deltas.
- `OpenStreams`: the streams of the requests in flight, by request id: where a front end
  refuses a duplicate id (the one place that checks) and where each output finds its
  reader.
- `StreamingOutputs`: `LLM.generate(..., streaming=True)`'s iterator over a `RequestStream`.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import uuid

from trtllm.runtime.outputs import RequestError, RequestOutput, failed_output
from trtllm.runtime.wire import StepDeltas

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

    def put(self, output: RequestOutput) -> None:  # from any thread
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


def put_all(streams_and_outputs: list[tuple[RequestStream, RequestOutput]]) -> None:
    """Hand a step's outputs to their readers: one wake-up per event loop, not one per
    request (256 streams at ~100 steps/s would otherwise be 25k cross-thread calls a second)."""
    batches: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, output in streams_and_outputs:
        if stream._async is not None:
            batches.setdefault(stream._loop, []).append((stream._async, output))
        else:
            stream._sync.put(output)
    for loop, items in batches.items():
        try:
            loop.call_soon_threadsafe(_put_nowait_all, items)
        except RuntimeError:  # that event loop is closed: no one is left to read
            pass


def _put_nowait_all(items) -> None:  # on the reader's event loop
    for queue_, output in items:
        queue_.put_nowait(output)


class MirrorStream(RequestStream):
    """A RequestStream over a growing RequestOutput: `grow` (on the reader's event loop)
    applies a delta and wakes the reader only if it is not already due to wake, and
    each read takes one snapshot of everything so far. Deltas that arrive while the
    reader is busy merge for free: no snapshot or queue entry per delta, and a writer
    that falls behind writes fewer, larger events instead of a backlog."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop, output: RequestOutput):
        super().__init__(request_id, loop)
        self.output = output
        self._due = False

    def grow(self, deltas: StepDeltas, row: int) -> None:  # on self._loop
        deltas.apply(row, self.output)
        if not self._due:
            self._due = True
            self._async.put_nowait(None)

    def grow_threadsafe(self, deltas: StepDeltas, row: int) -> None:
        try:
            self._loop.call_soon_threadsafe(self.grow, deltas, row)
        except RuntimeError:  # the reader's event loop is closed: no one is left to read
            pass

    def fail(self, error: str) -> None:
        """End the request with `error`, from any thread (its tokens so far are kept)."""
        self.grow_threadsafe(StepDeltas.of([failed_output(self.request_id, len(self.output.outputs), error)]), 0)

    async def next_merged(self, live: bool = False) -> RequestOutput:
        """Everything so far, once something new came. A snapshot; with `live`, the growing
        output itself (no copy: for a reader that is done with it before its next await,
        as the SSE writer is; its diffs are then not cleared)."""
        await self._async.get()
        self._due = False
        if live:
            self.last = self.output
            return self.output
        self.last = self.output.snapshot()
        self.output.clear_diffs()
        return self.last

    async def __aiter__(self):
        while self.last is None or not self.last.finished:
            yield await self.next_merged()


class OpenStreams:
    """Request id -> stream of each request in flight, shared by the threads of a front end
    (its callers add, its engine side routes outputs) under one lock, taken once per step."""

    def __init__(self):
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._refusal: str | None = None  # once closed: why new requests fail

    def open(self, stream: RequestStream) -> str | None:
        """Register `stream`; the error its request must end with instead, if any."""
        with self._lock:
            if self._refusal is not None:
                return self._refusal
            if stream.request_id in self._streams:
                return f"request id {stream.request_id!r} is already in flight"
            self._streams[stream.request_id] = stream
            return None

    def route(self, request_ids: list[str], finished: list[bool]) -> list[RequestStream | None]:
        """The stream of each request id (None: not open); the finished ones are forgotten."""
        with self._lock:
            streams = [self._streams.get(r) for r in request_ids]
            for r, done in zip(request_ids, finished):
                if done:
                    self._streams.pop(r, None)
        return streams

    def close(self, refusal: str) -> list[RequestStream]:
        """Refuse new requests with `refusal` from now on; the streams still open (for their
        caller to end)."""
        with self._lock:
            self._refusal = refusal
            streams = list(self._streams.values())
            self._streams.clear()
        return streams

    def __bool__(self) -> bool:
        return bool(self._streams)


class StreamingOutputs:
    """`generate(..., streaming=True)`: iterates one request's growing RequestOutputs. Closing
    it (`close()`, `with`, leaving a `for` loop over a generator that holds it) or dropping it
    before the request ends aborts the request, so it stops holding its KV blocks."""

    def __init__(self, stream: RequestStream, loop):  # loop: the EngineLoop running the request
        self._stream, self._loop = stream, loop
        self._outputs = iter(stream)

    def __iter__(self) -> StreamingOutputs:
        return self

    def __next__(self):
        out = next(self._outputs)
        if out.error is not None:  # the request failed while it ran: say why, not "finished"
            raise RequestError([out], [0], batch=False)
        return out

    def close(self) -> None:
        last = self._stream.last
        if last is None or not last.finished:
            self._loop.abort(self._stream.request_id)

    def __enter__(self) -> StreamingOutputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
