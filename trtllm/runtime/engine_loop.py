"""`EngineLoop`: the engine stepping on its own thread, for many callers at once.

Callers (the `LLM` API, the HTTP server) submit requests from any thread or asyncio task
and read `RequestOutput`s from a `RequestStream`. The loop thread (an `EngineDriver`) is
the only one that touches the engine; submissions and aborts reach it through a queue, so
a slow reader never blocks a step, and a request that fails at admission fails alone.
"""
from __future__ import annotations

import asyncio
import queue
import threading

from trtllm.runtime.engine import Engine
from trtllm.runtime.engine_driver import EngineDriver
from trtllm.runtime.outputs import RequestOutput, failed_output
from trtllm.runtime.request_stream import OpenStreams, RequestStream, put_all
from trtllm.runtime.wire import AbortRequest, AddRequest, Stop


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue[list] = queue.SimpleQueue()  # lists of wire messages
        self._streams = OpenStreams()
        self._driver = EngineDriver(engine, self._deliver)
        self._thread = threading.Thread(target=self._run, name="trtllm-engine", daemon=True)
        self._thread.start()

    def submit(self, request: AddRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        """With request.streaming, the stream gets every step's progress; else only the end."""
        return self.submit_many([request], loop)[0]

    def submit_many(self, requests: list[AddRequest], loop: asyncio.AbstractEventLoop | None = None
                    ) -> list[RequestStream]:
        """Requests added together: no step runs between two of them. One whose id is in
        flight fails at once, alone."""
        streams, adds = [], []
        for add in requests:
            stream = RequestStream(add.request_id, loop)
            error = self._streams.open(stream)
            if error is None:
                adds.append(add)
            else:
                stream.put(failed_output(add.request_id, add.params.n, error, add.prompt, add.prompt_token_ids))
            streams.append(stream)
        if adds:
            self._inbox.put(adds)
        return streams

    def abort(self, request_id: str) -> None:
        self._inbox.put([AbortRequest(request_id)])

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._inbox.put([Stop()])
        self._thread.join(timeout)

    # -- the loop thread ---------------------------------------------------------------
    def _run(self) -> None:
        self._driver.run(self._receive)
        for stream in self._streams.close("the engine shut down"):  # submitted after the stop
            stream.put(failed_output(stream.request_id, 1, "the engine shut down"))

    def _receive(self, block: bool) -> list | None:
        try:
            return self._inbox.get(block)
        except queue.Empty:
            return None

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if outputs:
            streams = self._streams.route([o.request_id for o in outputs], [o.finished for o in outputs])
            put_all([(s, o) for s, o in zip(streams, outputs) if s is not None])
