"""The client side's limits: connections, time to send a request, request targets, bodies.

Design
------
pylb faces clients it does not trust; none of them may hold resources that others need. Every
limit is a `server.*` setting (`pylb.config`); this module enforces them at the edge, before a
request reaches routing.

Connections (`ConnectionGuard`). Each accepted connection is wrapped in a `_Guarded` protocol
in front of aiohttp's own handler, which notes when the connection last finished a request and
when the first byte of the next one arrived. One sweep every `tick` seconds closes

    a connection whose request head (request line and headers) has been arriving for longer
    than `server.header_timeout_s`  -- after a `408` answer (slow headers, "slowloris");
    a connection idle longer than `server.keepalive_timeout_s` (keep-alive, or never used).

The request body is bounded in time by `read_body` (`server.body_timeout_s`, 408). At most
`server.max_connections` client connections are open: a new one beyond that closes the
longest-idle connection (no request in progress) to make room, as nginx reuses keep-alive
connections, and when every connection is busy it gets `503` and is closed. So idle or
half-open connections can never take the descriptors that working clients need (the limit is
also lowered to fit the process's descriptor limit, `fit_to_descriptors`).

Request targets (`target_problem`). Only origin-form targets (`/path?query`) are accepted; an
absolute-form (`http://host/path`) or authority-form target is a 400, as is a path with a `.` or
`..` segment, an empty segment (`//`), or an encoded `/`, `\\`, NUL or control character
(`%2e%2e`, `%2f`). So a path aiohttp routed under `/v1/` is the path the replica sees.

Bodies (`read_body`). The body is read piece by piece: 413 as soon as it passes
`server.max_body_bytes` (a declared Content-Length beyond it fails before reading), 408 past
`server.body_timeout_s`, and the bytes of all bodies held at once are bounded by
`server.max_buffered_body_bytes` (503 with Retry-After beyond it). aiohttp's own decompression
is off: a `Content-Encoding` of gzip or deflate is decoded here, bounded by `max_body_bytes` of
decoded bytes (a "zip bomb" stops there: 413), an invalid one is a 400 and any other encoding a
415; the body forwarded to the replica is the decoded one, without the header.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import resource
import sys
import zlib
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from aiohttp import web

from .errors import ProxyError, error_body

log = logging.getLogger("pylb.proxy")

_TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
_BUSY_503 = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nRetry-After: 1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


def _raw_answer(template: bytes, status: int, message: str) -> bytes:
    body = json.dumps(error_body(status, message)).encode()
    return template % (len(body), body)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one client connection, with the guard's book-keeping in front."""

    __slots__ = ("guard", "inner", "transport", "busy", "idle_since", "head_since", "refused")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.busy = 0
        self.idle_since = 0.0
        self.head_since: float | None = None  # when the first byte of a request head arrived
        self.refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.idle_since = self.guard.loop.time()
        if not self.guard.admit(self):
            self.refused = True
            transport.write(_raw_answer(_BUSY_503, 503, "pylb has too many open connections; retry later"))  # type: ignore[attr-defined]
            transport.close()
            return
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            return  # refused at admission: aiohttp never saw it
        self.guard.forget(self)
        self.inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self.head_since is None:
            self.head_since = self.guard.loop.time()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    """Bounds the client connections: how many, how long idle, how long to send a request head
    (see the module comment). `wrap(factory)` is the protocol factory to listen with; the
    server's first middleware calls `started(request)` and `finished(request)` around each request."""

    def __init__(self, max_connections: int, header_timeout: float, idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.conns: dict[Any, _Guarded] = {}
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0
        self.loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self.tick = max(0.05, min(1.0, header_timeout / 4, idle_timeout / 4))

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory that guards each connection `factory` serves."""

        def make() -> asyncio.Protocol:
            return _Guarded(self, factory())

        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.tick, self._sweep)
        return make

    def close(self) -> None:
        """Stop the sweeps."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    @property
    def open_connections(self) -> int:
        return len(self.conns)

    def admit(self, g: _Guarded) -> bool:
        if len(self.conns) >= self.max_connections:
            idle = [c for c in self.conns.values() if not c.busy and c.head_since is None]
            if not idle:
                self.refused += 1
                if self.refused == 1 or self.refused % 1000 == 0:
                    log.warning("client connection refused: every connection is busy", extra={"max_connections": self.max_connections, "refused": self.refused})
                return False
            oldest = min(idle, key=lambda c: c.idle_since)
            self.evicted += 1
            self._close(oldest)
        self.conns[g.transport] = g
        return True

    def forget(self, g: _Guarded) -> None:
        if self.conns.get(g.transport) is g:
            del self.conns[g.transport]

    def started(self, request: web.Request) -> None:
        """A request's head is in (called by the server's first middleware)."""
        g = self.conns.get(request.transport)
        if g is not None:
            g.busy += 1
            g.head_since = None

    def finished(self, request: web.Request) -> None:
        """The request's answer is written."""
        g = self.conns.get(request.transport)
        if g is not None:
            g.busy = max(0, g.busy - 1)
            g.idle_since = self.loop.time()
            g.head_since = None

    def _close(self, g: _Guarded, answer: bytes = b"") -> None:
        t = g.transport
        self.forget(g)
        if t is not None and not t.is_closing():
            if answer:
                t.write(answer)
            t.close()

    def _sweep(self) -> None:
        self._sweeper = self.loop.call_later(self.tick, self._sweep)
        now = self.loop.time()
        for g in list(self.conns.values()):
            if g.busy:
                continue
            if g.head_since is not None:
                if now - g.head_since > self.header_timeout:
                    self.timed_out += 1
                    self._close(g, _raw_answer(_TIMEOUT_408, 408, f"the request head did not arrive within {self.header_timeout:g} s"))
            elif now - g.idle_since > self.idle_timeout:
                self._close(g)


def fit_to_descriptors(max_connections: int, reserve: int = 64) -> int:
    """`max_connections`, lowered when the process's descriptor limit cannot hold that many
    client connections plus one upstream connection each and `reserve` more (the soft limit is
    first raised to the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or hard > soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_connections
    fit = max(8, (soft - reserve) // 2)
    if fit < max_connections:
        log.warning("server.max_connections lowered to fit the descriptor limit", extra={"max_connections": max_connections, "used": fit, "nofile": soft})
        return fit
    return max_connections


# ---- request targets ----------------------------------------------------------------------------------

_BAD_DECODED = re.compile(rb"[\x00-\x1f\x7f/\\]")


def target_problem(raw_target: str) -> str | None:
    """Why a request target may not be served (None when it may): only origin-form targets whose
    path has no `.`/`..`/empty segment and no encoded separator or control character."""
    if not raw_target.startswith("/"):
        return "the request target must be a path (origin-form, e.g. /v1/completions), not an absolute URL"
    path = raw_target.split("?", 1)[0]
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        decoded = unquote_to_bytes(seg)
        if decoded in (b".", b".."):
            return "the path may not contain . or .. segments"
        if not decoded and i < len(segments) - 1:
            return "the path may not contain empty segments (//)"
        if _BAD_DECODED.search(decoded):
            return "the path may not contain encoded separators or control characters"
    return None


# ---- bodies -------------------------------------------------------------------------------------------


class BodyBudget:
    """The bytes of request bodies held at once, bounded by `limit` (see `read_body`)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


DECODABLE = ("gzip", "x-gzip", "deflate")


async def read_body(request: web.Request, max_bytes: int, timeout: float, budget: BodyBudget, held: list[int]) -> bytes:
    """The request's body, decoded (see the module comment). Raises ProxyError: 413 past
    `max_bytes`, 408 past `timeout`, 503 when `budget` is spent, 400 for an invalid encoding, 415
    for one pylb cannot decode. The bytes taken from `budget` are added to `held[0]`; the caller
    gives them back when the request ends."""
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity", *DECODABLE):
        raise ProxyError(f"Content-Encoding {encoding[:40]!r} is not supported; send identity, gzip or deflate", param="Content-Encoding", status=415)
    declared = request.content_length
    if declared is not None and declared > max_bytes:
        raise ProxyError(f"request body larger than {max_bytes} bytes", param="body", status=413)

    def take(n: int) -> None:
        if not budget.take(n):
            raise ProxyError("pylb holds too many request bodies at once; retry later", status=503, headers={"Retry-After": "1"})
        held[0] += n

    async def read() -> bytes:
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > max_bytes:
                raise ProxyError(f"request body larger than {max_bytes} bytes", param="body", status=413)
            take(len(chunk))
            parts.append(chunk)

    try:
        raw = await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise ProxyError(f"the request body did not arrive within {timeout:g} s", param="body", status=408) from None
    if encoding in DECODABLE and raw:
        return _decode(raw, encoding, max_bytes, take)
    return raw


def _decode(raw: bytes, encoding: str, max_bytes: int, take: Callable[[int], None]) -> bytes:
    wbits = 16 + zlib.MAX_WBITS if encoding in ("gzip", "x-gzip") else zlib.MAX_WBITS
    d = zlib.decompressobj(wbits)
    try:
        out = d.decompress(raw, max_bytes + 1)
        if len(out) > max_bytes or d.unconsumed_tail:
            raise ProxyError(f"request body larger than {max_bytes} bytes once decoded", param="body", status=413)
        out += d.flush()
    except zlib.error as exc:
        raise ProxyError(f"the request body is not valid {encoding}: {exc}", param="body", status=400) from None
    if not d.eof:
        raise ProxyError(f"the request body is not valid {encoding}: it ends early", param="body", status=400)
    if len(out) > max_bytes:
        raise ProxyError(f"request body larger than {max_bytes} bytes once decoded", param="body", status=413)
    take(len(out))
    return out


class ClientErrorLog(logging.LoggerAdapter):
    """aiohttp's server logger: a malformed request is the client's problem, logged at info level
    as its error class and a short reason, never with the request's raw bytes (which hold its
    Authorization header and its prompt)."""

    _RAW = re.compile(r"(:\s*)?(b['\"]|\n).*", re.S)

    def log(self, level: int, msg: object, *args: object, exc_info: Any = None, **kwargs: Any) -> None:
        exc = exc_info if isinstance(exc_info, BaseException) else (sys.exc_info()[1] if exc_info else None)
        if exc is None:
            self.logger.log(min(level, logging.INFO), "client connection: %s", str(msg)[:120])
            return
        reason = self._RAW.sub("", str(getattr(exc, "message", "") or ""))[:120]
        self.logger.log(min(level, logging.INFO), "malformed or broken client request", extra={"error": f"{type(exc).__name__}: {reason}".rstrip(": ")})
