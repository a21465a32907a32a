"""The router driver: the one submit / poll / dispatch loop that both drivers of a router share.

Design (DESIGN.md §2)
---------------------
A `Router` is synchronous and never reads a clock; whoever drives it must keep a few facts
beside it: which requests are queued (and whether their client still waits), which are in
flight on which replica (and whether the router has had their first token), what was dispatched
where (pylb's dispatch counters and the hotspot window). The live proxy (`pylb.proxy.dispatcher`,
on the event loop's clock, with futures and a timer) and the simulator (`pylb.sim.cluster`, on a
virtual clock) both drive a router this way, so they share this class rather than keep two
copies of the same loop:

    submit(request, now[, failed_replica])  -> router.submit (or router.retry for a retry)
    poll(now) -> [(Dispatch, record)]       -> router.poll; every dispatch is booked (counters,
                                               hotspot window, in flight); a dispatch of a request
                                               whose client left is completed at once with
                                               usage None (the caller does not send it)
    abandon(id, now)                        -> router.cancel; when the router cannot withdraw it,
                                               the request is dropped at its dispatch (above)
    first_token / complete / metrics / membership  -> the router's hooks, each at most once
                                               per request where the router expects that
    move(id, replica, now)                  -> router.reassign: a request in flight is served by
                                               another replica than its dispatch named

Nothing here is asynchronous and nothing reads a clock: the caller passes `now`. The caller
polls after every event (`poll`) and arms its own timer from `router.next_wakeup`. Errors of the
router reach `on_router_error(where, exc)`: by default they propagate (the simulator wants a
broken router to stop the run); the proxy logs and counts them and goes on.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .interface import Dispatch, ReplicaId, ReplicaMetrics, Router, RoutingRequest, Usage

HOTSPOT_WINDOW = 1000
"""Dispatches over which the hotspot factor is computed."""


@dataclass(slots=True)
class DispatchCounts:
    """What the driver counts per replica that the router does not: dispatches, their
    (estimated) prompt tokens, and the prompt tokens the router expected cached."""

    dispatched: int = 0
    dispatched_prompt_tokens: int = 0
    predicted_cached_tokens: int = 0


@dataclass(slots=True)
class QueuedRequest:
    """A request submitted to the router and not yet dispatched."""

    request: RoutingRequest
    queued_at: float
    retry: bool = False
    abandoned: bool = False


@dataclass(slots=True)
class SentRequest:
    """A dispatched request not yet complete."""

    replica: ReplicaId
    prefilled: bool = False  # the router got its first token (it gets it at most once)


def _raise(where: str, exc: Exception) -> None:
    raise exc


class RouterDriver:
    """Drives one `Router` (see the module comment).

    Args:
        router: the router to drive.
        on_router_error: called with (event name, exception) when a router hook raises; the
            default re-raises. A handler that returns lets the driver go on as if the hook
            had done nothing (a failed poll dispatches nothing).
    """

    def __init__(self, router: Router, on_router_error: Callable[[str, Exception], None] = _raise) -> None:
        self.router = router
        self.on_router_error = on_router_error
        self.queued: dict[str, QueuedRequest] = {}
        """Submitted and not yet dispatched (abandoned ones included until withdrawn)."""
        self.active: dict[str, SentRequest] = {}
        """Dispatched and not complete."""
        self.counts: dict[ReplicaId, DispatchCounts] = {}
        """Per replica, the dispatch counters (kept while a replica is out of rotation; `forget`
        drops them when it leaves the fleet for good)."""
        self.replicas: list[ReplicaId] = []
        """The members, as last given to `membership`."""
        self._recent: deque[ReplicaId] = deque(maxlen=HOTSPOT_WINDOW)
        self._recent_counts: Counter[ReplicaId] = Counter()

    # ---- queries ----------------------------------------------------------------------------------

    def known(self, request_id: str) -> bool:
        """Whether `request_id` is queued or in flight."""
        return request_id in self.queued or request_id in self.active

    def hotspot_factor(self) -> float:
        """Replicas x the busiest replica's share of the recent dispatches (0 before any)."""
        n = len(self._recent)
        if not n or not self.replicas:
            return 0.0
        return len(self.replicas) * max(self._recent_counts.values()) / n

    # ---- events -----------------------------------------------------------------------------------

    def submit(self, request: RoutingRequest, now: float, failed_replica: ReplicaId | None = None) -> None:
        """Queue `request` in the router (`router.retry` when `failed_replica` names the replica
        its previous attempt failed on, after that attempt was completed with usage None).
        Raises what the router raises; the request is then not queued."""
        if self.known(request.request_id):
            raise ValueError(f"request id {request.request_id!r} is already queued or in flight")
        self.queued[request.request_id] = QueuedRequest(request, now, retry=failed_replica is not None)
        try:
            if failed_replica is not None:
                self.router.retry(request, failed_replica, now)
            else:
                self.router.submit(request, now)
        except Exception:
            del self.queued[request.request_id]
            raise

    def abandon(self, request_id: str, now: float) -> bool:
        """The request's client stopped waiting for its dispatch. True when it was withdrawn from
        the router; otherwise (not queued, or the router cannot withdraw it) False, and a queued
        one is dropped when it is dispatched."""
        q = self.queued.get(request_id)
        if q is None:
            return False
        try:
            if self.router.cancel(request_id, now):
                del self.queued[request_id]
                return True
        except Exception as exc:
            self.on_router_error("cancel", exc)
        q.abandoned = True
        return False

    def first_token(self, request_id: str, replica: ReplicaId, now: float) -> bool:
        """The request's first token arrived (or its prefill is estimated done); False when the
        router had it already or the request is not in flight."""
        sent = self.active.get(request_id)
        if sent is None or sent.prefilled:
            return False
        sent.prefilled = True
        self._call("on_first_token", self.router.on_first_token, request_id, replica, now)
        return True

    def complete(self, request_id: str, replica: ReplicaId, now: float, usage: Usage | None) -> bool:
        """The request left the replica (usage None: it failed or was aborted); False when it
        was not in flight."""
        if self.active.pop(request_id, None) is None:
            return False
        self._call("on_complete", self.router.on_complete, request_id, replica, now, usage)
        return True

    def move(self, request_id: str, replica: ReplicaId, now: float) -> bool:
        """The request in flight is served by `replica`, not where it was dispatched: move the
        router's accounting (`router.reassign`) and the dispatch counters there. False when it
        is not in flight, or the router did not move it (the accounting then stays put)."""
        sent = self.active.get(request_id)
        if sent is None or sent.replica == replica:
            return False
        try:
            moved = self.router.reassign(request_id, replica, now)
        except Exception as exc:
            self.on_router_error("reassign", exc)
            return False
        if not moved:
            return False
        old = self.counts.get(sent.replica)
        if old is not None and old.dispatched > 0:
            old.dispatched -= 1
        counts = self.counts.get(replica)
        if counts is None:
            counts = self.counts[replica] = DispatchCounts()
        counts.dispatched += 1
        sent.replica = replica
        return True

    def metrics(self, replica: ReplicaId, m: ReplicaMetrics, now: float) -> None:
        """A scrape of `replica`."""
        self._call("on_metrics", self.router.on_metrics, replica, m, now)

    def forget(self, replica: ReplicaId) -> None:
        """`replica` left the fleet for good (not merely out of rotation): drop its counters."""
        self.counts.pop(replica, None)

    def membership(self, replicas: Sequence[ReplicaId], now: float) -> None:
        """The members (replicas in rotation) changed."""
        self.replicas = list(replicas)
        self._call("on_membership", self.router.on_membership, list(replicas), now)

    def poll(self, now: float) -> list[tuple[Dispatch, QueuedRequest]]:
        """Poll the router; book and return every dispatch with its queue record. The dispatch of
        an abandoned request (`record.abandoned`) is completed at once with usage None, and the
        router is polled again, since that freed its slot; the caller sends only the others."""
        out: list[tuple[Dispatch, QueuedRequest]] = []
        while True:
            try:
                dispatches = self.router.poll(now)
            except Exception as exc:
                self.on_router_error("poll", exc)
                return out
            dropped = False
            for d in dispatches:
                q = self.queued.pop(d.request_id, None)
                if q is None:
                    self.on_router_error("poll", LookupError(f"router dispatched an unknown request {d.request_id!r} to {d.replica!r}"))
                    continue
                self._book(d, q.request)
                if q.abandoned:
                    dropped = True
                    del self.active[d.request_id]
                    self._call("on_complete", self.router.on_complete, d.request_id, d.replica, now, None)
                out.append((d, q))
            if not dropped:
                return out

    def next_wakeup(self, now: float) -> float | None:
        """When the router wants to be polled again (None: not before the next event)."""
        try:
            return self.router.next_wakeup(now)
        except Exception as exc:
            self.on_router_error("next_wakeup", exc)
            return None

    # ---- internals ----------------------------------------------------------------------------------

    def _book(self, d: Dispatch, request: RoutingRequest) -> None:
        counts = self.counts.get(d.replica)
        if counts is None:
            counts = self.counts[d.replica] = DispatchCounts()
        counts.dispatched += 1
        counts.dispatched_prompt_tokens += request.prompt_tokens
        counts.predicted_cached_tokens += min(d.cached_tokens, request.prompt_tokens)
        self.active[d.request_id] = SentRequest(d.replica)
        if len(self._recent) == self._recent.maxlen:
            old = self._recent[0]
            self._recent_counts[old] -= 1
            if not self._recent_counts[old]:
                del self._recent_counts[old]
        self._recent.append(d.replica)
        self._recent_counts[d.replica] += 1

    def _call(self, where: str, fn: Callable[..., object], *args: object) -> None:
        try:
            fn(*args)
        except Exception as exc:
            self.on_router_error(where, exc)
