"""`RequestError`: a request the server refuses, as an HTTP status and OpenAI's error fields.

Raised by every check of serve/ (protocol.py, content_parts.py, media.py, gate.py, jobs.py, handler.py)
before any work reaches the engine; the app turns it into OpenAI's error JSON
(`{"error": {message, type, param, code}}`).
"""
from __future__ import annotations

import json


class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                             413: "invalid_request_error", 415: "invalid_request_error",
                             429: "rate_limit_error", 503: "service_unavailable"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")  # 405, 499, ...: the client's

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def encode(self) -> bytes:
        """The body as JSON bytes; ASCII, so no string in a message can fail to encode."""
        return json.dumps(self.body()).encode()
