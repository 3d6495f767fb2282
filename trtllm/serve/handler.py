"""A checked `Job` (serve/jobs.py) run: its engine requests submitted, their outputs back to the
client as whole JSON or server-sent events (the bodies themselves: serve/render.py).

    response = await handler.run(job, request)

Outputs are read from each request's `RequestStream`; when a client reads slower than tokens
come, queued outputs are merged (each carries the whole text so far), so the event loop does
not fall behind and the engine thread never waits on a socket. A client that goes away (a
disconnect seen on the ASGI channel, or the response task cancelled) aborts its requests,
which frees their KV blocks.
"""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from trtllm.runtime.client_protocol import EngineClient
from trtllm.runtime.outputs import RequestOutput
from trtllm.runtime.request_stream import RequestStream
from trtllm.serve.errors import RequestError
from trtllm.serve.metrics import ServerMetrics
from trtllm.serve.render import ChunkEvents, Job, Renderer, dumps
from trtllm.serve.responses import ResponseEvents, response_object


class Handler:
    def __init__(self, llm: EngineClient, served_model_name: str, metrics: ServerMetrics, tool_parser: str = "hermes"):
        self.llm, self.metrics = llm, metrics
        self.active: dict[str, RequestStream] = {}
        self.render = Renderer(llm.tokenizer, served_model_name, tool_parser)

    # -- running -------------------------------------------------------------------------
    async def run(self, job: Job, request: Request) -> Response:
        reason = self.llm.dead_reason()
        if reason is not None:  # the engine process died: say so at once, as /health does
            raise RequestError(503, f"the engine is not running ({reason}); the server must be restarted",
                               code="engine_unavailable")
        lora = {}  # (the engine clients of before LoRA take no lora_request)
        if job.lora_request is not None:
            self.metrics.lora_requests.labels(job.lora_request.lora_name).inc()
            lora = {"lora_request": job.lora_request}
        if job.cache_salt is not None:
            lora["cache_salt"] = job.cache_salt
        if job.multimodal is not None:  # a chat's one prompt, with its images (and its adapter)
            streams = [self.llm.generate_async(job.prompts[0][1], job.params[0], streaming=job.stream,
                                               multimodal=job.multimodal, **lora)]
        else:
            streams = [self.llm.generate_async(ids, params, streaming=job.stream, **lora)
                       for (_, ids), params in zip(job.prompts, job.params)]
        for s in streams:
            self.active[s.request_id] = s
        headers = {}
        client_id = request.headers.get("x-request-id")
        if client_id and len(client_id) <= 128 and client_id.isprintable():
            headers["x-request-id"] = client_id
        run = _Run(self, job, streams)
        if job.stream:
            headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
            # the response's own finally, too: its body iterator may be cancelled before it starts
            return _EventStream(self._sse(job, run, request), run.finish, media_type="text/event-stream",
                                headers=headers)
        return await self._whole(job, run, request, headers)

    def abort_all(self) -> None:
        for request_id in list(self.active):
            self.llm.abort(request_id)
        self.active.clear()

    async def _watch(self, request: Request, streams, gone: asyncio.Event) -> None:
        """Abort the job's requests when the client disconnects."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                gone.set()
                for s in streams:
                    self.llm.abort(s.request_id)
                return

    async def _whole(self, job: Job, run: _Run, request: Request, headers: dict) -> Response:
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(self._watch(request, run.streams, gone))
        last = run.last
        try:
            async for i, out in _merged(run.streams):
                last[i] = out
                run.stats.update(i, out)
            if gone.is_set():
                return Response(status_code=499)
            error = next((o for o in last.values() if o.error), None)
            if error is not None:
                run.outcome = "failed" if _internal(error) else "invalid"
                err = RequestError(500 if _internal(error) else 400, error.error)
                return Response(err.encode(), status_code=err.status, media_type="application/json")
            run.outcome = "aborted" if _any_aborted(last.values()) else "success"
            if job.endpoint == "responses":
                body = response_object(job, self.render.model(job), last[0].outputs[0].text, last[0], "completed",
                                       self.render.tool_parser)
            else:
                body = self.render.whole_body(job, [last[i] for i in range(len(run.streams))])
            return Response(dumps(body), media_type="application/json", headers=headers)
        finally:
            watcher.cancel()
            run.finish()

    async def _sse(self, job: Job, run: _Run, request: Request):
        streams, last, stats = run.streams, run.last, run.stats
        gone = asyncio.Event()
        watcher = asyncio.ensure_future(self._watch(request, streams, gone))
        writer = ResponseEvents(job, self.render.model(job), self.render.tool_parser) if job.endpoint == "responses" else \
            ChunkEvents(self.render, job, len(streams))
        try:
            yield writer.opening()
            failed = None
            async for i, out in _merged(streams):
                last[i] = out
                stats.update(i, out)
                if out.error:
                    failed = out
                    break
                events = writer.output(i, out)
                if events:
                    yield events
            if failed is not None:
                run.outcome = "failed" if _internal(failed) else "invalid"
                yield writer.failed(500 if _internal(failed) else 400, failed.error)
            else:
                run.outcome = "aborted" if gone.is_set() or _any_aborted(last.values()) else "success"
                yield writer.closing(last)
        finally:
            watcher.cancel()
            run.finish()

    # -- OpenAI shapes -------------------------------------------------------------------

class _Run:
    """One job in flight: its streams, their latest outputs, and the end of it (once)."""

    def __init__(self, handler: Handler, job: Job, streams: list[RequestStream]):
        self.handler, self.job, self.streams = handler, job, streams
        self.last: dict[int, RequestOutput] = {}
        self.stats = _Stats(job.arrival, len(streams), job.stream)
        self.outcome = "aborted"  # unless the response says otherwise
        self.done = False

    def finish(self) -> None:
        """Abort what has not finished, forget the streams, count the outcome. Idempotent."""
        if self.done:
            return
        self.done = True
        for i, s in enumerate(self.streams):
            self.handler.active.pop(s.request_id, None)
            if i not in self.last or not self.last[i].finished:
                self.handler.llm.abort(s.request_id)
        self.stats.record(self.handler.metrics, self.job.endpoint, self.outcome, self.last)


class _EventStream(StreamingResponse):
    """A StreamingResponse that runs `on_close` however it ends (done, client gone, cancelled)."""

    def __init__(self, content, on_close, **kw):
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Stats:
    """Per-request timings for the latency histograms."""

    def __init__(self, arrival: float, num_streams: int, streaming: bool):
        self.arrival, self.streaming = arrival, streaming
        self.first = [None] * num_streams
        self.latest = [arrival] * num_streams

    def update(self, i: int, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self.first[i] is None and any(c.token_ids for c in out.outputs):
            self.first[i] = now
        self.latest[i] = now

    def record(self, metrics: ServerMetrics, endpoint: str, outcome: str, last: dict[int, RequestOutput]) -> None:
        metrics.outcome(endpoint, outcome)
        for i, out in last.items():
            generated = sum(len(c.token_ids) for c in out.outputs)
            metrics.prompt_tokens.inc(len(out.prompt_token_ids))
            metrics.cached_tokens.inc(out.num_cached_tokens)
            metrics.generation_tokens.inc(generated)
            if self.first[i] is None or not out.finished:
                continue
            metrics.e2e.observe(self.latest[i] - self.arrival)
            if not self.streaming:  # only the final output came: no per-token timings
                continue
            metrics.ttft.observe(self.first[i] - self.arrival)
            longest = max(len(c.token_ids) for c in out.outputs)
            if longest > 1:
                metrics.tpot.observe((self.latest[i] - self.first[i]) / (longest - 1))



def _internal(out: RequestOutput) -> bool:
    """An engine failure (not the request's fault): tokens already came, or the engine says so
    (an internal error, NaN logits, the engine process gone or shut down)."""
    error = out.error or ""
    return any(c.token_ids for c in out.outputs) or any(w in error for w in ("internal", "NaN", "engine"))


def _any_aborted(outs) -> bool:
    return any(c.finish_reason == "abort" for o in outs for c in o.outputs)


async def _outputs(stream: RequestStream):
    """A stream's outputs; those queued behind the first are merged into the latest."""
    while True:
        out = await stream.next_merged(live=True)  # read at once, before the next await
        yield out
        if out.finished:
            return


async def _merged(streams: list[RequestStream]):
    """(stream index, output) from several streams as they come, until all finished."""
    if len(streams) == 1:
        async for out in _outputs(streams[0]):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        async for out in _outputs(s):
            queue.put_nowait((i, out))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        finished: set[int] = set()  # by index: a live output can be queued twice, finished both times
        while len(finished) < len(streams):
            i, out = await queue.get()
            if out.finished:
                finished.add(i)
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
