"""A small fake Kubernetes API server for discovery tests (aiohttp on 127.0.0.1).

No kube-apiserver can run on the test machines, so this one speaks just enough of the real
protocol for `GET /apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`:

* list: an `EndpointSliceList` with `metadata.resourceVersion`, filtered by the
  `labelSelector` `kubernetes.io/service-name=NAME` (the only selector form it accepts);
* watch (`watch=true`): a chunked stream of one JSON event per line, `{"type", "object"}`, with
  ADDED / MODIFIED / DELETED events after the request's `resourceVersion` (replayed from its
  history), BOOKMARK events (`allowWatchBookmarks=true` only) carrying just a resourceVersion,
  and an `ERROR` event with a `Status` of code 410 (reason Expired) when the resourceVersion is
  older than the compacted history; the stream ends cleanly after `timeoutSeconds`;
* bearer-token authentication (401 with a `Status` body otherwise), as a kubeconfig gives it.

The test drives it: `put_slice`, `delete_slice`, `bookmark`, `expire` (compact the history and
send 410 to open watches), `drop_watches` (abort the watch connections mid-stream). Every
request's query is recorded (`list_requests`, `watch_requests`).
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

SERVICE_LABEL = "kubernetes.io/service-name"
_DROP = object()


@dataclass(frozen=True)
class Endpoint:
    """One endpoint of a slice: its address and conditions (as EndpointConditions)."""

    address: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False


def status(code: int, reason: str, message: str) -> dict[str, Any]:
    """A `v1.Status` failure object, as the API server sends it."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code}


class FakeKubeApi:
    """See the module comment."""

    def __init__(self, namespace: str = "serving", service: str = "vllm", token: str = "test-token") -> None:
        self.namespace = namespace
        self.service = service
        self.token = token
        self.rv = 1000
        self.slices: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, dict[str, Any]]] = []  # (resourceVersion, event)
        self.compacted = 0
        self.list_requests: list[dict[str, str]] = []
        self.watch_requests: list[dict[str, str]] = []
        self.unauthorized = 0
        self._watchers: set[asyncio.Queue[Any]] = set()
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.port = 0

    # ---- lifecycle ----------------------------------------------------------------------------------

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on 127.0.0.1 (HTTPS with `ssl_context`, as a real API server)."""
        app = web.Application()
        app.router.add_get("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices", self._endpointslices)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        for q in list(self._watchers):
            q.put_nowait(_DROP)
        if self._runner is not None:
            await self._runner.cleanup()

    def write_kubeconfig(self, path: Path, namespace: str | None = None, token: str | None = None) -> Path:
        """A kubeconfig for this server with its bearer token (or `token`), and a context namespace."""
        ctx: dict[str, Any] = {"cluster": "fake", "user": "pylb"}
        if namespace:
            ctx["namespace"] = namespace
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "pylb", "user": {"token": token or self.token}}],
            "contexts": [{"name": "fake", "context": ctx}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    # ---- what the test does -----------------------------------------------------------------------------

    def put_slice(self, name: str, endpoints: list[Endpoint], port: int, port_name: str = "http") -> None:
        """Create or replace the EndpointSlice `name` (ADDED or MODIFIED)."""
        kind = "MODIFIED" if name in self.slices else "ADDED"
        self.rv += 1
        obj = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "uid": f"uid-{name}",
                "resourceVersion": str(self.rv),
                "generateName": f"{self.service}-",
                "labels": {SERVICE_LABEL: self.service, "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"},
            },
            "addressType": "IPv4",
            "endpoints": [
                {
                    "addresses": [e.address],
                    "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                    "targetRef": {"kind": "Pod", "namespace": self.namespace, "name": f"vllm-{e.address.replace('.', '-')}"},
                }
                for e in endpoints
            ],
            "ports": [{"name": port_name, "port": port, "protocol": "TCP"}],
        }
        self.slices[name] = obj
        self._emit({"type": kind, "object": obj})

    def delete_slice(self, name: str) -> None:
        """Delete the EndpointSlice `name` (DELETED)."""
        obj = self.slices.pop(name)
        self.rv += 1
        obj = {**obj, "metadata": {**obj["metadata"], "resourceVersion": str(self.rv)}}
        self._emit({"type": "DELETED", "object": obj})

    def bookmark(self) -> int:
        """Other objects changed (the resourceVersion moves on); open watches get a BOOKMARK."""
        self.rv += 7
        ev = {"type": "BOOKMARK", "object": {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": str(self.rv)}}}
        for q in list(self._watchers):
            q.put_nowait(ev)
        return self.rv

    def expire(self) -> None:
        """Compact the history to now: open watches get ERROR 410 and end; older resourceVersions are refused."""
        self.rv += 3
        self.compacted = self.rv
        self.history.clear()
        for q in list(self._watchers):
            q.put_nowait(self._gone_event(0))

    def drop_watches(self) -> None:
        """Abort every open watch connection mid-stream."""
        for q in list(self._watchers):
            q.put_nowait(_DROP)

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    # ---- the API ----------------------------------------------------------------------------------------

    def _emit(self, event: dict[str, Any]) -> None:
        self.history.append((self.rv, event))
        for q in list(self._watchers):
            q.put_nowait(event)

    def _gone_event(self, asked: int) -> dict[str, Any]:
        return {"type": "ERROR", "object": status(410, "Expired", f"too old resource version: {asked} ({self.compacted})")}

    async def _endpointslices(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.unauthorized += 1
            return web.json_response(status(401, "Unauthorized", "Unauthorized"), status=401)
        ns = request.match_info["ns"]
        selector = request.query.get("labelSelector", "")
        key, _, value = selector.partition("=")
        if key != SERVICE_LABEL or not value:
            return web.json_response(status(400, "BadRequest", f"unsupported labelSelector {selector!r}"), status=400)
        matches = ns == self.namespace and value == self.service
        if request.query.get("watch") not in ("true", "1", "True"):
            self.list_requests.append({**request.query, "answered_resourceVersion": str(self.rv)})
            items = list(self.slices.values()) if matches else []
            return web.json_response(
                {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": str(self.rv)}, "items": items}
            )
        self.watch_requests.append(dict(request.query))
        return await self._watch(request, matches)

    async def _watch(self, request: web.Request, matches: bool) -> web.StreamResponse:
        asked = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 300)
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1", "True")
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if asked and asked < self.compacted:
            await resp.write(json.dumps(self._gone_event(asked)).encode() + b"\n")
            await resp.write_eof()
            return resp
        q: asyncio.Queue[Any] = asyncio.Queue()
        for rv, ev in self.history:
            if rv > asked:
                q.put_nowait(ev)
        self._watchers.add(q)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), max(0.0, deadline - loop.time()))
                except asyncio.TimeoutError:
                    break  # the server ends the watch: a clean end of the stream
                if ev is _DROP:
                    assert request.transport is not None
                    request.transport.abort()
                    return resp
                if not matches or (ev["type"] == "BOOKMARK" and not bookmarks):
                    continue
                await resp.write(json.dumps(ev).encode() + b"\n")
                if ev["type"] == "ERROR":
                    break
        finally:
            self._watchers.discard(q)
        await resp.write_eof()
        return resp
