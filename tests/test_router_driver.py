"""The router driver shared by the proxy's dispatcher and the simulator (pylb.router.driver)."""

from __future__ import annotations

import pytest

from policy_fakes import core, req
from pylb.router.driver import RouterDriver
from pylb.router.interface import Usage


def test_dispatches_are_booked_and_returned_once() -> None:
    d = RouterDriver(core(2, max_unprefilled_requests=1))
    d.membership(["r0", "r1"], 0.0)
    d.submit(req("0/a", tokens=100), 0.0)
    out = d.poll(0.0)
    d.submit(req("0/b", tokens=50), 0.0)
    assert [(x.request_id, x.replica) for x, _ in out] == [("0/a", "r0")]
    assert d.known("0/a") and d.known("0/b") and set(d.queued) == {"0/b"} and set(d.active) == {"0/a"}
    assert d.counts["r0"].dispatched == 1 and d.counts["r0"].dispatched_prompt_tokens == 100
    assert d.poll(0.0) == []  # nothing new
    assert d.first_token("0/a", "r0", 0.1) and not d.first_token("0/a", "r0", 0.2)  # once
    assert [x.request_id for x, _ in d.poll(0.1)] == ["0/b"]  # its budget was freed
    assert d.complete("0/a", "r0", 0.3, Usage(100, 4)) and not d.complete("0/a", "r0", 0.3, None)
    assert d.hotspot_factor() == 2.0  # 2 replicas x all dispatches on one


def test_an_abandoned_request_the_router_cannot_withdraw_is_dropped_at_dispatch() -> None:
    r = core(2, max_unprefilled_requests=1)
    d = RouterDriver(r)
    d.membership(["r0", "r1"], 0.0)
    d.submit(req("0/a"), 0.0)
    d.poll(0.0)
    d.submit(req("0/b"), 0.0)
    d.submit(req("0/c"), 0.0)
    d.poll(0.0)
    assert d.abandon("0/b", 0.0)  # queued in the core: withdrawn
    r.cancel = lambda request_id, now: False  # type: ignore[method-assign]  # a router that cannot withdraw
    assert not d.abandon("0/c", 0.0) and d.queued["0/c"].abandoned
    d.first_token("0/a", "r0", 1.0)
    out = d.poll(1.0)
    assert [(x.request_id, q.abandoned) for x, q in out] == [("0/c", True)]
    assert not d.known("0/c") and r.replicas[0].inflight_requests == 1  # completed at once: only 0/a


def test_ids_are_unique_and_router_errors_reach_the_handler() -> None:
    seen: list[str] = []
    r = core(1)
    d = RouterDriver(r, lambda where, exc: seen.append(where))
    d.membership(["r0"], 0.0)
    d.submit(req("0/a"), 0.0)
    with pytest.raises(ValueError, match="already queued"):
        d.submit(req("0/a"), 0.0)

    def broken(now: float) -> list:
        raise RuntimeError("boom")

    r.poll = broken  # type: ignore[method-assign]
    assert d.poll(0.0) == [] and seen == ["poll"]
    with pytest.raises(RuntimeError):  # the default handler re-raises
        RouterDriver(r).poll(0.0)


def test_forget_drops_a_removed_replicas_counters_only() -> None:
    d = RouterDriver(core(2))
    d.membership(["r0", "r1"], 0.0)
    d.submit(req("0/a"), 0.0)
    d.submit(req("1/b"), 0.0)
    d.poll(0.0)
    d.membership(["r1"], 1.0)  # out of rotation: counters kept
    assert set(d.counts) == {"r0", "r1"}
    d.forget("r0")  # gone for good
    assert set(d.counts) == {"r1"}


async def test_a_replica_removed_by_discovery_leaves_no_dispatch_counters() -> None:
    from pylb.config import FleetSettings
    from pylb.fleet.fleet import Fleet
    from pylb.observability.metrics import ProxyMetrics
    from pylb.proxy.dispatcher import Dispatcher

    a, b = "http://127.0.0.1:9", "http://127.0.0.1:10"
    disp = Dispatcher(core(2), ProxyMetrics(), max_queued=8)
    disp.on_membership([a, b])
    disp.submit(req("0/x"))
    disp.submit(req("1/y"))
    assert disp.load(a).dispatched == 1 and disp.load(b).dispatched == 1
    fleet = Fleet(FleetSettings(backends=[a, b]), ProxyMetrics(), disp.on_membership, disp.on_metrics, on_removed=disp.forget_replica)
    await fleet.set_members({a: True})
    assert set(disp.driver.counts) == {a} and disp.load(b).dispatched == 0
    disp.close()
