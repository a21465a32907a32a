"""`pylb epp`'s listeners around one balancer: gRPC (ext_proc + health) and HTTP (/metrics).

Design (issue 11 §3)
--------------------
One `pylb.proxy.balancer.Balancer` (router, dispatcher, fleet, metrics: the wiring `pylb serve`
runs) on one asyncio loop, with two listeners on `server.host`:

    epp.grpc_port     grpc.aio server: `envoy.service.ext_proc.v3.ExternalProcessor` (`Processor`)
                      and the standard gRPC health service `grpc.health.v1.Health`
    epp.metrics_port  aiohttp: GET /metrics (the same `pylb_*` series as `pylb serve`),
                      /health (200 while up), /ready (200 when a replica is healthy, else 503)

Health services (GIE's endpoint-picker protocol names them): "" and "liveness" are SERVING while
pylb runs; "readiness" and "envoy.service.ext_proc.v3.ExternalProcessor" are SERVING when at
least one replica is healthy, else NOT_SERVING (re-read every `fleet.health_interval_s`). On
stop every service turns NOT_SERVING, streams in flight get `server.shutdown_timeout_s` to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from pylb.config import Settings
from pylb.observability.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from pylb.observability.metrics import ProxySnapshot
from pylb.proxy.balancer import Balancer
from pylb.router.interface import Router

from .processor import Processor

log = logging.getLogger("pylb.epp")

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
"""The ext_proc service's full name (a gRPC health service name too)."""

ALWAYS_SERVING = ("", "liveness")
"""Health services SERVING while pylb runs."""

SERVING_WHEN_READY = ("readiness", EXT_PROC_SERVICE)
"""Health services SERVING while at least one replica is healthy."""


class EppServer:
    """pylb as Envoy's endpoint picker (see the module comment). `await start()` / `await stop()`,
    or `async with EppServer(settings) as epp: ... epp.grpc_target ...`.

    Without `router`, the router is the settings' (`create_router`): the constructor raises
    ConfigError for an unknown policy, a bad policy option or router setting."""

    def __init__(self, settings: Settings, router: Router | None = None) -> None:
        self.settings = settings
        self.balancer = Balancer(settings, router)
        self.processor = Processor(self)
        self.health = health_aio.HealthServicer()
        self.balancer.metrics.attach(self.snapshot)
        self._grpc: grpc.aio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._ready_task: asyncio.Task[None] | None = None
        self.grpc_port = 0
        self.metrics_port = 0

    @property
    def grpc_target(self) -> str:
        """host:port of the gRPC listener (after start)."""
        return f"{self.settings.server.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """Base URL of the metrics listener (after start)."""
        return f"http://{self.settings.server.host}:{self.metrics_port}"

    def snapshot(self) -> ProxySnapshot:
        """The live state behind pylb's state series."""
        return self.balancer.snapshot(self.processor.in_progress)

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe the replicas, then serve gRPC and HTTP. Raises OSError when a port cannot be bound."""
        s = self.settings
        await self.balancer.fleet.start()
        try:
            server = grpc.aio.server()
            ext_proc_grpc.add_ExternalProcessorServicer_to_server(self.processor, server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            host = s.server.host
            bind = f"[{host}]:{s.epp.grpc_port}" if ":" in host else f"{host}:{s.epp.grpc_port}"
            try:
                port = server.add_insecure_port(bind)
            except RuntimeError as exc:  # grpc's way of saying the address is taken
                raise OSError(f"cannot bind gRPC to {bind}: {exc}") from None
            await server.start()
            self._grpc = server
            self.grpc_port = port
            app = web.Application()
            app.router.add_get("/metrics", self._metrics_page)
            app.router.add_get("/health", self._health)
            app.router.add_get("/ready", self._ready)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, host, s.epp.metrics_port)
            try:
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            self._runner = runner
            self.metrics_port = int(runner.addresses[0][1])
        except BaseException:
            await self.stop()
            raise
        for name in ALWAYS_SERVING:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        await self._update_readiness()
        self._ready_task = asyncio.create_task(self._readiness_loop(), name="pylb-epp-readiness")
        log.info("pylb epp serving", extra={"grpc": self.grpc_target, "metrics": self.metrics_url, "policy": s.router.policy})

    async def stop(self) -> None:
        """NOT_SERVING everywhere, let streams in flight end (up to the shutdown timeout), close."""
        if self._ready_task is not None:
            self._ready_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ready_task
            self._ready_task = None
        await self.health.enter_graceful_shutdown()
        if self._grpc is not None:
            await self._grpc.stop(self.settings.server.shutdown_timeout_s)
            self._grpc = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.balancer.fleet.stop()
        self.balancer.dispatcher.close()

    async def __aenter__(self) -> EppServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- health -----------------------------------------------------------------------------------

    async def _update_readiness(self) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if self.balancer.fleet.healthy else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in SERVING_WHEN_READY:
            await self.health.set(name, status)

    async def _readiness_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.fleet.health_interval_s)
            try:
                await self._update_readiness()
            except Exception:  # log, count, go on
                self.balancer.metrics.count_background_error("epp_health")
                log.exception("updating the gRPC health status failed")

    # ---- HTTP ---------------------------------------------------------------------------------------

    async def _metrics_page(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.balancer.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    async def _ready(self, request: web.Request) -> web.StreamResponse:
        fleet = self.balancer.fleet
        healthy = len(fleet.healthy)
        body = {"ready": healthy > 0, "healthy_replicas": healthy, "replicas": len(fleet.replicas)}
        return web.json_response(body, status=200 if healthy else 503)
