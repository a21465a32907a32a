"""The balancer: the routing half of the live driver, shared by its two front ends.

Design (DESIGN.md §2 and §5, issue 11 §3)
-----------------------------------------
pylb meets clients two ways: as an HTTP proxy (`pylb serve`, `pylb.proxy.server`), where it
forwards the bytes itself, and as Envoy's endpoint picker (`pylb epp`, `pylb.epp`), where Envoy
forwards them and pylb only names the replica. Both run the same router brain the same way, and
this module is that one way:

    router        `create_router(settings.router)`: the policy spec around the router core
    dispatcher    the only caller of the router (`pylb.proxy.dispatcher`), on the event loop
    fleet         health probes, passive ejection, metrics scraping and discovery
                  (`pylb.fleet`), feeding the dispatcher's membership and metrics events; a
                  replica that discovery removes frees the dispatcher's counters for it
    metrics       pylb's `pylb_*` series (`pylb.observability.metrics`)

and the steps of a routed request that do not depend on the front end: wait for the router's
dispatch (`wait_dispatch`: 429 when pylb's queue is full, 504 past `router.queue_timeout_s`), the
estimated first-token event of a non-streamed request (`estimate_first_token`: vLLM sends nothing
of such an answer before it is complete, see `pylb.proxy.server`), and the state behind the
`/metrics` page (`snapshot`). A front end owns its own listener, its request-in-progress count and
what it does with the dispatch (send the body, or tell Envoy where to send it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from pylb.config import ConfigError, RouterSettings, Settings
from pylb.fleet.discovery import create_discovery
from pylb.fleet.fleet import Fleet
from pylb.fleet.kv_feed import KvFeed
from pylb.observability.metrics import ProxyMetrics, ProxySnapshot, ReplicaSnapshot
from pylb.router import registry
from pylb.router.interface import Dispatch, Overloaded, Router, RoutingRequest
from pylb.router.policy import PolicyOptionError
from pylb.router.request import RequestLimits

from .dispatcher import Dispatcher, QueueLimitReached, RouterFault
from .errors import NoReplica, ProxyError, QueueFull, QueueTimeout


def create_router(rs: RouterSettings) -> Router:
    """The router of the settings: the policy spec `rs.policy` (`NAME[:key=value...]`, as
    `pylb simulate --policy` takes it) around a core with `rs.router_options()`.

    Raises ConfigError naming the setting and its value: `router.policy` for an unknown policy
    or a bad spec option, the setting for a value `RouterOptions` rejects, `router.extra` for a
    policy option from there that the policy rejects."""
    options = rs.router_options()
    try:
        spec = registry.parse_spec(rs.policy)
    except (registry.UnknownPolicyError, PolicyOptionError) as exc:
        raise ConfigError("router.policy", rs.policy, str(exc)) from None
    try:
        return registry.create(rs.policy, options)
    except ValueError as exc:  # a policy rejecting an option's value (PolicyOptionError is one)
        if rs.extra and not spec.options:
            raise ConfigError("router.extra", rs.extra, str(exc)) from None
        raise ConfigError("router.policy", rs.policy, str(exc)) from None


class Balancer:
    """Router, dispatcher, fleet and metrics wired together (see the module comment).

    Without `router`, the router is `create_router(settings.router)`: the constructor raises
    ConfigError for an unknown policy, a bad policy option or router setting."""

    def __init__(self, settings: Settings, router: Router | None = None) -> None:
        self.settings = settings
        rs = settings.router
        self.router = router if router is not None else create_router(rs)
        self.metrics = ProxyMetrics()
        self.dispatcher = Dispatcher(self.router, self.metrics, rs.max_queued)
        self.kv: KvFeed | None = None  # router.cache_state events: KV-event subscribers and engine keys
        on_membership = self.dispatcher.on_membership
        if rs.cache_state == "events":
            self.kv = KvFeed(settings, self.router, self.dispatcher.on_kv_event, self.metrics.registry)
            on_membership = self._membership_with_kv
        self.fleet = Fleet(
            settings.fleet, self.metrics, on_membership, self.dispatcher.on_metrics,
            discovery=create_discovery(settings), on_removed=self.dispatcher.forget_replica,
        )  # fmt: skip
        self.limits = RequestLimits.from_settings(rs)
        self.queued: set[asyncio.Future[Dispatch]] = set()
        """Futures of the requests waiting in pylb's queue (a front end that stops fails them)."""
        fs = settings.fleet
        self.retry_after = str(max(1, math.ceil(fs.health_interval_s * fs.healthy_threshold)))
        """`Retry-After` seconds of a 503 for want of a healthy replica: about when one can be back."""

    def _membership_with_kv(self, replicas: Sequence[str]) -> None:
        self.dispatcher.on_membership(replicas)
        assert self.kv is not None
        self.kv.sync(replicas)

    async def wait_dispatch(self, rreq: RoutingRequest, failed_replica: str | None = None) -> Dispatch:
        """Submit `rreq` (a retry when `failed_replica` is given) and wait for its dispatch.

        Raises QueueFull (429) when pylb's queue is full, QueueTimeout (504) after
        `router.queue_timeout_s` in the queue, ProxyError 500 when the router fails on submit,
        503 when pylb shuts down meanwhile. A caller that is cancelled while waiting withdraws
        the request from the router."""
        disp = self.dispatcher
        rs = self.settings.router
        try:
            fut = disp.submit(rreq, failed_replica)
        except QueueLimitReached:
            raise QueueFull(f"pylb's queue is full ({rs.max_queued} requests waiting); retry later", headers={"Retry-After": "1"}) from None
        except Overloaded as exc:  # admission control: waiting would be hopeless
            raise QueueFull(f"pylb is overloaded: {exc}; retry later", headers={"Retry-After": str(max(1, math.ceil(exc.predicted_ttft)))}) from None
        except RouterFault as exc:
            raise ProxyError(str(exc), status=500) from None
        if fut.done():  # the common case: dispatched by the poll that followed the submit
            return fut.result()
        timeout = rs.queue_timeout_s - (disp.now() - rreq.arrival)
        handle = asyncio.get_running_loop().call_later(max(0.0, timeout), _expire, fut)
        self.queued.add(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            disp.abandon(rreq.request_id)
            raise
        except NoReplica:  # pylb is stopping (the front end failed the queued requests)
            disp.abandon(rreq.request_id)
            raise
        except QueueTimeout:
            disp.abandon(rreq.request_id)
            raise QueueTimeout(f"the request waited {rs.queue_timeout_s:g} s in pylb's queue without a replica free") from None
        except RouterFault as exc:
            raise ProxyError(str(exc), status=503, headers={"Retry-After": self.retry_after}) from None
        finally:
            handle.cancel()
            self.queued.discard(fut)

    def idle_replicas(self) -> list[str]:
        """Healthy replicas with nothing queued for them or in flight on them in the router's
        view, in configuration order; none while pylb's queue holds requests (background work,
        such as the semantic cache's re-runs, must not compete with clients)."""
        if self.dispatcher.queue_depth:
            return []
        view = self.router.view
        out = []
        for name in self.fleet.healthy:
            s = view.replica(name)
            if s is not None and s.load == 0:
                out.append(name)
        return out

    def move(self, request_id: str, replica: str) -> bool:
        """The request in flight is served by `replica`, not by the replica its dispatch named
        (`pylb epp`: the data plane fell back, or a subset hint narrowed the choice): move the
        router's accounting there. False when nothing moved."""
        disp = self.dispatcher
        now = disp.now()
        if not disp.driver.move(request_id, replica, now):
            return False
        disp._poll(now)  # the old replica's budget was freed
        return True

    def estimate_first_token(self, rreq: RoutingRequest, replica: str) -> asyncio.TimerHandle | None:
        """For a non-streamed request just sent to `replica`: a timer that delivers its estimated
        first-token event at prompt tokens x the replica's learned per-token prefill time (seeded
        with `router.prefill_s_per_token`); cancel it when the answer completes first. None for a
        streamed request, whose first chunk is the event."""
        if rreq.stream:
            return None
        rate = self.dispatcher.prefill_seconds_per_token(replica)
        est = rreq.prompt_tokens * (rate if rate is not None else self.settings.router.prefill_s_per_token)
        return asyncio.get_running_loop().call_later(est, self.dispatcher.first_token, rreq.request_id, replica)

    def snapshot(self, in_progress: int) -> ProxySnapshot:
        """The live state behind pylb's state series; `in_progress` is the front end's count of
        requests being served."""
        fleet = self.fleet
        healthy = set(fleet.healthy)
        reps = []
        for url, r in fleet.replicas.items():
            m = r.metrics
            reps.append(
                ReplicaSnapshot(
                    replica=url,
                    healthy=url in healthy,
                    load=self.dispatcher.load(url),
                    observed_queries=r.observed_queries,
                    observed_hits=r.observed_hits,
                    kv_cache_usage=m.kv_cache_usage if m else None,
                    running=m.num_requests_running if m else None,
                    waiting=m.num_requests_waiting if m else None,
                )
            )
        return ProxySnapshot(
            queue_depth=self.dispatcher.queue_depth,
            in_progress=in_progress,
            hotspot_factor=self.dispatcher.hotspot_factor(),
            predicted_known=self.dispatcher.predicted_known,
            replicas=reps,
            ttft_prediction_error=self.router.ttft_prediction_error(),
            event_loop_tasks=_event_loop_tasks(),
        )


def _event_loop_tasks() -> int:
    """Tasks alive in the running event loop (0 when called outside one)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:
        return 0


def _expire(fut: asyncio.Future[Dispatch]) -> None:
    if not fut.done():
        fut.set_exception(QueueTimeout("queue timeout"))
