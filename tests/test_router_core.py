"""The router core (pylb.router.core) on literal small cases: dispatch budgets, re-checks on events,
the timer, queue order, in-flight accounting, the mirror, the TTFT estimator, hotspot migration and
membership changes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fake_fleet import FakeFleet, prefix_workload
from policy_fakes import Fixed, core, ids, req
from pylb.fields import SettingError
from pylb.router import registry
from pylb.router.core import CoreRouter, PolicyContractError
from pylb.router.interface import ReplicaMetrics, RouterOptions, RoutingRequest, Usage
from pylb.router.policy import Choice, PolicyOptionError, RouterView
from pylb.router.ttft import PrefillTimeEstimator, blended


# ---- dispatch budgets and re-checks ------------------------------------------------------------


def test_request_budget_gates_dispatch_and_first_token_frees_it() -> None:
    r = core(max_unprefilled_requests=2)
    for k in range(3):
        r.submit(req(f"0/{k}"), 0.0)
    assert ids(r.poll(0.0)) == ["0/0", "0/1"]
    assert r.poll(0.1) == []  # budget full
    s = r.replicas[0]
    assert (s.queued_requests, s.unprefilled_requests, s.inflight_requests) == (1, 2, 2)
    r.on_first_token("0/1", "r0", 0.2)
    assert ids(r.poll(0.2)) == ["0/2"]
    assert (s.queued_requests, s.unprefilled_requests, s.inflight_requests) == (0, 2, 3)


def test_token_budget_gates_dispatch_but_an_empty_replica_takes_any_request() -> None:
    r = core(max_unprefilled_tokens=1000, queue_order="fifo")
    r.submit(req("0/huge", tokens=50_000), 0.0)
    r.submit(req("0/a", tokens=400), 0.0)
    assert ids(r.poll(0.0)) == ["0/huge"]  # nothing un-prefilled: it goes, whatever its size
    assert r.replicas[0].unprefilled_tokens == 50_000
    r.on_first_token("0/huge", "r0", 1.0)
    r.submit(req("0/b", tokens=700), 1.0)
    assert ids(r.poll(1.0)) == ["0/a", "0/b"]  # 0 < 1000, then 400 < 1000; then 1100 >= 1000
    r.submit(req("0/c", tokens=1), 1.0)
    assert r.poll(1.0) == []


def test_completion_without_first_token_frees_the_budget() -> None:
    r = core(max_unprefilled_requests=1)
    r.submit(req("1/a"), 0.0)
    r.submit(req("1/b"), 0.0)
    assert ids(r.poll(0.0)) == ["1/a"]
    r.on_complete("1/a", "r1", 0.5, None)  # failed before its first token
    assert ids(r.poll(0.5)) == ["1/b"]
    assert r.replicas[1].inflight_requests == 1 and r.replicas[1].unprefilled_tokens == 100
    assert r.policy.completed == [("1/a", 1)]


def test_budgets_are_per_replica() -> None:
    r = core(max_unprefilled_requests=1)
    for rid in ("0/a", "0/b", "1/c", "1/d"):
        r.submit(req(rid), 0.0)
    assert sorted(ids(r.poll(0.0))) == ["0/a", "1/c"]


def test_timer_asks_for_polls_only_while_requests_wait() -> None:
    r = core(max_unprefilled_requests=1, dispatch_interval=0.05)
    assert r.next_wakeup(0.0) is None
    r.submit(req("0/a"), 0.0)
    r.submit(req("0/b"), 0.0)
    r.poll(0.0)
    assert r.next_wakeup(0.0) == pytest.approx(0.05)
    r.on_first_token("0/a", "r0", 0.3)
    r.poll(0.3)
    assert r.next_wakeup(0.3) is None


def test_no_replica_idles_while_its_queue_is_not_empty() -> None:
    """Driven by the fake fleet: after every poll, a replica with queued requests has work."""
    for limits in ({"max_unprefilled_requests": 1}, {"max_unprefilled_tokens": 1}, {}):
        router = registry.create("dualmap", RouterOptions(**limits))  # type: ignore[arg-type]
        fleet = FakeFleet(router, ["a", "b", "c"], prefill_tps=5_000.0).run(prefix_workload(120, gap=0.01))
        assert not fleet.undispatched
        assert fleet.idle_violations == []
        assert max(s.queued_requests for s in router.replicas) == 0


# ---- queue order ---------------------------------------------------------------------------------


def test_queue_order_priority_then_cached_prefix_then_arrival() -> None:
    r = core(max_unprefilled_requests=1, queue_order="cached")
    r.submit(req("0/warm", hashes=[1, 2, 3]), 0.0)
    assert ids(r.poll(0.0)) == ["0/warm"]  # the mirror now holds 1, 2, 3 on r0
    r.submit(req("0/cold-early", arrival=0.1, hashes=[9]), 0.1)
    r.submit(req("0/two", arrival=0.2, hashes=[1, 2, 7]), 0.2)
    r.submit(req("0/three", arrival=0.3, hashes=[1, 2, 3, 4]), 0.3)
    r.submit(req("0/urgent", arrival=0.4, priority=5, hashes=[8]), 0.4)
    r.submit(req("0/cold-late", arrival=0.5, hashes=[6]), 0.5)
    order = []
    for t, done in enumerate(["0/warm", "0/urgent", "0/three", "0/two", "0/cold-early"], start=1):
        r.on_first_token(done, "r0", float(t))
        order += ids(r.poll(float(t)))
    assert order == ["0/urgent", "0/three", "0/two", "0/cold-early", "0/cold-late"]


def drain(r: CoreRouter, first: str, later: int, t0: float = 1.0) -> list[str]:
    """Complete `first`'s prefill, then each dispatched one's, one poll each; the dispatch order."""
    order, done, t = [], first, t0
    for _ in range(later):
        r.on_first_token(done, "r0", t)
        got = ids(r.poll(t))
        order += got
        done, t = got[0], t + 1.0
    return order


def test_queue_order_cheapest_first_counts_the_cache() -> None:
    r = core(max_unprefilled_requests=1)  # the default order: fewest uncached tokens first
    r.submit(req("0/warm", tokens=3 * 16, hashes=[1, 2, 3]), 0.0)
    r.poll(0.0)
    r.submit(req("0/big", tokens=5000, arrival=0.1), 0.1)
    r.submit(req("0/small", tokens=300, arrival=0.2), 0.2)
    r.submit(req("0/cached-big", tokens=3 * 16 + 100, arrival=0.3, hashes=[1, 2, 3]), 0.3)  # 100 uncached
    r.submit(req("0/urgent", tokens=9000, arrival=0.4, priority=1), 0.4)
    assert drain(r, "0/warm", 4) == ["0/urgent", "0/cached-big", "0/small", "0/big"]
    for order, expected in (("fifo", ["0/b", "0/c", "0/d"]), ("cheapest", ["0/d", "0/c", "0/b"])):
        r = core(max_unprefilled_requests=1, queue_order=order)
        for k, (rid, tokens) in enumerate((("0/a", 10), ("0/b", 300), ("0/c", 200), ("0/d", 100))):
            r.submit(req(rid, tokens=tokens, arrival=0.1 * k), 0.1 * k)
        r.poll(0.3)
        assert drain(r, "0/a", 3) == expected, order


def test_a_starving_request_goes_first() -> None:
    r = core(max_unprefilled_requests=1, starvation_s=10.0)
    r.submit(req("0/a", tokens=10), 0.0)
    r.submit(req("0/huge", tokens=90_000, arrival=0.0), 0.0)
    r.poll(0.0)
    t = 0.0
    for k in range(12):  # a stream of cheap requests keeps overtaking the huge one...
        r.submit(req(f"0/s{k}", tokens=50, arrival=t), t)
    order = drain(r, "0/a", 12, t0=1.0)
    assert order.index("0/huge") == 9  # ...until it has waited 10 s (the poll at t = 10)
    with pytest.raises(ValueError, match="queue_order"):
        RouterOptions(queue_order="random")


# ---- mirror, accounting, predicted TTFT -------------------------------------------------------------


def test_dispatch_inserts_into_the_mirror_and_predicted_ttft_uses_it() -> None:
    r = core(prefill_seconds_per_token=1e-3, max_unprefilled_requests=1)
    hashes = list(range(1, 11))  # 10 blocks = 160 tokens
    r.submit(req("0/a", tokens=170, hashes=hashes), 0.0)
    r.poll(0.0)
    probe = req("x", tokens=180, hashes=[*hashes, 99])
    assert r.cached_blocks(probe).tolist() == [10, 0]
    assert r.uncached_tokens(probe, 0) == 20 and r.uncached_tokens(probe, 1) == 180
    # r0: 170 un-prefilled + 20 own; r1: 180 own
    assert r.predicted_ttft(probe, 0) == pytest.approx(0.190)
    assert r.predicted_ttft(probe, 1) == pytest.approx(0.180)
    r.submit(req("0/b", tokens=50), 0.0)  # queued behind 0/a: 50 queued tokens
    assert r.replicas[0].queued_tokens == 50
    assert r.predicted_ttft(probe, 0) == pytest.approx(0.240)


def test_scraped_cache_size_resizes_the_mirror() -> None:
    r = core(cache_capacity_tokens=16 * 100)
    assert r.mirror.capacity(0) == 100 and r.replicas[0].cache_capacity_blocks == 100
    r.on_metrics("r0", ReplicaMetrics(0, 0, 0.0, 0, 0, block_size=16, num_gpu_blocks=8), 1.0)
    assert r.mirror.capacity(0) == 8 and r.replicas[0].cache_capacity_blocks == 8
    assert r.replicas[0].metrics is not None and r.replicas[0].metrics_at == 1.0
    r.on_metrics("gone", ReplicaMetrics(0, 0, 0.0, 0, 0, 16, 8), 1.0)  # unknown replica: ignored


def _serve(r: CoreRouter, rid: str, usage: Usage, tokens: int = 100) -> None:
    r.submit(req(rid, tokens=tokens), 0.0)
    d = r.poll(0.0)
    assert [x.request_id for x in d] == [rid]
    r.on_first_token(rid, d[0].replica, 0.0)
    r.on_complete(rid, d[0].replica, 0.0, usage)


def test_mirror_size_follows_the_replicas_reported_tokens_per_estimated_token() -> None:
    """A real tokenizer makes ~1.85 tokens of what pylb estimates as one (2.16 bytes per token, not
    4): the mirror then holds 1/1.85 of the router blocks the KV cache's tokens would suggest."""
    r = core(cache_capacity_tokens=16 * 1000, max_unprefilled_requests=4)
    r.on_metrics("r0", ReplicaMetrics(0, 0, 0.0, 0, 0, block_size=16, num_gpu_blocks=100), 0.0)
    assert r.mirror.capacity(0) == 100 and r.mirror.capacity(1) == 1000
    for k in range(10):  # estimates (a stream without usage) teach nothing
        _serve(r, f"{k % 2}/e{k}", Usage(185, 1, reported=False))
    assert r.token_ratio == 1.0 and r.mirror.capacity(0) == 100
    for k in range(200):
        _serve(r, f"{k % 2}/u{k}", Usage(185, 1))
    assert r.token_ratio == pytest.approx(1.85, rel=0.01)
    assert r.mirror.capacity(0) == pytest.approx(100 / 1.85, abs=3)  # scraped size, re-sized
    assert r.mirror.capacity(1) == pytest.approx(1000 / 1.85, abs=30)  # default size, re-sized
    assert r.replicas[1].cache_capacity_blocks == r.mirror.capacity(1)
    r.on_metrics("r0", ReplicaMetrics(0, 0, 0.0, 0, 0, block_size=16, num_gpu_blocks=200), 1.0)
    assert r.mirror.capacity(0) == pytest.approx(200 / 1.85, abs=5)  # later scrapes use the ratio too


def test_exact_usage_leaves_the_mirror_size_alone() -> None:
    r = core(cache_capacity_tokens=16 * 1000, max_unprefilled_requests=4)
    for k in range(50):
        _serve(r, f"{k % 2}/u{k}", Usage(100, 1))
    for k in range(50):
        _serve(r, f"{k % 2}/short{k}", Usage(40, 1), tokens=4)  # shorter than one block: not a sample
    assert r.token_ratio == 1.0 and r.mirror.capacity(0) == 1000


def test_ttft_estimator_converges_to_the_observed_rate() -> None:
    est = PrefillTimeEstimator(1e-4, 0.05)
    assert est.seconds_per_token == pytest.approx(1e-4)
    rng = np.random.default_rng(0)
    for _ in range(200):
        tokens = int(rng.integers(500, 20_000))
        est.observe(3e-5 * tokens * rng.uniform(0.9, 1.1), tokens)
    assert est.seconds_per_token == pytest.approx(3e-5, rel=0.05)
    est.observe(float("nan"), 100)
    est.observe(-1.0, 100)
    assert est.samples == 200


def test_the_affine_estimator_separates_a_per_request_constant_from_the_per_token_time() -> None:
    """prefill_intercept: latencies of 0.3 s + 1e-4 s per token ahead are fitted as such; through
    the origin the same data inflate the slope (short queues under-, long ones over-predicted)."""
    affine, origin = PrefillTimeEstimator(1e-4, 0.05, affine=True), PrefillTimeEstimator(1e-4, 0.05)
    rng = np.random.default_rng(1)
    for _ in range(300):
        tokens = int(rng.integers(200, 20_000))
        d = (0.3 + 1e-4 * tokens) * rng.uniform(0.95, 1.05)
        affine.observe(d, tokens)
        origin.observe(d, tokens)
    assert affine.seconds_per_token == pytest.approx(1e-4, rel=0.1) and affine.intercept_seconds == pytest.approx(0.3, rel=0.15)
    assert origin.intercept_seconds == 0 and origin.seconds_per_token > 1.1e-4
    same = PrefillTimeEstimator(1e-4, 0.05, affine=True)
    for _ in range(200):  # every observation with the same tokens ahead: no intercept can be told apart
        same.observe(0.5, 1000)
    assert same.intercept_seconds == 0 and same.seconds_per_token == pytest.approx(5e-4, rel=0.01)


def test_the_core_adds_the_learned_intercept_to_its_predictions() -> None:
    r = core(prefill_seconds_per_token=1e-3, max_unprefilled_requests=1, prefill_intercept=True)
    t = 0.0
    for k in range(300):
        tokens = 200 + (k * 37) % 1800
        r.submit(req(f"1/{k}", tokens=tokens), t)
        r.poll(t)
        t += 0.2 + 5e-5 * tokens
        r.on_first_token(f"1/{k}", "r1", t)
        r.on_complete(f"1/{k}", "r1", t, Usage(tokens, 4))
    s = r.replicas[1]
    assert s.prefill_seconds_per_token == pytest.approx(5e-5, rel=0.05) and s.ttft_intercept_s == pytest.approx(0.2, rel=0.05)
    assert r.replica_ttft(1) == pytest.approx(s.ttft_intercept_s)  # nothing queued: the constant alone
    assert core().replicas[0].ttft_intercept_s == 0  # off by default


@pytest.mark.parametrize("affine", [False, True])
def test_the_decoding_estimator_separates_the_running_batch_from_the_tokens_ahead(affine: bool) -> None:
    """prefill_decoding: latencies of [0.1 s +] 1e-4 s per token ahead + 0.2 s per decoding
    request are fitted as such; the fit without the decoding term folds it into the slope (or the
    constant)."""
    with_k, without = PrefillTimeEstimator(1e-4, 0.05, affine=affine, decoding=True), PrefillTimeEstimator(1e-4, 0.05, affine=affine)
    rng = np.random.default_rng(2)
    for _ in range(400):
        tokens, decoding = int(rng.integers(100, 3000)), int(rng.integers(0, 8))
        d = ((0.1 if affine else 0.0) + 1e-4 * tokens + 0.2 * decoding) * rng.uniform(0.95, 1.05)
        with_k.observe(d, tokens, decoding)
        without.observe(d, tokens, decoding)
    assert with_k.seconds_per_decoding == pytest.approx(0.2, rel=0.1) and with_k.seconds_per_token == pytest.approx(1e-4, rel=0.2)
    assert with_k.intercept_seconds == (pytest.approx(0.1, abs=0.05) if affine else 0)
    assert without.seconds_per_decoding == 0
    if affine:  # the batch's mean cost (0.7 s) goes into the constant
        assert without.intercept_seconds > 0.5
    else:  # or into the slope
        assert without.seconds_per_token > 2e-4
    idle = PrefillTimeEstimator(1e-4, 0.05, decoding=True)
    for _ in range(200):  # nothing ever decoding: no cost per decoding request can be learned
        idle.observe(0.1, 1000, 0)
    assert idle.seconds_per_decoding == 0 and idle.seconds_per_token == pytest.approx(1e-4, rel=0.01)


def test_the_core_prices_the_requests_decoding_on_a_replica() -> None:
    """prefill_decoding: a replica's predicted TTFT grows by the learned cost for each request
    past its first token there, and a request's observation counts those at its dispatch."""
    r = core(prefill_seconds_per_token=1e-3, max_unprefilled_requests=1, prefill_decoding=True)
    t, open_ = 0.0, []
    for k in range(300):
        decoding = k % 5  # requests past their first token, still streaming, on r1
        while len(open_) > decoding:
            r.on_complete(open_.pop(0), "r1", t, Usage(1000, 4))
        r.submit(req(f"1/{k}", tokens=1000), t)
        r.poll(t)
        t += 1000 * 5e-5 + 0.1 * decoding
        r.on_first_token(f"1/{k}", "r1", t)
        open_.append(f"1/{k}")
    s = r.replicas[1]
    assert s.ttft_seconds_per_decoding == pytest.approx(0.1, rel=0.05) and s.prefill_seconds_per_token == pytest.approx(5e-5, rel=0.1)
    assert s.inflight_requests - s.unprefilled_requests == len(open_) == 5
    assert r.replica_ttft(1) == pytest.approx(5 * s.ttft_seconds_per_decoding)  # nothing ahead: the batch alone
    assert core().replicas[0].ttft_seconds_per_decoding == 0  # off by default


def test_core_learns_prefill_time_from_first_tokens() -> None:
    r = core(prefill_seconds_per_token=1e-3, max_unprefilled_requests=1)
    assert [s.prefill_seconds_per_token for s in r.replicas] == [1e-3, 1e-3]  # the seed
    t = 0.0
    for k in range(300):
        r.submit(req(f"1/{k}", tokens=1000), t)
        r.poll(t)
        t += 0.05  # 1000 tokens in 50 ms: 5e-5 s per token
        r.on_first_token(f"1/{k}", "r1", t)
        r.on_complete(f"1/{k}", "r1", t, Usage(1000, 4))
    assert r.replicas[1].prefill_seconds_per_token == pytest.approx(5e-5, rel=0.02)
    # r0 never served anything: it is predicted at the fleet's rate, not at the stale seed
    assert r.replicas[0].prefill_seconds_per_token == pytest.approx(5e-5, rel=0.02)
    assert r.replicas[1].inflight_requests == 0 and r.replicas[1].unprefilled_tokens == 0


def test_a_replica_estimate_leans_on_the_fleet_until_it_has_samples() -> None:
    fleet, own = PrefillTimeEstimator(1e-4), PrefillTimeEstimator(1e-4)
    for _ in range(100):
        fleet.observe(2e-5 * 1000, 1000)
    assert blended(own, fleet) == pytest.approx(fleet.seconds_per_token)
    for _ in range(16):
        own.observe(8e-5 * 1000, 1000)
    assert blended(own, fleet) == pytest.approx((own.seconds_per_token + fleet.seconds_per_token) / 2)


# ---- migration ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("neighbours", [False, True])
def test_migration_moves_cheapest_first_and_only_while_it_helps(neighbours: bool) -> None:
    # 1 ms per token, SLO 5 s. r0 has a 2000-token prompt in flight and three queued behind it:
    #   cheap (alternate r1, whose cache holds 3200 of its 3300 tokens: the move saves 3200),
    #   dear  (alternate r2, nothing cached anywhere: the move costs 0 extra tokens),
    #   mid   (alternate r2, its prefix is on r1 only: moving to r2 costs 0 extra tokens either).
    r = core(3, migrates=True, neighbours=neighbours, max_unprefilled_requests=1, prefill_seconds_per_token=1e-3, slo_ttft=5.0, hot_wait_s=100.0)
    warm = list(range(1, 201))  # 200 blocks = 3200 tokens
    r.submit(req("1/warm", tokens=3200, hashes=warm), 0.0)
    r.submit(req("2/warm2", tokens=3200, hashes=[500 + h for h in warm]), 0.0)
    r.submit(req("0/busy", tokens=2000), 0.0)
    r.poll(0.0)
    for rid, rep in (("1/warm", "r1"), ("2/warm2", "r2")):
        r.on_first_token(rid, rep, 3.2)  # 3200 tokens at 1 ms: the estimate stays at 1 ms
        r.on_complete(rid, rep, 3.2, Usage(3200, 4))
    assert [s.prefill_seconds_per_token for s in r.replicas] == pytest.approx([1e-3] * 3)
    r.submit(req("0/dear/2", tokens=4000), 3.3)
    r.submit(req("0/cheap/1", tokens=3300, hashes=[*warm, 10_007]), 3.3)
    r.submit(req("0/mid/2", tokens=3300, hashes=[*warm, 10_008]), 3.3)
    assert r.replica_ttft(0) == pytest.approx((2000 + 4000 + 3300 + 3300) * 1e-3)  # 12.6 s: hot
    out = r.poll(3.3)
    where = {rid: r._entries[rid].replica for rid in ("0/dear/2", "0/cheap/1", "0/mid/2")}
    # cheap moves first (to r1, where it is 100 tokens), then dear (to r2, idle). r0 is then at
    # (2000 + 3300) ms = 5.3 s, still hot, but mid's move to its alternate r2 (4000 + 3300
    # tokens) would not help. With neighbours, mid goes to r1 instead, where its prefix is:
    # (100 queued + its own 100) ms = 0.2 s.
    assert r.migrations == 2 + neighbours and r.decisions["migration"] == 2 + neighbours
    assert where == {"0/cheap/1": 1, "0/dear/2": 2, "0/mid/2": 1 if neighbours else 0}
    assert sorted(d[:2] for d in out) == [("0/cheap/1", "r1"), ("0/dear/2", "r2")]
    assert r.replica_ttft(0) == pytest.approx(2.0 if neighbours else 5.3)
    assert r._entries["0/cheap/1"].alternate == 0 and r._entries["0/cheap/1"].branch == "migration"
    # the policy heard of each move, from the hot replica to the target, in the order they were made
    moves = [("0/cheap/1", 0, 1), ("0/dear/2", 0, 2)] + ([("0/mid/2", 0, 1)] if neighbours else [])
    assert r.policy.migrated == moves  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("migrate_to", "prefix_blocks", "hit_moves"),
    [
        ("any", 200, True),  # 3.6 s on r1 < r0's 6.1 s and within the 5 s SLO
        ("holders", 200, False),  # r1 holds none of it: never
        ("spare", 200, False),  # it adds 3200 tokens of work: 3.6 s > SLO / 2
        ("spare", 100, True),  # it adds 1600: 2.0 s on r1, within SLO / 2
        ("holders", 100, False),
        ("bounded", 100, False),  # within SLO / 2, but 1700 tokens on r1 against 100 on r0: > 2x
        ("bounded", 5, True),  # 180 tokens against 100 (the prefix is 80): within 2x and SLO / 2
    ],
)
def test_migration_target_rules_for_a_move_that_adds_work(migrate_to: str, prefix_blocks: int, hit_moves: bool) -> None:
    # 1 ms per token, SLO 5 s. r0 holds a prefix (16 tokens per block) and has 6000 tokens in
    # flight; queued behind them: cold (300 tokens, nothing cached anywhere) and hit (the prefix
    # plus 100 tokens). r0 is hot (6.4 s); cold moves first (cheapest, and it adds no work under
    # every rule), then r0 is still hot (6.1 s) and hit would be faster on r1 but must compute
    # its whole prompt there.
    r = core(2, migrates=True, migrate_to=migrate_to, max_unprefilled_requests=1, prefill_seconds_per_token=1e-3, slo_ttft=5.0, hot_wait_s=100.0)
    warm = list(range(1, prefix_blocks + 1))
    prefix_tokens = 16 * prefix_blocks
    r.submit(req("0/warm", tokens=prefix_tokens, hashes=warm), 0.0)
    r.poll(0.0)
    r.on_first_token("0/warm", "r0", prefix_tokens * 1e-3)  # 1 ms per token: the estimate stays
    r.on_complete("0/warm", "r0", prefix_tokens * 1e-3, Usage(prefix_tokens, 4))
    r.submit(req("0/busy", tokens=6000), 3.3)
    r.poll(3.3)
    r.submit(req("0/cold/1", tokens=300), 3.3)
    r.submit(req("0/hit/1", tokens=prefix_tokens + 100, hashes=[*warm, 10_007]), 3.3)
    assert r.replica_ttft(0) == pytest.approx(6.4)
    r.poll(3.3)
    assert r._entries["0/cold/1"].replica == 1
    assert r._entries["0/hit/1"].replica == (1 if hit_moves else 0)
    assert r.migrations == 1 + hit_moves


def test_no_migration_when_the_alternate_is_as_loaded() -> None:
    r = core(2, migrates=True, max_unprefilled_requests=1, prefill_seconds_per_token=1e-3, slo_ttft=1.0)
    r.submit(req("0/a", tokens=5000), 0.0)
    r.submit(req("1/b", tokens=5000), 0.0)
    r.poll(0.0)
    r.submit(req("0/c/1", tokens=3000), 0.0)
    r.submit(req("1/d/0", tokens=3000), 0.0)
    r.poll(0.0)  # both hot (8 s > 1 s) and equally loaded: a move would not lower the TTFT
    assert r.migrations == 0
    assert (r._entries["0/c/1"].replica, r._entries["1/d/0"].replica) == (0, 1)


def test_long_wait_makes_a_replica_hot() -> None:
    r = core(2, migrates=True, max_unprefilled_requests=1, prefill_seconds_per_token=1e-6, hot_wait_s=3.0)
    r.submit(req("0/a", tokens=100), 0.0)
    r.submit(req("0/b/1", tokens=100), 0.0)
    r.poll(0.0)
    r.submit(req("1/c", tokens=50), 0.0)
    r.poll(0.0)
    r.on_first_token("1/c", "r1", 1e-4)
    assert r.poll(1e-4) == []  # r1 is idle, but r0's predicted TTFT is tiny: not hot
    assert r._entries["0/b/1"].replica == 0
    assert r.poll(2.9) == [] and r._entries["0/b/1"].replica == 0
    assert ids(r.poll(3.0)) == ["0/b/1"]  # waited 3 s on r0: moved to r1 (idle) and dispatched
    assert r.migrations == 1


# ---- membership --------------------------------------------------------------------------------


def test_queued_requests_of_a_removed_replica_are_re_placed() -> None:
    r = core(3, max_unprefilled_requests=1)
    for rid in ("1/a", "1/b", "1/c", "2/d"):
        r.submit(req(rid), 0.0)
    assert sorted(ids(r.poll(0.0))) == ["1/a", "2/d"]
    r.on_membership(["r0", "r2", "r3"], 1.0)  # r1 leaves with 1/a in flight and 1/b, 1/c queued
    assert r.replica_names == ["r0", "r2", "r3"]
    assert r.policy.memberships[-1] == ["r0", "r2", "r3"]
    # re-placed with choose: "1/..." -> index 1 of the new list = r2 (which still has 2/d in flight)
    assert r.replicas[1].queued_requests == 2 and r.replicas[1].inflight_requests == 1
    r.on_first_token("2/d", "r2", 1.5)
    assert ids(r.poll(1.5)) == ["1/b"]
    r.on_first_token("1/a", "r1", 1.6)  # the removed replica's in-flight request finishes anyway
    r.on_complete("1/a", "r1", 1.7, Usage(100, 4))
    assert "1/a" not in r._entries
    assert r.mirror.num_replicas == 3


def test_requests_wait_for_replicas_and_survive_an_empty_fleet() -> None:
    o = RouterOptions()
    r = CoreRouter(Fixed(o), o)
    r.submit(req("0/a"), 0.0)
    assert r.poll(0.0) == [] and r.queued == 1
    r.on_membership(["x"], 1.0)
    r.on_membership([], 1.0)
    r.submit(req("0/b"), 1.0)
    assert r.poll(1.0) == [] and r.queued == 2
    r.on_membership(["y", "z"], 2.0)
    assert sorted(d[:2] for d in r.poll(2.0)) == [("0/a", "y"), ("0/b", "y")]


def test_a_new_replica_starts_from_the_fleet_estimate() -> None:
    r = core(2, prefill_seconds_per_token=1e-3, max_unprefilled_requests=1)
    for k in range(100):
        r.submit(req(f"0/{k}", tokens=1000), float(k))
        r.poll(float(k))
        r.on_first_token(f"0/{k}", "r0", k + 0.02)  # 2e-5 s per token
    r.on_membership(["r0", "r1", "new"], 200.0)
    assert r.replicas[2].prefill_seconds_per_token == pytest.approx(r._fleet_estimator.seconds_per_token)
    assert r.replicas[2].prefill_seconds_per_token < 1e-4


# ---- contract errors and options --------------------------------------------------------------------


def test_policy_answers_are_checked() -> None:
    class Bad(Fixed):
        def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
            return Choice(7)

    o = RouterOptions()
    r = CoreRouter(Bad(o), o)
    r.on_membership(["a"], 0.0)
    with pytest.raises(PolicyContractError, match="replica in \\[0, 1\\)"):
        r.submit(req("x"), 0.0)
    r2 = core(1)
    r2.submit(req("0/x"), 0.0)
    with pytest.raises(ValueError, match="already submitted"):
        r2.submit(req("0/x"), 0.0)


def test_router_options_are_validated() -> None:
    with pytest.raises(SettingError, match="RouterOptions.max_unprefilled_tokens must be at least 1, got 0") as info:
        RouterOptions(max_unprefilled_tokens=0)
    assert (info.value.field, info.value.value) == ("RouterOptions.max_unprefilled_tokens", 0)
    with pytest.raises(SettingError, match="RouterOptions.seed expected an integer, got 1.5"):
        RouterOptions(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(SettingError, match="RouterOptions.queue_order must be one of cheapest, cached, fifo"):
        RouterOptions(queue_order="lifo")
    with pytest.raises(ValueError, match="slo_ttft"):
        RouterOptions(slo_ttft=math.nan)
    with pytest.raises(ValueError, match="whole number of router blocks"):
        RouterOptions(key_block_tokens=3)
    o = RouterOptions()
    assert (o.tokens_per_block, o.blocks_per_key_block) == (16, 4)  # 64-token key blocks
    assert RouterOptions(key_block_tokens=512).blocks_per_key_block == 32


def test_policy_specs() -> None:
    spec = registry.parse_spec("dualmap:migration=false:key_depth=2")
    assert spec.options == {"migration": False, "key_depth": 2}
    assert spec.label == "dualmap:migration=false:key_depth=2"
    router = registry.create("dualmap:slo_switch=off")
    assert isinstance(router, CoreRouter) and router.policy.slo_switch == "off" and router.policy.migrates is True
    with pytest.raises(PolicyOptionError, match="has no option 'nope'"):
        registry.parse_spec("dualmap:nope=1")
    with pytest.raises(PolicyOptionError, match="expected a boolean \\(true/false\\)"):
        registry.parse_spec("dualmap:migration=maybe")
    with pytest.raises(PolicyOptionError, match="round-robin.*has no option"):
        registry.parse_spec("round-robin:x=1")
    with pytest.raises(registry.UnknownPolicyError):
        registry.parse_spec("nope:x=1")
