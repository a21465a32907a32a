"""The live proxy: an aiohttp server in front of vLLM replicas, driving the router.

Design (docs/design.md §5)
--------------------------
`ProxyServer` is one aiohttp application (uvloop when `pylb serve` runs it) with one pool of
keep-alive connections towards the replicas (`pylb.proxy.upstream`, for routed and forwarded
requests; an aiohttp client session only gathers /v1/models), one `Dispatcher` (the only caller
of the router) and one `Fleet` (health probes, passive ejection, metrics scraping). aiohttp sets TCP_NODELAY on
both the server's and the client's sockets, so no streamed chunk waits for Nagle's algorithm.

Routes:
    POST /v1/completions, /v1/chat/completions   routed by the router (`pylb.proxy.routed`)
    GET  /v1/models                              merged from the healthy replicas (by model id)
    *    /v1/*                                   forwarded to a healthy replica, in turn
    GET  /health                                 pylb is up (always 200 while serving)
    GET  /ready                                  200 when at least one replica is healthy, else 503
    GET  /metrics                                pylb's own `pylb_*` series (Prometheus text)
    POST /admin/cache/false-hit                  with the semantic cache on (`pylb.cache`, called by the routed path)
    anything else                                404, OpenAI-style JSON error

Routed requests (`pylb.proxy.routed`): parsed into a `RoutingRequest`, queued in the router,
sent to the replica it picked, retried elsewhere before the client's first byte, streamed back
through a splice (`pylb.proxy.streaming`). Which headers cross: `pylb.proxy.headers`; API keys and
TLS: `pylb.proxy.access`; limits on what clients may send: `pylb.proxy.guard`; the wiring of
router, dispatcher and fleet shared with `pylb epp`: `pylb.proxy.balancer`.

Lifecycle. `start` probes the replicas, binds the listener (behind the connection guard, with
TLS when `server.tls_cert` is set) and the optional admin listener; `stop` drains (see its
docstring); `reload` applies new settings while serving (SIGHUP).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from pylb.config import ConfigError, Settings
from pylb.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pylb.observability.metrics import ProxyMetrics, ProxySnapshot
from pylb.router.interface import Router

from .access import ApiKeys, client_ssl_context, reload_certificate, server_ssl_context
from .balancer import Balancer
from .errors import NoReplica, ProxyError, UpstreamFailed, error_response
from .guard import BodyBudget, ClientErrorLog, ConnectionGuard, fit_to_descriptors, target_problem
from .headers import REQUEST_SKIP, ReplicaLabels, raw_request_headers, response_headers, strip_headers
from .routed import RoutedPath
from .upstream import UPSTREAM_ERRORS, UpstreamPool

if TYPE_CHECKING:
    from pylb.cache.cache import SemanticCache

log = logging.getLogger("pylb.proxy")

_CLEANUP_GRACE_S = 1.0
"""At shutdown, how long the requests cut at `server.shutdown_timeout_s` get to end (their error
event written, their connections closed)."""


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
        self.names = ReplicaLabels(settings.server.expose_replicas)
        self.api_keys = ApiKeys(settings.server)
        self._tls = server_ssl_context(settings.server)  # towards clients; None: plain HTTP
        self._ssl = client_ssl_context(settings.upstream.ca_file, settings.upstream.tls_verify) if self._uses_tls() else None
        self._bodies = BodyBudget(settings.server.max_buffered_body_bytes)
        self.routed = RoutedPath(settings, b, self.names, self._bodies, self.cache)
        self._session: aiohttp.ClientSession | None = None
        self._pool: UpstreamPool | None = None
        self._runner: web.AppRunner | None = None
        self._port: int | None = None
        self._turn = 0
        self._admin_runner: web.AppRunner | None = None
        self.admin_port: int | None = None
        self.fleet.ssl = self._ssl
        self.fleet.on_eject = self._on_eject
        self.fleet.sent_data_within = self._sent_data_within
        self._guard: ConnectionGuard | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._active = 0  # /v1/ requests being served
        self._draining = False  # stopping: /ready says 503, new /v1/ requests get 503
        self.metrics.attach(self.snapshot)

    def _uses_tls(self) -> bool:
        return any(u.startswith("https://") for u in self.settings.fleet.backends) or self.settings.discovery.scheme == "https"

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
        return f"{'https' if self._tls is not None else 'http'}://{self.settings.server.host}:{self.port}"

    def make_app(self) -> web.Application:
        """The aiohttp application (with /metrics, /health and /ready unless an admin listener serves them)."""
        app = web.Application(middlewares=[self._gate, self._edge], client_max_size=self.settings.server.max_body_bytes)
        app.router.add_post("/v1/completions", self.routed.completions)
        app.router.add_post("/v1/chat/completions", self.routed.chat)
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
                max_headers=ss.max_headers, auto_decompress=False, logger=ClientErrorLog(logging.getLogger("pylb.proxy.client"), {}),
            )  # fmt: skip
            await runner.setup()
            assert runner.server is not None
            self._guard = ConnectionGuard(fit_to_descriptors(ss.max_connections), ss.header_timeout_s, ss.keepalive_timeout_s)
            try:
                loop = asyncio.get_running_loop()
                self._listener = await loop.create_server(
                    self._guard.wrap(runner.server), ss.host, ss.port, reuse_port=reuse_port or None, backlog=1024, ssl=self._tls
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
        self.routed.pool = self._pool
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
        if self.cache is not None:
            await self.cache.stop_verifying()  # background re-runs of cache hits: cancelled, not drained
        self._fail_queued()
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.01)
        if self._active:
            self.routed.cut = True
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
        replica naming, the TLS certificate and key (when TLS is on). Rejected as a whole, with ConfigError naming the first offending
        setting, when one in `RESTART_ONLY` differs or the keys file is bad; nothing is applied
        then. Returns the settings ("section.name") that changed."""
        old_d, new_d = self.settings.to_dict(), new.to_dict()
        changed = [f"{sec}.{k}" for sec in new_d for k in new_d[sec] if new_d[sec][k] != old_d[sec][k]]
        for key in changed:
            if key in self.RESTART_ONLY or key.split(".", 1)[0] in self.RESTART_ONLY:
                sec, name = key.split(".", 1)
                raise ConfigError(key, new_d[sec][name], "cannot change while pylb runs (restart pylb for it); nothing was reloaded")
        api_keys = ApiKeys(new.server)
        tls_changed = [k for k in ("server.tls_cert", "server.tls_key") if k in changed]
        if tls_changed and (self._tls is None or not (new.server.tls_cert and new.server.tls_key)):
            key = tls_changed[0]
            raise ConfigError(key, new_d["server"][key.split(".")[1]], "turning TLS on or off needs a restart (a new certificate and key can be reloaded); nothing was reloaded")
        if tls_changed:
            server_ssl_context(new.server)  # check the new pair before the live context takes it
        ss, us, fs = new.server, new.upstream, new.fleet
        self.settings = self.balancer.settings = new
        self.fleet.settings = fs
        self.api_keys = api_keys
        self.names.expose = ss.expose_replicas
        self.routed.apply(new)
        if tls_changed and self._tls is not None:
            reload_certificate(self._tls, ss)
        self.balancer.retry_after = str(max(1, math.ceil(fs.health_interval_s * fs.healthy_threshold)))
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
                fut.set_exception(NoReplica("pylb is shutting down; retry on another instance", headers={"Retry-After": self.balancer.retry_after}))

    def _sent_data_within(self, replica: str, window: float) -> bool:
        """Whether `replica` sent data on the request path in the last `window` seconds."""
        return self._pool is not None and self._pool.sent_data_within(replica, window)

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
        return self.balancer.snapshot(self.routed.in_progress)

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
            elif api and self.api_keys.required and not self.api_keys.accepts(request.headers.get("Authorization", "")):
                self.metrics.count_request("other", 401)
                return error_response(401, "missing or invalid API key: send Authorization: Bearer <key>", None, {"WWW-Authenticate": "Bearer"})
            elif api and self._draining:
                self.metrics.count_request("other", 503)
                answer = error_response(503, "pylb is shutting down; retry on another instance", None, {"Retry-After": self.balancer.retry_after})
            else:
                return await handler(request)
            answer.force_close()  # and close the connection
            return answer
        finally:
            if api:
                self._active -= 1
            if guard is not None:
                guard.finished(request)

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

    # ---- other paths -----------------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.StreamResponse:
        """The union of the healthy replicas' /v1/models, by model id (first replica wins)."""
        assert self._session is not None
        healthy = list(self.fleet.healthy)
        if not healthy:
            raise NoReplica("no healthy replica to list models from", headers={"Retry-After": self.balancer.retry_after})
        headers = strip_headers(request.headers, REQUEST_SKIP)

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
            raise NoReplica("no healthy replica to forward the request to", headers={"Retry-After": self.balancer.retry_after})
        self._turn += 1
        replica = healthy[self._turn % len(healthy)]
        rid = self.routed.request_id(request)
        headers = raw_request_headers(request.raw_headers, rid, self.routed.skip_raw)
        held = [0]
        try:
            body = await self.routed.read_body(request, held)
            try:
                up = await self._pool.request(replica, request.method, request.raw_path, headers, body)
            except UPSTREAM_ERRORS as exc:
                self.fleet.report_connect_error(replica, f"{type(exc).__name__}: {exc}")
                self.metrics.count_upstream_error(replica, "connect")
                raise UpstreamFailed(self.names.public(f"replica {replica} failed: {type(exc).__name__}: {exc}", replica)) from None
        finally:
            self._bodies.give(held[0])
        try:
            out = web.StreamResponse(status=up.status, headers=response_headers(up.headers, rid, self.names.label(replica)))
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

