"""The dispatcher: the one place the live proxy talks to the router.

Design (DESIGN.md §2, `pylb.router.interface`)
-----------------------------------------------
The router is synchronous and never reads the clock. The dispatcher owns the proxy's clock
(`time.monotonic`, made non-decreasing) and delivers every event to the router from the event
loop's thread, so no two router calls ever overlap:

    submit(req)           -> router.submit, then poll; returns a Future that the request's
                             handler awaits and that resolves to its `Dispatch`
    first_token(id)       -> router.on_first_token, then poll
    complete(id, usage)   -> router.on_complete, then poll
    metrics(replica, m)   -> router.on_metrics, then poll
    membership(replicas)  -> router.on_membership, then poll

After every poll, the router's `next_wakeup` is armed as one `loop.call_at` timer, which polls
again when it fires (the "short timer" that re-checks dispatch). Each `Dispatch` the poll returns
resolves the waiting request's future; polling inline (instead of in a separate task) saves a
task switch per event on the request path.

A retried request (its attempt failed before the client got a byte) goes to `router.retry`
with the same id, so that the router can send it to its other candidate.

A request that is abandoned while queued (its client went away, or it waited past the queue
timeout) is withdrawn with `router.cancel`; when the router cannot withdraw it (cancel answers
False), it stays queued in the router and, when it is dispatched, is completed at once with
`usage=None` without being sent (so the router's accounting stays exact either way).

The bookkeeping beside the router (queued and in-flight requests, dispatch counters, the hotspot
window, dropping the dispatch of an abandoned request) is `pylb.router.driver.RouterDriver`'s,
the same loop the simulator drives. Per-replica load (in flight, un-prefilled requests and
tokens) and the per-token prefill time are the router's: the dispatcher reads them from
`router.view` and keeps no copy. What this module adds is the event loop's part: futures, the
timer, metrics, and logging a failing router instead of stopping. A dispatch without a branch
counts as "retry" for a retried request and as "unknown" otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from pylb.observability.metrics import ProxyMetrics, ReplicaLoad
from pylb.router.driver import RouterDriver
from pylb.router.interface import Dispatch, Overloaded, ReplicaMetrics, Router, RoutingRequest, Usage

log = logging.getLogger("pylb.dispatcher")


class QueueLimitReached(Exception):
    """pylb's queue holds `max_queued` requests already (the proxy answers 429, `errors.QueueFull`)."""


class RouterFault(RuntimeError):
    """The router raised or broke the interface contract; the request cannot be routed."""


@dataclass
class Dispatcher:
    """Drives one router from the event loop (see the module comment)."""

    router: Router
    metrics: ProxyMetrics
    max_queued: int
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self._last = 0.0
        self.driver = RouterDriver(self.router, self._router_failed)
        self._futures: dict[str, asyncio.Future[Dispatch]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.predicted_known = False
        self.closed = False

    # ---- clock ------------------------------------------------------------------------------------

    def now(self) -> float:
        """The driver clock: monotonic seconds, never smaller than the previous reading."""
        t = self.clock()
        if t < self._last:
            t = self._last
        self._last = t
        return t

    # ---- queries ----------------------------------------------------------------------------------

    @property
    def replicas(self) -> list[str]:
        """The members, as last given to `on_membership`."""
        return self.driver.replicas

    @property
    def queue_depth(self) -> int:
        """Requests submitted and not yet dispatched (abandoned ones included until withdrawn)."""
        return len(self.driver.queued)

    def known(self, request_id: str) -> bool:
        """Whether `request_id` is queued or in flight."""
        return self.driver.known(request_id)

    def load(self, replica: str) -> ReplicaLoad:
        """The replica's load as pylb's `/metrics` reports it: in flight and un-prefilled from the
        router's view (zero for a replica that is not a member), dispatch counters from the driver."""
        out = ReplicaLoad()
        c = self.driver.counts.get(replica)
        if c is not None:
            out = replace(out, dispatched=c.dispatched, dispatched_prompt_tokens=c.dispatched_prompt_tokens,
                          predicted_cached_tokens=c.predicted_cached_tokens)  # fmt: skip
        s = self.router.view.replica(replica)
        if s is not None:
            out.inflight = s.inflight_requests
            out.unprefilled_requests = s.unprefilled_requests
            out.unprefilled_tokens = s.unprefilled_tokens
        return out

    def prefill_seconds_per_token(self, replica: str) -> float | None:
        """The router's learned per-token prefill time on `replica` (None when not a member)."""
        s = self.router.view.replica(replica)
        return None if s is None else s.prefill_seconds_per_token

    def hotspot_factor(self) -> float:
        """Replicas x the busiest replica's share of the recent dispatches (0 before any)."""
        return self.driver.hotspot_factor()

    # ---- events -----------------------------------------------------------------------------------

    def submit(self, request: RoutingRequest, failed_replica: str | None = None) -> asyncio.Future[Dispatch]:
        """Queue `request` in the router; the future resolves to its Dispatch.

        `failed_replica` marks a retry: the request's previous attempt failed there (and was
        completed with usage None); the router gets `retry(request, failed_replica, now)`, so it
        can place the request on its other candidate. Raises QueueLimitReached past `max_queued`,
        the router's `Overloaded` when its admission control refuses the request, RouterFault
        when the router raises anything else."""
        if len(self.driver.queued) >= self.max_queued:
            raise QueueLimitReached()
        fut: asyncio.Future[Dispatch] = asyncio.get_running_loop().create_future()
        now = self.now()
        t0 = time.perf_counter()
        try:
            self.driver.submit(request, now, failed_replica)
        except Overloaded:  # admission control: the caller answers 429
            raise
        except Exception as exc:
            self.metrics.count_background_error("router")
            log.exception("router.submit failed")
            raise RouterFault(f"router failed on submit: {type(exc).__name__}: {exc}") from exc
        self._futures[request.request_id] = fut
        self._poll(now, t0)
        return fut

    def abandon(self, request_id: str) -> None:
        """The request's handler stopped waiting for its dispatch (client gone, queue timeout)."""
        fut = self._futures.pop(request_id, None)
        if fut is None:
            return
        if not fut.done():
            fut.cancel()
        self.driver.abandon(request_id, self.now())

    def first_token(self, request_id: str, replica: str) -> None:
        """The request's first token arrived (or its prefill is estimated done)."""
        now = self.now()
        if self.driver.first_token(request_id, replica, now):
            self._poll(now)

    def complete(self, request_id: str, replica: str, usage: Usage | None) -> None:
        """The request left the replica (usage None: it failed or was aborted)."""
        now = self.now()
        if self.driver.complete(request_id, replica, now, usage):
            self._poll(now)

    def on_metrics(self, replica: str, m: ReplicaMetrics) -> None:
        """A scrape of `replica`."""
        now = self.now()
        self.driver.metrics(replica, m, now)
        self._poll(now)

    def on_kv_event(self, replica: str, kind: str, keys: np.ndarray) -> None:
        """A KV-cache event of `replica`'s engine (`pylb.fleet.kv_feed`); no poll: it frees no budget."""
        try:
            self.router.on_kv_event(replica, kind, keys, self.now())
        except Exception as exc:
            self._router_failed("on_kv_event", exc)

    def on_membership(self, replicas: Sequence[str]) -> None:
        """The healthy replicas changed."""
        now = self.now()
        self.driver.membership(replicas, now)
        self._poll(now)

    def forget_replica(self, replica: str) -> None:
        """`replica` was removed from the fleet (by discovery): drop its dispatch counters."""
        self.driver.forget(replica)

    def close(self) -> None:
        """Stop the timer and fail every queued request (shutdown)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(RouterFault("pylb is shutting down"))
        self._futures.clear()
        self.driver.queued.clear()

    # ---- internals ----------------------------------------------------------------------------------

    def _router_failed(self, where: str, exc: Exception) -> None:
        self.metrics.count_background_error("router")
        log.error("router %s failed: %s: %s", where, type(exc).__name__, exc, exc_info=exc)

    def _poll(self, now: float, t0: float | None = None) -> None:
        """Poll the router and hand out its dispatches; `t0` (perf_counter at the start of a
        submit) times the routing decision."""
        while True:
            gone = False
            for d, q in self.driver.poll(now):
                self.predicted_known = True
                self.metrics.count_decision(d.branch or ("retry" if q.retry else "unknown"))
                self.metrics.queue_wait.observe(now - q.queued_at)
                if q.abandoned:
                    continue
                fut = self._futures.pop(d.request_id, None)
                if fut is None or fut.done():  # its handler is gone without abandoning it
                    gone = self.driver.complete(d.request_id, d.replica, now, None) or gone
                else:
                    fut.set_result(d)
            if not gone:
                break
        if t0 is not None:
            self.metrics.decision_seconds.observe(time.perf_counter() - t0)
        self._arm(now)

    def _arm(self, now: float) -> None:
        if self.closed:
            return
        wake = self.driver.next_wakeup(now)
        if wake is None or wake <= now:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            return
        if self._timer is not None:
            if self._timer_at == wake:
                return
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer_at = wake
        self._timer = loop.call_at(loop.time() + (wake - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self._poll(self.now())
