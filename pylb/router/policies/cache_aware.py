"""`cache-aware`: SGLang router's cache-aware policy (approximate prefix tree + load override).

Source
------
SGLang router, `sgl-router/src/policies/cache_aware.rs` and `sgl-router/src/policies/tree.rs`
(sglang v0.4.x-v0.5.x, 2025; the same code later moved to `sgl-model-gateway/src/policies/`).
Defaults are the ones a deployment gets from the launcher, `sglang_router/router_args.py`
(`RouterArgs`): cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5,
eviction_interval_secs 60, max_tree_size 2**26. (The Rust `CacheAwareConfig::default()` says
0.5 / 32 / 1.1 / 30 / 10000; the launcher's values are what runs, and what DESIGN.md names.)

Algorithm (per request, in `choose`)
------------------------------------
1. Load of a worker = requests the router has sent it and not seen finish. The system is
   *imbalanced* when both `max_load - min_load > balance_abs_threshold` and
   `max_load > balance_rel_threshold * min_load`. Then: route to the least-loaded worker
   (first in replica order on ties), insert the request into that worker's tree, done
   (branch "load").
2. Otherwise, match the request against the approximate tree: the deepest node of the tree
   (the union of all workers' trees) on the request's path, and one tenant (worker) holding it.
   `match_rate = matched / request length`.
   - `match_rate > cache_threshold`: route to that worker (branch "affinity").
   - else: route to the worker with the smallest tree, i.e. the most cache room
     (`Tree::get_smallest_tenant`; first in replica order on ties) (branch "fallback").
   Insert the request into the chosen worker's tree.
3. Matching touches the matched worker's path (LRU time = now); inserting touches the chosen
   worker's whole path.
4. Every `eviction_interval_secs` (checked in `advance` against the core's `now`, as SGLang's background
   thread would fire), each worker whose tree holds more than `max_tree_size` characters loses
   its least recently used leaves until it fits (`Tree::evict_tenant_by_size`): leaves by last
   access time, a parent becomes a candidate once its last child of that worker is gone.

The tree, in pylb's terms
-------------------------
SGLang's tree is a character radix tree. pylb's router has no text, only chained XXH3 hashes of
64-byte blocks (`RoutingRequest.block_hashes`, uint64), and equal leading hashes mean equal
leading text, so `ApproxTree` is the same radix tree over block hashes: a node holds a run of
blocks (a numpy uint64 array, compared with the request's hashes in one vector operation), its
children by first block, and per worker holding it one last access time. A worker holds whole
nodes; a touch or an eviction that ends inside a node splits it there first, so every block
keeps its own last access time, exactly as in a per-block map (the first implementation, kept
as the reference in tests/test_policies_cache_aware.py, which checks that both make the same
decisions and hold the same blocks). Per request the cost is a walk over the few nodes of the
request's path, not a dict operation per block. A worker's holding is prefix-closed (insert
adds whole paths, eviction removes leaves); nodes no worker holds are dropped. Eviction takes a
worker's leaf blocks by (last access time, block hash), lowest first, as one heap of blocks
would. Sizes and `max_tree_size` are counted in blocks: `max_tree_size` characters /
`block_chars` (2**26 / 64 = 2**20 blocks).

Parameters (policy options, SGLang names: `RouterOptions.extra`, or
`pylb simulate --policy cache-aware:key=value`)
-------------------------------------------------------------------------
- `cache_threshold` (float in [0, 1], default 0.3)
- `balance_abs_threshold` (int >= 0, default 64)
- `balance_rel_threshold` (float >= 1, default 1.5)
- `eviction_interval_secs` (float >= 0, default 60; 0 disables eviction)
- `max_tree_size` (characters, int >= 0, default 2**26)
- `low_match` ("smallest-tree" | "min-load", default "smallest-tree"): where a low-match request
  goes. sgl-router routed it to the smallest tree; the later sgl-model-gateway routes it to the
  least-loaded worker. Both are offered; the default is the router DESIGN.md names.
Declared in `CacheAwarePolicy.Options`; a value out of range is a
`PolicyOptionError` (a ValueError) naming the policy, option and value.

Deviations from SGLang, and why
-------------------------------
- Granularity: 64-byte blocks instead of characters; the trailing partial block (< 64 bytes) of
  a prompt is not matched or stored, and `match_rate` = matched blocks / full blocks. A prompt
  shorter than one block has match rate 0 (it goes to the smallest tree), as an empty text does
  in SGLang.
- The tenant picked at the deepest node: SGLang takes the first key of a DashMap (an arbitrary,
  hash-dependent order); pylb picks uniformly with the policy's seeded RNG among the workers
  holding that node, so runs are reproducible.
- Load: `ReplicaState.load` (queued in the router + in flight), the analogue of SGLang's
  per-worker in-flight counter (pylb's router may queue before dispatch; SGLang sends at once).
- Timing of the tree update: SGLang inserts when it selects (selection and send are one step
  there). pylb's core may hold the request in its queue before dispatch, but these baselines
  never move a queued request, so the tree is updated at selection (`on_choice`), as in SGLang;
  `on_dispatch` does nothing. (Inserting at dispatch instead would let a burst of requests with
  one new prefix all see an empty tree and spread over the smallest trees.)
- Time is `view.now` (driver clock), not the wall clock, and eviction runs in `advance`, which
  the router core calls before each choice, instead of on a thread. The tree is read in
  `choose` and written in `on_choice` (the touch and the insert SGLang makes at selection).
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from pylb.fields import at_least, in_range, non_negative, one_of, setting
from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policy import Choice, Policy, RouterView, peek_choice
from pylb.router.registry import register

DEFAULT_CACHE_THRESHOLD = 0.3
DEFAULT_BALANCE_ABS_THRESHOLD = 64
DEFAULT_BALANCE_REL_THRESHOLD = 1.5
DEFAULT_EVICTION_INTERVAL_SECS = 60.0
DEFAULT_MAX_TREE_SIZE_CHARS = 2**26
LOW_MATCH_CHOICES = ("smallest-tree", "min-load")

_EMPTY = np.empty(0, dtype=np.uint64)


def _as_hashes(hashes: np.ndarray | Sequence[int]) -> np.ndarray:
    """Block hashes as a uint64 array (a request's `block_hashes` already is one)."""
    return np.asarray(hashes, dtype=np.uint64)


class _Node:
    """A radix-tree node: the run of blocks on the edge into it (`key`, never empty below the
    root), its children by their first block, and the workers holding it (all of its blocks)
    with their last access time."""

    __slots__ = ("key", "children", "times")

    def __init__(self, key: np.ndarray, times: dict[ReplicaId, float]) -> None:
        self.key = key
        self.children: dict[int, _Node] = {}
        self.times = times


def _common(key: np.ndarray, hashes: np.ndarray, pos: int) -> int:
    """Length of the common prefix of `key` and `hashes[pos:]`, given key[0] == hashes[pos]."""
    n = len(key)
    if n == 1:
        return 1
    seg = hashes[pos : pos + n]
    if len(seg) < n:
        key = key[: len(seg)]
    diff = key != seg
    return int(diff.argmax()) if diff.any() else len(seg)


class ApproxTree:
    """SGLang's multi-tenant approximate prefix tree: a radix tree over chained block hashes.

    Every node holds a run of blocks and, per worker (tenant) holding it, one last access time,
    so a worker's blocks in one node are always held and touched together: a touch or an
    eviction that ends inside a node splits it there first. A worker's held nodes are
    prefix-closed (insert adds whole paths, eviction removes leaves), and a node no worker holds
    is removed. `tenants[name]` is the worker's size in blocks.

    The tree is equivalent, block for block, to one map block -> last access time per worker
    (the first, per-block implementation, kept as the reference in
    tests/test_policies_cache_aware.py): the same match depths, sizes and evictions, including the
    order in which eviction takes equally old leaf blocks (lowest block hash first). It costs
    per request a walk over the nodes of the request's path instead of per-block dict updates.
    """

    def __init__(self) -> None:
        self.root = _Node(_EMPTY, {})
        self.tenants: dict[ReplicaId, int] = {}

    def add_tenant(self, name: ReplicaId) -> None:
        """Add an empty tree for a worker (SGLang: `insert("", url)`)."""
        self.tenants.setdefault(name, 0)

    def remove_tenant(self, name: ReplicaId) -> None:
        """Drop a worker and everything it holds (nodes held by no one else go)."""
        if self.tenants.pop(name, None) is None:
            return
        stack = [self.root]
        while stack:
            node = stack.pop()
            for first, child in list(node.children.items()):
                if child.times.pop(name, None) is not None:
                    if child.times:
                        stack.append(child)
                    else:
                        del node.children[first]

    def size(self, name: ReplicaId) -> int:
        """Blocks the worker's tree holds (SGLang's `tenant_char_count`, in blocks)."""
        return self.tenants[name]

    def block_count(self) -> int:
        """Distinct blocks in the tree (held by at least one worker)."""
        total, stack = 0, [self.root]
        while stack:
            node = stack.pop()
            total += len(node.key)
            stack.extend(node.children.values())
        return total

    def _walk(self, hashes: np.ndarray) -> list[tuple[_Node, _Node, int]]:
        """(parent, node, matched) for each node on the path of `hashes` from the root:
        `matched` leading blocks of the node are on the path (all but maybe in the last one)."""
        path = []
        parent, pos, n = self.root, 0, len(hashes)
        while pos < n:
            node = parent.children.get(int(hashes[pos]))
            if node is None:
                break
            m = _common(node.key, hashes, pos)
            path.append((parent, node, m))
            if m < len(node.key):
                break
            pos += m
            parent = node
        return path

    @staticmethod
    def _split(parent: _Node, node: _Node, m: int) -> _Node:
        """Cut `node` after its first `m` blocks; returns the new upper part (same holders)."""
        upper = _Node(node.key[:m], dict(node.times))
        node.key = node.key[m:]
        upper.children[int(node.key[0])] = node
        parent.children[int(upper.key[0])] = upper
        return upper

    def insert(self, hashes: np.ndarray | Sequence[int], name: ReplicaId, now: float) -> None:
        """Add the path to the worker's tree, touching every block on it."""
        hashes = _as_hashes(hashes)
        self.add_tenant(name)
        added, pos, last = 0, 0, self.root
        for parent, node, m in self._walk(hashes):
            if m < len(node.key):
                node = self._split(parent, node, m)
            if name not in node.times:
                added += m
            node.times[name] = now
            pos += m
            last = node
        if pos < len(hashes):
            last.children[int(hashes[pos])] = _Node(hashes[pos:].copy(), {name: now})
            added += len(hashes) - pos
        self.tenants[name] += added

    def match_depth(self, hashes: np.ndarray | Sequence[int], name: ReplicaId) -> int:
        """Leading blocks of `hashes` the worker holds."""
        depth = 0
        for _, node, m in self._walk(_as_hashes(hashes)):
            if name not in node.times:
                break
            depth += m
        return depth

    def prefix_match(
        self, hashes: np.ndarray | Sequence[int], now: float, rng: random.Random
    ) -> tuple[int, ReplicaId | None]:
        """Depth of the deepest node on the path and one worker holding it (None at depth 0).

        Touches the picked worker's matched path, as SGLang's `prefix_match` does (`match`, the
        draw, then `touch`)."""
        depth, name, tied = self.match(hashes, rng)
        if name is not None:
            if tied > 1:
                rng.choice(range(tied))  # the draw `match` peeked
            self.touch(hashes, name, now)
        return depth, name

    def match(self, hashes: np.ndarray | Sequence[int], rng: random.Random) -> tuple[int, ReplicaId | None, int]:
        """(depth, worker, tied): the deepest node's depth on the request's path, the worker
        holding it that `rng.choice` picks among the `tied` holders (in name order), without
        changing the tree or advancing `rng`; (0, None, 0) when no worker holds any of it."""
        path = self._walk(_as_hashes(hashes))
        depths: dict[ReplicaId, int] = {}
        pos = 0
        for _, node, m in path:
            pos += m
            for name in node.times:  # a worker holding a node holds the path above it
                depths[name] = pos
        if not depths:
            return 0, None, 0
        best = pos  # the last node on the path is held by someone
        holders = sorted(name for name, d in depths.items() if d == best)
        name = holders[0] if len(holders) == 1 else peek_choice(rng, holders)
        return best, name, len(holders)

    def touch(self, hashes: np.ndarray | Sequence[int], name: ReplicaId, now: float) -> None:
        """Set the worker's last access time to `now` along the request's matched path."""
        for parent, node, m in self._walk(_as_hashes(hashes)):
            if m < len(node.key):
                node = self._split(parent, node, m)
            node.times[name] = now

    def evict(self, max_size: int) -> None:
        """Shrink every worker's tree to `max_size` blocks, least recently used leaves first."""
        for name, size in list(self.tenants.items()):
            if size > max_size:
                self._evict(name, size - max_size)

    def _evict(self, name: ReplicaId, need: int) -> None:
        """Remove `need` blocks of the worker: its leaf blocks in order of (last access, hash),
        a block becoming a leaf once its held child is gone (SGLang `evict_tenant_by_size`)."""
        parents: dict[_Node, _Node] = {}
        kids: dict[_Node, int] = {}  # held children of the worker's inner nodes
        heap: list[tuple[float, int, int, _Node]] = []  # (time, tail block, tie-break, leaf)
        order = itertools.count()
        root = self.root
        stack = [root]
        while stack:
            node = stack.pop()
            held = 0
            for child in node.children.values():
                if name in child.times:
                    parents[child] = node
                    stack.append(child)
                    held += 1
            if node is not root:
                if held:
                    kids[node] = held
                else:
                    heap.append((node.times[name], int(node.key[-1]), next(order), node))
        heapq.heapify(heap)
        while need > 0 and heap:
            t, _, _, node = heapq.heappop(heap)
            length = len(node.key)
            k = length
            if heap and heap[0][0] == t:
                # An equally old leaf is next: blocks go one by one in hash order, so this node
                # loses its tail blocks below that leaf's block, then that leaf has its turn.
                above = node.key[::-1] >= np.uint64(heap[0][1])
                if above.any():
                    k = max(1, int(above.argmax()))
            k = min(k, need)
            need -= k
            self.tenants[name] -= k
            if k < length:
                if len(node.times) == 1:  # only this worker holds it, so it has no children
                    node.key = node.key[: length - k]
                else:
                    parent, lower = parents[node], node
                    node = self._split(parent, lower, length - k)
                    del lower.times[name]
                    parents[node] = parent
                heapq.heappush(heap, (t, int(node.key[-1]), next(order), node))
                continue
            del node.times[name]
            parent = parents[node]
            if not node.times:
                del parent.children[int(node.key[0])]
            if parent is not root:
                kids[parent] -= 1
                if kids[parent] == 0:
                    heapq.heappush(heap, (parent.times[name], int(parent.key[-1]), next(order), parent))

    def sync(self, names: Iterable[ReplicaId]) -> None:
        """Make the tenants exactly `names`: add empty trees, drop workers that left."""
        wanted = set(names)
        for name in [n for n in self.tenants if n not in wanted]:
            self.remove_tenant(name)
        for name in wanted:
            self.add_tenant(name)


@register("cache-aware")
class CacheAwarePolicy(Policy):
    """SGLang router cache_aware: longest approximate-tree match, smallest tree, or least load."""

    name = "cache-aware"
    migrates = False
    @dataclass(frozen=True)
    class Options:
        """SGLang's cache-aware parameters, under their SGLang names (see the module docstring)."""

        cache_threshold: float = setting(DEFAULT_CACHE_THRESHOLD, "match rate above which the matched worker is taken", check=in_range(0.0, 1.0))
        balance_abs_threshold: int = setting(DEFAULT_BALANCE_ABS_THRESHOLD, "imbalance test: max - min load above this", check=at_least(0))
        balance_rel_threshold: float = setting(DEFAULT_BALANCE_REL_THRESHOLD, "imbalance test: max load above this x min load", check=at_least(1.0))
        eviction_interval_secs: float = setting(DEFAULT_EVICTION_INTERVAL_SECS, "seconds between tree evictions (0: never)", check=non_negative)
        max_tree_size: int = setting(DEFAULT_MAX_TREE_SIZE_CHARS, "characters a worker's tree keeps at most", check=at_least(0))
        low_match: str = setting(LOW_MATCH_CHOICES[0], "where a low-match request goes: smallest-tree or min-load", check=one_of(*LOW_MATCH_CHOICES))

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.cache_threshold: float = self.option("cache_threshold")
        self.balance_abs_threshold: int = self.option("balance_abs_threshold")
        self.balance_rel_threshold: float = self.option("balance_rel_threshold")
        self.eviction_interval: float = self.option("eviction_interval_secs")
        self.max_tree_blocks = self.option("max_tree_size") // max(1, options.block_chars)
        self.low_match: str = self.option("low_match")
        self.tree = ApproxTree()
        self._rng = random.Random(options.seed)
        self._next_eviction: float | None = None

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Give new workers empty trees and drop the trees of workers that left."""
        self.tree.sync(replicas)

    def advance(self, now: float) -> None:
        """Every `eviction_interval_secs`, shrink each worker's tree to `max_tree_size` (SGLang's
        eviction thread, run on the driver's clock before a choice)."""
        if self.eviction_interval <= 0:
            return
        if self._next_eviction is None:
            self._next_eviction = now + self.eviction_interval
            return
        if now >= self._next_eviction:
            self.tree.evict(self.max_tree_blocks)
            while self._next_eviction <= now:
                self._next_eviction += self.eviction_interval

    def is_imbalanced(self, loads: Sequence[int]) -> bool:
        """SGLang's test: (max - min) > abs threshold AND max > rel threshold x min."""
        hi, lo = max(loads), min(loads)
        return hi - lo > self.balance_abs_threshold and float(hi) > float(lo) * self.balance_rel_threshold

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Least load when imbalanced; else longest match above the threshold, else most room.
        (`on_choice` touches the matched path and inserts the request into the chosen tree.)"""
        names = [r.name for r in view.replicas]
        hashes = _as_hashes(request.block_hashes)
        loads = [r.load for r in view.replicas]
        if self.is_imbalanced(loads):
            return Choice(loads.index(min(loads)), None, "load", note=(hashes, None, 0))
        depth, holder, tied = self.tree.match(hashes, self._rng)
        match_rate = depth / len(hashes) if len(hashes) else 0.0
        if holder is not None and match_rate > self.cache_threshold:
            i, branch = names.index(holder), "affinity"
        elif self.low_match == "min-load":
            i, branch = loads.index(min(loads)), "fallback"
        else:
            sizes = [self.tree.size(name) for name in names]
            i, branch = sizes.index(min(sizes)), "fallback"
        return Choice(i, None, branch, note=(hashes, holder, tied))

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """As SGLang at selection: the match touches its holder's path (taking the tie-break
        draw `choose` peeked), then the request goes into the chosen worker's tree."""
        hashes, holder, tied = choice.note
        now = view.now
        if holder is not None:
            if tied > 1:
                self._rng.choice(range(tied))
            self.tree.touch(hashes, holder, now)
        self.tree.insert(hashes, view.replicas[choice.replica].name, now)
