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

Per-replica load (in flight, un-prefilled requests and tokens) and the per-token prefill time
are the router's: the dispatcher reads them from `router.view` and keeps no copy. It counts only
what the router does not: dispatches, their prompt tokens and the cached tokens the router
predicted for them (pylb's `/metrics`), and the recent dispatches for the hotspot factor. A
dispatch without a branch counts as "retry" for a retried request and as "unknown" otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from pylb.observability.metrics import HOTSPOT_WINDOW, ProxyMetrics, ReplicaLoad
from pylb.router.interface import Dispatch, Overloaded, ReplicaMetrics, Router, RoutingRequest, Usage

log = logging.getLogger("pylb.dispatcher")


class QueueLimitReached(Exception):
    """pylb's queue holds `max_queued` requests already (the proxy answers 429, `errors.QueueFull`)."""


class RouterFault(RuntimeError):
    """The router raised or broke the interface contract; the request cannot be routed."""


@dataclass(slots=True)
class _Queued:
    request: RoutingRequest
    future: asyncio.Future[Dispatch]
    queued_at: float
    abandoned: bool = False
    retry: bool = False


@dataclass(slots=True)
class _Sent:
    replica: str
    prefilled: bool = False  # the router got its first token (it gets it at most once)


@dataclass
class Dispatcher:
    """Drives one router from the event loop (see the module comment)."""

    router: Router
    metrics: ProxyMetrics
    max_queued: int
    clock: Callable[[], float] = time.monotonic
    dispatched: dict[str, ReplicaLoad] = field(default_factory=dict)
    """Per replica, the dispatch counters (`dispatched`, `dispatched_prompt_tokens`,
    `predicted_cached_tokens`); `load` adds the router's in-flight numbers."""

    def __post_init__(self) -> None:
        self._last = 0.0
        self._queued: dict[str, _Queued] = {}
        self._active: dict[str, _Sent] = {}  # dispatched and not complete
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._recent: deque[str] = deque(maxlen=HOTSPOT_WINDOW)
        self._recent_counts: Counter[str] = Counter()
        self.replicas: list[str] = []
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
    def queue_depth(self) -> int:
        """Requests submitted and not yet dispatched (abandoned ones included until withdrawn)."""
        return len(self._queued)

    def known(self, request_id: str) -> bool:
        """Whether `request_id` is queued or in flight."""
        return request_id in self._queued or request_id in self._active

    def load(self, replica: str) -> ReplicaLoad:
        """The replica's load as pylb's `/metrics` reports it: in flight and un-prefilled from the
        router's view (zero for a replica that is not a member), dispatch counters from here."""
        out = replace(self.dispatched[replica]) if replica in self.dispatched else ReplicaLoad()
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
        n = len(self._recent)
        if not n or not self.replicas:
            return 0.0
        return len(self.replicas) * max(self._recent_counts.values()) / n

    # ---- events -----------------------------------------------------------------------------------

    def submit(self, request: RoutingRequest, failed_replica: str | None = None) -> asyncio.Future[Dispatch]:
        """Queue `request` in the router; the future resolves to its Dispatch.

        `failed_replica` marks a retry: the request's previous attempt failed there (and was
        completed with usage None); the router gets `retry(request, failed_replica, now)`, so it
        can place the request on its other candidate. Raises QueueLimitReached past `max_queued`,
        the router's `Overloaded` when its admission control refuses the request, RouterFault
        when the router raises anything else."""
        if len(self._queued) >= self.max_queued:
            raise QueueLimitReached()
        fut: asyncio.Future[Dispatch] = asyncio.get_running_loop().create_future()
        now = self.now()
        self._queued[request.request_id] = _Queued(request, fut, now, retry=failed_replica is not None)
        t0 = time.perf_counter()
        try:
            if failed_replica is not None:
                self.router.retry(request, failed_replica, now)
            else:
                self.router.submit(request, now)
        except Overloaded:  # admission control: the caller answers 429
            del self._queued[request.request_id]
            raise
        except Exception as exc:
            del self._queued[request.request_id]
            self.metrics.count_background_error("router")
            log.exception("router.submit failed")
            raise RouterFault(f"router failed on submit: {type(exc).__name__}: {exc}") from exc
        self._poll(now, t0)
        return fut

    def abandon(self, request_id: str) -> None:
        """The request's handler stopped waiting for its dispatch (client gone, queue timeout)."""
        q = self._queued.get(request_id)
        if q is None:
            return
        if not q.future.done():
            q.future.cancel()
        try:
            if self.router.cancel(request_id, self.now()):
                del self._queued[request_id]
                return
        except Exception:
            self.metrics.count_background_error("router")
            log.exception("router.cancel failed; the request will be dropped at dispatch")
        q.abandoned = True

    def first_token(self, request_id: str, replica: str) -> None:
        """The request's first token arrived (or its prefill is estimated done)."""
        sent = self._active.get(request_id)
        if sent is None or sent.prefilled:
            return
        sent.prefilled = True
        now = self.now()
        self._call(self.router.on_first_token, request_id, replica, now)
        self._poll(now)

    def complete(self, request_id: str, replica: str, usage: Usage | None) -> None:
        """The request left the replica (usage None: it failed or was aborted)."""
        if self._active.pop(request_id, None) is None:
            return
        now = self.now()
        self._call(self.router.on_complete, request_id, replica, now, usage)
        self._poll(now)

    def on_metrics(self, replica: str, m: ReplicaMetrics) -> None:
        """A scrape of `replica`."""
        now = self.now()
        self._call(self.router.on_metrics, replica, m, now)
        self._poll(now)

    def on_membership(self, replicas: Sequence[str]) -> None:
        """The healthy replicas changed."""
        self.replicas = list(replicas)
        now = self.now()
        self._call(self.router.on_membership, list(replicas), now)
        self._poll(now)

    def close(self) -> None:
        """Stop the timer and fail every queued request (shutdown)."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for q in self._queued.values():
            if not q.future.done():
                q.future.set_exception(RouterFault("pylb is shutting down"))
        self._queued.clear()

    # ---- internals ----------------------------------------------------------------------------------

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception:
            self.metrics.count_background_error("router")
            log.exception("router event handler failed", extra={"event": getattr(fn, "__name__", "?")})

    def _poll(self, now: float, t0: float | None = None) -> None:
        """Poll the router and hand out its dispatches; `t0` (perf_counter at the start of a
        submit) times the routing decision."""
        try:
            dispatches = self.router.poll(now)
        except Exception:
            dispatches = []
            self.metrics.count_background_error("router")
            log.exception("router.poll failed")
        abandoned = False
        for d in dispatches:
            q = self._queued.pop(d.request_id, None)
            if q is None:
                self.metrics.count_background_error("router")
                log.error("router dispatched an unknown request", extra={"dispatch_id": d.request_id, "replica": d.replica})
                continue
            req = q.request
            self.predicted_known = True
            counts = self.dispatched.get(d.replica)
            if counts is None:
                counts = self.dispatched[d.replica] = ReplicaLoad()
            counts.dispatched += 1
            counts.dispatched_prompt_tokens += req.prompt_tokens
            counts.predicted_cached_tokens += min(d.cached_tokens, req.prompt_tokens)
            self._active[d.request_id] = _Sent(d.replica)
            if len(self._recent) == self._recent.maxlen:
                old = self._recent[0]
                self._recent_counts[old] -= 1
                if not self._recent_counts[old]:
                    del self._recent_counts[old]
            self._recent.append(d.replica)
            self._recent_counts[d.replica] += 1
            self.metrics.count_decision(d.branch or ("retry" if q.retry else "unknown"))
            self.metrics.queue_wait.observe(now - q.queued_at)
            if q.abandoned or q.future.done():
                abandoned = True
                del self._active[d.request_id]
                self._call(self.router.on_complete, d.request_id, d.replica, now, None)
            else:
                q.future.set_result(d)
        if t0 is not None:
            self.metrics.decision_seconds.observe(time.perf_counter() - t0)
        if abandoned:
            self._poll(now)
            return
        self._arm(now)

    def _arm(self, now: float) -> None:
        if self.closed:
            return
        try:
            wake = self.router.next_wakeup(now)
        except Exception:
            wake = None
            self.metrics.count_background_error("router")
            log.exception("router.next_wakeup failed")
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
