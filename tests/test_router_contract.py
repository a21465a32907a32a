"""The router contract as code: pure `choose`, a read-only view, retries counted once, and a
live driver (the proxy's dispatcher) that keeps no copy of the router's state."""

from __future__ import annotations

import pytest

from fake_fleet import prefix_workload
from pylb import native
from pylb.observability.metrics import ProxyMetrics
from pylb.proxy.dispatcher import Dispatcher
from pylb.router import registry
from pylb.router.core import CoreRouter, CoreView
from pylb.router.interface import ReplicaState, Router, RouterOptions, RoutingRequest, Usage
from pylb.router.policy import Choice, Policy

POLICIES = [n for n in registry.names() if registry.policy_class(n) is not None]


def req(rid: str, n_blocks: int = 40, tag: str = "p") -> RoutingRequest:
    data = (tag * (64 * n_blocks))[: 64 * n_blocks].encode()
    return RoutingRequest(rid, native.block_hashes(data, 64), 16 * n_blocks, 8, 0.0)


def test_router_declares_every_call_a_driver_makes() -> None:
    for name in ("submit", "poll", "on_first_token", "on_complete", "on_metrics", "on_membership", "next_wakeup", "retry", "cancel", "view"):
        assert hasattr(Router, name), name
    assert Router.__abstractmethods__ == {"submit", "poll", "view"}


class Spy(Policy):
    """Records what the core hands the policy, and answers replica 0."""

    name = "spy"

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.views: list[object] = []
        self.calls: list[str] = []

    def advance(self, now: float) -> None:
        self.calls.append("advance")

    def choose(self, request: RoutingRequest, view) -> Choice:  # noqa: ANN001
        self.views.append(view)
        self.calls.append("choose")
        return Choice(0, branch="load")

    def on_choice(self, request: RoutingRequest, choice: Choice, view) -> None:  # noqa: ANN001
        self.views.append(view)
        self.calls.append("on_choice")


def test_policies_get_a_read_only_view_not_the_core() -> None:
    spy = Spy(RouterOptions())
    core = CoreRouter(spy)
    core.on_membership(["a", "b"], 0.0)
    core.submit(req("r"), 0.0)
    assert spy.calls == ["advance", "choose", "on_choice"]
    assert all(v is core.view for v in spy.views) and isinstance(core.view, CoreView)
    view = core.view
    assert not hasattr(view, "submit") and not hasattr(view, "poll") and not hasattr(view, "mirror")
    state = view.replicas[0]
    assert isinstance(state, ReplicaState) and state.queued_requests == 1
    with pytest.raises(AttributeError):
        state.queued_requests = 0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        view.now = 5.0  # type: ignore[misc]
    assert view.replica("b") is view.replicas[1] and view.replica("zz") is None


@pytest.mark.parametrize("policy", POLICIES)
def test_choose_is_pure(policy: str) -> None:
    """Asking a policy again (as a retry does) changes none of its later decisions."""
    reqs = prefix_workload(150, gap=0.02, seed=5)

    def run(extra_asks: int) -> list[tuple[str, str]]:
        router = registry.create(policy, RouterOptions(seed=3, slo_ttft=2.0))
        assert isinstance(router, CoreRouter)
        router.on_membership([f"r{i}" for i in range(4)], 0.0)
        out = []
        for k, r in enumerate(reqs):
            now = r.arrival
            for _ in range(extra_asks):
                router.policy.advance(now)
                router.policy.choose(r, router.view)
            router.submit(r, now)
            out += [(d.request_id, d.replica) for d in router.poll(now)]
            if k >= 6:  # keep a few in flight
                rid, rep = out[k - 6]
                router.on_first_token(rid, rep, now)
                router.on_complete(rid, rep, now, Usage(10, 1, 0))
        return out

    assert run(0) == run(2)


def test_a_retried_request_is_counted_once_in_dualmaps_key_window() -> None:
    router = registry.create("dualmap", RouterOptions())
    assert isinstance(router, CoreRouter)
    router.on_membership(["a", "b", "c"], 0.0)
    table = router.policy.keyer.table  # type: ignore[attr-defined]
    r = req("x", n_blocks=70)  # two key blocks of 32 router blocks, and a tail
    first = int(r.block_hashes[31])
    router.submit(r, 0.0)
    (d,) = router.poll(0.0)
    assert (table.fill, table.count(first)) == (1, 1)
    router.on_complete("x", d.replica, 0.1, None)  # the attempt failed before any byte
    router.retry(r, d.replica, 0.1)
    (again,) = router.poll(0.1)
    assert again.replica != d.replica and again.branch == "retry"
    assert (table.fill, table.count(first)) == (1, 1)  # not counted a second time


def test_cancel_reports_whether_the_request_was_withdrawn() -> None:
    router = registry.create("round-robin", RouterOptions(max_unprefilled_requests=1))
    router.on_membership(["a"], 0.0)
    router.submit(req("1"), 0.0)
    router.submit(req("2"), 0.0)
    assert [d.request_id for d in router.poll(0.0)] == ["1"]
    assert router.cancel("2", 0.1) is True  # queued: withdrawn
    assert router.cancel("1", 0.1) is False  # dispatched: ends through on_complete
    assert router.cancel("nope", 0.1) is False


async def test_the_dispatcher_reads_load_and_prefill_time_from_the_router() -> None:
    router = registry.create("least-load", RouterOptions(prefill_seconds_per_token=2e-4))
    disp = Dispatcher(router, ProxyMetrics(), max_queued=8)
    disp.on_membership(["http://a", "http://b"])
    futs = [disp.submit(req(f"q{i}", tag=str(i))) for i in range(3)]
    sent = [f.result() for f in futs]
    view = router.view
    for url in ("http://a", "http://b"):
        load, state = disp.load(url), view.replica(url)
        assert state is not None
        assert (load.inflight, load.unprefilled_requests, load.unprefilled_tokens) == (
            state.inflight_requests, state.unprefilled_requests, state.unprefilled_tokens)  # fmt: skip
    assert sum(disp.load(u).inflight for u in ("http://a", "http://b")) == 3
    assert sum(disp.load(u).dispatched for u in ("http://a", "http://b")) == 3
    d = sent[0]
    disp.first_token(d.request_id, d.replica)
    assert disp.load(d.replica).unprefilled_requests == view.replica(d.replica).unprefilled_requests  # type: ignore[union-attr]
    assert disp.prefill_seconds_per_token(d.replica) == view.replica(d.replica).prefill_seconds_per_token  # type: ignore[union-attr]
    assert disp.prefill_seconds_per_token("http://gone") is None
    for d in sent:
        disp.complete(d.request_id, d.replica, Usage(10, 1, 0))
    assert all(disp.load(u).inflight == 0 for u in ("http://a", "http://b"))
    disp.close()
