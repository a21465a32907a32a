"""The router core's hooks for the live proxy: cancel, retry, and what a Dispatch carries."""

from __future__ import annotations

from policy_fakes import core, ids, req

from pylb.router import registry
from pylb.router.interface import RouterOptions


def test_dispatch_names_its_branch_and_expected_cached_tokens() -> None:
    r = core(1)
    r.submit(req("0/a", tokens=100, hashes=[1, 2, 3]), 0.0)
    (d,) = r.poll(0.0)
    assert (d.request_id, d.replica, d.branch, d.cached_tokens) == ("0/a", "r0", "affinity", 0)
    r.on_complete("0/a", "r0", 1.0, None)
    # The mirror now holds the three blocks (16 tokens each) on r0.
    r.submit(req("0/b", tokens=100, hashes=[1, 2, 3]), 2.0)
    (d,) = r.poll(2.0)
    assert d.cached_tokens == 48 and d.branch == "affinity"


def test_cancel_withdraws_a_queued_request_and_frees_its_place() -> None:
    r = core(1, max_unprefilled_requests=1)
    r.submit(req("0/a"), 0.0)
    r.submit(req("0/b"), 0.0)
    assert ids(r.poll(0.0)) == ["0/a"]
    assert r.queued == 1
    r.cancel("0/b", 0.1)
    assert r.queued == 0 and r.replicas[0].queued_requests == 0
    r.on_complete("0/a", "r0", 0.2, None)
    assert r.poll(0.3) == []  # nothing left: the cancelled request is never dispatched
    r.cancel("0/a", 0.4)  # completed or unknown ids are ignored
    r.cancel("nope", 0.4)
    r.submit(req("0/b"), 0.5)  # its id is free again
    assert ids(r.poll(0.5)) == ["0/b"]


def test_retry_goes_to_the_alternate_or_another_replica_never_the_failed_one() -> None:
    r = core(3)
    r.submit(req("1/a/2"), 0.0)
    (d,) = r.poll(0.0)
    assert d.replica == "r1"
    r.on_complete("1/a/2", "r1", 0.1, None)
    r.retry(req("1/a/2"), "r1", 0.1)
    (d,) = r.poll(0.1)
    assert (d.replica, d.branch) == ("r2", "retry")
    r.on_complete("1/a/2", "r2", 0.2, None)
    # No alternate: the least-loaded replica other than the failed one.
    r.submit(req("0/busy"), 0.2)
    r.poll(0.2)
    r.retry(req("1/b"), "r1", 0.3)
    (d,) = r.poll(0.3)
    assert d.replica == "r2" and r.decisions["retry"] == 2


def test_every_registered_policy_retries_away_from_the_failed_replica() -> None:
    for name in registry.names():
        r = registry.create(name, RouterOptions(seed=1))
        r.on_membership(["a", "b"], 0.0)
        r.submit(req("x", hashes=[7, 8]), 0.0)
        (d,) = r.poll(0.0)
        r.on_complete("x", d.replica, 0.1, None)
        r.retry(req("x", hashes=[7, 8]), d.replica, 0.1)
        (d2,) = r.poll(0.1)
        assert d2.replica != d.replica, name
