"""`EngineCoreClient`: what a server asks of an engine, with the engine in a child
process (trtllm/runtime/engine_core.py, which also describes the wire), and `MirrorStream`,
a request's output as the client grows it from the core's per-step deltas.

    build = functools.partial(build_engine, "path/to/checkpoint", build_config=...)
    client = EngineCoreClient(build, tokenizer="path/to/checkpoint")  # returns once the core is ready
    stream = client.generate_async(prompt_ids, SamplingParams(...), streaming=True)
    async for out in stream: ...                   # RequestOutputs, as from LLM.generate_async
    client.abort(stream.request_id); client.shutdown()
"""
from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import pickle
import queue
import threading

from trtllm.runtime.engine import validate_request
from trtllm.runtime.engine_core import core_main, failed_delta
from trtllm.runtime.engine_loop import RequestStream, new_request_id
from trtllm.runtime.engine_stats import EngineStats
from trtllm.runtime.outputs import CompletionOutput, RequestOutput
from trtllm.runtime.tokenizer import load_tokenizer, tokenize_prompt
from trtllm.sampling_params import SamplingParams

log = logging.getLogger("trtllm")


# -- the client's side of a request: its output, grown by deltas ---------------------------
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

    def grow(self, delta: tuple) -> None:  # on self._loop
        self.output.apply_delta(delta)
        if not self._due:
            self._due = True
            self._async.put_nowait(None)

    def grow_threadsafe(self, delta: tuple) -> None:
        try:
            self._loop.call_soon_threadsafe(self.grow, delta)
        except RuntimeError:  # the reader's event loop is closed: no one is left to read
            pass

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


# -- the client, in the server's process -----------------------------------------------------
class EngineCoreClient:
    """What a server asks of an engine (as `LLM` answers it), with the engine in a child
    process: `tokenizer`, `limits`, `validate`, `generate_async`, `abort`,
    `has_unfinished`, `is_alive`, `engine_stats`, `shutdown`.

    `build` is a picklable zero-argument callable returning an `Engine` (it runs in the
    child, so a module-level function or a functools.partial of one); `tokenizer` (a
    checkpoint directory, a tokenizer, or None) is loaded here for chat templates and
    prompt text. Raises RuntimeError naming the cause if the engine cannot be built."""

    def __init__(self, build, tokenizer=None, start_timeout: float | None = None):
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer is not None else None
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        core_inbox, self._to_core = ctx.Pipe(duplex=False)
        self._from_core, core_outbox = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=core_main, args=(build, core_inbox, core_outbox),
                                 name="trtllm-engine-core")
        self._proc.start()
        core_inbox.close()
        core_outbox.close()
        # at interpreter exit, before multiprocessing joins its children: a core still
        # running (an exception skipped shutdown) would make that join wait forever
        atexit.register(self._kill)
        try:
            ready = self._wait_ready(start_timeout)
        except BaseException:  # a load error, or SIGTERM/Ctrl-C while loading
            self._kill()
            raise
        _, self.limits, self.vocab_size, self._has_tokenizer, self._stats = ready
        self._streams: dict[str, MirrorStream] = {}
        self._lock = threading.Lock()  # _streams: the event loop adds, the reader removes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._gone = False  # the core's pipe closed: new requests fail at once
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="trtllm-core-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="trtllm-core-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _wait_ready(self, timeout: float | None) -> tuple:
        waited = 0.0
        while not self._from_core.poll(1.0):
            waited += 1.0
            if not self._proc.is_alive():
                raise RuntimeError(f"the engine process exited with code {self._proc.exitcode} while starting")
            if timeout is not None and waited >= timeout:
                raise RuntimeError(f"the engine process was not ready after {timeout:.0f} s")
        try:
            msg = self._from_core.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited with code {self._proc.exitcode} while starting") from None
        if msg[0] == "error":
            raise RuntimeError(f"the engine could not be built: {msg[1]}")
        return msg

    # -- requests ----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.limits, self.vocab_size, self._has_tokenizer)

    def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False, request_id: str | None = None) -> RequestStream:
        """A RequestStream: `async for out in stream` (streaming) or `await stream.aresult()`."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, ids = tokenize_prompt(self.tokenizer, prompt)
        request_id = request_id or new_request_id()
        self._loop = asyncio.get_running_loop()  # outputs are dispatched on it (one server, one loop)
        stream = MirrorStream(request_id, self._loop, RequestOutput(request_id, text, ids, [
            CompletionOutput(i, logprobs=[] if params.logprobs is not None else None,
                             cumulative_logprob=0.0 if params.logprobs is not None else None)
            for i in range(params.n)]))
        with self._lock:
            error = "the engine process is not running" if self._gone else \
                f"request id {request_id!r} is already in flight" if request_id in self._streams else None
            if error is None:
                self._streams[request_id] = stream
        if error is not None:
            stream.grow(failed_delta(request_id, params.n, error))
        else:
            self._outgoing.put(("add", request_id, ids, params, text, streaming))
        return stream

    def abort(self, request_id: str) -> None:
        self._outgoing.put(("abort", request_id))

    def has_unfinished(self) -> bool:
        return bool(self._streams)

    def is_alive(self) -> bool:
        # _gone first: the reader sets it when the core's pipe closes, while the thread
        # itself still runs for a moment failing the open requests (a test saw it alive).
        return not self._gone and self._proc.is_alive() and self._reader.is_alive()

    def engine_stats(self) -> EngineStats:
        """The counters the core sent with its latest step."""
        return self._stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core (open requests end with finish_reason "abort") and wait for it."""
        if self._proc.is_alive():
            self._outgoing.put(("stop",))
            self._proc.join(timeout)
        if self._proc.is_alive():
            log.error("the engine process did not stop in %.0f s; killing it", timeout)
            self._kill()
        atexit.unregister(self._kill)
        self._outgoing.put(None)
        self._reader.join(5)
        self._fail_all("the engine shut down")

    def __enter__(self) -> "EngineCoreClient":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # -- the two threads -----------------------------------------------------------------
    def _send_loop(self) -> None:
        """Requests to the core, one write for whatever queued meanwhile (never on the event
        loop: a full pipe would block it)."""
        while True:
            msg = self._outgoing.get()
            batch = [msg]
            while not self._outgoing.empty():
                batch.append(self._outgoing.get())
            stop = None in batch
            batch = [m for m in batch if m is not None]
            try:
                if batch:
                    self._to_core.send(batch)
            except OSError:  # the core is gone
                return
            if stop:
                self._to_core.close()
                return

    def _read_loop(self) -> None:
        """Outputs from the core: this thread only waits for a step's message (no GIL held)
        and hands its bytes to the event loop, where one callback unpickles it and grows
        every stream it names; the GIL changes hands once per step, not once per output."""
        while True:
            try:
                data = self._from_core.recv_bytes()
            except (EOFError, OSError):
                break
            if not self._hand_to_loop(data):  # no event loop yet, or it is closed: take it here
                self._dispatch(data, None)
        with self._lock:
            self._gone = True
        self._fail_all("the engine process exited")

    def _hand_to_loop(self, data: bytes) -> bool:
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._dispatch, data, loop)
            return True
        except RuntimeError:  # closed
            return False

    def _dispatch(self, data: bytes, loop: asyncio.AbstractEventLoop | None) -> None:
        """On `loop`'s thread (or the reader's, with None): grow and feed the streams."""
        deltas, self._stats = pickle.loads(data)
        with self._lock:  # once per step: who each delta is for; the finished are forgotten
            streams = [self._streams.get(d[0]) for d in deltas]
            for d in deltas:
                if d[1]:
                    self._streams.pop(d[0], None)
        for stream, delta in zip(streams, deltas):
            if stream is None:
                continue
            if stream._loop is loop:
                stream.grow(delta)
            else:
                stream.grow_threadsafe(delta)

    def _fail_all(self, error: str) -> None:
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.grow_threadsafe(failed_delta(stream.request_id, len(stream.output.outputs), error))
