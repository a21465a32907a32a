"""Cluster simulator, router registry and run metrics; validation on the Mooncake trace."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from policy_fakes import FakeView
from pylb import native
from pylb.router import registry
from pylb.router.interface import Dispatch, ReplicaMetrics, Router, RouterOptions, RoutingRequest, Usage
from pylb.router.core import CoreRouter
from pylb.router.policies.round_robin import RoundRobin
from pylb.sim.cluster import SimResult, SimulationError, prepare_workload, simulate
from pylb.sim.profiles import PROFILES, Profile, load_profile
from pylb.sim.report import find_capacity, summarize
from pylb.workload.types import WorkloadRequest

SYSTEM = "You are a helpful assistant. " * 20  # 580 bytes shared by every prompt


def workload(n: int, gap: float = 0.1, prompt_bytes: int = 800, out: int = 5) -> list[WorkloadRequest]:
    reqs = []
    for i in range(n):
        suffix = f"request {i}: " + "x" * prompt_bytes
        text = (SYSTEM + suffix)[:prompt_bytes]
        reqs.append(WorkloadRequest(f"r{i}", i * gap, prompt_bytes // 4, out, make_text=lambda t=text: t))
    return reqs


FAST = Profile("fast", block_size=16, num_blocks=2048, max_num_seqs=32, max_num_batched_tokens=2048, c0=0.005, c_prefill=1e-5, c_decode=1e-4, c_attn=1e-8)


def RoundRobinRouter(options: RouterOptions | None = None) -> CoreRouter:  # noqa: N802 - reads as a class
    """The round-robin policy behind the core router."""
    opts = options or RouterOptions()
    return CoreRouter(RoundRobin(opts), opts)


class Recorder(CoreRouter):
    """Round-robin that logs every call it gets."""

    def __init__(self, options: RouterOptions | None = None) -> None:
        opts = options or RouterOptions()
        super().__init__(RoundRobin(opts), opts)
        self.calls: list[tuple] = []

    def submit(self, request: RoutingRequest, now: float) -> None:
        self.calls.append(("submit", request.request_id, now, request))
        super().submit(request, now)

    def on_first_token(self, request_id: str, replica: str, now: float) -> None:
        self.calls.append(("first", request_id, now, replica))
        super().on_first_token(request_id, replica, now)

    def on_complete(self, request_id: str, replica: str, now: float, usage: Usage | None) -> None:
        self.calls.append(("complete", request_id, now, usage))
        super().on_complete(request_id, replica, now, usage)

    def on_metrics(self, replica: str, metrics: ReplicaMetrics, now: float) -> None:
        self.calls.append(("metrics", replica, now, metrics))
        super().on_metrics(replica, metrics, now)

    def on_membership(self, replicas: Sequence[str], now: float) -> None:
        self.calls.append(("membership", tuple(replicas), now, None))
        super().on_membership(replicas, now)

    def of(self, kind: str) -> list[tuple]:
        return [c for c in self.calls if c[0] == kind]


def test_all_requests_complete_with_consistent_records() -> None:
    w = prepare_workload(workload(50), FAST.block_size)
    router = Recorder()
    res = simulate(w, FAST, 3, router)
    assert not np.isnan(res.completion).any()
    assert (res.arrival <= res.dispatch).all() and (res.dispatch < res.first_token).all()
    assert (res.first_token <= res.completion).all()
    assert router.of("membership")[0][1] == ("replica-0", "replica-1", "replica-2")
    assert len(router.of("first")) == len(router.of("complete")) == 50
    assert all(c[3].completion_tokens == 5 for c in router.of("complete"))
    # every prompt shares the system prompt: later requests on a replica hit it
    assert res.cached_tokens[3:].min() >= 512 // 4


def test_rate_scale_divides_arrival_times_and_keeps_order() -> None:
    reqs = workload(20, gap=1.0)
    reqs[5].arrival_s = reqs[6].arrival_s = reqs[7].arrival_s = 6.0  # a tie, in trace order 5, 6, 7
    w = prepare_workload(reqs, FAST.block_size)
    for scale in (1.0, 4.0):
        router = Recorder()
        res = simulate(w, FAST, 2, router, rate_scale=scale)
        submits = router.of("submit")
        assert [c[1] for c in submits] == [f"r{i}" for i in range(20)]
        assert [c[2] for c in submits] == pytest.approx([r.arrival_s / scale for r in reqs])
        assert res.arrival == pytest.approx(np.array([r.arrival_s / scale for r in reqs]))
        assert summarize(res, "rr").qps == pytest.approx(20 / (19 / scale))


def test_metrics_reach_the_router_every_scrape_interval() -> None:
    w = prepare_workload(workload(40, gap=0.25, out=50), FAST.block_size)
    router = Recorder()
    simulate(w, FAST, 2, router, scrape_interval=0.3)
    scrapes = router.of("metrics")
    for rep in ("replica-0", "replica-1"):
        times = [c[2] for c in scrapes if c[1] == rep]
        assert len(times) > 20
        assert np.diff(times) == pytest.approx(np.full(len(times) - 1, 0.3))  # busy all along
    # an idle gap: no scrapes while nothing happens, then back on the same grid
    reqs = workload(4, gap=1.0) + [WorkloadRequest("late", 100.0, 200, 5, make_text=lambda: "z" * 800)]
    router = Recorder()
    simulate(prepare_workload(reqs, FAST.block_size), FAST, 1, router, scrape_interval=0.3)
    times = np.array([c[2] for c in router.of("metrics")])
    assert len(times) < 30
    assert np.allclose(times / 0.3, np.round(times / 0.3))
    assert times.max() > 100.0 and ((times > 4) & (times < 99.5)).sum() == 0
    snaps = [c[3] for c in scrapes]
    assert any(m.num_requests_running > 0 for m in snaps)
    assert all(m.block_size == 16 and m.num_gpu_blocks == 2048 for m in snaps)
    assert max(m.prefix_cache_queries for m in snaps) > 0


def test_round_robin_spreads_evenly() -> None:
    w = prepare_workload(workload(80), FAST.block_size)
    res = simulate(w, FAST, 8, registry.create("round-robin"))
    assert np.bincount(res.replica, minlength=8).tolist() == [10] * 8
    assert summarize(res, "round-robin").hotspot_factor == pytest.approx(1.0)


def test_fused_and_single_steps_give_the_same_run() -> None:
    w = prepare_workload(workload(60, gap=0.05, prompt_bytes=4000, out=40), FAST.block_size)
    small = Profile("small", 16, 300, 8, 512, c0=0.01, c_prefill=2e-5, c_decode=1e-4, c_attn=1e-7)
    a = simulate(w, small, 2, registry.create("round-robin"))
    b = simulate(w, small, 2, registry.create("round-robin"), fuse_decode=False)
    assert a.stats["engine_calls"] < b.stats["engine_calls"]
    assert a.stats["preemptions"] == b.stats["preemptions"] > 0
    np.testing.assert_allclose(a.first_token, b.first_token, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.completion, b.completion, rtol=0, atol=1e-9)
    assert (a.cached_tokens == b.cached_tokens).all()


def test_zero_cost_profile_terminates_in_zero_time() -> None:
    zero = Profile("zero", 16, 256, 4, 64, 0.0, 0.0, 0.0, 0.0)
    w = prepare_workload(workload(30, gap=0.0, out=20), zero.block_size)
    res = simulate(w, zero, 2, registry.create("round-robin"))
    assert not np.isnan(res.completion).any()
    assert res.end_time == 0.0


class TimerRouter(Router):
    """Holds every request until a dispatch timer fires 1 s after its arrival."""

    def __init__(self, options: RouterOptions | None = None) -> None:
        self.queue: list[tuple[float, str]] = []
        self.replicas: list[str] = []

    @property
    def view(self) -> FakeView:
        return FakeView([])  # the simulator reads nothing from it

    def submit(self, request: RoutingRequest, now: float) -> None:
        self.queue.append((now + 1.0, request.request_id))

    def poll(self, now: float) -> list[Dispatch]:
        due = [rid for t, rid in self.queue if t <= now]
        self.queue = [(t, rid) for t, rid in self.queue if t > now]
        return [Dispatch(rid, self.replicas[0]) for rid in due]

    def on_membership(self, replicas: Sequence[str], now: float) -> None:
        self.replicas = list(replicas)

    def next_wakeup(self, now: float) -> float | None:
        return min((t for t, _ in self.queue), default=None)


def test_router_timers_are_honoured() -> None:
    w = prepare_workload(workload(10, gap=0.37), FAST.block_size)
    res = simulate(w, FAST, 2, TimerRouter(), scrape_interval=None)
    np.testing.assert_allclose(res.dispatch - res.arrival, 1.0)
    assert not np.isnan(res.completion).any()


class BadRouter(Recorder):
    def poll(self, now: float) -> list[Dispatch]:
        return [Dispatch(d.request_id, "nowhere") for d in super().poll(now)]


def test_router_contract_violations_are_reported() -> None:
    w = prepare_workload(workload(3), FAST.block_size)
    with pytest.raises(SimulationError, match="unknown replica 'nowhere'"):
        simulate(w, FAST, 2, BadRouter())


def test_requests_too_long_for_the_cache_are_rejected_not_hung() -> None:
    tiny = Profile("tiny", 16, 10, 4, 64, 0.001, 0.0, 0.0, 0.0)  # 160 tokens of KV
    reqs = workload(4, prompt_bytes=400) + [WorkloadRequest("huge", 1.0, 1000, 5, make_text=lambda: "y" * 4000)]
    router = Recorder()
    res = simulate(prepare_workload(reqs, tiny.block_size), tiny, 1, router)
    assert res.rejected.tolist() == [False] * 4 + [True]
    assert ("complete", "huge") in [(c[0], c[1]) for c in router.of("complete") if c[3] is None]
    assert summarize(res, "rr").completed == 4


def test_prepare_workload_hashes_router_and_engine_blocks() -> None:
    reqs = workload(3, prompt_bytes=1000)
    w = prepare_workload(reqs, 128, batch_size=2)
    for r, s in zip(reqs, w):
        text = r.prompt_text().encode()
        assert s.router_hashes.tolist() == native.block_hashes(text, 64).tolist()
        assert s.engine_hashes.tolist() == native.block_hashes(text, 512).tolist()


def test_registry() -> None:
    assert "round-robin" in registry.names()
    rr = registry.create("round-robin")
    assert isinstance(rr, CoreRouter) and isinstance(rr.policy, RoundRobin)
    with pytest.raises(registry.UnknownPolicyError, match="unknown policy 'nope': expected one of .*round-robin"):
        registry.get("nope")
    with pytest.raises(ValueError, match="kebab-case"):
        registry.register("Bad_Name")
    with pytest.raises(ValueError, match="already registered"):
        registry.register("round-robin")(Recorder)


def test_round_robin_survives_membership_changes() -> None:
    r = RoundRobinRouter()
    req = lambda i: RoutingRequest(f"q{i}", np.zeros(0, np.uint64), 10, 1, 0.0)  # noqa: E731
    r.submit(req(0), 0.0)
    assert r.poll(0.0) == []  # no replicas yet: held, not dropped
    r.on_membership(["a", "b"], 0.0)
    for i in range(1, 4):
        r.submit(req(i), 0.0)
    assert sorted(d[:2] for d in r.poll(0.0)) == [("q0", "a"), ("q1", "b"), ("q2", "a"), ("q3", "b")]
    r.on_membership(["c"], 1.0)
    r.submit(req(9), 1.0)
    assert [d[:2] for d in r.poll(1.0)] == [("q9", "c")]


# ---- report ------------------------------------------------------------------------------------


def fake_result(ttft: list[float], replica: list[int], prompt: list[int], cached: list[int]) -> SimResult:
    n = len(ttft)
    arrival = np.arange(n, dtype=float)
    first = arrival + np.array(ttft)
    return SimResult(
        replicas=["a", "b"],
        rate_scale=1.0,
        request_ids=[str(i) for i in range(n)],
        arrival=arrival,
        dispatch=arrival,
        first_token=first,
        completion=first + 1,
        replica=np.array(replica),
        prompt_tokens=np.array(prompt),
        cached_tokens=np.array(cached),
        output_tokens=np.ones(n, dtype=np.int64),
        rejected=np.zeros(n, dtype=bool),
        end_time=float(first.max() + 1),
        wall_s=0.0,
    )


def test_summarize_definitions() -> None:
    res = fake_result([1.0, 2.0, 6.0, float("nan")], [0, 0, 0, 1], [100, 300, 100, 100], [50, 100, 0, 0])
    res.completion[3] = np.nan
    m = summarize(res, "p", slo_ttft=5.0)
    assert m.qps == pytest.approx(4 / 3)
    assert (m.requests, m.completed) == (4, 3)
    assert m.ttft_p50 == pytest.approx(2.0)
    assert m.slo_attainment == pytest.approx(0.5)  # the request without a first token misses
    assert m.hit_rate == pytest.approx(150 / 500)  # token-weighted over completed requests
    assert m.hotspot_factor == pytest.approx(2 * 3 / 4)
    assert set(m.to_json()) == {
        "policy", "rate_scale", "qps", "requests", "completed", "ttft_p50", "ttft_p90", "ttft_p99",
        "slo_attainment", "hit_rate", "hotspot_factor",
    }  # fmt: skip


def test_find_capacity_brackets_then_bisects() -> None:
    def run_at(scale: float):
        m = summarize(fake_result([1.0, 1.0], [0, 1], [1, 1], [0, 0]), "p")
        m.rate_scale, m.qps, m.ttft_p50 = scale, 2.0 * scale, min(scale, 1.0)
        m.slo_attainment = 1.0 if scale <= 3.3 else 0.5
        return m

    cap, runs = find_capacity(run_at, max_runs=8)
    assert [r.rate_scale for r in runs[:3]] == [1.0, 2.0, 4.0]
    assert len(runs) <= 8
    assert 2.0 * 3.3 / 1.05 < cap <= 2.0 * 3.3  # stops once the bracket is within 5 %
    cap, runs = find_capacity(lambda s: run_at(s * 16), max_runs=6)  # fails at the start: halves
    assert [r.rate_scale for r in runs[:2]] == [16.0, 8.0]

    def never(scale: float, p50: float):
        m = run_at(1e9)
        m.rate_scale, m.ttft_p50 = scale, p50
        return m

    cap, runs = find_capacity(lambda s: never(s, 100 * s), max_runs=3)  # overloaded: keeps halving
    assert cap == 0.0 and [r.rate_scale for r in runs] == [1.0, 0.5, 0.25]
    cap, runs = find_capacity(lambda s: never(s, 7.0), max_runs=8)  # a plateau below target: stops
    assert cap == 0.0 and [r.rate_scale for r in runs] == [1.0, 0.5]


# ---- validation on the real trace -----------------------------------------------------------------


def mooncake_workload(path: Path, block_size: int) -> list:
    from pylb.workload.mooncake import load_mooncake

    return prepare_workload(load_mooncake(path), block_size)


def test_single_lru_hit_rate_matches_the_trace_statistics(tmp_path: Path, mooncake_trace: Path) -> None:
    """One replica, 16,384 blocks of 512 tokens, zero costs: the hit rate of one LRU cache of
    8M tokens, which ../shared/traces/README.md gives as 26.6 % of blocks."""
    f = tmp_path / "lru16k.yaml"
    f.write_text(
        "block_size: 512\nnum_blocks: 16384\nmax_num_seqs: 256\nmax_num_batched_tokens: 8192\n"
        "c0: 0\nc_prefill: 0\nc_decode: 0\nc_attn: 0\n"
    )
    profile = load_profile(str(f))
    w = mooncake_workload(mooncake_trace, profile.block_size)
    res = simulate(w, profile, 1, registry.create("round-robin"))
    m = summarize(res, "round-robin")
    assert m.completed == len(w) == 12031
    block_hit = float((res.cached_tokens // 512).sum()) / sum(-(-int(p) // 512) for p in res.prompt_tokens)
    print(f"\nsingle LRU of 16k x 512-token blocks: hit rate {m.hit_rate:.2%} of tokens, {block_hit:.2%} of blocks")
    assert abs(m.hit_rate - 0.266) <= 0.03
    assert abs(block_hit - 0.266) <= 0.03


@pytest.mark.slow
def test_whole_trace_over_8_replicas_completes_every_request(mooncake_trace: Path) -> None:
    # (its time is printed, not asserted: speed is a benchmark's business, and on a shared machine
    # this took 20 s to 120 s)
    profile = PROFILES["h100-llama3.1-8b"]
    start = time.perf_counter()
    w = mooncake_workload(mooncake_trace, profile.block_size)
    res = simulate(w, profile, 8, registry.create("round-robin"))
    elapsed = time.perf_counter() - start
    print(f"\nwhole Mooncake trace, 8 x {profile.name}: {elapsed:.1f} s (simulation {res.wall_s:.1f} s)")
    assert summarize(res, "round-robin").completed == 12031


# ---- schedule: membership changes, failures, cancels ---------------------------------------------


def test_schedule_add_and_remove_change_where_requests_go() -> None:
    from pylb.sim.cluster import ClusterEvent

    wl = prepare_workload(workload(60, gap=0.1), FAST.block_size)
    res = simulate(wl, FAST, 2, RoundRobinRouter(), schedule=[ClusterEvent(2.0, "add", "replica-2"), ClusterEvent(4.0, "remove", "replica-0")])
    assert res.replicas == ["replica-0", "replica-1", "replica-2"]
    assert np.all(~np.isnan(res.completion)) and not res.failed.any()
    assert set(res.replica[res.dispatch < 2.0].tolist()) == {0, 1}
    assert 2 in set(res.replica[(res.dispatch > 2.0) & (res.dispatch < 4.0)].tolist())
    assert set(res.replica[res.dispatch > 4.0].tolist()) == {1, 2}  # nothing to the removed one


def test_schedule_failure_retries_unstarted_requests_and_fails_streaming_ones() -> None:
    from pylb.sim.cluster import ClusterEvent

    slow = Profile("slow", block_size=16, num_blocks=4096, max_num_seqs=64, max_num_batched_tokens=512, c0=0.02, c_prefill=2e-4, c_decode=1e-3, c_attn=0.0)
    wl = prepare_workload(workload(80, gap=0.01, out=50), slow.block_size)
    res = simulate(wl, slow, 2, RoundRobinRouter(), schedule=[ClusterEvent(0.3, "fail", "replica-0")])
    ended = ~np.isnan(res.completion) | res.failed
    assert ended.all()  # none lost
    assert res.failed.any() and res.stats["retries"] > 0
    assert np.isnan(res.completion[res.failed]).all()
    completed = ~np.isnan(res.completion)
    assert not np.any((res.replica == 0) & completed & (res.completion > 0.3))  # nothing finishes on the dead one
    assert np.all(res.replica[res.dispatch > 0.3] == 1)


def test_schedule_cancel_and_bad_events() -> None:
    from pylb.sim.cluster import ClusterEvent

    wl = prepare_workload(workload(10, gap=0.0, out=50), FAST.block_size)
    res = simulate(wl, FAST, 1, RoundRobinRouter(RouterOptions(max_unprefilled_requests=1)), schedule=[ClusterEvent(0.0, "cancel", "r9")])
    assert res.failed.tolist() == [False] * 9 + [True] and np.isnan(res.dispatch[9])  # withdrawn while queued
    with pytest.raises(ValueError, match="kind"):
        ClusterEvent(1.0, "explode", "replica-0")
    with pytest.raises(ValueError, match="schedule event 0.*not in rotation"):
        simulate(wl, FAST, 1, RoundRobinRouter(), schedule=[ClusterEvent(0.0, "remove", "replica-7")])


# ---- request overhead: dispatch -> the engine's queue ----------------------------------------------


def test_request_overhead_delays_every_request_by_its_amount_and_costs_a_gated_router_idle_time() -> None:
    import dataclasses

    one = dataclasses.replace(FAST, name="one-at-a-time", c_prefill=1e-3)  # ~0.2 s per prompt: a queue forms
    late = dataclasses.replace(one, request_overhead=0.05)
    wl = prepare_workload(workload(12, gap=0.0), one.block_size)
    gated = RouterOptions(max_unprefilled_requests=1)  # the next dispatch waits for the previous first token
    at_once = simulate(wl, one, 1, RoundRobinRouter(gated))
    delayed = simulate(wl, late, 1, RoundRobinRouter(gated))
    assert np.all(~np.isnan(delayed.completion)) and not delayed.rejected.any()
    # the first request reaches an idle engine 50 ms after its dispatch: its TTFT grows by exactly that
    assert delayed.ttft[0] == pytest.approx(at_once.ttft[0] + 0.05)
    # with one request in flight at a time, the engine idles for the overhead before each prompt
    assert delayed.first_token[-1] - at_once.first_token[-1] == pytest.approx(12 * 0.05, rel=0.05)
    # a router that sends everything at once pays the overhead once, not per request
    eager = simulate(wl, late, 1, RoundRobinRouter())
    assert eager.first_token[-1] < delayed.first_token[-1] - 0.4


def test_a_working_engine_takes_the_loaded_overhead_and_an_idle_one_the_idle_overhead() -> None:
    import dataclasses

    one = dataclasses.replace(FAST, name="one", c_prefill=1e-3, request_overhead=0.01)  # ~0.2 s per prompt
    loaded = dataclasses.replace(one, loaded_request_overhead=0.3)
    assert loaded.busy_request_overhead == 0.3 and one.busy_request_overhead == 0.01  # (0: the idle value)
    wl = prepare_workload(workload(3, gap=0.0), one.block_size)
    res = simulate(wl, loaded, 1, RoundRobinRouter())
    # all three are dispatched at 0: the engine is idle then, so each reaches it 10 ms later
    assert res.enqueued == pytest.approx([0.01, 0.01, 0.01])
    spaced = prepare_workload(workload(3, gap=0.1), one.block_size)  # the 2nd and 3rd find it prefilling
    res = simulate(spaced, loaded, 1, RoundRobinRouter())
    assert res.enqueued - res.dispatch == pytest.approx([0.01, 0.3, 0.3])
    base = simulate(spaced, one, 1, RoundRobinRouter())
    assert res.ttft[0] == pytest.approx(base.ttft[0]) and res.first_token[2] > base.first_token[2]


def test_the_running_overhead_grows_with_the_requests_the_engine_runs() -> None:
    import dataclasses

    one = dataclasses.replace(FAST, name="one", c_prefill=1e-3, request_overhead=0.01)  # ~0.2 s per prompt
    per_running = dataclasses.replace(one, running_request_overhead=0.05)
    spaced = prepare_workload(workload(3, gap=0.1), one.block_size)
    res = simulate(spaced, per_running, 1, RoundRobinRouter())
    # the 1st finds the engine idle; the 2nd (t=0.1) and the 3rd (t=0.2) find the 1st running its
    # prefill step (0.01-0.21), the 2nd still waiting for the next step: one running request each
    assert res.enqueued - res.dispatch == pytest.approx([0.01, 0.06, 0.06])
    two = simulate(spaced, one, 2, RoundRobinRouter())  # two engines: each request finds its own idle
    assert simulate(spaced, per_running, 2, RoundRobinRouter()).enqueued - two.dispatch == pytest.approx([0.01, 0.01, 0.06])


def test_request_overhead_survives_cancels_and_failures_in_transit() -> None:

    from pylb.sim.cluster import ClusterEvent

    slow = Profile("slow", block_size=16, num_blocks=4096, max_num_seqs=64, max_num_batched_tokens=512, c0=0.02,
                   c_prefill=2e-4, c_decode=1e-3, c_attn=0.0, request_overhead=0.1)  # fmt: skip
    wl = prepare_workload(workload(40, gap=0.01, out=20), slow.block_size)
    # r3 is cancelled while on its way to the engine (dispatched at 0.03, arrives at 0.13); replica-0
    # fails at 0.35 with requests in transit to it: they are re-placed, none is delivered to the dead engine
    res = simulate(wl, slow, 2, RoundRobinRouter(), schedule=[ClusterEvent(0.08, "cancel", "r3"), ClusterEvent(0.35, "fail", "replica-0")])
    ended = ~np.isnan(res.completion) | res.failed
    assert ended.all()  # none lost
    assert res.failed[3] and np.isnan(res.first_token[3])
    assert res.stats["retries"] > 0
    assert not np.any((res.replica == 0) & ~np.isnan(res.completion) & (res.completion > 0.35))
    assert (res.first_token[~np.isnan(res.first_token)] - res.dispatch[~np.isnan(res.first_token)] >= 0.1 - 1e-9).all()


def test_slowed_profile_scales_every_time_and_keeps_the_geometry() -> None:
    from pylb.sim.profiles import ProfileError

    p = Profile("p", block_size=16, num_blocks=100, max_num_seqs=8, max_num_batched_tokens=256, c0=0.01, c_prefill=1e-4,
                c_decode=1e-3, c_attn=1e-6, c_prefill_attn=1e-8, request_overhead=0.004, loaded_request_overhead=0.2)  # fmt: skip
    s = p.slowed(1.5, why="fitted")
    assert s.name == "p-x1.5" and "x 1.5: fitted" in s.description
    assert (s.block_size, s.num_blocks, s.max_num_seqs, s.max_num_batched_tokens) == (16, 100, 8, 256)
    assert s.step_time(100, 3, 500, 50) == pytest.approx(1.5 * p.step_time(100, 3, 500, 50))
    assert s.request_overhead == pytest.approx(0.006) and s.loaded_request_overhead == pytest.approx(0.3)
    for bad in (0, -1.0, float("nan"), True, "2"):
        with pytest.raises(ProfileError, match="slowdown factor"):
            p.slowed(bad)  # type: ignore[arg-type]
