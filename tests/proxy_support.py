"""Shared pieces of the proxy's integration tests: settings, fake fleets, scripted replicas,
routers that hold or record, and a reader of pylb's /metrics. Everything listens on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
import json
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from pylb.config import Settings, load_settings
from pylb.proxy.server import ProxyServer
from policy_fakes import FakeView, write
from pylb.router.interface import Dispatch, ReplicaMetrics, ReplicaState, Router, RoutingRequest, Usage
from pylb.sim.profiles import Profile
from pylb.sim.server import FakeServerConfig, FakeVllmServer

# 4-token blocks, 1 ms steps, 10 us per prefill token: every request takes milliseconds.
FAST = Profile(
    name="test-fast", block_size=4, num_blocks=4096, max_num_seqs=64, max_num_batched_tokens=4096,
    c0=1e-3, c_prefill=1e-5, c_decode=0.0, c_attn=0.0,
)  # fmt: skip
MODEL = "pylb-sim"


def settings(backends: Sequence[str], **overrides: Any) -> Settings:
    """Test settings: quick probes and scrapes, round-robin, a free port, no access log.
    `overrides` are "section__name"=value."""
    flags: dict[str, Any] = {
        "fleet.backends": list(backends),
        "router.policy": "round-robin",
        "server.port": 0,
        "fleet.health_interval_s": 0.05,
        "fleet.health_timeout_s": 0.5,
        "fleet.ejection_s": 0.2,
        "fleet.scrape_interval_s": 0.05,
        "logging.access_log": False,
        "server.shutdown_timeout_s": 1.0,
    }
    for k, v in overrides.items():
        flags[k.replace("__", ".", 1)] = v
    return load_settings(flags, env={})


@asynccontextmanager
async def fake_fleet(n: int = 2, **config: Any) -> AsyncIterator[list[FakeVllmServer]]:
    """n fake vLLM replicas (FAST profile)."""
    cfg = FakeServerConfig(**{"speed": 10.0, "output_len": 8, "max_model_len": 4096, **config})
    servers = [FakeVllmServer(FAST, cfg) for _ in range(n)]
    try:
        for s in servers:
            await s.start()
        yield servers
    finally:
        for s in servers:
            await s.stop()


@asynccontextmanager
async def running_proxy(s: Settings, router: Router | None = None) -> AsyncIterator[ProxyServer]:
    proxy = ProxyServer(s, router=router)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()


async def scrape(proxy: ProxyServer) -> dict[str, dict[tuple, float]]:
    """pylb's /metrics as {sample name: {sorted label items: value}}."""
    async with aiohttp.ClientSession() as s, s.get(proxy.url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def value(metrics: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    """One sample's value, 0 when absent."""
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


async def wait_for(cond: Any, timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `cond()` (sync) until true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---- routers for tests ------------------------------------------------------------------------------


class RoundRobinRouter(Router):
    """The simplest router: dispatch every request at the next poll, to the replicas in turn.
    (The production policies live in pylb.router.policies; these tests need one whose every
    decision they can predict and hold back.) It counts requests in flight and un-prefilled per
    replica in its `view`, as every router does, since the proxy reads its load from there."""

    def __init__(self) -> None:
        self._replicas: list[str] = []
        self._queue: deque[str] = deque()
        self._turn = 0
        self._view = FakeView([])
        self._sent: dict[str, tuple[str, bool]] = {}  # request id -> (replica, prefilled)

    @property
    def view(self) -> FakeView:
        return self._view

    def submit(self, request: RoutingRequest, now: float) -> None:
        self._queue.append(request.request_id)

    def poll(self, now: float) -> list[Dispatch]:
        out = []
        while self._replicas and self._queue:
            d = Dispatch(self._queue.popleft(), self._replicas[self._turn % len(self._replicas)])
            self._turn += 1
            self._sent[d.request_id] = (d.replica, False)
            self._count(d.replica, inflight=1, unprefilled=1)
            out.append(d)
        return out

    def on_first_token(self, request_id: str, replica: str, now: float) -> None:
        sent = self._sent.get(request_id)
        if sent is not None and not sent[1]:
            self._sent[request_id] = (sent[0], True)
            self._count(sent[0], unprefilled=-1)

    def on_complete(self, request_id: str, replica: str, now: float, usage: Usage | None) -> None:
        sent = self._sent.pop(request_id, None)
        if sent is not None:
            self._count(sent[0], inflight=-1, unprefilled=0 if sent[1] else -1)

    def on_membership(self, replicas: Sequence[str], now: float) -> None:
        self._replicas = list(replicas)
        old = {r.name: r for r in self._view.replicas}
        self._view.replicas = [write(old.get(n) or ReplicaState(n, i), index=i) for i, n in enumerate(replicas)]

    def _count(self, replica: str, inflight: int = 0, unprefilled: int = 0) -> None:
        s = self._view.replica(replica)
        if s is not None:
            write(s, inflight_requests=s.inflight_requests + inflight, unprefilled_requests=s.unprefilled_requests + unprefilled)


class HoldRouter(RoundRobinRouter):
    """Round-robin that dispatches only while `open` is true (for queue tests)."""

    def __init__(self, with_cancel: bool = False) -> None:
        super().__init__()
        self.open = False
        self.with_cancel = with_cancel
        self.cancelled: list[str] = []

    def poll(self, now: float) -> list[Dispatch]:
        return super().poll(now) if self.open else []

    def cancel(self, request_id: str, now: float) -> bool:
        """Withdraws only `with_cancel` (else: the router cannot, and the proxy drops the
        request unsent when it is dispatched)."""
        if not self.with_cancel or request_id not in self._queue:
            return False
        self.cancelled.append(request_id)
        self._queue.remove(request_id)
        return True


class RecordingRouter(RoundRobinRouter):
    """Round-robin that records every event it gets, with its time."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[Any, ...]] = []
        self.requests: dict[str, RoutingRequest] = {}

    def submit(self, request: RoutingRequest, now: float) -> None:
        self.events.append(("submit", request.request_id, now))
        self.requests[request.request_id] = request
        super().submit(request, now)

    def on_first_token(self, request_id: str, replica: str, now: float) -> None:
        self.events.append(("first_token", request_id, replica, now))
        super().on_first_token(request_id, replica, now)

    def on_complete(self, request_id: str, replica: str, now: float, usage: Usage | None) -> None:
        self.events.append(("complete", request_id, replica, now, usage))
        super().on_complete(request_id, replica, now, usage)

    def on_metrics(self, replica: str, metrics: ReplicaMetrics, now: float) -> None:
        self.events.append(("metrics", replica, metrics, now))

    def on_membership(self, replicas: Sequence[str], now: float) -> None:
        self.events.append(("membership", list(replicas), now))
        super().on_membership(replicas, now)

    def of(self, kind: str, request_id: str | None = None) -> list[tuple[Any, ...]]:
        return [e for e in self.events if e[0] == kind and (request_id is None or e[1] == request_id)]


# ---- a scripted replica -----------------------------------------------------------------------------

METRICS_PAGE = 'vllm:num_requests_running{engine="0",model_name="m"} 0\nvllm:num_requests_waiting{engine="0",model_name="m"} 0\n'


class ScriptedReplica:
    """An aiohttp server that speaks enough of vLLM's API and misbehaves on request.

    `mode` for generation requests: "ok" (JSON answer, or `events` SSE events when streamed),
    "status" (answer `status` with a vLLM-style error), "hang" (never answer), "drop" (close the
    connection without answering), "die" (start a stream, send `events` events, then reset the
    connection), "stall" (send `events` events, then nothing, holding the connection), "truncate"
    (send `events` events and end the stream without `data: [DONE]`), "slow" (answer after
    `delay` seconds). A stream ends `done_delay` seconds after
    its `data: [DONE]` event (vLLM ends its streams in a later write). With `stale_after` set, a
    connection idle that long is closed, unanswered, when its next request arrives (a server that
    closes idle keep-alive connections, as uvicorn does after 5 s, at the worst moment: just as
    the client reuses one); those are counted in `stale_closed`. `health` is the /health status
    (or "hang", or "flap": 200 and 500 by turns); `/metrics` answers `metrics_page` after `metrics_delay` seconds (calls counted in
    `metrics_calls`). `start(ssl_context)` serves HTTPS. Every generation request is recorded in `requests` (headers, body); handlers
    cancelled by a client going away are counted in `aborted`.
    """

    def __init__(self, model: str = "scripted") -> None:
        self.model = model
        self.mode = "ok"
        self.status = 503
        self.events = 5
        self.pad = 0
        self.event_sleep = 0.001
        self.delay = 0.0
        self.done_delay = 0.0
        self.stale_after: float | None = None
        self.stale_closed = 0
        self._idle_since: dict[object, float] = {}
        self.health: int | str = 200
        self.health_calls = 0
        self.metrics_delay = 0.0
        self.metrics_calls = 0
        self.metrics_page = METRICS_PAGE
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.aborted = 0
        self.active = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, ssl_context: Any = None) -> str:
        app = web.Application(middlewares=[self._keep_alive])
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/completions", self._generate)
        app.router.add_post("/v1/chat/completions", self._generate)
        app.router.add_route("*", "/v1/echo", self._echo)
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self._runner.addresses[0][1]}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> ScriptedReplica:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _health(self, request: web.Request) -> web.StreamResponse:
        self.health_calls += 1
        if self.health == "hang":
            await asyncio.sleep(3600)
        if self.health == "flap":  # good and bad by turns, whatever the timing of the probes
            return web.Response(status=200 if self.health_calls % 2 else 500)
        return web.Response(status=int(self.health))

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.metrics_calls += 1
        if self.metrics_delay:
            await asyncio.sleep(self.metrics_delay)
        return web.Response(text=self.metrics_page)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "vllm"}]})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        return web.json_response({"method": request.method, "path": request.path_qs, "body": body.decode(), "replica": self.url})

    @web.middleware
    async def _keep_alive(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """`stale_after` for the API's requests (/v1/...)."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        await request.read()
        idle_since = self._idle_since.pop(request.transport, None)
        now = asyncio.get_running_loop().time()
        if self.stale_after is not None and idle_since is not None and now - idle_since >= self.stale_after:
            assert request.transport is not None
            self.stale_closed += 1
            request.transport.close()
            await asyncio.sleep(0.05)
            return web.Response(status=500)
        try:
            return await handler(request)
        finally:
            self._idle_since[request.transport] = asyncio.get_running_loop().time()

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append(({k: v for k, v in request.headers.items()}, body))
        self.active += 1
        try:
            return await self._answer(request, json.loads(body))
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        finally:
            self.active -= 1

    async def _answer(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(3600)
        if mode == "slow":
            await asyncio.sleep(self.delay)
        if mode == "drop":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(0.05)
            return web.Response(status=500)
        if mode == "status":
            err = {"error": {"message": f"scripted {self.status}", "type": "ServiceUnavailableError", "param": None, "code": self.status}}
            return web.json_response(err, status=self.status)
        headers = {"X-Replica": self.url, "X-Request-Id-Seen": request.headers.get("X-Request-Id", "")}
        if payload.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", **headers})
            await resp.prepare(request)
            for i in range(self.events):
                text = f" t{i}" + "x" * self.pad
                chunk = {"id": "cmpl-s", "object": "text_completion", "model": self.model, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(self.event_sleep)
            if mode == "die":
                assert request.transport is not None
                request.transport.abort()
                await asyncio.sleep(0.05)
                return resp
            if mode == "stall":
                await asyncio.sleep(3600)
            if mode == "truncate":
                await resp.write_eof()
                return resp
            if (payload.get("stream_options") or {}).get("include_usage"):
                usage = {"prompt_tokens": 11, "completion_tokens": self.events, "total_tokens": 11 + self.events, "prompt_tokens_details": {"cached_tokens": 4}}
                await resp.write(b"data: " + json.dumps({"id": "cmpl-s", "choices": [], "usage": usage}).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            if self.done_delay:
                await asyncio.sleep(self.done_delay)
            await resp.write_eof()
            return resp
        answer = {
            "id": "cmpl-s", "object": "text_completion", "model": self.model,
            "choices": [{"index": 0, "text": " t0", "finish_reason": "length"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 1, "total_tokens": 12, "prompt_tokens_details": {"cached_tokens": 8}},
        }  # fmt: skip
        return web.json_response(answer, headers=headers)


@asynccontextmanager
async def scripted(n: int = 2) -> AsyncIterator[list[ScriptedReplica]]:
    reps = [ScriptedReplica(model=f"model-{i}") for i in range(n)]
    try:
        for r in reps:
            await r.start()
        yield reps
    finally:
        for r in reps:
            await r.stop()


def dead_url() -> str:
    """A URL where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def free_port_on(hosts: list[str]) -> int:
    """A TCP port free on every one of `hosts` (loopback addresses), for servers that must share one port."""
    for _ in range(20):
        with socket.socket() as s:
            s.bind((hosts[0], 0))
            port = int(s.getsockname()[1])
        try:
            for h in hosts[1:]:
                with socket.socket() as s:
                    s.bind((h, port))
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on every test address")


async def raw(port: int, data: bytes, *, wait: float = 3.0) -> bytes:
    """Send `data` on a fresh connection to 127.0.0.1:`port` and return the answer: until its
    Content-Length is in, the server closes, or `wait` seconds pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = b""
    try:
        writer.write(data)
        await writer.drain()
    except ConnectionError:
        pass
    try:
        while True:
            chunk = await asyncio.wait_for(reader.read(65536), wait)
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                head, _, body = out.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    except (asyncio.TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()
    return out
