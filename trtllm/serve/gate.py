"""The ASGI gate in front of every route: what is refused before the app sees a request.

In order: the API key (every route but /health; compared in constant time; never
logged), the body of a POST (content type JSON, at most `max_body_bytes`: 413 before the
rest is read), and the number of generation requests in flight (beyond
`max_concurrent_requests`, 429 at once, before the body is parsed or anything is
allocated). A plain ASGI middleware, not Starlette's BaseHTTPMiddleware, so streaming
responses and client disconnects pass through untouched.
"""
from __future__ import annotations

import asyncio
import hmac
import logging

from trtllm.serve.errors import RequestError
from trtllm.serve.metrics import ServerMetrics

log = logging.getLogger("trtllm.serve")

GENERATION_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"}
OPEN_PATHS = {"/health"}


async def send_error(send, err: RequestError, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = err.encode()
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Gate:
    def __init__(self, app, app_state, metrics: ServerMetrics, api_key: str | None, max_concurrent_requests: int,
                 max_body_bytes: int):
        self.app, self.state, self.metrics = app, app_state, metrics
        self._key = api_key.encode() if api_key else None
        self.max_concurrent, self.max_body = max_concurrent_requests, max_body_bytes
        self.in_flight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = GENERATION_PATHS.get(path)
        headers = dict(scope["headers"])  # lower-cased names; a repeated header: the last one
        if self._key is not None and path not in OPEN_PATHS and not self._authorized(headers):
            if endpoint:
                self.metrics.outcome(endpoint, "unauthorized")
            return await send_error(send, RequestError(
                401, "missing or invalid API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"),
                [(b"www-authenticate", b"Bearer")])
        if scope["method"] == "POST":
            err = self._check_headers(headers)
            body = None
            if err is None:
                body, err = await self._read_body(receive)
                if body is None and err is None:
                    return  # the client went away while sending its body
            if err is not None:
                if endpoint:
                    self.metrics.outcome(endpoint, "invalid")
                return await send_error(send, err)
            receive = _replay(body, receive)
        if endpoint is None:
            return await self.app(scope, receive, send)
        if self.state.stopping:
            self.metrics.outcome(endpoint, "rejected")
            return await send_error(send, RequestError(503, "the server is shutting down", code="shutting_down"))
        if self.in_flight >= self.max_concurrent:
            self.metrics.outcome(endpoint, "rejected")
            return await send_error(send, RequestError(
                429, f"the server is at its limit of {self.max_concurrent} concurrent requests; retry later",
                code="too_many_requests"), [(b"retry-after", b"1")])
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if not self.state.stopping:
                raise
            # past the shutdown grace period, stuck writing to a client that stopped reading
            log.warning("a %s response was cut off at shutdown", endpoint)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _authorized(self, headers: dict) -> bool:
        """`Authorization: Bearer KEY`: the scheme in any case (RFC 9110: schemes are
        case-insensitive; some clients send "bearer"), the key exactly."""
        scheme, _, key = headers.get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(key.lstrip(b" "), self._key)

    def _check_headers(self, headers: dict) -> RequestError | None:
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            shown = ctype.decode("latin-1")[:100] or "none"
            return RequestError(415, f"content type must be application/json, got {shown}", code="unsupported_media_type")
        length = headers.get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return RequestError(400, "content-length is not a number")
            if n > self.max_body:
                return _too_large(self.max_body)
        return None

    async def _read_body(self, receive) -> tuple[bytes | None, RequestError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", _too_large(self.max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _too_large(limit: int) -> RequestError:
    return RequestError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _replay(body: bytes, receive):
    """A receive() that gives the buffered body once, then the real channel (disconnects)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
