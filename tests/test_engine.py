"""Engine model of one vLLM replica: small literal cases, one behaviour each; and profiles."""

from __future__ import annotations

import random

import pytest

from pylb import native
from pylb.sim.engine import Engine, RequestRejected, StepResult, prompt_block_hashes
from pylb.sim.profiles import PROFILES, Profile, ProfileError, load_profile, profile_from_dict


def prof(**kw: object) -> Profile:
    base: dict[str, object] = dict(
        name="test",
        block_size=4,
        num_blocks=16,
        max_num_seqs=8,
        max_num_batched_tokens=64,
        c0=1.0,
        c_prefill=0.0,
        c_decode=0.0,
        c_attn=0.0,
    )
    base.update(kw)
    return Profile(**base)  # type: ignore[arg-type]


class Trace:
    """Runs an engine until idle, recording when each event happened."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.now = 0.0
        self.first: dict[str, float] = {}
        self.done: dict[str, float] = {}
        self.usage: dict = {}
        self.results: list[StepResult] = []

    def step(self, max_steps: int = 1) -> StepResult:
        res = self.engine.step(self.now, max_steps)
        self.results.append(res)
        self.now = res.end
        for rid in res.first_tokens:
            self.first[rid] = self.now
        for f in res.finished:
            self.done[f.request_id] = self.now
            self.usage[f.request_id] = f.usage
        return res

    def drain(self, max_steps: int = 1, limit: int = 10_000) -> None:
        for _ in range(limit):
            if not self.engine.has_work():
                return
            self.step(max_steps)
        raise AssertionError("engine did not drain")


def run_one(engine: Engine, rid: str, prompt: int, hashes: list[int], max_tokens: int = 1) -> Trace:
    engine.add_request(rid, prompt, max_tokens, hashes, 0.0)
    t = Trace(engine)
    t.drain()
    return t


# ---- prefix caching ------------------------------------------------------------------------


def test_prefix_hit_is_longest_leading_run_of_full_blocks() -> None:
    e = Engine(prof())
    assert run_one(e, "a", 12, [1, 2, 3]).usage["a"].cached_tokens == 0
    # shares the first two blocks, differs in the third
    assert run_one(e, "b", 12, [1, 2, 9]).usage["b"].cached_tokens == 8
    # a miss in the middle ends the hit even if later blocks are cached
    assert run_one(e, "c", 12, [1, 7, 3]).usage["c"].cached_tokens == 4
    m = e.metrics_snapshot(100.0)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (36, 12)  # counted in tokens


def test_fully_cached_prompt_recomputes_its_last_token() -> None:
    e = Engine(prof())
    run_one(e, "a", 13, [1, 2, 3])
    # 12 tokens, all 3 blocks cached: vLLM caps the hit at 11 tokens -> 2 blocks
    assert run_one(e, "b", 12, [1, 2, 3]).usage["b"].cached_tokens == 8
    # 13 tokens: the 3 full blocks are a hit, the 13th token is computed
    t = run_one(e, "c", 13, [1, 2, 3])
    assert t.usage["c"].cached_tokens == 12
    assert t.results[0].prefill_tokens == 1


def test_blocks_are_cached_at_scheduling_so_the_same_step_can_hit() -> None:
    e = Engine(prof())
    e.add_request("a", 8, 1, [1, 2], 0.0)
    e.add_request("b", 9, 1, [1, 2], 0.0)
    t = Trace(e)
    t.drain()
    assert len(t.results) == 1  # both in one step
    assert t.usage["b"].cached_tokens == 8


def test_lru_eviction_order_and_tail_first_release() -> None:
    e = Engine(prof(num_blocks=4))
    run_one(e, "a", 8, [1, 2])  # frees 2 blocks: tail (h2) first, then head (h1)
    run_one(e, "b", 8, [3, 4])
    run_one(e, "c", 8, [5, 6])  # needs 2 of the 4: evicts a's (least recently freed)
    assert e.cached_prefix_blocks([1, 2]) == 0
    assert e.cached_prefix_blocks([3, 4]) == 2
    # d hits h3 (cap: 7 tokens -> 1 block) and needs one new block: the head of the free
    # queue is b's tail block (h4), freed before b's head block (h3)
    assert run_one(e, "d", 8, [3, 7]).usage["d"].cached_tokens == 4
    assert e.cached_prefix_blocks([3, 4]) == 1
    # d re-freed h3 after c's blocks: e evicts c's blocks, not the recently used h3
    run_one(e, "e", 8, [8, 9])
    assert e.cached_prefix_blocks([5, 6]) == 0
    assert e.cached_prefix_blocks([3]) == 1
    assert e.num_cached_blocks == 4


def test_blocks_in_use_are_never_evicted() -> None:
    e = Engine(prof(num_blocks=5))
    e.add_request("long", 8, 6, [1, 2], 0.0)  # runs for 6 steps, holds 2..4 blocks
    t = Trace(e)
    t.step()
    for i, rid in enumerate(["x", "y", "z"]):
        e.add_request(rid, 8, 1, [10 + 2 * i, 11 + 2 * i], t.now)
        t.step()
        assert e.cached_prefix_blocks([1, 2]) == 2, "blocks of a running request were evicted"
    # a request arriving while "long" runs hits its blocks
    e.add_request("hit", 9, 1, [1, 2], t.now)
    t.drain()
    assert t.usage["hit"].cached_tokens == 8
    assert set(t.done) == {"long", "x", "y", "z", "hit"}
    assert e.cached_prefix_blocks([10, 11]) == 0  # x's blocks were the ones evicted


def test_abort_frees_blocks_and_keeps_them_cached() -> None:
    e = Engine(prof())
    e.add_request("a", 16, 40, [1, 2, 3, 4], 0.0)
    e.add_request("w", 8, 1, [], 0.0)
    t = Trace(e)
    t.step()
    assert e.num_free_blocks < 16
    assert e.abort("a", t.now) is True
    assert e.abort("a", t.now) is False
    assert e.abort("nope", t.now) is False
    t.drain()
    assert e.num_free_blocks == 16
    assert e.cached_prefix_blocks([1, 2, 3, 4]) == 4
    assert "a" not in t.done and "w" in t.done
    # a waiting request can be aborted too
    e.add_request("b", 8, 1, [], t.now)
    assert e.abort("b", t.now) and not e.has_work()


# ---- batching --------------------------------------------------------------------------------


def test_chunked_prefill_splits_by_token_budget() -> None:
    e = Engine(prof(max_num_batched_tokens=10))
    e.add_request("a", 25, 2, [], 0.0)
    t = Trace(e)
    r1, r2, r3 = t.step(), t.step(), t.step()
    assert [r.prefill_tokens for r in (r1, r2, r3)] == [10, 10, 5]
    assert r1.first_tokens == r2.first_tokens == [] and r3.first_tokens == ["a"]
    r4 = t.step()
    assert (r4.prefill_tokens, r4.decode_seqs, [f.request_id for f in r4.finished]) == (0, 1, ["a"])


def test_running_requests_come_before_waiting_ones_in_the_budget() -> None:
    e = Engine(prof(max_num_batched_tokens=10, num_blocks=32))
    e.add_request("a", 15, 3, [], 0.0)
    t = Trace(e)
    t.step()  # a: 10 of 15
    e.add_request("b", 20, 1, [], t.now)
    r = t.step()  # a finishes its prompt (5), b gets the other 5
    assert r.prefill_tokens == 10 and r.first_tokens == ["a"]
    r = t.step()  # a decodes (1), b gets 9
    assert (r.decode_seqs, r.prefill_tokens) == (1, 9)


def test_max_num_seqs_limits_the_running_set() -> None:
    e = Engine(prof(max_num_seqs=2, num_blocks=64))
    for rid in "abc":
        e.add_request(rid, 4, 3, [], 0.0)
    t = Trace(e)
    t.step()
    assert (e.num_running, e.num_waiting) == (2, 1)
    m = e.metrics_snapshot(t.now)
    assert (m.num_requests_running, m.num_requests_waiting) == (2, 1)
    t.drain()
    assert t.first["c"] > t.done["a"] - 1e-9  # c started only after a slot freed


def test_preemption_by_recompute_when_blocks_run_out() -> None:
    e = Engine(prof(num_blocks=4))
    e.add_request("a", 4, 8, [1], 0.0)
    e.add_request("b", 4, 8, [2], 0.0)
    t = Trace(e)
    t.drain()
    assert e.num_preemptions >= 1
    assert t.done["a"] < t.done["b"]  # b (admitted last) was preempted and recomputed
    assert t.usage["b"].completion_tokens == 8 and t.usage["a"].completion_tokens == 8
    assert sum(rid == "b" for r in t.results for rid in r.first_tokens) == 1
    assert sum(r.sampled.count("b") for r in t.results) == 8  # no token twice
    assert e.num_free_blocks == 4
    # recompute counts as prefill in the step that re-admits b
    assert any(r.prefill_tokens > 1 for r in t.results[2:])


def test_rejects_what_cannot_fit_and_bad_arguments() -> None:
    e = Engine(prof(num_blocks=4))  # 16 tokens of KV
    with pytest.raises(RequestRejected, match="exceeds the KV cache"):
        e.add_request("big", 12, 5, [], 0.0)
    e.add_request("ok", 12, 4, [], 0.0)
    with pytest.raises(RequestRejected, match="already"):
        e.add_request("ok", 4, 1, [], 0.0)
    with pytest.raises(RequestRejected, match="max_tokens"):
        e.add_request("m", 4, 0, [], 0.0)
    with pytest.raises(RequestRejected, match="block hashes"):
        e.add_request("h", 7, 1, [1, 2], 0.0)


# ---- time --------------------------------------------------------------------------------------


def test_step_time_formula() -> None:
    e = Engine(prof(c0=1.0, c_prefill=0.1, c_decode=0.01, c_attn=0.001))
    e.add_request("a", 10, 3, [], 0.0)
    t = Trace(e)
    r = t.step()
    assert (r.prefill_tokens, r.decode_seqs, r.context_tokens) == (10, 0, 10)
    assert r.duration == pytest.approx(1.0 + 0.1 * 10 + 0.001 * 10)
    e.add_request("b", 6, 1, [], t.now)
    r = t.step()  # a decodes with 11 tokens of context, b prefills 6
    assert (r.prefill_tokens, r.decode_seqs, r.context_tokens) == (6, 1, 17)
    assert r.duration == pytest.approx(1.0 + 0.1 * 6 + 0.01 * 1 + 0.001 * 17)
    assert t.first == {"a": pytest.approx(2.01), "b": pytest.approx(2.01 + 1.627)}


def test_zero_cost_profile_makes_progress_in_zero_time() -> None:
    e = Engine(prof(c0=0.0, num_blocks=64))
    for i in range(5):
        e.add_request(f"r{i}", 10 + i, 7, [], 0.0)
    for max_steps in (1, 1 << 30):
        t = Trace(e)
        t.drain(max_steps)
        for i in range(5):
            e.add_request(f"s{i}-{max_steps}", 10 + i, 7, [], 0.0)
    t.drain(1 << 30)
    assert t.now == 0.0
    assert not e.has_work()


# ---- fused decode steps --------------------------------------------------------------------------


def drive(engine: Engine, arrivals: list[tuple[float, str, int, int, list[int]]], max_steps: int) -> dict[str, tuple[float, float]]:
    """A minimal event-driven driver: adds requests at their times, steps whenever idle.

    Returns request id -> (first token time, finish time). At equal times a step end comes
    before an arrival, as in the cluster simulator.
    """
    events: dict[str, list[float]] = {}
    pending = sorted(arrivals)
    inflight: StepResult | None = None  # events to deliver at step_end
    step_end: float | None = None
    while pending or step_end is not None:
        if pending and (step_end is None or pending[0][0] < step_end):
            now, rid, prompt, out, hashes = pending.pop(0)
            engine.add_request(rid, prompt, out, hashes, now)
            if step_end is not None and engine.busy_until != step_end:  # a fused run was cut short
                inflight, step_end = None, engine.busy_until
            if step_end is None:
                inflight = engine.step(now, max_steps)
                step_end = engine.busy_until
            continue
        now = step_end  # type: ignore[assignment]
        if inflight is not None:
            for rid in inflight.first_tokens:
                events[rid] = [now]
            for f in inflight.finished:
                events[f.request_id].append(now)
        inflight = step_end = None
        if engine.has_work():
            inflight = engine.step(now, max_steps)
            step_end = engine.busy_until
    return {k: (v[0], v[1]) for k, v in events.items()}


@pytest.mark.parametrize("seed", range(12))
def test_fused_decode_steps_give_the_same_timeline_as_single_steps(seed: int) -> None:
    """Random arrivals with shared prefixes on a small cache: chunking, preemption, blocked
    admissions and cut runs all happen; fused stepping must not change a single event time."""
    rng = random.Random(seed)
    arrivals = []
    for i in range(40):
        prompt = rng.randint(1, 60)
        shared = rng.randint(0, 6)
        hashes = [100 + j for j in range(shared)] + [1000 * i + j for j in range(prompt // 4)]
        arrivals.append((rng.uniform(0, 30), f"r{i}", prompt, rng.randint(1, 40), hashes[: prompt // 4]))
    p = prof(
        num_blocks=rng.randint(25, 40),
        max_num_seqs=rng.randint(2, 8),
        max_num_batched_tokens=rng.choice([8, 16, 32]),
        c0=0.05,
        c_prefill=0.01,
        c_decode=0.002,
        c_attn=0.0005,
    )
    single_engine, fused_engine = Engine(p), Engine(p)
    single = drive(single_engine, arrivals, 1)
    fused = drive(fused_engine, arrivals, 1 << 30)
    assert set(single) == set(fused) == {a[1] for a in arrivals}
    for rid in single:
        assert fused[rid] == pytest.approx(single[rid], abs=1e-9), rid
    assert fused_engine.num_preemptions == single_engine.num_preemptions
    assert fused_engine.steps_total == single_engine.steps_total


def test_fused_run_is_cut_at_the_next_step_boundary_when_a_request_arrives() -> None:
    e = Engine(prof(c0=1.0, num_blocks=32))
    e.add_request("a", 4, 100, [], 0.0)
    e.step(0.0)  # prefill, ends at 1.0
    r = e.step(1.0, 1 << 30)
    assert r.num_steps == 98 and r.end == pytest.approx(99.0)
    e.add_request("b", 4, 1, [], 10.5)  # steps start at 1, 2, ..., 10 and 11: cut after the one started at 10
    assert e.busy_until == pytest.approx(11.0)
    assert e.request_state("a")["output_tokens"] == 1 + 10  # type: ignore[index]
    r = e.step(11.0, 1 << 30)
    assert r.first_tokens == ["b"] and r.end == pytest.approx(12.0)


def test_metrics_snapshot_during_a_fused_run_sees_the_steps_started() -> None:
    e = Engine(prof(c0=1.0, num_blocks=32))
    e.add_request("a", 4, 100, [], 0.0)
    e.step(0.0)
    e.step(1.0, 1 << 30)
    assert e.metrics_snapshot(0.9).generation_tokens == 1  # the prefill's token
    assert e.metrics_snapshot(1.0).generation_tokens == 2  # a step counts from its start
    assert e.metrics_snapshot(5.5).generation_tokens == 6  # steps started at 1, 2, 3, 4, 5
    m = e.metrics_snapshot(5.5)
    assert m.kv_cache_usage == pytest.approx(3 / 32)  # 4 + 6 tokens computed: 3 blocks
    assert e.busy_until == pytest.approx(99.0)  # the run itself goes on


# ---- hashing and metrics ---------------------------------------------------------------------------


def test_prompt_block_hashes_use_four_bytes_per_token() -> None:
    text = b"abcd" * 40
    assert prompt_block_hashes(text, 4).tolist() == native.block_hashes(text, 16).tolist()
    assert len(prompt_block_hashes(text, 16)) == 2


def test_metrics_snapshot_fields() -> None:
    e = Engine(prof())
    e.add_request("a", 9, 2, [1, 2], 0.0)
    e.step(0.0)
    m = e.metrics_snapshot(0.5)
    assert (m.num_requests_running, m.num_requests_waiting) == (1, 0)
    assert m.kv_cache_usage == pytest.approx(3 / 16)
    assert (m.block_size, m.num_gpu_blocks) == (4, 16)
    assert (m.prefix_cache_queries, m.prefix_cache_hits, m.prompt_tokens, m.generation_tokens) == (9, 0, 9, 1)


# ---- profiles ----------------------------------------------------------------------------------


def test_builtin_profiles() -> None:
    assert {"h100-llama3.1-8b", "dualmap-910b"} <= set(PROFILES)
    d = load_profile("dualmap-910b")
    assert (d.c_prefill, d.block_size, d.max_num_batched_tokens) == (1.6e-4, 128, 20480)
    assert not d.zero_cost and prof(c0=0.0).zero_cost


def test_yaml_profile(tmp_path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(
        "block_size: 512\nnum_blocks: 16384\nmax_num_seqs: 256\nmax_num_batched_tokens: 8192\n"
        "c0: 0\nc_prefill: 0\nc_decode: 0\nc_attn: 0\n"
    )
    p = load_profile(str(f))
    assert (p.name, p.block_size, p.num_blocks, p.zero_cost) == ("p", 512, 16384, True)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_sise": 4}, "unknown profile field 'block_sise'"),
        ({"c0": -1}, "c0 must be a finite number of seconds >= 0, got -1"),
        ({"num_blocks": 0}, "num_blocks must be a positive integer, got 0"),
        ({"block_size": 2.5}, "block_size must be a positive integer, got 2.5"),
        ({"c_attn": "fast"}, "c_attn must be a number of seconds >= 0, got 'fast'"),
        ({"max_num_seqs": True}, "max_num_seqs must be a positive integer, got True"),
    ],
)
def test_bad_profile_fields_are_named(change: dict, message: str) -> None:
    data = {"block_size": 4, "num_blocks": 8, "max_num_seqs": 2, "max_num_batched_tokens": 16, "c0": 0, "c_prefill": 0, "c_decode": 0, "c_attn": 0}
    data.update(change)
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace(")", r"\)")):
        profile_from_dict(data)


def test_missing_profile_field_and_unknown_name(tmp_path) -> None:
    with pytest.raises(ProfileError, match="missing profile field.*c_attn"):
        profile_from_dict({"block_size": 4, "num_blocks": 8, "max_num_seqs": 2, "max_num_batched_tokens": 16, "c0": 0, "c_prefill": 0, "c_decode": 0})
    with pytest.raises(ProfileError, match="unknown profile 'nope'"):
        load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ProfileError, match="expected a mapping"):
        load_profile(str(bad))


def test_add_prompt_counts_tokens_and_hashes_text() -> None:
    e = Engine(prof(num_blocks=64))
    text = b"0123456789abcdef" * 4 + b"xyz"  # 67 bytes -> 17 tokens, 4 full blocks of 4 tokens
    assert e.add_prompt("a", text, 1, 0.0) == 17
    Trace(e).drain()
    e.add_prompt("b", text, 1, 1.0)
    t = Trace(e)
    t.now = 1.0
    t.drain()
    assert t.usage["b"].cached_tokens == 16
