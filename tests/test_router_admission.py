"""Admission control (`RouterOptions.admission_factor`, `Overloaded`) and the measured TTFT
prediction error (`Router.ttft_prediction_error`) of the router core, on literal small cases and
through the simulator."""

from __future__ import annotations

import pytest

from policy_fakes import core, ids, req
from pylb.router import registry
from pylb.router.interface import Overloaded, RouterOptions
from pylb.sim.cluster import prepare_workload, simulate
from pylb.sim.profiles import load_profile
from pylb.sim.report import summarize
from pylb.workload.synthetic import sessions

SPT = 1e-3  # seconds per token: the seed of the learned prefill time, kept (no first token observed)


def busy_pair(**opts: object):
    """Two replicas, each with 2,000 tokens (2 s) dispatched and not yet prefilled."""
    r = core(2, prefill_seconds_per_token=SPT, slo_ttft=1.0, **opts)
    r.submit(req("0/a", tokens=2000), 0.0)
    r.submit(req("1/b", tokens=2000), 0.0)
    assert sorted(ids(r.poll(0.0))) == ["0/a", "1/b"]
    return r


def test_a_request_hopeless_on_every_replica_is_refused_and_not_tracked() -> None:
    r = busy_pair(admission_factor=2.0)
    with pytest.raises(Overloaded) as refused:
        r.submit(req("0/late", tokens=100), 0.1)  # 2,100 tokens ahead = 2.1 s > 2 x 1 s
    assert refused.value.predicted_ttft == pytest.approx(2.1)
    assert refused.value.limit == 2.0
    assert "2.1 s" in str(refused.value) and "2.0 s" in str(refused.value)
    assert r.rejections == 1 and r.queued == 0
    r.on_first_token("1/b", "r1", 0.2)
    r.on_complete("1/b", "r1", 0.3, None)  # replica 1 is idle now: anything is admitted
    r.submit(req("0/late", tokens=5000), 0.3)  # the same id again: it was not tracked
    assert ids(r.poll(0.3)) == ["0/late"]  # admitted and sent where the policy chose


def test_admission_within_the_limit_and_when_off() -> None:
    r = busy_pair(admission_factor=3.0)
    r.submit(req("0/ok", tokens=100), 0.1)  # 2.1 s <= 3 s
    assert r.rejections == 0 and r.queued == 1
    off = busy_pair()  # admission_factor 0: everything is admitted
    off.submit(req("0/any", tokens=1_000_000), 0.1)
    assert off.rejections == 0 and off.queued == 1


def test_prediction_error_compares_the_queued_prediction_with_the_first_token() -> None:
    r = core(1, prefill_seconds_per_token=SPT, max_unprefilled_requests=1, queue_order="fifo")
    assert r.ttft_prediction_error() is None
    r.submit(req("0/a", tokens=1000), 0.0)  # predicted 1.0 s
    r.submit(req("0/b", tokens=500), 0.0)  # predicted (1000 + 500) x 1 ms = 1.5 s
    assert ids(r.poll(0.0)) == ["0/a"]
    r.on_first_token("0/a", "r0", 1.2)  # observed 1.2 s: error 0.2 s
    assert ids(r.poll(1.2)) == ["0/b"]
    p50, p90 = r.ttft_prediction_error()
    assert p50 == pytest.approx(0.2) and p90 == pytest.approx(0.2)
    r.on_first_token("0/b", "r0", 2.5)  # observed 2.5 s, predicted 1.5 s: error 1.0 s
    p50, p90 = r.ttft_prediction_error()
    assert p50 == pytest.approx(0.6) and p90 == pytest.approx(0.92)


def test_the_simulator_counts_refused_requests_as_misses() -> None:
    profile = load_profile("h100-llama3.1-8b")
    work = prepare_workload(sessions(requests=300, rate=1.0, prompt_tokens=20_000, shared_depth=0), profile.block_size)
    results = {}
    for factor in (0.0, 1.0):
        router = registry.create("dualmap", RouterOptions(admission_factor=factor))
        result = simulate(work, profile, 2, router, rate_scale=5.0)  # about 2.5x capacity
        results[factor] = (summarize(result, "dualmap"), int(result.rejected.sum()), router)
    m_off, rejected_off, _ = results[0.0]
    m_on, rejected_on, router_on = results[1.0]
    assert rejected_off == 0 and m_off.completed == 300
    assert rejected_on == router_on.rejections > 0
    assert m_on.completed == 300 - rejected_on  # a refused request never runs, and counts as a miss
    assert m_on.slo_attainment > m_off.slo_attainment  # shedding hopeless work lets the rest in
    assert router_on.ttft_prediction_error() is not None
