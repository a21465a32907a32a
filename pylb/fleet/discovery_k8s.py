"""Kubernetes discovery: the replicas are the endpoints of one Service's EndpointSlices.

Design (issue 11 §1; `pylb.fleet.discovery` has the contract)
-------------------------------------------------------------
pylb lists, then watches, the `discovery.k8s.io/v1` EndpointSlices labelled
`kubernetes.io/service-name=<discovery.k8s_service>` in `discovery.k8s_namespace`, through
`kubernetes_asyncio` (the asyncio port of the official generated client: it speaks aiohttp,
pylb's HTTP stack, and brings the official config loaders -- in-cluster service account with
token refresh, kubeconfig with exec and OIDC auth). The protocol is the library's; pylb keeps
the slices it has seen and turns them into members after every event:

    list  -> every slice, and the list's resourceVersion
    watch (resourceVersion=last seen, allowWatchBookmarks, timeoutSeconds=discovery.watch_timeout_s)
          ADDED / MODIFIED   the slice replaces its previous version
          DELETED            the slice is forgotten
          BOOKMARK           only moves the resourceVersion on
          ERROR 410 Gone     the resourceVersion is too old: list again
    the server ends the watch (timeout) or the connection drops -> watch again from the last
    resourceVersion (the library tracks it from events and bookmarks); any other error (API
    unreachable, 401/403, a malformed answer) -> back off (doubling up to
    discovery.backoff_max_s), list again. Nothing here ever stops the proxy; the last published
    membership stays until a list or watch succeeds.

Endpoints -> members: each address of each endpoint, with the slice's port (the one named
`discovery.k8s_port_name`, else its only port, else `discovery.port`). Conditions, as the API
defines them (a missing `ready` means ready):

    ready and not terminating      -> ready (a candidate; the health probe still gates it)
    anything else that is listed   -> draining (serving+terminating: the pod is shutting down;
                                      not ready: its readiness probe fails) -- no new requests,
                                      requests in flight finish
    gone from every slice          -> removed

An address listed in several slices (a slice update in two steps) is ready if any slice says so.

Credentials: `discovery.kubeconfig` when set; else the in-cluster service account when
KUBERNETES_SERVICE_HOST is set (a pod); else $KUBECONFIG or ~/.kube/config. The namespace:
`discovery.k8s_namespace`, else the pod's own (the service account's namespace file), else the
kubeconfig context's, else "default". The role needs get/list/watch on endpointslices
(k8s/base/rbac.yaml).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp

from pylb.config import ConfigError, DiscoverySettings

from .discovery import Backoff, Members, Publish, ReportError, replica_url, start_source

try:
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio import config as k8s_config
    from kubernetes_asyncio import watch as k8s_watch
    from kubernetes_asyncio.client.exceptions import ApiException
    from kubernetes_asyncio.config.config_exception import ConfigException
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ConfigError("fleet.discovery", "k8s", "needs the kubernetes_asyncio package: pip install 'pylb[k8s]'") from exc

log = logging.getLogger("pylb.discovery")

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
"""The label that ties an EndpointSlice to its Service."""

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""The pod's service-account volume: `token`, `ca.crt` (the API server's CA), `namespace`."""

LIST_TIMEOUT_S = 30.0
"""Longest wait for a list answer."""

WATCH_GRACE_S = 30.0
"""A watch with no end after discovery.watch_timeout_s + this is treated as dropped."""


def members_of_slices(slices: dict[str, dict[str, Any]], scheme: str, port_name: str, default_port: int) -> Members:
    """The members that a set of EndpointSlices (their JSON, by name) describe (see the module
    comment for the conditions)."""
    out: Members = {}
    for obj in slices.values():
        port = slice_port(obj.get("ports") or [], port_name, default_port)
        for ep in obj.get("endpoints") or []:
            cond = ep.get("conditions") or {}
            ready = cond.get("ready") is not False and cond.get("terminating") is not True
            for addr in ep.get("addresses") or []:
                url = replica_url(scheme, str(addr), port)
                out[url] = out.get(url, False) or ready
    return out


def slice_port(ports: list[dict[str, Any]], name: str, default: int) -> int:
    """The slice's port named `name`; without a name, its only port; else `default`."""
    if name:
        for p in ports:
            if p.get("name") == name and isinstance(p.get("port"), int):
                return int(p["port"])
        return default
    numbered = [p for p in ports if isinstance(p.get("port"), int)]
    return int(numbered[0]["port"]) if len(numbered) == 1 else default


class _Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class K8sDiscovery:
    """List + watch of one Service's EndpointSlices (see the module comment)."""

    def __init__(self, settings: DiscoverySettings) -> None:
        self.settings = settings
        self.slices: dict[str, dict[str, Any]] = {}
        self.resource_version: str | None = None
        self.lists = 0
        """Lists done (the first, and one after every 410 or error)."""
        self.watches = 0
        """Watch requests started."""
        self._published: Members | None = None

    async def start(self, publish: Publish, report_error: ReportError) -> asyncio.Task[None]:
        """See `pylb.fleet.discovery.Discovery.start`."""
        return await start_source(self._run, publish, report_error, "pylb-discovery-k8s")

    # ---- configuration ----------------------------------------------------------------------------

    async def _configure(self) -> tuple[k8s_client.Configuration, str]:
        """The client configuration and the namespace (see the module comment)."""
        s = self.settings
        cfg = k8s_client.Configuration()
        context_ns = ""
        if s.kubeconfig or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            path = s.kubeconfig or None
            await k8s_config.load_kube_config(config_file=path, client_configuration=cfg)
            try:
                _, current = k8s_config.list_kube_config_contexts(config_file=path)
                context_ns = (current.get("context") or {}).get("namespace", "") if current else ""
            except ConfigException:
                context_ns = ""
        else:
            sa = SERVICE_ACCOUNT_DIR
            k8s_config.load_incluster_config(client_configuration=cfg, token_filename=str(sa / "token"), cert_filename=str(sa / "ca.crt"))
        ns = s.k8s_namespace
        if not ns and not s.kubeconfig and (SERVICE_ACCOUNT_DIR / "namespace").is_file():
            ns = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
        return cfg, ns or context_ns or "default"

    # ---- the loop ---------------------------------------------------------------------------------

    async def _run(self, publish: Publish, report_error: ReportError) -> None:
        s = self.settings
        backoff = Backoff(s.backoff_max_s)
        failing = False
        while True:
            api_client = None
            try:
                cfg, ns = await self._configure()
                api_client = k8s_client.ApiClient(configuration=cfg)
                api = k8s_client.DiscoveryV1Api(api_client)
                selector = f"{SERVICE_NAME_LABEL}={s.k8s_service}"
                while True:
                    await self._list(api, ns, selector, publish)
                    if failing:
                        log.info("Kubernetes discovery works again", extra={"service": s.k8s_service, "namespace": ns})
                    failing = False
                    backoff.reset()
                    try:
                        while True:  # each watch ends at its timeout or a dropped connection
                            await self._watch(api, ns, selector, publish)
                    except _Gone:
                        log.info("EndpointSlice watch expired (410 Gone); listing again", extra={"service": s.k8s_service})
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a source logs, counts, backs off and goes on
                report_error()
                if not failing:
                    log.warning(
                        "Kubernetes discovery failed; keeping the last replica list and retrying",
                        extra={"service": s.k8s_service, "error": f"{type(exc).__name__}: {exc}"},
                    )
                failing = True
                await backoff.wait()
            finally:
                if api_client is not None:
                    await api_client.close()

    async def _list(self, api: Any, ns: str, selector: str, publish: Publish) -> None:
        self.lists += 1
        result = await api.list_namespaced_endpoint_slice(ns, label_selector=selector, _request_timeout=LIST_TIMEOUT_S)
        raw = api.api_client.sanitize_for_serialization(result)
        self.slices = {item["metadata"]["name"]: item for item in raw.get("items") or []}
        self.resource_version = (raw.get("metadata") or {}).get("resourceVersion")
        await self._publish(publish)

    async def _watch(self, api: Any, ns: str, selector: str, publish: Publish) -> None:
        """One watch request, from `self.resource_version` until the server ends it or the
        connection drops (then it returns, and the caller watches again). Raises _Gone on 410."""
        s = self.settings
        self.watches += 1
        try:
            async with k8s_watch.Watch() as w:
                stream = w.stream(
                    api.list_namespaced_endpoint_slice, ns, label_selector=selector, resource_version=self.resource_version,
                    allow_watch_bookmarks=True, timeout_seconds=s.watch_timeout_s, _request_timeout=s.watch_timeout_s + WATCH_GRACE_S,
                )  # fmt: skip
                async for event in stream:
                    kind, obj = event["type"], event["raw_object"]
                    if kind in ("ADDED", "MODIFIED"):
                        self.slices[obj["metadata"]["name"]] = obj
                    elif kind == "DELETED":
                        self.slices.pop(obj["metadata"]["name"], None)
                    if w.resource_version:
                        self.resource_version = w.resource_version
                    if kind != "BOOKMARK":
                        await self._publish(publish)
        except ApiException as exc:
            if exc.status == 410:
                raise _Gone() from None
            raise
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, ConnectionResetError, asyncio.TimeoutError) as exc:
            log.info("EndpointSlice watch dropped; resuming", extra={"resource_version": self.resource_version, "error": f"{type(exc).__name__}: {exc}"})
            await asyncio.sleep(0.1)  # no hot loop against a server that drops every watch at once

    async def _publish(self, publish: Publish) -> None:
        s = self.settings
        members = members_of_slices(self.slices, s.scheme, s.k8s_port_name, s.port)
        if members != self._published:
            log.info(
                "Kubernetes discovery: replicas changed",
                extra={"service": s.k8s_service, "ready": [u for u, r in members.items() if r], "draining": [u for u, r in members.items() if not r]},
            )
            await publish(dict(members))
            self._published = members
