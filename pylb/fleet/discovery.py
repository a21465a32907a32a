"""Discovery: where the replica list comes from when it is not fixed (`fleet.discovery`).

Design (DESIGN.md §5, issue 11 §1)
----------------------------------
A discovery source watches something outside pylb and tells the fleet what it sees, as a
mapping `{base URL: ready}`; the fleet (`Fleet.set_members`) turns that into membership:

    listed, ready=True    a candidate: in rotation once its health probe passes
    listed, ready=False   draining: out of rotation (no new requests), requests in flight finish
    not listed            removed (pylb cuts no request in flight; the replica may, as it stops)

Every change reaches the router through the one path the proxy already uses
(`Fleet._publish` -> `Dispatcher.on_membership` -> `Router.on_membership`), so the rings are
rebuilt off the request path and move about 1/N of the keys per replica that joins or leaves.

Sources (each runs as one background task on the proxy's loop; `start()` waits for the first
answer or the first failure, up to `FIRST_LIST_WAIT_S`, so that pylb starts with a membership
when it can and without delay when it cannot):

* `static` -- no source: `fleet.backends`, as always.
* `dns` (`DnsDiscovery`, this module) -- a headless Service name resolved every
  `discovery.interval_s` (A and AAAA records, through the system resolver or an injected
  `resolve` function); each address becomes `scheme://addr:port` with `discovery.port`. A name
  that does not exist (EAI_NONAME: a headless Service with no ready pod) means no replica; any
  other failure keeps the last list and retries with backoff. Addresses that disappear are
  removed, new ones join. DNS cannot say "terminating", so there is no draining state here.
* `k8s` (`pylb.fleet.discovery_k8s.K8sDiscovery`) -- list + watch of the Service's
  discovery.k8s.io/v1 EndpointSlices through `kubernetes_asyncio` (the optional extra `k8s`).

A source never raises out of its task: it logs, counts (`pylb_background_errors_total{task=
"discovery"}`), backs off (doubling from `BACKOFF_START_S` up to `discovery.backoff_max_s`) and
goes on. A failing source keeps the last membership it published.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from pylb.config import Settings

log = logging.getLogger("pylb.discovery")

Members = dict[str, bool]
"""What a source sees: replica base URL -> ready (False: draining)."""

Publish = Callable[[Members], Awaitable[None]]
"""The fleet's `set_members`."""

ReportError = Callable[[], None]
"""Counts one failure of the source (the fleet's background-error counter)."""

FIRST_LIST_WAIT_S = 10.0
"""How long `start()` waits at most for a source's first answer (or failure) before pylb serves without one."""

BACKOFF_START_S = 0.5
"""First wait after a failure; it doubles on each consecutive failure up to discovery.backoff_max_s."""


class Discovery(Protocol):
    """A source of replica membership (see the module comment)."""

    async def start(self, publish: Publish, report_error: ReportError) -> asyncio.Task[None]:
        """Start the source's task; return it once the first membership was published or the
        first attempt failed (at most `FIRST_LIST_WAIT_S`). The caller cancels the task to stop
        the source."""
        ...


def replica_url(scheme: str, host: str, port: int) -> str:
    """`scheme://host:port`, with an IPv6 address in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name
    return f"{scheme}://{host}:{port}"


class Backoff:
    """Waits that double from `BACKOFF_START_S` up to `limit` seconds; `reset()` after a success."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self.next = BACKOFF_START_S

    def reset(self) -> None:
        """Back to the first wait."""
        self.next = BACKOFF_START_S

    async def wait(self) -> None:
        """Sleep the current wait, then double it (up to the limit)."""
        delay = min(self.next, self.limit)
        self.next = min(self.next * 2, self.limit)
        await asyncio.sleep(delay)


async def start_source(run: Callable[[Publish, ReportError], Coroutine[Any, Any, None]], publish: Publish, report_error: ReportError, name: str) -> asyncio.Task[None]:
    """Run `run(publish, report_error)` as a task; return it once the source published its first
    membership or failed for the first time, or after `FIRST_LIST_WAIT_S` (the shared `start()`
    of sources: pylb starts with a membership when it can, and without delay when it cannot)."""
    settled = asyncio.Event()

    async def publish_and_note(members: Members) -> None:
        await publish(members)
        settled.set()

    def report_and_note() -> None:
        report_error()
        settled.set()

    task = asyncio.create_task(run(publish_and_note, report_and_note), name=name)
    waiter = asyncio.create_task(settled.wait())
    await asyncio.wait((task, waiter), timeout=FIRST_LIST_WAIT_S, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    return task


Resolver = Callable[[str], Awaitable[list[str]]]
"""Resolves a host name to its addresses (A and AAAA); raises socket.gaierror as getaddrinfo does."""


async def system_resolve(name: str) -> list[str]:
    """The addresses of `name` from the system resolver (getaddrinfo: A and AAAA), in its order,
    without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    out: list[str] = []
    for _family, _type, _proto, _canon, sockaddr in infos:
        addr = str(sockaddr[0])
        if addr not in out:
            out.append(addr)
    return out


NO_SUCH_NAME = {getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n)}
"""getaddrinfo errors that mean "the name has no address" (an empty headless Service), not a failure."""


class DnsDiscovery:
    """Replicas = the addresses of a (headless Service) name, resolved every `interval_s`."""

    def __init__(self, name: str, port: int, scheme: str, interval_s: float, backoff_max_s: float, resolve: Resolver = system_resolve) -> None:
        self.name = name
        self.port = port
        self.scheme = scheme
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.resolve = resolve
        self.resolutions = 0
        """Resolutions attempted (for tests and logs)."""

    async def start(self, publish: Publish, report_error: ReportError) -> asyncio.Task[None]:
        """See `Discovery.start`."""
        return await start_source(self._run, publish, report_error, "pylb-discovery-dns")

    async def _run(self, publish: Publish, report_error: ReportError) -> None:
        backoff = Backoff(self.backoff_max_s)
        last: Members | None = None
        failing = False
        while True:
            self.resolutions += 1
            try:
                try:
                    addrs = await self.resolve(self.name)
                except socket.gaierror as exc:
                    if exc.errno not in NO_SUCH_NAME:
                        raise
                    addrs = []
                members = {replica_url(self.scheme, a, self.port): True for a in addrs}
                if members != last:
                    log.info("DNS discovery: replicas changed", extra={"dns_name": self.name, "replicas": list(members)})
                    await publish(dict(members))
                    last = members
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a source logs, counts and goes on
                report_error()
                if not failing:
                    log.warning("DNS discovery failed; keeping the last replica list", extra={"dns_name": self.name, "error": f"{type(exc).__name__}: {exc}"})
                failing = True
                await backoff.wait()
                continue
            if failing:
                log.info("DNS discovery works again", extra={"dns_name": self.name})
            failing = False
            backoff.reset()
            await asyncio.sleep(self.interval_s)


def create_discovery(settings: Settings) -> Discovery | None:
    """The discovery source that `fleet.discovery` names (None for static)."""
    mode, d = settings.fleet.discovery, settings.discovery
    if mode == "dns":
        return DnsDiscovery(d.dns_name, d.port, d.scheme, d.interval_s, d.backoff_max_s)
    if mode == "k8s":
        from .discovery_k8s import K8sDiscovery

        return K8sDiscovery(d)
    return None
