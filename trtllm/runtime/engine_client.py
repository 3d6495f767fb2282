"""`EngineCoreClient`: what a server asks of an engine (`EngineClient`), with the engine in
a child process (trtllm/runtime/engine_core.py; the messages: trtllm/runtime/wire.py).
Each request's output is a `MirrorStream` the client grows from the core's per-step deltas.

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
import os
import pickle
import queue
import signal
import threading

from trtllm.lora_request import LoRARequest
from trtllm.runtime.engine_core import core_main
from trtllm.runtime.engine_limits import check_cache_salt, validate_request
from trtllm.runtime.engine_stats import EngineStats
from trtllm.runtime.multimodal_inputs import Processor, check_image_tokens
from trtllm.runtime.outputs import new_output
from trtllm.runtime.request_stream import MirrorStream, OpenStreams, RequestStream, new_request_id
from trtllm.runtime.tokenizer import check_image_prompt_options, load_tokenizer, tokenize_prompt
from trtllm.runtime.wire import AbortRequest, AddRequest, BuildFailed, Ready, StepDeltas, Stop
from trtllm.sampling_params import SamplingParams

log = logging.getLogger("trtllm")


class EngineCoreClient:
    """`EngineClient` (what a server asks of an engine, as `LLM` answers it) with the engine
    in a child process.

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
        self.limits, self.vocab_size, self._has_tokenizer, self._stats = \
            ready.limits, ready.vocab_size, ready.has_tokenizer, ready.stats
        # a multimodal model's image processing, here in the server's process (the checkpoint's processor)
        self.processor = Processor(None, tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None,
                                  self.tokenizer, ready.image_token_id)
        self._streams = OpenStreams()  # the event loop opens, the reader routes and closes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False  # shutdown() was called: the core's exit is expected
        self._dead_reason: str | None = None  # set when the core's pipe closes (new requests fail at once)
        self._outgoing: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="trtllm-core-sender", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name="trtllm-core-reader", daemon=True)
        self._sender.start()
        self._reader.start()

    def _kill(self) -> None:
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)

    def _wait_ready(self, timeout: float | None) -> Ready:
        waited = 0.0
        while not self._from_core.poll(1.0):
            waited += 1.0
            if not self._proc.is_alive():
                raise RuntimeError(f"{_exit_reason(self._proc.exitcode)} while starting")
            if timeout is not None and waited >= timeout:
                raise RuntimeError(f"the engine process was not ready after {timeout:.0f} s")
        try:
            msg = self._from_core.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"{_exit_reason(self._proc.exitcode)} while starting") from None
        if isinstance(msg, BuildFailed):
            raise RuntimeError(f"the engine could not be built: {msg.error}")
        return msg

    # -- requests ----------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.limits, self.vocab_size, self._has_tokenizer)
        if params.return_context_logits or params.return_generation_logits:
            raise ValueError("return_context_logits / return_generation_logits: logits are returned by the LLM "
                             "API only; the engine process sends tokens, not logits, over its pipes")

    def generate_async(self, prompt, sampling_params: SamplingParams | None = None,
                       streaming: bool = False, request_id: str | None = None,
                       lora_request: LoRARequest | None = None, multimodal=None,
                       cache_salt: str | None = None) -> RequestStream:
        """A RequestStream: `async for out in stream` (streaming) or `await stream.aresult()`.
        A LoRA adapter is checked by the engine process: a bad one fails the request there.
        multimodal: a processed prompt's images (`processor.process`), checked by the engine process."""
        params = sampling_params if sampling_params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if multimodal is not None:
            check_image_prompt_options(params)
        check_cache_salt(cache_salt)
        text, ids = tokenize_prompt(self.tokenizer, prompt, None if multimodal is not None else params)
        check_image_tokens(self.processor.image_token_id, multimodal, ids)
        request_id = request_id or new_request_id()
        self._loop = asyncio.get_running_loop()  # outputs are dispatched on it (one server, one loop)
        stream = MirrorStream(request_id, self._loop, new_output(request_id, text, ids, params))
        error = self._streams.open(stream)
        if error is not None:
            stream.fail(error)
        else:
            self._outgoing.put(AddRequest(request_id, ids, params, text, streaming, lora_request, multimodal,
                                          cache_salt))
        return stream

    def abort(self, request_id: str) -> None:
        self._outgoing.put(AbortRequest(request_id))

    def has_unfinished(self) -> bool:
        return bool(self._streams)

    def is_alive(self) -> bool:
        return self.dead_reason() is None

    def dead_reason(self) -> str | None:
        # the reader's reason first: it is set when the core's pipe closes, while the thread
        # itself still runs for a moment failing the open requests (a test saw it alive)
        if self._dead_reason is not None:
            return self._dead_reason
        if not self._proc.is_alive():
            return "the engine shut down" if self._stopping else _exit_reason(self._proc.exitcode)
        if not self._sender.is_alive():  # requests would queue forever: say so, as /health does
            return "the engine client's sender thread stopped"
        return None if self._reader.is_alive() else "the engine client's reader thread stopped"

    def engine_stats(self) -> EngineStats:
        """The counters the core sent with its latest step."""
        return self._stats

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop the core (open requests end with finish_reason "abort") and wait for it."""
        self._stopping = True
        if self._proc.is_alive():
            self._outgoing.put(Stop())
            self._proc.join(timeout)
        if self._proc.is_alive():
            log.error("the engine process did not stop in %.0f s; killing it", timeout)
            self._kill()
        atexit.unregister(self._kill)
        self._outgoing.put(None)
        self._reader.join(5)
        self._close("the engine shut down")

    def __enter__(self) -> EngineCoreClient:
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
            stop = any(m is None for m in batch)
            batch = [m for m in batch if m is not None]
            try:
                if batch:
                    self._to_core.send(batch)
            except OSError:  # the core is gone
                return
            except Exception:  # a message pickle cannot write (nothing was sent): fail it alone
                if not self._send_each(batch):
                    return
            if stop:
                self._to_core.close()
                return

    def _send_each(self, batch: list) -> bool:
        """The batch one message at a time; a request that cannot be pickled (e.g. a guide
        nested past the recursion limit) ends with an error, the rest go on. False: the core is gone."""
        for msg in batch:
            try:
                self._to_core.send([msg])
            except OSError:
                return False
            except Exception as e:
                if not isinstance(msg, AddRequest):
                    raise
                log.error("request %s could not be sent to the engine process: %s: %s", msg.request_id,
                          type(e).__name__, e)
                stream, = self._streams.route([msg.request_id], [True])
                if stream is not None:
                    stream.fail(f"internal error: the request could not be sent to the engine process "
                                f"({type(e).__name__})")
        return True

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
        if self._stopping:
            self._dead_reason = "the engine shut down"
        else:  # the core died under us (killed, out of memory, a crash): the server's log must say so
            self._proc.join(5)
            self._dead_reason = _exit_reason(self._proc.exitcode)
            log.error("%s: its requests failed and new requests fail at once", self._dead_reason)
        self._close(self._dead_reason)

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
        deltas: StepDeltas = pickle.loads(data)
        self._stats = deltas.stats
        streams = self._streams.route(deltas.request_ids, deltas.finished)  # the finished are forgotten
        for row, stream in enumerate(streams):
            if stream is None:
                continue
            if stream._loop is loop:
                stream.grow(deltas, row)
            else:
                stream.grow_threadsafe(deltas, row)

    def _close(self, error: str) -> None:
        """New requests fail at once from now on; those in flight end with `error`."""
        for stream in self._streams.close("the engine process is not running"):
            stream.fail(error)


def _exit_reason(exitcode: int | None) -> str:
    if exitcode is None:
        return "the engine process closed its pipe"
    if exitcode < 0:
        try:
            return f"the engine process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"the engine process was killed by signal {-exitcode}"
    return f"the engine process exited with code {exitcode}"
