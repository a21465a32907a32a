"""The live proxy: an aiohttp server in front of vLLM replicas, driving the router.

Design (DESIGN.md §5, issue 5 §1-4)
-----------------------------------
`ProxyServer` is one aiohttp application (uvloop when `pylb serve` runs it) with one pool of
keep-alive connections towards the replicas (`pylb.proxy.upstream`, for routed and forwarded
requests; an aiohttp client session only gathers /v1/models), one `Dispatcher` (the only caller
of the router) and one `Fleet` (health probes, passive ejection, metrics scraping). aiohttp sets TCP_NODELAY on
both the server's and the client's sockets, so no streamed chunk waits for Nagle's algorithm.

Routes:
    POST /v1/completions, /v1/chat/completions   routed by the router (below)
    GET  /v1/models                              merged from the healthy replicas (by model id)
    *    /v1/*                                   forwarded to a healthy replica, in turn
    GET  /health                                 pylb is up (always 200 while serving)
    GET  /ready                                  200 when at least one replica is healthy, else 503
    GET  /metrics                                pylb's own `pylb_*` series (Prometheus text)
    POST /admin/cache/false-hit                  with the semantic cache on (`pylb.cache`, one call in `_generate`)
    anything else                                404, OpenAI-style JSON error

A routed request: read the body (413 past `server.max_body_bytes`), parse it into a
`RoutingRequest` (`pylb.router.request`; 400 naming the field), answer 503 with `Retry-After` when
no replica is healthy, submit it to the router (429 when pylb's queue is full) and wait for its
dispatch (504 after `router.queue_timeout_s`). Then send the body *as received* to the replica,
with the client's headers minus hop-by-hop ones, and `x-request-id` (the client's, or a new one).

Responses. Streamed answers (`stream: true`, 200, `text/event-stream`) are passed through chunk by
chunk as they arrive, without re-encoding. The response head is sent to the client together with
the first chunk, so until the first byte reaches the client the request can still be retried.
The first chunk is the request's first-token event (`router.on_first_token`). After it, the
stream is spliced: each piece read from the replica is written to the client's socket from the
upstream connection's data callback (`_Splice`), with no task switch per chunk, and the replica
is paused while the client's socket buffer is full. Other answers
(non-streamed, or errors) are read whole and sent with their status and headers. Every response
carries `x-pylb-replica` (the replica's base URL) and `x-request-id`.

Non-streamed requests and prefill. vLLM sends nothing of a non-streamed answer until it is
complete, so pylb cannot see when its prefill ended. Two ways were possible: turn the request into
a streamed one upstream and re-assemble the JSON answer, or estimate. pylb estimates: it fires
the first-token event at dispatch + prompt tokens x the replica's per-token prefill time, the one
the router learns from first tokens (`pylb.router.ttft`, seeded with `router.prefill_s_per_token`),
or at completion when that comes first. Reasons: the body and the answer stay byte-exact (a
re-assembled answer would have to reproduce every field vLLM may add -- logprobs, tool calls,
reasoning content, prompt logprobs, kv_transfer_params -- and follow every vLLM release); the
event only releases the router's dispatch budget, where an estimate errs by at most the request's
own prefill; and TTFT matters to streaming clients, whose first token pylb sees exactly. The
router learns its prefill speed from streamed requests only (a non-streamed client cannot
observe TTFT anyway).

Usage. `router.on_complete` gets the `usage` object of the answer: the JSON body's, or, for a
stream, the last `usage` in its final events (clients ask for it with
`stream_options.include_usage`). When a stream carries none, pylb passes an estimate: the
request's estimated prompt tokens, one completion token per SSE data event, 0 cached tokens.

Retries. A request is retried on another replica only before its first byte reached the client:
when the connection to the replica fails or times out, when the replica answers with a status in
`upstream.retry_statuses` (502, 503, 504), or when a stream breaks before its first chunk. The
failed attempt is completed in the router with `usage=None`, the replica is reported to the
fleet (a connection error ejects it at once by default, 5xx answers after a few), and the same
`RoutingRequest` (same id, same arrival) is submitted again -- through the router's optional
`retry(request, failed_replica, now)` hook when it has one, so that it goes to the request's other
candidate; otherwise with `submit`, and the router places it among the replicas in rotation (an
ejected replica is no longer among them). At most
`upstream.max_retries` retries, none starting later than `upstream.retry_deadline_s` after
arrival; after that the last answer is forwarded (or 502 when there was none).

Faults. A replica that fails mid-stream ends that stream with vLLM's in-stream error event
(`data: {"error": ...}` then `data: [DONE]`); other requests are untouched. A client that goes
away cancels its handler (aiohttp handler cancellation), which closes the upstream connection, so
vLLM aborts the request and frees its KV blocks; a request abandoned while queued is withdrawn
from the router. Every request is counted once in `pylb_requests_total` with its final status
(499 when the client left, 502 for a stream that broke after its head was sent). A client that
closes once it has a stream's `data: [DONE]` event (or every byte of the replica's answer), before
pylb wrote the chunked body's last chunk, left with the whole answer: a 200, completed in the
router with the stream's usage.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import ssl
import sys
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from pylb.config import ConfigError, Settings
from pylb.observability.logging import ACCESS_LOGGER, request_id_var
from pylb.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pylb.observability.metrics import ProxyMetrics, ProxySnapshot
from pylb.router.interface import Dispatch, Router, RoutingRequest, Usage
from pylb.router.request import CHAT, COMPLETIONS, RequestError, build_request, parse_json_body

from .balancer import Balancer
from .balancer import create_router as create_router  # re-exported: `pylb serve`, tests and bench build routers from here
from .errors import NoReplica, ProxyError, UpstreamFailed, error_response, sse_error_event
from .guard import BodyBudget, ConnectionGuard, fit_to_descriptors, read_body, target_problem
from .upstream import UpstreamPool, UpstreamResponse

if TYPE_CHECKING:
    from pylb.cache.cache import SemanticCache

log = logging.getLogger("pylb.proxy")
access_log = logging.getLogger(ACCESS_LOGGER)

HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade")
)
"""Headers that concern one connection only (RFC 9110 §7.6.1) and are never forwarded."""

_REQUEST_SKIP = HOP_BY_HOP | {"host", "content-length", "expect", "content-encoding"}  # pylb forwards bodies decoded
_RESPONSE_SKIP = HOP_BY_HOP | {"content-length"}

UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, OSError, asyncio.TimeoutError)
"""Exceptions that mean the exchange with a replica failed."""

CLIENT_HIGH_WATER = 256 * 1024
"""Bytes waiting in a client's socket buffer above which pylb stops reading the replica's stream."""

CLIENT_LOW_WATER = 64 * 1024
"""... and below which it reads again."""

_CLEANUP_GRACE_S = 1.0
"""At shutdown, how long the requests cut at `server.shutdown_timeout_s` get to end (their error
event written, their connections closed)."""

def _strip(headers: CIMultiDictProxy[str] | CIMultiDict[str], skip: frozenset[str] | set[str]) -> CIMultiDict[str]:
    """A copy of `headers` without `skip` and without the headers the Connection header names."""
    extra = headers.get("Connection")
    if extra:
        skip = set(skip) | {h.strip().lower() for h in extra.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in skip:
            out.add(k, v)
    return out


def _strip_pairs(headers: Any, skip: frozenset[str] | set[str]) -> list[tuple[str, str]]:
    """(name, value) pairs of `headers` without `skip` and the headers the Connection header names."""
    pairs = headers.items() if hasattr(headers, "items") else headers
    out = []
    extra: set[str] | None = None
    for k, v in pairs:
        low = k.lower()
        if low in skip:
            if low == "connection":
                extra = {h.strip().lower() for h in v.split(",")}
            continue
        out.append((k, v))
    if extra:
        out = [(k, v) for k, v in out if k.lower() not in extra]
    return out


_REQUEST_SKIP_RAW = frozenset(h.encode() for h in _REQUEST_SKIP | {"x-request-id"})
_REQUEST_SKIP_RAW_AUTH = _REQUEST_SKIP_RAW | {b"authorization"}


def _raw_request_headers(raw: tuple[tuple[bytes, bytes], ...], request_id: str, skip: frozenset[bytes] = _REQUEST_SKIP_RAW) -> bytes:
    """The client's headers as an encoded block for the replica: hop-by-hop ones (and those the
    Connection header names), Host, Content-Length, Content-Encoding and Expect dropped (and
    those in `skip`), X-Request-Id set."""
    out = []
    extra: set[bytes] | None = None
    for k, v in raw:
        low = k.lower()
        if low in skip:
            if low == b"connection":
                extra = {h.strip().lower() for h in v.split(b",")}
            continue
        out.append(b"%s: %s\r\n" % (k, v))
    if extra:
        out = [line for line in out if line.split(b":", 1)[0].lower() not in extra]
    out.append(b"X-Request-Id: %s\r\n" % request_id.encode("latin-1", "replace"))
    return b"".join(out)


def usage_from_json(obj: Any) -> Usage | None:
    """`Usage` from an OpenAI `usage` object, None when absent or malformed."""
    if not isinstance(obj, dict):
        return None
    try:
        details = obj.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return Usage(int(obj["prompt_tokens"]), int(obj.get("completion_tokens") or 0), int(cached or 0))
    except (KeyError, TypeError, ValueError):
        return None


def usage_from_sse_tail(tail: bytes) -> Usage | None:
    """The last `usage` object in the final SSE events of a stream, None when there is none."""
    i = tail.rfind(b'"usage"')
    while i >= 0:
        start = tail.rfind(b"data:", 0, i)
        end = tail.find(b"\n", i)
        if start >= 0:
            try:
                obj = json.loads(tail[start + 5 : end if end >= 0 else len(tail)])
                u = usage_from_json(obj.get("usage")) if isinstance(obj, dict) else None
                if u is not None:
                    return u
            except ValueError:
                pass
        i = tail.rfind(b'"usage"', 0, max(start, 0))
    return None


@dataclass(slots=True)
class _Exchange:
    """Book-keeping of one request through its attempts."""

    rid: str
    endpoint: str
    t_start: float
    status: int = 0
    replica: str | None = None
    attempts: int = 0
    ttft: float | None = None
    error: str | None = None
    delivered: bool = False  # the client received the whole answer (it may close before its end)
    record: list[bytes] | None = None  # the streamed answer's pieces are appended here when set (the semantic cache)


class _Retry(Exception):
    """An attempt failed before the client got a byte: retry if allowed, else answer `response`."""

    def __init__(self, reason: str, message: str, response: web.StreamResponse | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.response = response


def client_ssl_context(ca_file: str, verify: bool) -> ssl.SSLContext:
    """The TLS context for https:// replicas: the system's CAs or `ca_file`'s; `verify` False
    skips the certificate and host name checks. Raises ConfigError for an unreadable CA file."""
    try:
        ctx = ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("upstream.ca_file", ca_file, f"cannot load CA certificates: {exc}") from None
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _ClientErrorLog(logging.LoggerAdapter):
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


def load_key_digests(keys: list[str], keys_file: str) -> frozenset[str]:
    """The SHA-256 hex digests of the accepted client keys: of `keys`, and the lines of
    `keys_file` (digests already; blank lines and # comments skipped). Raises ConfigError for a
    line that is not a digest."""
    digests = {hashlib.sha256(k.encode()).hexdigest() for k in keys}
    if keys_file:
        with open(keys_file, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.split("#", 1)[0].strip().lower()
                if not line:
                    continue
                if not re.fullmatch(r"[0-9a-f]{64}", line):
                    raise ConfigError("server.api_keys_file", keys_file, f"line {n} is not a SHA-256 hex digest (make one with: printf %s KEY | sha256sum)")
                digests.add(line)
    return frozenset(digests)


class ProxyServer:
    """pylb's HTTP proxy (see the module comment). Use `await start()` / `await stop()`, or
    `async with ProxyServer(settings) as proxy: ... proxy.url ...`.

    Without `router`, the router is `create_router(settings.router)`: the constructor raises
    ConfigError for an unknown policy, a bad policy option or router setting."""

    def __init__(self, settings: Settings, router: Router | None = None) -> None:
        self.settings = settings
        self.balancer = b = Balancer(settings, router)
        self.router, self.metrics, self.dispatcher, self.fleet, self.limits = b.router, b.metrics, b.dispatcher, b.fleet, b.limits
        self.cache = _create_cache(settings, self.metrics)
        self.kv = b.kv  # router.cache_state events: KV-event subscribers and engine keys
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._in_progress = 0
        self._turn = 0
        self._ids = 0
        self._id_prefix = uuid.uuid4().hex[:16]
        self._retry_after = b.retry_after
        self._retry_statuses = frozenset(settings.upstream.retry_statuses)
        self._eject_statuses = frozenset(settings.fleet.eject_statuses)
        self._skip_raw = _REQUEST_SKIP_RAW if settings.upstream.forward_authorization else _REQUEST_SKIP_RAW_AUTH
        self._key_digests = load_key_digests(settings.server.api_keys, settings.server.api_keys_file)
        self._admin_runner: web.AppRunner | None = None
        self.admin_port: int | None = None
        self._ssl = client_ssl_context(settings.upstream.ca_file, settings.upstream.tls_verify) if self._uses_tls() else None
        self.fleet.ssl = self._ssl
        self.fleet.on_eject = self._on_eject
        self._guard: ConnectionGuard | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._bodies = BodyBudget(settings.server.max_buffered_body_bytes)
        self._active = 0  # /v1/ requests being served
        self._draining = False  # stopping: /ready says 503, new /v1/ requests get 503
        self._cut = False  # the shutdown timeout passed: what is still open is cut
        self.metrics.attach(self.snapshot)

    def _uses_tls(self) -> bool:
        return any(u.startswith("https://") for u in self.settings.fleet.backends) or self.settings.discovery.scheme == "https"

    def _label(self, replica: str) -> str:
        """How clients see a replica: its base URL, or an opaque stable id (`server.expose_replicas`)."""
        if self.settings.server.expose_replicas:
            return replica
        return "replica-" + hashlib.sha256(replica.encode()).hexdigest()[:10]

    def _public(self, text: str, replica: str) -> str:
        """`text` for a client: the replica's address replaced by its label when hidden."""
        if self.settings.server.expose_replicas:
            return text
        label = self._label(replica)
        return text.replace(replica, label).replace(replica.split("://", 1)[-1], label)

    # ---- lifecycle ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (after start)."""
        if self._port is None:
            raise RuntimeError("proxy not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL of the proxy, e.g. http://127.0.0.1:8080 (OpenAI base_url: url + "/v1")."""
        return f"http://{self.settings.server.host}:{self.port}"

    def make_app(self) -> web.Application:
        """The aiohttp application (with /metrics, /health and /ready unless an admin listener serves them)."""
        app = web.Application(middlewares=[self._gate, self._edge], client_max_size=self.settings.server.max_body_bytes)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_route("*", "/v1/{tail:.*}", self._forward)
        if not self.settings.server.admin_port:
            self._add_admin_routes(app)
        return app

    def _add_admin_routes(self, app: web.Application) -> None:
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics_page)
        if self.cache is not None:
            self.cache.add_routes(app)

    async def _start_admin(self) -> None:
        """The admin listener (`server.admin_host`:`server.admin_port`): /metrics, /health, /ready."""
        ss = self.settings.server
        app = web.Application(middlewares=[self._edge])
        self._add_admin_routes(app)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=_CLEANUP_GRACE_S, keepalive_timeout=ss.keepalive_timeout_s)
        await runner.setup()
        site = web.TCPSite(runner, ss.admin_host, ss.admin_port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._admin_runner = runner
        self.admin_port = int(runner.addresses[0][1])

    async def start(self, reuse_port: bool = False) -> int:
        """Open the client session, probe the replicas, bind and serve; returns the port."""
        if self._runner is not None:
            raise RuntimeError("proxy already started")
        us, ss = self.settings.upstream, self.settings.server
        self._pool = UpstreamPool(us.connect_timeout_s, us.read_timeout_s, us.keepalive_s, ssl=self._ssl, max_idle=us.max_idle_per_replica)
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=us.keepalive_s, ssl=self._ssl if self._ssl is not None else True)
        self._session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=us.connect_timeout_s, sock_read=us.read_timeout_s or None),
        )
        try:
            await self.fleet.start()
            runner = web.AppRunner(
                self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=_CLEANUP_GRACE_S,
                keepalive_timeout=ss.keepalive_timeout_s, max_line_size=ss.max_header_bytes, max_field_size=ss.max_header_bytes,
                max_headers=ss.max_headers, auto_decompress=False, logger=_ClientErrorLog(logging.getLogger("pylb.proxy.client"), {}),
            )  # fmt: skip
            await runner.setup()
            assert runner.server is not None
            self._guard = ConnectionGuard(fit_to_descriptors(ss.max_connections), ss.header_timeout_s, ss.keepalive_timeout_s)
            try:
                loop = asyncio.get_running_loop()
                self._listener = await loop.create_server(
                    self._guard.wrap(runner.server), ss.host, ss.port, reuse_port=reuse_port or None, backlog=1024
                )
            except BaseException:
                self._guard.close()
                await runner.cleanup()
                raise
            if ss.admin_port:
                try:
                    await self._start_admin()
                except BaseException:
                    self._guard.close()
                    self._listener.close()
                    await runner.cleanup()
                    raise
        except BaseException:
            await self.fleet.stop()
            await self._session.close()
            await self._pool.close()
            self._session = None
            raise
        self._runner = runner
        self._port = int(self._listener.sockets[0].getsockname()[1])
        log.info("pylb serving", extra={"url": self.url, "policy": self.settings.router.policy, "backends": list(self.fleet.replicas)})
        return self._port

    async def stop(self) -> None:
        """Drain and close: /ready answers 503 and new connections are refused at once, queued
        requests get 503 with Retry-After, requests in flight may finish for
        `server.shutdown_timeout_s`; then what is still open is cut (a stream gets an error event,
        then its end) and every connection is closed. Returns within the timeout plus
        `_CLEANUP_GRACE_S`."""
        if self._runner is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.shutdown_timeout_s
        self._draining = True
        if self._listener is not None:
            self._listener.close()
        self._fail_queued()
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._active:
            self._cut = True
            if self._pool is not None:
                self._pool.abort_active("pylb is shutting down")
            grace = loop.time() + _CLEANUP_GRACE_S
            while self._active and loop.time() < grace:
                await asyncio.sleep(0.01)
        await self._runner.cleanup()
        self._runner = None
        if self._guard is not None:
            self._guard.close()
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        await self.fleet.stop()
        if self.kv is not None:
            await self.kv.stop()
        self.dispatcher.close()
        if self.cache is not None:
            await self.cache.close()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    RESTART_ONLY = (
        "server.host", "server.port", "server.workers", "server.admin_host", "server.admin_port", "router", "discovery",
        "fleet.discovery", "fleet.health_interval_s", "fleet.scrape_interval_s", "upstream.ca_file", "upstream.tls_verify", "logging",
    )  # fmt: skip
    """Settings (or whole sections) that `reload` cannot change while pylb runs."""

    async def reload(self, new: Settings) -> list[str]:
        """Apply `new` settings while serving (SIGHUP): the replica list (static discovery:
        new replicas are probed before they join, removed ones leave), health, ejection and
        scrape settings, upstream timeouts and retries, the client-side limits, API keys, the
        replica naming. Rejected as a whole, with ConfigError naming the first offending
        setting, when one in `RESTART_ONLY` differs or the keys file is bad; nothing is applied
        then. Returns the settings ("section.name") that changed."""
        old_d, new_d = self.settings.to_dict(), new.to_dict()
        changed = [f"{sec}.{k}" for sec in new_d for k in new_d[sec] if new_d[sec][k] != old_d[sec][k]]
        for key in changed:
            if key in self.RESTART_ONLY or key.split(".", 1)[0] in self.RESTART_ONLY:
                sec, name = key.split(".", 1)
                raise ConfigError(key, new_d[sec][name], "cannot change while pylb runs (restart pylb for it); nothing was reloaded")
        digests = load_key_digests(new.server.api_keys, new.server.api_keys_file)
        ss, us, fs = new.server, new.upstream, new.fleet
        self.settings = self.balancer.settings = new
        self.fleet.settings = fs
        self._key_digests = digests
        self._skip_raw = _REQUEST_SKIP_RAW if us.forward_authorization else _REQUEST_SKIP_RAW_AUTH
        self._retry_statuses = frozenset(us.retry_statuses)
        self._eject_statuses = frozenset(fs.eject_statuses)
        self._retry_after = self.balancer.retry_after = str(max(1, math.ceil(fs.health_interval_s * fs.healthy_threshold)))
        self._bodies.limit = ss.max_buffered_body_bytes
        if self._guard is not None:
            self._guard.max_connections = fit_to_descriptors(ss.max_connections)
            self._guard.header_timeout, self._guard.idle_timeout = ss.header_timeout_s, ss.keepalive_timeout_s
        if self._pool is not None:
            p = self._pool
            p.connect_timeout, p.read_timeout, p.keepalive, p.max_idle = us.connect_timeout_s, us.read_timeout_s, us.keepalive_s, us.max_idle_per_replica
        if "fleet.backends" in changed and fs.discovery == "static":
            await self.fleet.set_members({url.rstrip("/"): True for url in fs.backends})
        log.info("settings reloaded", extra={"changed": changed})
        return changed

    def _fail_queued(self) -> None:
        """Answer every request waiting in pylb's queue with 503 (pylb is stopping)."""
        for fut in list(self.balancer.queued):
            if not fut.done():
                fut.set_exception(NoReplica("pylb is shutting down; retry on another instance", headers={"Retry-After": self._retry_after}))

    def _on_eject(self, replica: str, reason: str) -> None:
        """The fleet took `replica` out of rotation. Ejected by its health probes (hung, or
        dead), its requests in flight that have been silent for as long as the probes took to
        decide fail now (before their first byte: retried elsewhere; mid-stream: an error event),
        instead of after `upstream.read_timeout_s`."""
        if reason == "probe" and self._pool is not None:
            fs = self.settings.fleet
            self._pool.expedite(replica, fs.health_interval_s * fs.unhealthy_threshold + fs.health_timeout_s)

    async def __aenter__(self) -> ProxyServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- state for /metrics -------------------------------------------------------------------------

    def snapshot(self) -> ProxySnapshot:
        """The live state behind pylb's state series."""
        return self.balancer.snapshot(self._in_progress)

    # ---- the error edge ---------------------------------------------------------------------------

    @web.middleware
    async def _gate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The client-side checks before anything else (`pylb.proxy.guard`): the request target
        (400 for anything but a clean origin-form path), and 503 for API requests while pylb
        stops; the connection guard's book-keeping around every request."""
        guard = self._guard
        if guard is not None:
            guard.started(request)
        api = request.path.startswith("/v1/")
        if api:
            self._active += 1
        try:
            problem = target_problem(request.raw_path)
            if problem is not None:
                self.metrics.count_request("other", 400)
                answer = error_response(400, problem, "path")
            elif api and self._key_digests and not self._authorized(request):
                self.metrics.count_request("other", 401)
                return error_response(401, "missing or invalid API key: send Authorization: Bearer <key>", None, {"WWW-Authenticate": "Bearer"})
            elif api and self._draining:
                self.metrics.count_request("other", 503)
                answer = error_response(503, "pylb is shutting down; retry on another instance", None, {"Retry-After": self._retry_after})
            else:
                return await handler(request)
            answer.force_close()  # and close the connection
            return answer
        finally:
            if api:
                self._active -= 1
            if guard is not None:
                guard.finished(request)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hashlib.sha256(key.strip().encode()).hexdigest() in self._key_digests

    @web.middleware
    async def _edge(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The one place where errors become HTTP answers (routed requests map their own, to log them)."""
        try:
            return await handler(request)
        except ProxyError as exc:
            self.metrics.count_request("other", exc.status)
            return error_response(exc.status, exc.message, exc.param, exc.headers)
        except web.HTTPNotFound:
            self.metrics.count_request("other", 404)
            return error_response(404, f"no such path: {request.path}")
        except web.HTTPMethodNotAllowed as exc:
            self.metrics.count_request("other", 405)
            return error_response(405, f"method {request.method} not allowed on {request.path}", headers={"Allow": ", ".join(sorted(exc.allowed_methods))})
        except web.HTTPRequestEntityTooLarge:
            self.metrics.count_request("other", 413)
            return error_response(413, f"request body larger than {self.settings.server.max_body_bytes} bytes", "body")
        except web.HTTPException as exc:
            self.metrics.count_request("other", exc.status)
            return error_response(exc.status, exc.reason or "error")
        except (asyncio.CancelledError, ConnectionResetError):
            raise  # the client went away: nothing to answer
        except Exception:
            self.metrics.count_request("other", 500)
            self.metrics.count_background_error("handler")
            log.exception("unhandled error while serving", extra={"path": request.path})
            return error_response(500, "internal error in pylb (logged)")

    # ---- routed requests ------------------------------------------------------------------------------

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT, "chat")

    def _request_id(self, request: web.Request) -> str:
        rid = request.headers.get("x-request-id")
        if not rid or len(rid) > 128 or not rid.isprintable():
            self._ids += 1
            rid = f"{self._id_prefix}{self._ids:08x}"
        if self.dispatcher.known(rid):  # a client reusing an id while the first is in flight
            self._ids += 1
            rid = f"{rid}.{self._ids}"
        return rid

    async def _generate(self, request: web.Request, kind: str, endpoint: str) -> web.StreamResponse:
        t_start = time.perf_counter()
        rid = self._request_id(request)
        token = request_id_var.set(rid)
        ex = _Exchange(rid, endpoint, t_start)
        self._in_progress += 1
        held = [0]
        try:
            body = await self._read_body(request, held)
            payload = parse_json_body(body)
            rreq = build_request(kind, payload, rid, self.dispatcher.now(), self.limits)
            if self.kv is not None:
                await self.kv.annotate(kind, payload, len(body), rreq)
            if self.cache is None:
                resp = await self._route(request, rreq, body, ex)
            else:  # the semantic cache answers, or calls the normal path (recording the answer)

                def route(record: list[bytes] | None) -> Awaitable[web.StreamResponse]:
                    ex.record = record
                    return self._route(request, rreq, body, ex)

                resp = await self.cache.serve(request, endpoint, payload, route)
            ex.status = ex.status or resp.status
            return resp
        except RequestError as exc:
            ex.status, ex.error = 400, exc.message
            return error_response(400, exc.message, exc.field, {"x-request-id": rid})
        except ProxyError as exc:
            ex.status, ex.error = exc.status, exc.message
            return error_response(exc.status, exc.message, exc.param, {**exc.headers, "x-request-id": rid})
        except asyncio.CancelledError:
            if not ex.delivered:
                ex.status, ex.error = 499, "client closed the connection"
            raise
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            # the client went away while pylb wrote to it: nothing to answer, nothing to log
            ex.status, ex.error = 499, "client closed the connection"
            return web.Response(status=499)
        except Exception as exc:
            ex.status, ex.error = 500, f"{type(exc).__name__}: {exc}"
            self.metrics.count_background_error("handler")
            log.exception("unhandled error while routing")
            return error_response(500, "internal error in pylb (logged)", headers={"x-request-id": rid})
        finally:
            self._bodies.give(held[0])
            self._in_progress -= 1
            e2e = time.perf_counter() - t_start
            self.metrics.count_request(endpoint, ex.status)
            self.metrics.observe_e2e(endpoint, e2e)
            if self.settings.logging.access_log and access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "status": ex.status,
                        "replica": ex.replica,
                        "attempts": ex.attempts,
                        "ttft_ms": round(ex.ttft * 1000, 3) if ex.ttft is not None else None,
                        "e2e_ms": round(e2e * 1000, 3),
                        **({"error": ex.error} if ex.error else {}),
                    },
                )
            request_id_var.reset(token)

    async def _read_body(self, request: web.Request, held: list[int]) -> bytes:
        ss = self.settings.server
        return await read_body(request, ss.max_body_bytes, ss.body_timeout_s, self._bodies, held)

    async def _route(self, request: web.Request, rreq: RoutingRequest, body: bytes, ex: _Exchange) -> web.StreamResponse:
        us = self.settings.upstream
        headers = _raw_request_headers(request.raw_headers, rreq.request_id, self._skip_raw)
        target = request.raw_path
        deadline = rreq.arrival + us.retry_deadline_s
        retries = 0
        failed: str | None = None
        while True:
            if not self.fleet.healthy:
                raise NoReplica("no healthy replica to serve the request; retry later", headers={"Retry-After": self._retry_after})
            d = await self._wait_dispatch(rreq, failed)
            ex.replica = d.replica
            ex.attempts += 1
            try:
                return await self._attempt(request, rreq, body, headers, d, target, ex)
            except _Retry as r:
                ex.error = r.message
                if self._cut:
                    raise NoReplica("pylb is shutting down; retry on another instance", headers={"Retry-After": self._retry_after}) from None
                if retries < us.max_retries and self.dispatcher.now() < deadline and self.fleet.healthy:
                    retries += 1
                    failed = d.replica
                    self.metrics.count_retry(r.reason)
                    log.info("retrying on another replica", extra={"replica": d.replica, "reason": r.reason, "error": r.message})
                    continue
                if r.response is not None:
                    return r.response
                if not self.fleet.healthy:
                    raise NoReplica(f"no healthy replica left ({r.message})", headers={"Retry-After": self._retry_after}) from None
                raise UpstreamFailed(self._public(f"the replica failed before answering: {r.message}", d.replica)) from None

    async def _wait_dispatch(self, rreq: RoutingRequest, failed_replica: str | None = None) -> Dispatch:
        return await self.balancer.wait_dispatch(rreq, failed_replica)

    async def _attempt(
        self, request: web.Request, rreq: RoutingRequest, body: bytes, headers: bytes, d: Dispatch, target: str, ex: _Exchange
    ) -> web.StreamResponse:
        """One attempt on replica `d.replica`; raises _Retry when it failed before the client got a byte."""
        assert self._pool is not None
        rid, replica = rreq.request_id, d.replica
        disp = self.dispatcher
        est_handle = self.balancer.estimate_first_token(rreq, replica)
        t_sent = time.perf_counter()
        done = False
        up: UpstreamResponse | None = None
        try:
            try:
                up = await self._pool.request(replica, "POST", target, headers, body)
            except UPSTREAM_ERRORS as exc:
                done = True
                raise self._failed(rid, replica, exc, "before the answer") from None
            status = up.status
            if rreq.stream and status == 200 and up.content_type == "text/event-stream":
                resp, done = await self._stream(request, rreq, up, replica, ex, t_sent)
                return resp
            try:
                data = await up.read()
            except UPSTREAM_ERRORS as exc:
                done = True
                raise self._failed(rid, replica, exc, "while reading the answer") from None
            resp = web.Response(status=status, body=data, headers=self._response_headers(up, rid, replica))
            if status >= 500:
                if status in self._eject_statuses:  # the replica says it cannot serve; a 500 answers this request only
                    self.fleet.report_5xx(replica, status)
                self.metrics.count_upstream_error(replica, "status")
                disp.complete(rid, replica, None)
                done = True
                if status in self._retry_statuses:
                    raise _Retry("status", f"replica {self._label(replica)} answered HTTP {status}", resp)
                return resp
            self.fleet.report_success(replica)
            if status == 200:
                disp.first_token(rid, replica)
                try:
                    usage = usage_from_json(json.loads(data.decode("utf-8")).get("usage"))
                except (ValueError, AttributeError):  # not JSON (UnicodeDecodeError is a ValueError)
                    usage = None
                disp.complete(rid, replica, usage)
            else:
                disp.complete(rid, replica, None)
            done = True
            return resp
        finally:
            if est_handle is not None:
                est_handle.cancel()
            if not done:  # cancelled (the client left) or an unexpected error: the replica's work is abandoned
                disp.complete(rid, replica, None)
            if up is not None:
                up.close()  # a no-op on a fully read answer; aborts an unfinished one upstream

    def _failed(self, rid: str, replica: str, exc: BaseException, when: str) -> _Retry:
        """Book-keeping of a failed exchange; returns the _Retry to raise."""
        kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect"
        self.dispatcher.complete(rid, replica, None)
        if not self._cut:  # pylb cut it while stopping: no evidence against the replica
            self.fleet.report_connect_error(replica, f"{type(exc).__name__}: {exc}")
            self.metrics.count_upstream_error(replica, kind)
        return _Retry(kind, self._public(f"replica {replica} failed {when}: {type(exc).__name__}: {exc}".rstrip(": "), replica))

    async def _stream(
        self, request: web.Request, rreq: RoutingRequest, up: UpstreamResponse, replica: str, ex: _Exchange, t_sent: float
    ) -> tuple[web.StreamResponse, bool]:
        """Pass an SSE stream through; returns (response, completed-in-router)."""
        rid = rreq.request_id
        disp = self.dispatcher
        try:
            first = await up.next_piece() or b""
        except UPSTREAM_ERRORS as exc:
            raise self._failed(rid, replica, exc, "before its first chunk") from None
        now = time.perf_counter()
        disp.first_token(rid, replica)
        ex.ttft = now - ex.t_start
        self.metrics.observe_ttft(ex.endpoint, ex.ttft)
        out = web.StreamResponse(status=up.status, headers=self._response_headers(up, rid, replica))
        await out.prepare(request)
        if not first:  # the stream ended at once, without its [DONE] event
            disp.complete(rid, replica, None)
            await self._end_truncated(out, replica, ex)
            return out, True
        await out.write(first)  # sends the head with it
        splice = _Splice(request.transport, up, out.headers.get("Transfer-Encoding", "").lower() == "chunked", first, ex.record)
        failed: BaseException | None = None
        try:
            await up.pipe(splice)
        except UPSTREAM_ERRORS as exc:
            failed = exc
        except asyncio.CancelledError:  # the client closed its connection (aiohttp cancels the handler)
            if splice.delivered:  # ... after the stream's last event: it has the whole answer
                self._stream_succeeded(rreq, replica, splice, ex)
            raise
        # the client has the whole answer when the stream's last event, `data: [DONE]`, reached
        # its socket; a stream that ends without it was cut short (a replica shutting down)
        whole = splice.delivered
        if not whole and splice.gone:  # the client went away mid-stream
            ex.status, ex.error = 499, "client closed the connection"
            disp.complete(rid, replica, None)
            return out, True  # the caller closes the upstream answer, which aborts it
        if whole:
            self._stream_succeeded(rreq, replica, splice, ex)
        elif failed is None:
            disp.complete(rid, replica, None)
            await self._end_truncated(out, replica, ex)
            return out, True
        elif self._cut:
            disp.complete(rid, replica, None)
            ex.status, ex.error = 503, "cut by pylb's shutdown"
            await out.write(sse_error_event(503, "pylb shut down before this stream ended"))
        else:
            self._failed(rid, replica, failed, "mid-stream")
            ex.status = 502  # counted and logged as failed, though the client saw a 200 head
            ex.error = f"replica failed mid-stream: {type(failed).__name__}: {failed}"
            await out.write(sse_error_event(502, self._public(f"the replica serving this stream failed: {type(failed).__name__}: {failed}".rstrip(": "), replica)))
        try:
            await out.write_eof()
        except ConnectionResetError:  # the client left before the body's last chunk
            if not whole:
                ex.status, ex.error = 499, "client closed the connection"
        return out, True

    async def _end_truncated(self, out: web.StreamResponse, replica: str, ex: _Exchange) -> None:
        """A stream the replica ended without `data: [DONE]`: an error for the client (an error
        event, then the end), counted as an upstream error of kind "truncated" (not held against
        the replica's health: a replica that is shutting down does this, and its probes tell)."""
        self.metrics.count_upstream_error(replica, "truncated")
        ex.status, ex.error = 502, "the replica ended the stream before its final event"
        try:
            await out.write(sse_error_event(502, "the replica ended this stream before its final event"))
            await out.write_eof()
        except ConnectionResetError:
            ex.status = 499

    def _stream_succeeded(self, rreq: RoutingRequest, replica: str, splice: _Splice, ex: _Exchange) -> None:
        """Book-keeping of a stream the client received whole: the replica answered well, the
        router completes the request with the stream's usage (or an estimate), status 200."""
        self.fleet.report_success(replica)
        usage = usage_from_sse_tail(splice.tail())
        if usage is None:
            usage = Usage(rreq.prompt_tokens, max(0, splice.events - 1), 0, reported=False)
        self.dispatcher.complete(rreq.request_id, replica, usage)
        ex.status, ex.delivered = 200, True

    def _response_headers(self, up: UpstreamResponse | aiohttp.ClientResponse, rid: str, replica: str) -> CIMultiDict[str]:
        h: CIMultiDict[str] = CIMultiDict(_strip_pairs(up.headers, _RESPONSE_SKIP))
        h["x-pylb-replica"] = self._label(replica)
        h["x-request-id"] = rid
        return h

    # ---- other paths -----------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        """The union of the healthy replicas' /v1/models, by model id (first replica wins)."""
        assert self._session is not None
        healthy = list(self.fleet.healthy)
        if not healthy:
            raise NoReplica("no healthy replica to list models from", headers={"Retry-After": self._retry_after})
        headers = _strip(request.headers, _REQUEST_SKIP)

        async def get(url: str) -> Any:
            assert self._session is not None
            timeout = aiohttp.ClientTimeout(total=self.settings.upstream.connect_timeout_s + self.settings.fleet.health_timeout_s)
            async with self._session.get(url + "/v1/models", headers=headers, timeout=timeout) as resp:
                data = await resp.read()
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                return json.loads(data)

        results = await asyncio.gather(*(get(u) for u in healthy), return_exceptions=True)
        merged: dict[str, Any] = {}
        ok = 0
        for url, res in zip(healthy, results):
            if isinstance(res, BaseException):
                if isinstance(res, asyncio.CancelledError):
                    raise res
                log.warning("listing models failed", extra={"replica": url, "error": f"{type(res).__name__}: {res}"})
                continue
            ok += 1
            for model in res.get("data", []) if isinstance(res, dict) else []:
                if isinstance(model, dict) and isinstance(model.get("id"), str):
                    merged.setdefault(model["id"], model)
        status = 200 if ok else 502
        self.metrics.count_request("models", status)
        if not ok:
            return error_response(502, "no replica answered /v1/models")
        return web.json_response({"object": "list", "data": list(merged.values())})

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        """Any other /v1/* request: forwarded to the healthy replicas in turn, streamed back, on
        the routed requests' connection pool (so with its resend of a stale connection)."""
        assert self._pool is not None
        healthy = list(self.fleet.healthy)
        if not healthy:
            raise NoReplica("no healthy replica to forward the request to", headers={"Retry-After": self._retry_after})
        self._turn += 1
        replica = healthy[self._turn % len(healthy)]
        rid = self._request_id(request)
        headers = _raw_request_headers(request.raw_headers, rid, self._skip_raw)
        held = [0]
        try:
            body = await self._read_body(request, held)
            try:
                up = await self._pool.request(replica, request.method, request.raw_path, headers, body)
            except UPSTREAM_ERRORS as exc:
                self.fleet.report_connect_error(replica, f"{type(exc).__name__}: {exc}")
                self.metrics.count_upstream_error(replica, "connect")
                raise UpstreamFailed(self._public(f"replica {replica} failed: {type(exc).__name__}: {exc}", replica)) from None
        finally:
            self._bodies.give(held[0])
        try:
            out = web.StreamResponse(status=up.status, headers=self._response_headers(up, rid, replica))
            await out.prepare(request)
            try:
                async for chunk in up:
                    await out.write(chunk)
            except UPSTREAM_ERRORS as exc:
                self.metrics.count_upstream_error(replica, "stream")
                log.warning("forwarded answer broke", extra={"replica": replica, "error": f"{type(exc).__name__}: {exc}"})
            await out.write_eof()
            self.metrics.count_request("other", up.status)
            return out
        finally:
            up.close()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.StreamResponse:
        healthy = len(self.fleet.healthy)
        ready = healthy > 0 and not self._draining
        body = {"ready": ready, "healthy_replicas": healthy, "replicas": len(self.fleet.replicas), **({"draining": True} if self._draining else {})}
        return web.json_response(body, status=200 if ready else 503)

    async def _metrics_page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


class _Splice:
    """The sink of a streamed answer: writes each piece from the replica straight to the client's
    transport, from the upstream connection's data callback (`UpstreamResponse.pipe`), in HTTP/1.1
    chunked framing when the response is chunked (aiohttp wrote the head and the first piece, and
    writes the last chunk at `write_eof`). This saves a task switch and aiohttp's write path per
    piece. It counts SSE events, keeps the last pieces (for the final `usage`), pauses the
    replica while the client's socket buffer is over `CLIENT_HIGH_WATER` and resumes it below
    `CLIENT_LOW_WATER`, and notes a client that went away (then aborts the upstream answer)."""

    __slots__ = ("transport", "up", "framed", "events", "c1", "c2", "c3", "gone", "record", "_loop")

    def __init__(self, transport: asyncio.Transport | None, up: UpstreamResponse, framed: bool, first: bytes, record: list[bytes] | None = None) -> None:
        self.transport = transport
        self.record = record  # every piece of the answer is appended here when given
        if record is not None:
            record.append(first)
        self.up = up
        self.framed = framed
        self.events = first.count(b"data:")
        self.c1 = self.c2 = b""
        self.c3 = first
        self.gone = transport is None
        self._loop = asyncio.get_running_loop()

    def __call__(self, piece: bytes) -> None:
        t = self.transport
        if self.gone or t is None or t.is_closing():
            if not self.gone:
                self.gone = True
                self.up.abort()
            return
        t.write(b"%x\r\n%s\r\n" % (len(piece), piece) if self.framed else piece)
        if self.record is not None:
            self.record.append(piece)
        self.events += piece.count(b"data:")
        self.c1, self.c2, self.c3 = self.c2, self.c3, piece
        if t.get_write_buffer_size() > CLIENT_HIGH_WATER:
            self.up.pause()
            self._loop.call_later(0.005, self._check)

    def _check(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or t.get_write_buffer_size() <= CLIENT_LOW_WATER:
            self.up.resume()
        else:
            self._loop.call_later(0.005, self._check)

    def tail(self) -> bytes:
        """The last three pieces, where a stream's final `usage` event is."""
        return self.c1 + self.c2 + self.c3

    @property
    def delivered(self) -> bool:
        """Whether the stream's last event, `data: [DONE]`, was written to the client."""
        return self.tail().rstrip().endswith(b"data: [DONE]")


def _create_cache(settings: Settings, metrics: ProxyMetrics) -> SemanticCache | None:
    """The semantic cache when `cache.enabled` (its series in the proxy's registry), else None."""
    if not settings.cache.enabled:
        return None
    from pylb.cache.cache import SemanticCache
    from pylb.cache.embedders import EmbedderError

    try:
        cache = SemanticCache(settings.cache)
    except (EmbedderError, RuntimeError) as exc:
        if isinstance(exc, EmbedderError):
            raise ConfigError("cache.embedder", settings.cache.embedder, str(exc)) from None
        raise ConfigError("cache.device", settings.cache.device, str(exc)) from None
    metrics.registry.register(cache.metrics)
    return cache

