"""Unit tests of the four baseline policies (chwbl, cache-aware, weighted-score, preble-e2).

Literal replica states in a fake RouterView (tests/policy_fakes.py); no router core. Each policy
gets tests of its own rule with exact thresholds, then all four go through the same contract
checks: a valid index always, one replica, determinism under a seed, membership changes (state
of removed replicas dropped, indices remapped by name).
"""

from __future__ import annotations

import random

import pytest
from policy_fakes import Driver, FakeView, choose, metrics, replicas, request, text, write

from pylb.router import registry
from pylb.router.interface import RouterOptions, RoutingRequest
from pylb.router.policies.cache_aware import CacheAwarePolicy
from pylb.router.policies.chwbl import ChwblPolicy, ChwblRing, load_ok, prefix_key
from pylb.router.policies.preble_e2 import PrebleE2Policy
from pylb.router.policies.weighted_score import WeightedScorePolicy, queue_scores
from pylb.router.policy import Policy

NAMES4 = ["replica-0", "replica-1", "replica-2", "replica-3"]
NAMES8 = [f"replica-{i}" for i in range(8)]


def opts(seed: int = 0, **extra: object) -> RouterOptions:
    return RouterOptions(seed=seed, extra=dict(extra))


# ---- chwbl -----------------------------------------------------------------------------------


def test_chwbl_ring_has_256_vnodes_per_replica() -> None:
    ring = ChwblRing(NAMES4, 256)
    assert len(ring) == 4 * 256
    assert sorted(ring.owners.count(n) for n in NAMES4) == [256] * 4
    assert ring.positions == sorted(ring.positions)
    assert ChwblPolicy(opts()).replication == 256


def test_chwbl_load_bound_arithmetic() -> None:
    # KubeAI: load + 1 <= (total + 1) / n * 1.25; everything qualifies while nothing is in flight.
    assert load_ok(0, 0, 4, 1.25)
    assert load_ok(12, 42, 4, 1.25)  # 13 <= 43 / 4 * 1.25 = 13.4375
    assert not load_ok(13, 43, 4, 1.25)  # 14 > 44 / 4 * 1.25 = 13.75
    assert load_ok(4, 15, 4, 1.25)  # 5 <= 16 / 4 * 1.25 = 5.0, the bound itself is allowed
    assert not load_ok(0, 1, 8, 1.25)  # 1 > 2 / 8 * 1.25: at low load nobody qualifies


def test_chwbl_same_prefix_same_replica_when_loads_even() -> None:
    policy = ChwblPolicy(opts())
    view = FakeView(replicas(NAMES4, [5, 5, 5, 5]))
    policy.on_membership(NAMES4)
    assert policy.ring is not None
    for k in range(40):
        req = request(text(f"user{k}", 2) + text(f"tail{k}", 3))
        owner = policy.ring.walk(prefix_key(req, 2))[0]
        choice = choose(policy, req, view)
        assert (view.replicas[choice.replica].name, choice.branch) == (owner, "affinity")
        # Same first two blocks, different rest: same key, same replica.
        again = request(text(f"user{k}", 2) + text("other", 5), "r2")
        assert choose(policy, again, view).replica == choice.replica


def test_chwbl_walks_clockwise_past_overloaded_owner() -> None:
    policy = ChwblPolicy(opts())
    policy.on_membership(NAMES4)
    assert policy.ring is not None
    req = request(text("conversation", 4))
    order = policy.ring.walk(prefix_key(req, 2))
    assert sorted(order) == sorted(NAMES4)

    def loads(owner: int, second: int = 10) -> list[int]:
        by_name = {order[0]: owner, order[1]: second, order[2]: 10, order[3]: 10}
        return [by_name[n] for n in NAMES4]

    view = FakeView(replicas(NAMES4, loads(12)))  # 13 <= 43/4*1.25 = 13.44: the owner takes it
    choice = choose(policy, req, view)
    assert (NAMES4[choice.replica], choice.branch) == (order[0], "affinity")
    view = FakeView(replicas(NAMES4, loads(13)))  # 14 > 13.75: next clockwise (load 10) takes it
    choice = choose(policy, req, view)
    assert (NAMES4[choice.replica], choice.branch) == (order[1], "load")
    view = FakeView(replicas(NAMES4, loads(15, 15)))  # 16 > 51/4*1.25 = 15.94 for both: the third
    assert NAMES4[choose(policy, req, view).replica] == order[2]


def test_chwbl_falls_back_to_owner_when_nobody_qualifies() -> None:
    policy = ChwblPolicy(opts())
    policy.on_membership(NAMES8)
    assert policy.ring is not None
    req = request(text("x", 3))
    owner = policy.ring.walk(prefix_key(req, 2))[0]
    other = next(n for n in NAMES8 if n != owner)
    view = FakeView(replicas(NAMES8, [1 if n == other else 0 for n in NAMES8]))
    choice = choose(policy, req, view)
    assert (NAMES8[choice.replica], choice.branch) == (owner, "fallback")


def test_chwbl_adding_a_replica_moves_about_one_nth_of_keys() -> None:
    policy = ChwblPolicy(opts())
    names9 = NAMES8 + ["replica-8"]
    reqs = [request(text(f"k{k}", 2)) for k in range(3000)]
    policy.on_membership(NAMES8)
    view8 = FakeView(replicas(NAMES8))
    before = [NAMES8[choose(policy, r, view8).replica] for r in reqs]
    policy.on_membership(names9)
    view9 = FakeView(replicas(names9))
    after = [names9[choose(policy, r, view9).replica] for r in reqs]
    moved = [(b, a) for b, a in zip(before, after) if a != b]
    assert all(a == "replica-8" for _, a in moved)  # keys only move to the new replica
    assert 0.07 < len(moved) / len(reqs) < 0.16  # about 1/9 = 0.111


def test_chwbl_prefix_blocks_option_and_validation() -> None:
    one = ChwblPolicy(opts(prefix_blocks=1))
    a, b = request(text("same", 1) + text("a", 2)), request(text("same", 1) + text("b", 2))
    assert prefix_key(a, 1) == prefix_key(b, 1) and prefix_key(a, 2) != prefix_key(b, 2)
    view = FakeView(replicas(NAMES8))
    one.on_membership(NAMES8)
    assert choose(one, a, view).replica == choose(one, b, view).replica
    with pytest.raises(ValueError, match="load_factor"):
        ChwblPolicy(opts(load_factor=0.9))
    with pytest.raises(ValueError, match="replication"):
        ChwblPolicy(opts(replication=0))


# ---- cache-aware -----------------------------------------------------------------------------


def _cache_aware(names: list[str], **extra: object) -> tuple[CacheAwarePolicy, FakeView]:
    policy = CacheAwarePolicy(RouterOptions(extra=dict(extra)))
    policy.on_membership(names)
    return policy, FakeView(replicas(names))


def test_cache_aware_routes_to_longest_match_above_threshold() -> None:
    policy, view = _cache_aware(NAMES4)
    policy.tree.insert(request(text("sys", 10)).block_hashes.tolist(), "replica-2", 0.0)
    policy.tree.insert(request(text("big", 40)).block_hashes.tolist(), "replica-2", 0.0)
    policy.tree.insert(request(text("sys", 4)).block_hashes.tolist(), "replica-1", 0.0)
    # 10 of 12 blocks match on replica-2 (4 on replica-1): 0.83 > 0.3, despite replica-2's big tree.
    choice = choose(policy, request(text("sys", 10) + text("q", 2)), view)
    assert (choice.replica, choice.branch) == (2, "affinity")
    # The request was inserted into replica-2's tree.
    assert policy.tree.match_depth(request(text("sys", 10) + text("q", 2)).block_hashes.tolist(), "replica-2") == 12


def test_cache_aware_low_match_goes_to_smallest_tree() -> None:
    policy, view = _cache_aware(NAMES4)
    policy.tree.insert(request(text("sys", 3) + text("a", 7)).block_hashes.tolist(), "replica-0", 0.0)
    policy.tree.insert(request(text("b", 5)).block_hashes.tolist(), "replica-1", 0.0)
    policy.tree.insert(request(text("c", 2)).block_hashes.tolist(), "replica-2", 0.0)
    policy.tree.insert(request(text("d", 2)).block_hashes.tolist(), "replica-3", 0.0)
    # 3 of 10 blocks match replica-0: 0.3 is not > 0.3, so the smallest tree (first of the 2-block
    # trees, replica-2) gets it.
    choice = choose(policy, request(text("sys", 3) + text("z", 7)), view)
    assert (choice.replica, choice.branch) == (2, "fallback")
    # 4 of 10 (0.4 > 0.3): replica-0.
    policy, view = _cache_aware(NAMES4)
    policy.tree.insert(request(text("sys", 4) + text("a", 6)).block_hashes.tolist(), "replica-0", 0.0)
    choice = choose(policy, request(text("sys", 4) + text("z", 6)), view)
    assert (choice.replica, choice.branch) == (0, "affinity")


def test_cache_aware_low_match_min_load_variant() -> None:
    policy, view = _cache_aware(NAMES4, low_match="min-load")
    for r, load in zip(view.replicas, [3, 1, 0, 2]):
        write(r, inflight_requests=load)
    policy.tree.insert(request(text("c", 9)).block_hashes.tolist(), "replica-1", 0.0)
    choice = choose(policy, request(text("new", 4)), view)
    assert (choice.replica, choice.branch) == (2, "fallback")
    with pytest.raises(ValueError, match="low_match"):
        CacheAwarePolicy(opts(low_match="random"))


@pytest.mark.parametrize(
    ("loads", "imbalanced"),
    [([64, 0], False), ([65, 0], True), ([200, 134], False), ([201, 134], False), ([202, 134], True), ([90, 80], False)],
)
def test_cache_aware_imbalance_thresholds(loads: list[int], imbalanced: bool) -> None:
    # Imbalanced iff max - min > 64 AND max > 1.5 * min.
    names = ["replica-0", "replica-1"]
    policy, view = _cache_aware(names)
    assert policy.is_imbalanced(loads) is imbalanced
    for r, load in zip(view.replicas, loads):
        write(r, inflight_requests=load)
    req = request(text("sys", 8))
    policy.tree.insert(req.block_hashes.tolist(), "replica-0", 0.0)  # affinity says replica-0
    choice = choose(policy, req, view)
    if imbalanced:
        assert (choice.replica, choice.branch) == (1, "load")
        assert policy.tree.match_depth(req.block_hashes.tolist(), "replica-1") == 8  # still inserted
    else:
        assert (choice.replica, choice.branch) == (0, "affinity")


def test_cache_aware_evicts_lru_leaves_after_interval() -> None:
    # max_tree_size 5 blocks (5 x 64 characters), eviction every 60 s.
    policy, view = _cache_aware(["replica-0"], max_tree_size=5 * 64, eviction_interval_secs=60)
    old = request(text("old", 4)).block_hashes.tolist()
    new = request(text("sys", 2) + text("new", 2)).block_hashes.tolist()
    tiny = request(b"short")  # no full block: matches and inserts nothing
    view.now = 0.0
    choose(policy, tiny, view)  # first call arms the timer: next eviction at t = 60
    policy.tree.insert(old, "replica-0", 1.0)
    policy.tree.insert(new, "replica-0", 2.0)
    assert policy.tree.size("replica-0") == 8
    view.now = 59.9
    choose(policy, tiny, view)
    assert policy.tree.size("replica-0") == 8  # not yet
    view.now = 60.0
    choose(policy, tiny, view)
    # Down to 5 blocks, least recently used leaves first: 3 of "old"'s 4 blocks go (deepest first),
    # "new" (touched later) stays whole.
    assert policy.tree.size("replica-0") == 5
    assert policy.tree.match_depth(old, "replica-0") == 1
    assert policy.tree.match_depth(new, "replica-0") == 4
    # The next eviction is at t = 120.
    policy.tree.insert(old, "replica-0", 61.0)
    view.now = 119.0
    choose(policy, tiny, view)
    assert policy.tree.size("replica-0") == 8
    view.now = 120.0
    choose(policy, tiny, view)
    assert policy.tree.size("replica-0") == 5
    assert policy.tree.match_depth(new, "replica-0") == 1  # now "new" was the older path
    assert policy.tree.block_count() == 5  # evicted blocks leave the tree


def test_cache_aware_max_tree_size_defaults_to_2_pow_26_chars() -> None:
    policy = CacheAwarePolicy(opts())
    assert policy.max_tree_blocks == 2**26 // 64
    assert (policy.cache_threshold, policy.balance_abs_threshold, policy.balance_rel_threshold) == (0.3, 64, 1.5)
    assert policy.eviction_interval == 60


# ---- weighted-score --------------------------------------------------------------------------


def test_weighted_score_literal_arithmetic() -> None:
    policy = WeightedScorePolicy(opts())
    rs = replicas(["a", "b", "c"])
    # Waiting queue = router queue + scraped vLLM waiting: 0, 2, 4 -> queue scores 1, 0.5, 0.
    write(rs[0], metrics=metrics(waiting=0, kv_usage=0.5))
    write(rs[1], queued_requests=1, metrics=metrics(waiting=1, kv_usage=0.25))
    write(rs[2], queued_requests=4, metrics=metrics(waiting=0, kv_usage=0.0))
    view = FakeView(rs)
    policy.on_membership(["a", "b", "c"])
    req = request(text("p", 4))
    policy.index.add(req.block_hashes[:2].tolist(), "c", 100)  # c holds 2 of the 4 blocks
    # a: 2*1 + 2*0.5 + 3*0 = 3.0; b: 2*0.5 + 2*0.75 + 0 = 2.5; c: 0 + 2*1 + 3*0.5 = 3.5
    assert policy.scores(req, view) == [3.0, 2.5, 3.5]
    choice = choose(policy, req, view)
    assert (choice.replica, choice.branch) == (2, "affinity")
    assert policy.index.run_length(req.block_hashes.tolist(), "c") == 4  # indexed at selection
    assert queue_scores([3, 3, 3]) == [1.0, 1.0, 1.0]
    assert queue_scores([0, 4, 8]) == [1.0, 0.5, 0.0]


def test_weighted_score_ties_are_seeded_random() -> None:
    def picks(seed: int) -> list[int]:
        policy = WeightedScorePolicy(opts(seed=seed))
        view = FakeView(replicas(NAMES4))
        policy.on_membership(NAMES4)
        # Every request is new and nothing changes in the view: all four replicas tie each time.
        return [choose(policy, request(text(f"u{k}", 2)), view).replica for k in range(40)]

    assert picks(7) == picks(7)
    assert picks(7) != picks(8)
    assert set(picks(7)) == {0, 1, 2, 3}


def test_weighted_score_prefix_blocks_cap_and_lru_capacity() -> None:
    policy = WeightedScorePolicy(opts())
    rs = replicas(["a"])
    write(rs[0], metrics=metrics(num_gpu_blocks=4))  # autoTune: the LRU holds 4 blocks
    view = FakeView(rs)
    req = request(text("long", 6))
    choose(policy, req, view)
    hashes = req.block_hashes.tolist()
    assert len(policy.index.lrus["a"]) == 4
    assert policy.index.run_length(hashes, "a") == 4  # tail first: the leading blocks stay
    write(rs[0], metrics=metrics(num_gpu_blocks=4, block_size=32))  # 4 x 32 tokens = 8 router blocks
    assert policy.capacity_of(rs[0]) == 8
    write(rs[0], metrics=None)
    assert policy.capacity_of(rs[0]) == 31250
    # maxPrefixBlocksToMatch = 256: a 300-block prompt scores 256 matched of 256.
    big = WeightedScorePolicy(opts())
    long_req = request(text("huge", 300))
    view = FakeView(replicas(["a", "b"]))
    big.index.add(long_req.block_hashes.tolist(), "a", 10_000)
    assert len(big.index.lrus["a"]) == 300
    assert big.scores(long_req, view) == [2.0 + 2.0 + 3.0, 2.0 + 2.0]


# ---- preble-e2 -------------------------------------------------------------------------------


def _preble(window: dict[str, int], cached_b: int) -> tuple[PrebleE2Policy, FakeView]:
    policy = PrebleE2Policy(opts())
    names = ["A", "B", "C"]
    policy.on_membership(names)
    for name, load in window.items():
        policy.load.add(name, 0.0, load)
    return policy, FakeView(replicas(names), now=1.0, cached={"A": 0, "B": cached_b, "C": 0})


def test_preble_exploit_explore_boundary() -> None:
    req = request(text("p", 4), prompt_tokens=64)  # 4 blocks of 16 tokens
    # B caches 2 blocks = 32 tokens = the 32 missed: not longer, so explore: cost L + missed is
    # A 80+64, B 115+32, C 80+64: A (tie with C broken by index).
    policy, view = _preble({"A": 80, "B": 115, "C": 80}, cached_b=2)
    choice = choose(policy, req, view)
    assert (choice.replica, choice.branch) == (0, "load")
    assert policy.load.get("A") == 80 + 64
    # B caches 3 blocks = 48 tokens > 16 missed: exploit B (115 <= 1.5 * 80, no rebalancing).
    policy, view = _preble({"A": 80, "B": 115, "C": 80}, cached_b=3)
    choice = choose(policy, req, view)
    assert (choice.replica, choice.branch) == (1, "affinity")
    assert policy.load.get("B") == 115 + 16


def test_preble_rebalances_off_a_replica_over_1_5x_the_lightest() -> None:
    req = request(text("p", 4), prompt_tokens=64)
    policy, view = _preble({"A": 80, "B": 120, "C": 90}, cached_b=3)
    assert choose(policy, req, view).replica == 1  # 120 = 1.5 * 80: not over, stays on B
    policy, view = _preble({"A": 80, "B": 121, "C": 90}, cached_b=3)
    choice = choose(policy, req, view)
    assert (choice.replica, choice.branch) == (0, "load")  # 121 > 120: redirected to A
    assert policy.load.get("A") == 80 + 64  # A had nothing cached: 64 tokens of work


def test_preble_load_window_expires() -> None:
    policy, view = _preble({"A": 1000}, cached_b=0)
    view.now = 180.0
    choose(policy, request(b"tiny", prompt_tokens=0), view)
    assert policy.load.get("A") == 1000  # recorded at t=0, still inside [0, 180]
    view.now = 180.5
    choose(policy, request(b"tiny", prompt_tokens=0), view)
    assert policy.load.get("A") == 0


# ---- the contract, for all four --------------------------------------------------------------

POLICIES = [ChwblPolicy, CacheAwarePolicy, WeightedScorePolicy, PrebleE2Policy]
REGISTERED = {"chwbl": ChwblPolicy, "cache-aware": CacheAwarePolicy, "weighted-score": WeightedScorePolicy,
              "preble-e2": PrebleE2Policy}


def _workload(n: int, seed: int) -> list[RoutingRequest]:
    """Conversations: a few shared system prompts, turns that extend earlier turns."""
    rng = random.Random(seed)
    convs: list[bytes] = []
    out = []
    for k in range(n):
        if convs and rng.random() < 0.6:
            c = rng.randrange(len(convs))
            convs[c] += text(f"turn{k}", rng.randint(1, 3))
            data = convs[c]
        else:
            data = text(f"sys{rng.randrange(3)}", 4) + text(f"user{k}", rng.randint(1, 6))
            convs.append(data)
        out.append(request(data, f"r{k}"))
    return out


def _run(cls: type[Policy], names: list[str], seed: int = 0, n: int = 120) -> list[tuple[int, str]]:
    driver = Driver(cls(opts(seed=seed)), FakeView(replicas(names)))
    return [(c.replica, c.branch) for c in (driver.route(r) for r in _workload(n, seed))]


@pytest.mark.parametrize(("name", "cls"), sorted(REGISTERED.items()))
def test_registered_by_name(name: str, cls: type[Policy]) -> None:
    assert registry._registry[name] is cls
    assert cls.name == name and cls.migrates is False


@pytest.mark.parametrize("cls", POLICIES)
def test_valid_choices_and_deterministic_under_seed(cls: type[Policy]) -> None:
    first = _run(cls, NAMES4, seed=3)
    assert first == _run(cls, NAMES4, seed=3)
    assert all(0 <= i < 4 for i, _ in first)
    assert all(branch in ("affinity", "load", "fallback") for _, branch in first)
    assert len({i for i, _ in first}) > 1  # the workload is spread, not piled on one replica


@pytest.mark.parametrize("cls", POLICIES)
def test_one_replica(cls: type[Policy]) -> None:
    assert {i for i, _ in _run(cls, ["only"], n=30)} == {0}


def _state_names(policy: object) -> set[str]:
    """The replica names a policy keeps private state for."""
    if isinstance(policy, ChwblPolicy):
        assert policy.ring is not None
        return set(policy.ring.owners)
    if isinstance(policy, CacheAwarePolicy):
        return set(policy.tree.tenants)
    if isinstance(policy, WeightedScorePolicy):
        return set(policy.index.lrus)
    assert isinstance(policy, PrebleE2Policy)
    return set(policy.load.events)


@pytest.mark.parametrize("cls", POLICIES)
def test_membership_changes_drop_state_and_remap_indices(cls: type[Policy]) -> None:
    driver = Driver(cls(opts(seed=1)), FakeView(replicas(NAMES4)))
    reqs = _workload(200, 1)
    for r in reqs[:80]:
        driver.route(r)
    held = _state_names(driver.policy)
    assert held <= set(NAMES4) and held
    # The first replica with state leaves and replica-4 joins: later indices shift by one.
    leaving = min(held, key=NAMES4.index)
    names = [n for n in NAMES4 if n != leaving] + ["replica-4"]
    driver.set_members(names)
    assert leaving not in _state_names(driver.policy)
    for r in reqs[80:140]:
        choice = driver.route(r)
        assert 0 <= choice.replica < 4
    assert _state_names(driver.policy) <= set(names)
    # Down to two replicas, then back up: still valid.
    driver.set_members(["replica-3", "replica-4"])
    assert _state_names(driver.policy) <= {"replica-3", "replica-4"}
    for r in reqs[140:170]:
        assert driver.route(r).replica in (0, 1)
    driver.set_members(["replica-5", "replica-3", "replica-4"])
    for r in reqs[170:]:
        assert 0 <= driver.route(r).replica < 3


@pytest.mark.parametrize("cls", POLICIES)
def test_affinity_follows_the_replica_name_when_indices_shift(cls: type[Policy]) -> None:
    # Conversations settle on replicas; when replica-0 leaves, a conversation's next turn goes to
    # the same *name* at its new index.
    names = ["replica-0", "replica-1", "replica-2"]
    driver = Driver(cls(opts()), FakeView(replicas(names)), max_inflight=0)  # loads stay at 0
    convs = {tag: text(f"system-{tag}", 6) + text(tag, 2) for tag in (f"conv{k}" for k in range(6))}
    placed = {tag: names[driver.route(request(data, tag)).replica] for tag, data in convs.items()}
    moved = [tag for tag, name in placed.items() if name != "replica-0"]
    assert moved, placed
    driver.set_members(["replica-1", "replica-2"])
    for tag in moved:
        second = driver.route(request(convs[tag] + text(tag + "-2", 1), tag + "-2"), dt=0.0)
        assert driver.view.replicas[second.replica].name == placed[tag]
