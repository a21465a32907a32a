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
its router blocks (`RoutingRequest.block_hashes`), and equal leading hashes mean equal leading
text, so `pylb.router.radix_tree.ApproxTree` is the same radix tree over block hashes (its
module comment has the details; tests/test_policies_cache_aware.py checks it against a
per-block reference). Sizes and `max_tree_size` are counted in blocks: `max_tree_size`
characters / `block_chars`.

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

import random
from collections.abc import Sequence
from dataclasses import dataclass

from pylb.fields import at_least, in_range, non_negative, one_of, setting
from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policy import Choice, Policy, RouterView
from pylb.router.radix_tree import ApproxTree, as_hashes
from pylb.router.registry import register

DEFAULT_CACHE_THRESHOLD = 0.3
DEFAULT_BALANCE_ABS_THRESHOLD = 64
DEFAULT_BALANCE_REL_THRESHOLD = 1.5
DEFAULT_EVICTION_INTERVAL_SECS = 60.0
DEFAULT_MAX_TREE_SIZE_CHARS = 2**26
LOW_MATCH_CHOICES = ("smallest-tree", "min-load")

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
        hashes = as_hashes(request.block_hashes)
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
