"""The cache-aware policy's radix tree against a straightforward reference.

`ReferenceTree` is the first implementation of SGLang's approximate tree in pylb: one map
block hash -> last access time per worker, plus a shared map block -> parent block, evicting
leaf blocks one by one from a heap. It is simple enough to check by reading, and slow (a dict
update per block of every request). `ApproxTree` is the radix tree the policy uses. The tests
drive both with the same random workloads and require the same routing decisions, and the same
held blocks with the same last access times per worker, after every step.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterable

import numpy as np
import pytest
from policy_fakes import FakeView, choose, replicas, request, text, write

from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policies.cache_aware import CacheAwarePolicy
from pylb.router.radix_tree import ApproxTree, _Node
from pylb.router.policy import Choice, RouterView

_ROOT = -1


class ReferenceTree:
    """Per worker, every block held -> its last access time (a prefix-closed set)."""

    def __init__(self) -> None:
        self.tenants: dict[ReplicaId, dict[int, float]] = {}
        self.parent: dict[int, int] = {}

    def add_tenant(self, name: ReplicaId) -> None:
        self.tenants.setdefault(name, {})

    def remove_tenant(self, name: ReplicaId) -> None:
        self.tenants.pop(name, None)

    def size(self, name: ReplicaId) -> int:
        return len(self.tenants[name])

    def insert(self, hashes: list[int], name: ReplicaId, now: float) -> None:
        if not hashes:
            self.add_tenant(name)
            return
        self.parent[hashes[0]] = _ROOT
        self.parent.update(zip(hashes[1:], hashes[:-1]))
        self.tenants.setdefault(name, {}).update(dict.fromkeys(hashes, now))

    def match_depth(self, hashes: list[int], name: ReplicaId) -> int:
        held = self.tenants.get(name, {})
        depth = 0
        while depth < len(hashes) and hashes[depth] in held:
            depth += 1
        return depth

    def prefix_match(self, hashes: list[int], now: float, rng: random.Random) -> tuple[int, ReplicaId | None]:
        depths = {name: self.match_depth(hashes, name) for name in self.tenants}
        best = max(depths.values(), default=0)
        if best == 0:
            return 0, None
        holders = sorted(name for name, d in depths.items() if d == best)
        name = holders[0] if len(holders) == 1 else rng.choice(holders)
        self.tenants[name].update(dict.fromkeys(hashes[:best], now))
        return best, name

    def evict(self, max_size: int) -> None:
        for held in self.tenants.values():
            if len(held) <= max_size:
                continue
            children = Counter(self.parent[h] for h in held)
            leaves = [(t, h) for h, t in held.items() if h not in children]
            heapq.heapify(leaves)
            while len(held) > max_size and leaves:
                _, h = heapq.heappop(leaves)
                del held[h]
                p = self.parent[h]
                if p != _ROOT:
                    children[p] -= 1
                    if children[p] == 0:
                        heapq.heappush(leaves, (held[p], p))

    def sync(self, names: Iterable[ReplicaId]) -> None:
        wanted = set(names)
        for name in [n for n in self.tenants if n not in wanted]:
            self.remove_tenant(name)
        for name in wanted:
            self.add_tenant(name)


class ReferencePolicy(CacheAwarePolicy):
    """The policy's decision rule written plainly over the reference tree, in one step: evict,
    match, insert, all in `choose` (the policy splits this into advance / choose / on_choice)."""

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.tree = ReferenceTree()  # type: ignore[assignment]

    def advance(self, now: float) -> None:
        pass  # done in choose

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        pass  # done in choose

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        names = [r.name for r in view.replicas]
        now = view.now
        CacheAwarePolicy.advance(self, now)
        hashes: list[int] = request.block_hashes.tolist()
        loads = [r.load for r in view.replicas]
        if self.is_imbalanced(loads):
            i = loads.index(min(loads))
            self.tree.insert(hashes, names[i], now)  # type: ignore[arg-type]
            return Choice(i, None, "load")
        depth, holder = self.tree.prefix_match(hashes, now, self._rng)  # type: ignore[arg-type]
        match_rate = depth / len(hashes) if hashes else 0.0
        if holder is not None and match_rate > self.cache_threshold:
            i, branch = names.index(holder), "affinity"
        elif self.low_match == "min-load":
            i, branch = loads.index(min(loads)), "fallback"
        else:
            sizes = [self.tree.size(name) for name in names]
            i, branch = sizes.index(min(sizes)), "fallback"
        self.tree.insert(hashes, names[i], now)  # type: ignore[arg-type]
        return Choice(i, None, branch)


def held_blocks(tree: ApproxTree) -> dict[ReplicaId, dict[int, float]]:
    """Per worker, block -> last access time, read off the radix tree."""
    out: dict[ReplicaId, dict[int, float]] = {name: {} for name in tree.tenants}
    stack: list[_Node] = [tree.root]
    while stack:
        node = stack.pop()
        assert node is tree.root or (len(node.key) > 0 and node.times), "empty node left in the tree"
        for first, child in node.children.items():
            assert int(child.key[0]) == first
            stack.append(child)
        for name, t in node.times.items():
            out[name].update(dict.fromkeys(node.key.tolist(), t))
    return out


def assert_same_state(fast: ApproxTree, ref: ReferenceTree) -> None:
    held = held_blocks(fast)
    assert held == ref.tenants
    assert {name: fast.size(name) for name in fast.tenants} == {name: len(h) for name, h in ref.tenants.items()}
    live = set().union(*ref.tenants.values()) if ref.tenants else set()
    assert fast.block_count() == len(live)


def conversations(n: int, rng: random.Random, systems: int = 3) -> list[RoutingRequest]:
    """Conversations over a few shared system prompts; a turn extends an earlier one, some are
    re-sent (same prompt), some are prefixes of earlier ones, a few are shorter than a block."""
    convs: list[bytes] = []
    out = []
    for k in range(n):
        roll = rng.random()
        if convs and roll < 0.5:
            c = rng.randrange(len(convs))
            convs[c] += text(f"turn{k}", rng.randint(1, 4))
            data = convs[c]
        elif convs and roll < 0.6:
            data = rng.choice(convs)
        elif convs and roll < 0.7:
            data = rng.choice(convs)
            data = data[: rng.randint(0, len(data) // 64) * 64]
        elif roll < 0.75:
            data = b"short"
        else:
            data = text(f"sys{rng.randrange(systems)}", rng.randint(1, 6)) + text(f"user{k}", rng.randint(1, 8))
            convs.append(data)
        out.append(request(data, f"r{k}"))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_tree_operations_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    fast, ref = ApproxTree(), ReferenceTree()
    names = ["a", "b", "c"]
    fast.sync(names)
    ref.sync(names)
    reqs = conversations(150, rng)
    now = 0.0
    for k, req in enumerate(reqs):
        now += rng.choice((0.0, 0.0, 1.0, 2.5))  # equal times are common: eviction breaks ties by hash
        hashes = req.block_hashes
        op = rng.random()
        if op < 0.5:
            name = rng.choice(names)
            fast.insert(hashes, name, now)
            ref.insert(hashes.tolist(), name, now)
        else:
            seed_k = rng.random()
            assert fast.prefix_match(hashes, now, random.Random(seed_k)) == ref.prefix_match(
                hashes.tolist(), now, random.Random(seed_k)
            )
        for name in names:
            assert fast.match_depth(hashes, name) == ref.match_depth(hashes.tolist(), name)
        if k % 10 == 9:
            size = rng.randint(0, 40)
            fast.evict(size)
            ref.evict(size)
        if k == 100:  # a worker leaves and another joins
            names = ["b", "c", "d"]
            fast.sync(names)
            ref.sync(names)
        assert_same_state(fast, ref)


def test_eviction_ties_go_block_by_block_in_hash_order() -> None:
    # Two paths inserted at the same time: the reference evicts their leaf blocks interleaved by
    # hash value, so the radix tree must cut both nodes at the right places.
    fast, ref = ApproxTree(), ReferenceTree()
    for tag in ("x", "y", "z"):
        hashes = request(text("root", 1) + text(tag, 12)).block_hashes
        fast.insert(hashes, "a", 1.0)
        ref.insert(hashes.tolist(), "a", 1.0)
    for size in (36, 30, 17, 9, 2, 1, 0):
        fast.evict(size)
        ref.evict(size)
        assert_same_state(fast, ref)
    assert fast.size("a") == 0 and fast.block_count() == 0


def _drive(policy: CacheAwarePolicy, reqs: list[RoutingRequest], seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    names = ["replica-0", "replica-1", "replica-2", "replica-3"]
    view = FakeView(replicas(names))
    policy.on_membership(names)
    out = []
    for k, req in enumerate(reqs):
        view.now += rng.choice((0.0, 0.2, 0.5, 3.0))
        for r in view.replicas:
            write(r, inflight_requests=rng.choice((0, 0, 1, 2, 4, 9)))
        if k == len(reqs) // 2:  # membership change: replica-1 leaves, replica-4 joins
            view.set_members(["replica-0", "replica-2", "replica-3", "replica-4"])
            policy.on_membership([r.name for r in view.replicas])
        choice = choose(policy, req, view)
        out.append((view.replicas[choice.replica].name, choice.branch))
    return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"max_tree_size": 30 * 64, "eviction_interval_secs": 2.0, "balance_abs_threshold": 4},
        {"max_tree_size": 12 * 64, "eviction_interval_secs": 1.0, "cache_threshold": 0.5, "low_match": "min-load"},
    ],
)
def test_policy_decisions_match_the_reference(seed: int, extra: dict[str, object]) -> None:
    reqs = conversations(300, random.Random(seed))
    options = RouterOptions(seed=seed, extra=dict(extra))
    fast, ref = CacheAwarePolicy(options), ReferencePolicy(options)
    assert _drive(fast, reqs, seed) == _drive(ref, reqs, seed)
    assert_same_state(fast.tree, ref.tree)  # type: ignore[arg-type]


def test_reference_workload_exercises_every_branch_and_eviction() -> None:
    reqs = conversations(300, random.Random(0))
    options = RouterOptions(seed=0, extra={"max_tree_size": 30 * 64, "eviction_interval_secs": 2.0, "balance_abs_threshold": 4})
    policy = ReferencePolicy(options)
    evicted = []
    evict = policy.tree.evict

    def counting(max_size: int) -> None:
        before = sum(len(h) for h in policy.tree.tenants.values())  # type: ignore[attr-defined]
        evict(max_size)
        evicted.append(before - sum(len(h) for h in policy.tree.tenants.values()))  # type: ignore[attr-defined]

    policy.tree.evict = counting  # type: ignore[method-assign]
    branches = Counter(branch for _, branch in _drive(policy, reqs, 0))
    assert set(branches) == {"affinity", "fallback", "load"}
    assert sum(evicted) > 100


def test_tree_accepts_lists_and_arrays() -> None:
    tree = ApproxTree()
    hashes = request(text("p", 5)).block_hashes
    tree.insert(hashes.tolist(), "a", 0.0)
    assert tree.match_depth(hashes, "a") == 5
    assert tree.match_depth(np.asarray(hashes[:3]), "a") == 3
    tree.insert([], "b", 0.0)
    assert tree.size("b") == 0 and tree.prefix_match([], 1.0, random.Random(0)) == (0, None)
