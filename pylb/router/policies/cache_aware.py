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
4. Every `eviction_interval_secs` (checked in `choose` against `view.now`, as SGLang's background
   thread would fire), each worker whose tree holds more than `max_tree_size` characters loses
   its least recently used leaves until it fits (`Tree::evict_tenant_by_size`): leaves by last
   access time, a parent becomes a candidate once its last child of that worker is gone.

The tree, in pylb's terms
-------------------------
SGLang's tree is a character radix tree. pylb's router has no text, only chained XXH3 hashes of
64-byte blocks (`RoutingRequest.block_hashes`), and equal leading hashes mean equal leading text,
so a block hash names a tree node (its whole path from the root) and each worker's tree is a map
block hash -> last access time; a shared map block hash -> parent hash gives the tree edges. A
worker's map is prefix-closed (insert adds whole paths, eviction removes leaves), so a worker's
match depth on a path is found by binary search. Sizes and `max_tree_size` are counted in
blocks: `max_tree_size` characters / `block_chars` (2**26 / 64 = 2**20 blocks).

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
Declared in `CacheAwarePolicy.option_defaults` / `option_limits`; a value out of range is a
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
  never move a queued request, so the tree is updated in `choose`, at selection, as in SGLang;
  `on_dispatch` does nothing. (Inserting at dispatch instead would let a burst of requests with
  one new prefix all see an empty tree and spread over the smallest trees.)
- Time is `view.now` (driver clock), not the wall clock, and eviction runs inside `choose`
  instead of on a thread.
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterable, Sequence

from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policy import Choice, OptionLimits, Policy, RouterView
from pylb.router.registry import register

DEFAULT_CACHE_THRESHOLD = 0.3
DEFAULT_BALANCE_ABS_THRESHOLD = 64
DEFAULT_BALANCE_REL_THRESHOLD = 1.5
DEFAULT_EVICTION_INTERVAL_SECS = 60.0
DEFAULT_MAX_TREE_SIZE_CHARS = 2**26
LOW_MATCH_CHOICES = ("smallest-tree", "min-load")

_ROOT = -1
"""Parent of a first block (block hashes are unsigned, so -1 is never a block)."""


class ApproxTree:
    """SGLang's multi-tenant approximate prefix tree, keyed by chained block hashes.

    `tenants[name]` maps every block the tenant (worker) holds to its last access time; the
    set is prefix-closed. `parent` maps a block to its parent block (`_ROOT` for a first block).
    """

    def __init__(self) -> None:
        self.tenants: dict[ReplicaId, dict[int, float]] = {}
        self.parent: dict[int, int] = {}

    def add_tenant(self, name: ReplicaId) -> None:
        """Add an empty tree for a worker (SGLang: `insert("", url)`)."""
        self.tenants.setdefault(name, {})

    def remove_tenant(self, name: ReplicaId) -> None:
        """Drop a worker and everything it holds."""
        self.tenants.pop(name, None)

    def size(self, name: ReplicaId) -> int:
        """Blocks the worker's tree holds (SGLang's `tenant_char_count`, in blocks)."""
        return len(self.tenants[name])

    def insert(self, hashes: list[int], name: ReplicaId, now: float) -> None:
        """Add the path to the worker's tree, touching every block on it."""
        if not hashes:
            self.add_tenant(name)
            return
        self.parent[hashes[0]] = _ROOT
        self.parent.update(zip(hashes[1:], hashes[:-1]))
        self.tenants.setdefault(name, {}).update(dict.fromkeys(hashes, now))

    def match_depth(self, hashes: list[int], name: ReplicaId) -> int:
        """Leading blocks of `hashes` the worker holds (binary search: its set is prefix-closed)."""
        held = self.tenants.get(name)
        if not held:
            return 0
        lo, hi = 0, len(hashes)  # invariant: hashes[:lo] held, hashes[hi:] not held
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in held:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def prefix_match(self, hashes: list[int], now: float, rng: random.Random) -> tuple[int, ReplicaId | None]:
        """Depth of the deepest node on the path and one worker holding it (None at depth 0).

        Touches the picked worker's matched path, as SGLang's `prefix_match` does.
        """
        depths = {name: self.match_depth(hashes, name) for name in self.tenants}
        best = max(depths.values(), default=0)
        if best == 0:
            return 0, None
        holders = sorted(name for name, d in depths.items() if d == best)
        name = holders[0] if len(holders) == 1 else rng.choice(holders)
        self.tenants[name].update(dict.fromkeys(hashes[:best], now))
        return best, name

    def evict(self, max_size: int) -> None:
        """Shrink every worker's tree to `max_size` blocks, least recently used leaves first."""
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
        self.prune()

    def prune(self) -> None:
        """Forget tree edges no worker holds any more."""
        live: set[int] = set()
        for held in self.tenants.values():
            live.update(held)
        if len(live) < len(self.parent):
            self.parent = {h: p for h, p in self.parent.items() if h in live}

    def sync(self, names: Iterable[ReplicaId]) -> None:
        """Make the tenants exactly `names`: add empty trees, drop workers that left."""
        wanted = set(names)
        for name in [n for n in self.tenants if n not in wanted]:
            self.remove_tenant(name)
        for name in wanted:
            self.add_tenant(name)
        self.prune()


@register("cache-aware")
class CacheAwarePolicy(Policy):
    """SGLang router cache_aware: longest approximate-tree match, smallest tree, or least load."""

    name = "cache-aware"
    migrates = False
    option_defaults = {
        "cache_threshold": DEFAULT_CACHE_THRESHOLD,
        "balance_abs_threshold": DEFAULT_BALANCE_ABS_THRESHOLD,
        "balance_rel_threshold": DEFAULT_BALANCE_REL_THRESHOLD,
        "eviction_interval_secs": DEFAULT_EVICTION_INTERVAL_SECS,
        "max_tree_size": DEFAULT_MAX_TREE_SIZE_CHARS,
        "low_match": LOW_MATCH_CHOICES[0],
    }
    option_limits = {
        "cache_threshold": OptionLimits(min=0.0, max=1.0),
        "balance_abs_threshold": OptionLimits(min=0),
        "balance_rel_threshold": OptionLimits(min=1.0),
        "eviction_interval_secs": OptionLimits(min=0.0),
        "max_tree_size": OptionLimits(min=0),
        "low_match": OptionLimits(choices=LOW_MATCH_CHOICES),
    }

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
        self._members: frozenset[ReplicaId] = frozenset()
        self._next_eviction: float | None = None

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Give new workers empty trees and drop the trees of workers that left."""
        self._members = frozenset(replicas)
        self.tree.sync(self._members)

    def _maybe_evict(self, now: float) -> None:
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
        """Least load when imbalanced; else longest match above the threshold, else most room."""
        names = [r.name for r in view.replicas]
        if self._members != frozenset(names):
            self.on_membership(names)
        now = view.now
        self._maybe_evict(now)
        hashes: list[int] = request.block_hashes.tolist()
        loads = [r.load for r in view.replicas]
        if self.is_imbalanced(loads):
            i = loads.index(min(loads))
            self.tree.insert(hashes, names[i], now)
            return Choice(i, None, "load")
        depth, holder = self.tree.prefix_match(hashes, now, self._rng)
        match_rate = depth / len(hashes) if hashes else 0.0
        if holder is not None and match_rate > self.cache_threshold:
            i, branch = names.index(holder), "affinity"
        elif self.low_match == "min-load":
            i, branch = loads.index(min(loads)), "fallback"
        else:
            sizes = [self.tree.size(name) for name in names]
            i, branch = sizes.index(min(sizes)), "fallback"
        self.tree.insert(hashes, names[i], now)
        return Choice(i, None, branch)
