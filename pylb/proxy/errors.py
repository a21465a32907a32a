"""Errors of the proxy, typed once, mapped to OpenAI-style JSON responses at one edge.

Every error a client can get from pylb itself is a `ProxyError` with its HTTP status; the
server's error middleware (`pylb.proxy.server`) turns it, `pylb.router.request.RequestError`
(400) and aiohttp's own HTTP exceptions into

    {"error": {"message": ..., "type": ..., "param": ..., "code": <status>}}

the shape vLLM and OpenAI use, so the `openai` SDK raises its matching exception class.
Errors a replica returns are forwarded unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    408: "RequestTimeoutError",
    413: "BadRequestError",
    415: "BadRequestError",
    429: "RateLimitError",
    499: "ClientClosedRequest",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}
"""The `type` of pylb's errors by HTTP status (vLLM's naming)."""


class ProxyError(Exception):
    """An error answered by pylb itself: `status`, `message`, optional `param` and headers."""

    status = 500

    def __init__(self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if status is not None:
            self.status = status


class QueueFull(ProxyError):
    """429: pylb's router-side queue is full."""

    status = 429


class NoReplica(ProxyError):
    """503: no replica is healthy; `Retry-After` says when to try again."""

    status = 503


class QueueTimeout(ProxyError):
    """504: the request waited in pylb's queue past the queue timeout."""

    status = 504


class UpstreamFailed(ProxyError):
    """502: every attempt to reach a replica failed before an answer."""

    status = 502


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI-style error object."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "InternalServerError"), "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> web.Response:
    """An OpenAI-style JSON error response."""
    return web.Response(
        status=status, body=json.dumps(error_body(status, message, param)).encode(), content_type="application/json", headers=headers
    )


def sse_error_event(status: int, message: str) -> bytes:
    """The SSE events that end a stream that failed after it started (vLLM's in-stream error)."""
    return b"data: " + json.dumps(error_body(status, message)).encode() + b"\n\ndata: [DONE]\n\n"
