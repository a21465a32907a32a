"""The events-fed mirror and `router.cache_state: events` in the router core (issue 12 §3)."""

from __future__ import annotations

import numpy as np
import pytest

from pylb import native
from pylb.router import registry
from pylb.router.event_mirror import EventMirror
from pylb.router.interface import RouterOptions, RoutingRequest


U64 = np.uint64


def keys(*k: int) -> np.ndarray:
    return np.array(k, dtype=U64)


def test_event_mirror_applies_events_and_recent_dispatches() -> None:
    m = EventMirror(grace_s=2.0)
    m.add_replica()
    m.add_replica()
    m.stored(0, keys(1, 2, 3))
    assert m.match(keys(1, 2, 3, 4)).tolist() == [3, 0]
    m.removed(0, keys(3))
    assert m.match(keys(1, 2, 3)).tolist() == [2, 0]
    m.record_dispatch(1, keys(1, 2, 3, 4), now=10.0)  # pylb's own dispatch, before its events
    assert m.match(keys(1, 2, 3, 4, 5)).tolist() == [2, 4]
    assert m.observed_match(keys(1, 2)).tolist() == [2, 0]
    m.advance(11.0)  # grace/2 later: still remembered (older generation)
    assert m.match(keys(1, 2, 3, 4)).tolist() == [2, 4]
    m.advance(12.1)  # a grace later: forgotten
    assert m.match(keys(1, 2, 3, 4)).tolist() == [2, 0]
    m.record_dispatch(1, keys(1, 2, 3), now=12.2)
    m.removed(1, keys(2))  # the engine evicted it within the grace period: its word wins
    assert m.match(keys(1, 2, 3)).tolist() == [2, 1]
    m.cleared(0)
    assert m.match(keys(1)).tolist() == [0, 1] and m.blocks(0) == 0
    m.stored(1, keys(7))
    m.remove_replica(0)
    assert m.match(keys(7)).tolist() == [1]


def test_a_forgotten_dispatch_leaves_the_engines_own_blocks() -> None:
    """`forget_dispatch` (a request moved to another replica) drops pylb's recent dispatch there,
    in both generations, and never what the engine's events reported."""
    m = EventMirror(grace_s=2.0)
    m.add_replica()
    m.stored(0, keys(1, 2))
    m.record_dispatch(0, keys(1, 2, 3, 4), now=10.0)
    m.advance(11.1)  # now in the older generation
    m.record_dispatch(0, keys(1, 2, 3), now=11.2)
    assert m.match(keys(1, 2, 3, 4)).tolist() == [4]
    m.forget_dispatch(0, keys(3, 4))
    assert m.match(keys(1, 2, 3, 4)).tolist() == [2]


def request(rid: str, text: bytes, engine: np.ndarray | None, block_size: int = 32) -> RoutingRequest:
    return RoutingRequest(rid, native.block_hashes(text, 64), prompt_tokens=len(text) // 4, max_tokens=4, arrival=0.0,
                          engine_keys=engine, engine_block_size=block_size if engine is not None else 0)  # fmt: skip


@pytest.mark.parametrize("policy", registry.names())
def test_every_policy_runs_on_the_events_mirror(policy: str) -> None:
    """With cache_state events the core's cached_blocks comes from the engine's events (in router
    blocks: 2 engine blocks of 32 tokens = 4 router blocks of 16 tokens); every policy routes."""
    router = registry.create(policy, RouterOptions(cache_state="events"))
    router.on_membership(["a", "b"], 0.0)
    text = b"x" * 4096  # 1024 estimated tokens, 64 router blocks
    eng = native.engine_block_hashes(np.arange(1024, dtype=np.uint32), 32)  # 32 engine blocks
    router.on_kv_event("b", "stored", eng[:2], 0.1)
    req = request("r1", text, eng)
    assert router.view.cached_blocks(req).tolist() == [0, 4]  # the predicted mirror knows nothing
    assert router.view.uncached_tokens(req, 1) == 1024 - 64
    router.submit(req, 0.2)
    (d,) = router.poll(0.2)
    # after the dispatch pylb remembers it sent all 32 blocks there, until the events catch up
    i = ["a", "b"].index(d.replica)
    again = request("r2", text, eng)
    assert router.view.cached_blocks(again)[i] == 64
    router.on_kv_event("a", "cleared", keys(), 0.3)
    router.on_kv_event("b", "removed", eng[:1], 0.3)
    late = request("r3", text, eng)
    router.on_complete("r1", d.replica, 60.0, None)  # much later: the recent dispatch is forgotten
    assert router.view.cached_blocks(late).tolist() == [0, 0]
    # a request without engine keys is matched on the predicted mirror
    plain = request("r4", text, None)
    assert router.view.cached_blocks(plain)[i] == 64


def test_cache_comparison_counts_both_mirrors_at_dispatch() -> None:
    router = registry.create("least-load", RouterOptions(cache_state="events"))
    router.on_membership(["a"], 0.0)
    text = b"y" * 1024  # 256 tokens
    eng = native.engine_block_hashes(np.arange(256, dtype=np.uint32), 32)  # 8 engine blocks
    router.on_kv_event("a", "stored", eng[:3], 0.0)
    router.submit(request("r1", text, eng), 0.0)
    router.poll(0.0)
    c = router.cache_comparison["a"]
    assert (c.dispatches, c.prompt_tokens, c.predicted_tokens, c.events_tokens) == (1, 256, 0, 96)
    router.on_complete("r1", "a", 1.0, None)
    router.submit(request("r2", text, eng), 1.0)
    router.poll(1.0)
    assert (c.predicted_tokens, c.events_tokens) == (256, 192)  # predicted: its own dispatch; events: 3 blocks


def test_unknown_event_kind_and_predicted_mode() -> None:
    router = registry.create("round-robin", RouterOptions())
    router.on_membership(["a"], 0.0)
    router.on_kv_event("a", "stored", keys(1), 0.0)  # predicted mode: ignored
    assert router.events is None
    ev = registry.create("round-robin", RouterOptions(cache_state="events"))
    ev.on_membership(["a"], 0.0)
    with pytest.raises(ValueError, match="unknown KV event kind"):
        ev.on_kv_event("a", "bogus", keys(), 0.0)
    ev.on_kv_event("nobody", "stored", keys(1), 0.0)  # not a member: ignored
    with pytest.raises(ValueError, match="cache_state"):
        RouterOptions(cache_state="exact")


def test_simulator_feeds_engine_events_and_they_predict_better_under_eviction() -> None:
    """`pylb simulate` with cache_state events: the engines report their cache changes at each
    step's end. With caches too small for the workload, the events mirror's account at dispatch
    is closer to what the engines then hit than the predicted LRU mirror's."""
    from pylb.sim.cluster import prepare_workload, simulate
    from pylb.sim.profiles import Profile
    from pylb.workload.synthetic import multi_turn

    small = Profile("small", block_size=16, num_blocks=160, max_num_seqs=8, max_num_batched_tokens=2048,
                    c0=0.005, c_prefill=1e-5, c_decode=1e-4, c_attn=1e-8)  # fmt: skip
    w = prepare_workload(multi_turn(sessions=12, turns=3, seed=1, system_tokens=256, user_tokens=128, answer_tokens=8, rate=4.0), small.block_size)
    router = registry.create("dualmap", RouterOptions(cache_state="events", cache_capacity_tokens=small.num_blocks * small.block_size))
    res = simulate(w, small, 2, router)
    assert not np.isnan(res.completion).any()
    comparison = router.cache_comparison  # type: ignore[attr-defined]
    actual = int(res.cached_tokens.sum())
    events = sum(c.events_tokens for c in comparison.values())
    predicted = sum(c.predicted_tokens for c in comparison.values())
    assert sum(c.dispatches for c in comparison.values()) == len(w)
    assert actual > 0
    assert abs(events - actual) < abs(predicted - actual)
