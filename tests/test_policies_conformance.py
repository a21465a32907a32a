"""Every registered policy against the same contract (STYLE.md 1): it always picks a live replica,
is deterministic under a seed, works with one replica, survives replicas joining and leaving
mid-run with no request lost, and its `choose` only ever sees a non-empty replica list.

The test loops over the whole registry, so a policy added later (its module listed in
`pylb.router.registry.BUILTIN_MODULES`) is covered without touching this file.
"""

from __future__ import annotations

import pytest

from fake_fleet import FakeFleet, prefix_workload
from pylb.router import registry
from pylb.router.core import CoreRouter
from pylb.router.interface import Router, RouterOptions

POLICIES = registry.names()
NAMES = [f"replica-{i}" for i in range(4)]


def make(policy: str, seed: int = 7) -> Router:
    """A router for `policy` whose policy asserts it is never asked to choose among no replicas."""
    router = registry.create(policy, RouterOptions(seed=seed, slo_ttft=2.0))
    if isinstance(router, CoreRouter):
        inner = router.policy.choose

        def checked(request, view):  # noqa: ANN001, ANN202
            assert len(view.replicas) > 0, f"{policy}: choose called with no replicas"
            choice = inner(request, view)
            assert 0 <= choice.replica < len(view.replicas)
            return choice

        router.policy.choose = checked  # type: ignore[method-assign]
    return router


def test_the_registry_has_the_core_policies() -> None:
    assert {"round-robin", "least-load", "consistent-hash", "min-ttft", "dualmap"} <= set(POLICIES)
    for name in POLICIES:
        assert registry.parse_spec(name).name == name


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_is_dispatched_once_to_a_live_replica(policy: str) -> None:
    reqs = prefix_workload(150, gap=0.02)
    fleet = FakeFleet(make(policy), NAMES).run(reqs)
    assert not fleet.undispatched
    assert len(fleet.dispatches) == len(reqs)
    assert set(fleet.completed) == {r.request_id for r in reqs}
    assert all(u is not None for u in fleet.completed.values())
    assert not fleet.idle_violations


@pytest.mark.parametrize("policy", POLICIES)
def test_deterministic_under_a_seed(policy: str) -> None:
    reqs = prefix_workload(120, gap=0.01, seed=3)
    a = FakeFleet(make(policy, seed=11), NAMES).run(reqs)
    b = FakeFleet(make(policy, seed=11), NAMES).run(reqs)
    assert a.dispatches == b.dispatches


@pytest.mark.parametrize("policy", POLICIES)
def test_one_replica(policy: str) -> None:
    reqs = prefix_workload(60, gap=0.01)
    fleet = FakeFleet(make(policy), ["only"]).run(reqs)
    assert {name for _, _, name in fleet.dispatches} == {"only"}
    assert len(fleet.dispatches) == 60 and not fleet.undispatched


@pytest.mark.parametrize("policy", POLICIES)
def test_replicas_join_and_leave_mid_run(policy: str) -> None:
    reqs = prefix_workload(300, gap=0.01, seed=5)
    changes = [
        (0.5, ["replica-0", "replica-1", "replica-2", "replica-3", "replica-4"]),  # one joins
        (1.0, ["replica-0", "replica-2", "replica-4"]),  # two leave, with queued and in-flight work
        (1.5, []),  # none at all for a while: requests wait, none lost
        (1.8, ["replica-5"]),
        (2.2, ["replica-5", "replica-0", "replica-6"]),
    ]
    fleet = FakeFleet(make(policy), NAMES[:4], prefill_tps=8_000.0, changes=changes).run(reqs)
    assert not fleet.undispatched, f"{policy} lost requests"
    assert len(fleet.dispatches) == len(reqs)
    assert set(fleet.completed) == {r.request_id for r in reqs}  # each completed or failed once
    late = {name for t, _, name in fleet.dispatches if t >= 2.2}
    assert late <= {"replica-5", "replica-0", "replica-6"}
    assert not fleet.idle_violations
