"""The OpenAI-compatible HTTP app on an engine (`EngineClient`): an `EngineCoreClient` (the
engine in a process of its own: what `trtllm-serve` uses) or an `LLM` (the engine on a thread).

    app = build_app(llm, served_model_name="my-model", api_key=None, max_concurrent_requests=1024)
    uvicorn.run(app, host="127.0.0.1", port=8000)     # what `trtllm-serve` does

Routes: POST /v1/completions, POST /v1/chat/completions (JSON or SSE with stream=true),
GET /v1/models, GET /v1/models/{model}, GET /health (never behind the API key; 503 with
the reason while stopping or when the engine died),
GET /version, GET /metrics (Prometheus text). Every error, including FastAPI's own (bad
JSON, unknown route, wrong method), is OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}` with a 4xx status (a bug: 500, logged
with its traceback). The app does not own the engine: whoever built it shuts it down
(after the server has stopped); on shutdown the app aborts whatever requests are still
in flight.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from trtllm.runtime.client_protocol import EngineClient
from trtllm.serve.errors import RequestError
from trtllm.serve.gate import GENERATION_PATHS, Gate
from trtllm.serve.handler import Handler
from trtllm.serve.jobs import JobBuilder
from trtllm.serve.media import MediaPolicy
from trtllm.serve.metrics import ServerMetrics
from trtllm.serve.protocol import ChatCompletionRequest, CompletionRequest
from trtllm.serve.responses import ResponsesRequest

log = logging.getLogger("trtllm.serve")

DEFAULT_MAX_CONCURRENT_REQUESTS = 1024
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


def server_version() -> str:
    try:
        from importlib.metadata import version
        return version("trtllm")
    except Exception:
        return "0.1.0"


def build_app(llm: EngineClient, served_model_name: str, api_key: str | None = None,
              max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
              max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, tool_parser: str = "hermes",
              lora_modules: dict | None = None, media: MediaPolicy | None = None) -> FastAPI:
    """lora_modules: LoRA adapter name -> its LoRARequest (trtllm-serve --lora_modules): listed in
    /v1/models, and a request whose `model` is an adapter's name runs through it."""
    metrics = ServerMetrics(llm)
    jobs = JobBuilder(llm, served_model_name, lora_modules, media)
    handler = Handler(llm, served_model_name, metrics, tool_parser)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        yield
        app.state.stopping = True
        handler.abort_all()  # what the graceful period did not finish
        for _ in range(50):  # let the engine take the aborts while the event loop still runs
            if not llm.has_unfinished():
                break
            await asyncio.sleep(0.1)

    app = FastAPI(title="trtllm-serve", version=server_version(), lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions on the trtllm engine.")
    app.state.handler, app.state.metrics, app.state.stopping = handler, metrics, False

    def error(err: RequestError, request: Request) -> JSONResponse:
        endpoint = GENERATION_PATHS.get(request.url.path)
        if endpoint is not None:
            metrics.outcome(endpoint, "invalid" if err.status < 500 else "failed")
        return Response(err.encode(), status_code=err.status, media_type="application/json")

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return error(_from_validation(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.url.path}"
        elif exc.status_code == 405:
            detail = f"method {request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 400 and "parsing the body" in detail:  # FastAPI: undecodable, too deep, ...
            detail = "the request body could not be parsed as JSON (bad encoding or nesting)"
        return error(RequestError(exc.status_code, detail), request)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):  # Starlette logs the traceback after this
        return error(RequestError(500, "internal server error (the server log has the details)"), request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await handler.run(await jobs.completion_job(body), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await handler.run(await jobs.chat_job(body), request)

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        return await handler.run(await jobs.responses_job(body), request)

    def model_card(lora=None) -> dict:
        card = {"id": served_model_name, "object": "model", "created": created, "owned_by": "trtllm",
                "max_model_len": llm.limits.max_seq_len}
        if lora is not None:  # vLLM's card of an adapter: its base model as parent
            card.update(id=lora.lora_name, root=lora.lora_path, parent=served_model_name)
        return card

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()] + [model_card(lora) for lora in jobs.lora_modules.values()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        return model_card(jobs.check_model(model))

    @app.get("/health")
    async def health():
        reason = "the server is shutting down" if app.state.stopping else llm.dead_reason()
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return {"status": "ok"}

    @app.get("/version")
    async def version():
        return {"version": server_version()}

    @app.get("/metrics")
    async def prometheus():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(Gate, app_state=app.state, metrics=metrics, api_key=api_key, max_concurrent_requests=max_concurrent_requests,
                       max_body_bytes=max_body_bytes)
    return app


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 10.0,
               log_level: str = "info", access_log: bool = True, switch_interval: float | None = 0.001,
               sock: socket.socket | None = None) -> bool:
    """Serve `app` with uvicorn until SIGTERM/SIGINT (or `should_exit`); False if it never started.

    `sock`: a socket already bound to host:port (trtllm-serve binds before it loads the
    model, so a port in use fails at once); without it, uvicorn binds.

    On the signal: stop accepting connections; in-flight requests get `shutdown_timeout`
    seconds to finish; then their engine requests are aborted (streams end with
    finish_reason "abort"), and a response still stuck writing to a client that stopped
    reading is cancelled a few seconds later.

    `switch_interval` (seconds; None: Python's 5 ms): how long the engine thread can wait
    for the GIL while the event loop holds it. The engine's host work sits between GPU
    steps, so a long wait there idles the GPU; this sets it for the whole process."""
    import sys

    import uvicorn

    if switch_interval is not None:
        sys.setswitchinterval(switch_interval)

    class GracefulServer(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)  # listening from here on (uvicorn exits if it cannot)
            bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port  # port 0: the one given
            log.info("serving on http://%s:%d", f"[{host}]" if ":" in host else host, bound)

        async def shutdown(self, sockets=None):
            app.state.stopping = True
            timer = asyncio.get_running_loop().call_later(shutdown_timeout, app.state.handler.abort_all)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            timeout_graceful_shutdown=shutdown_timeout + 3, lifespan="on")
    server = GracefulServer(config)
    server.run(sockets=[sock] if sock is not None else None)
    return server.started


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "tuple"}


def _from_validation(exc: RequestValidationError) -> RequestError:
    errors = exc.errors()
    if not errors:
        return RequestError(400, "invalid request body")
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        why = (e.get("ctx") or {}).get("error", e.get("msg", ""))
        return RequestError(400, f"the request body is not valid JSON: {why}")
    if not loc:  # the body itself (a field that must be an object is named below)
        return RequestError(400, "the request body must be a JSON object")
    # a union reports one error per member type; name the field, not the member
    loc = [p for p in loc if p not in _TYPE_TAGS and "[" not in p]
    return RequestError(400, f"{'.'.join(loc)}: {e.get('msg', 'invalid value')}", param=loc[0] if loc else None)
