"""`preble-e2`: Preble's E2 global scheduler (exploit the cache, explore by load, rebalance).

Source
------
Srivatsa, He, Abhyankar, Li, Zhang, "Preble: Efficient Distributed Prompt Scheduling for LLM
Serving", ICLR 2025 (§4, Algorithm "E2": Exploitation + Exploration), and its code,
github.com/WukLab/preble, `multi_node/global_scheduler_with_time.py` (`runtime_selector`,
`SlidingWindowHistogram`, 3-minute window) and `multi_node/histogram_based_scheduling_v2.py`
(`HIGH_LOAD_THRESHOLD = 1.5`, the rebalancing rule).

Algorithm (per request)
-----------------------
Let cached_i be the request's prompt tokens replica i holds as a cached prefix, and
missed_i = prompt_tokens - cached_i. Let L_i be replica i's load: the prefill work (uncached
prompt tokens) of the requests assigned to it during the last `window_s` seconds.

1. Exploit: with c the replica with the longest cached prefix, if cached_c > missed_c (the cached
   part is longer than the new part), send the request to c. Several replicas with the same
   longest prefix: the one with the lowest L (then the lowest index) (branch "affinity").
2. Explore: otherwise send it to the replica with the lowest cost L_i + missed_i, i.e. its
   recent load plus the prefill this request would add there (ties: lower `ReplicaState.load`,
   then lower index) (branch "load").
3. Post-assignment rebalancing: when the replica picked above is the most loaded one (largest L)
   and its L exceeds `rebalance_ratio` (1.5) x the least loaded replica's L, the request goes to
   the least loaded replica instead (branch "load"). New requests thus shift from the heavy
   replica to the light one until their loads are within 1.5x.
4. The request's missed tokens on the replica it finally goes to are added to that replica's L
   at `view.now`; they leave L `window_s` later.

Parameters (policy options: `RouterOptions.extra`, or `pylb simulate --policy preble-e2:key=value`)
-------------------------------------------------------------------------------------------------
- `window_s` (float > 0, default 180): Preble's load window H (3 minutes in its code).
- `rebalance_ratio` (float >= 1, default 1.5): Preble's `HIGH_LOAD_THRESHOLD`.
Declared in `PrebleE2Policy.Options`; a value out of range is a
`PolicyOptionError` (a ValueError) naming the policy, option and value.

Deviations from Preble, and why
-------------------------------
- Cached prefix: Preble keeps its own global radix tree of token ids with the GPUs caching each
  node (and models their eviction). pylb uses the router core's cache mirror
  (`view.cached_blocks`), which plays the same role: routed prefixes per replica, LRU-evicted to
  the replica's KV capacity. cached_i = min(cached blocks x tokens per block, prompt_tokens).
- Load L: Preble's windowed cost is the prefill time of the missed tokens plus the decode time
  of the requests in the window, from fitted per-model equations and measured TPOT. pylb's
  router has no such model for arbitrary replicas, so L counts the prefill work in tokens (the
  `SlidingWindowHistogram` of Preble's `histogram_based_scheduling_v2.py` also counts tokens);
  decode work is not counted.
- Explore cost: Preble's M term (the cost of evicting cached prefixes another request will
  need) is left out: its `enable_eviction` is off by default in `global_scheduler_with_time.py`.
- Rebalancing: Preble moves whole prefix subtrees (their future requests) from the heavy GPU to
  the light one and can replicate a hot prefix on another GPU ("prefix autoscaling"). pylb
  redirects each new request that would land on the heaviest replica, which shifts the same
  future load without a prefix-to-GPU assignment table; prefix autoscaling is not implemented.
- Preble's local (per-GPU) scheduler — priority-based fairness and prefill/decode batching inside
  the engine — is outside a router's reach; pylb's replicas run stock vLLM scheduling.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pylb.fields import at_least, positive, setting
from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policy import Choice, Policy, RouterView
from pylb.router.registry import register

DEFAULT_WINDOW_S = 180.0
"""Preble's load window (3 minutes)."""
DEFAULT_REBALANCE_RATIO = 1.5
"""Preble's HIGH_LOAD_THRESHOLD: rebalance when the heaviest load exceeds 1.5x the lightest."""


class WindowLoad:
    """Per-replica sum of costs recorded in the last `window` seconds."""

    def __init__(self, window: float) -> None:
        self.window = window
        self.events: dict[ReplicaId, deque[tuple[float, int]]] = {}
        self.totals: dict[ReplicaId, int] = {}

    def add(self, name: ReplicaId, now: float, cost: int) -> None:
        """Record `cost` on replica `name` at time `now`."""
        self.events.setdefault(name, deque()).append((now, cost))
        self.totals[name] = self.totals.get(name, 0) + cost

    def move(self, source: ReplicaId, target: ReplicaId, at: float, cost: int, new_cost: int) -> None:
        """Move a cost recorded on `source` at time `at` to `target`, where it is `new_cost`: it
        leaves the window at the same time as if it had been recorded there (O(costs recorded
        since `at`), a few for a request moved while queued)."""
        for name, amount in ((source, -cost), (target, new_cost)):
            events = self.events.setdefault(name, deque())
            i = len(events)
            while i and events[i - 1][0] > at:
                i -= 1
            events.insert(i, (at, amount))
            self.totals[name] = self.totals.get(name, 0) + amount

    def expire(self, now: float) -> None:
        """Forget costs recorded before `now - window`."""
        cutoff = now - self.window
        for name, events in self.events.items():
            while events and events[0][0] < cutoff:
                self.totals[name] -= events.popleft()[1]

    def get(self, name: ReplicaId) -> int:
        """The replica's load in the window (0 for a replica with no record)."""
        return self.totals.get(name, 0)

    def keep(self, names: Sequence[ReplicaId]) -> None:
        """Drop the records of replicas not in `names`."""
        wanted = set(names)
        for name in [n for n in self.events if n not in wanted]:
            del self.events[name]
            del self.totals[name]


@register("preble-e2")
class PrebleE2Policy(Policy):
    """Preble E2: exploit the longest cached prefix when it outweighs the new part, else explore
    the least loaded replica; shift new requests off a replica loaded 1.5x the lightest."""

    name = "preble-e2"
    migrates = False
    @dataclass(frozen=True)
    class Options:
        """Preble E2's parameters (see the module docstring)."""

        window_s: float = setting(DEFAULT_WINDOW_S, "seconds of assignments the load window keeps", check=positive)
        rebalance_ratio: float = setting(DEFAULT_REBALANCE_RATIO, "rebalance when the heaviest load exceeds this x the lightest", check=at_least(1.0))

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.window_s: float = self.option("window_s")
        self.rebalance_ratio: float = self.option("rebalance_ratio")
        self.tokens_per_block = options.tokens_per_block  # router blocks -> tokens (RouterOptions.chars_per_token)
        self.load = WindowLoad(self.window_s)

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Drop the load history of replicas that left (new ones start at 0)."""
        self.load.keep(replicas)

    def missed_tokens(self, request: RoutingRequest, view: RouterView) -> list[int]:
        """Per replica, the request's prompt tokens not covered by its cached prefix there."""
        blocks = np.asarray(view.cached_blocks(request), dtype=np.int64)
        prompt = max(0, request.prompt_tokens)
        return [prompt - min(int(b * self.tokens_per_block), prompt) for b in blocks.tolist()]

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Exploit / explore, then the 1.5x rebalancing check (`on_choice` records the load)."""
        replicas = view.replicas
        names = [r.name for r in replicas]
        loads = [self.load.get(name) for name in names]
        missed = self.missed_tokens(request, view)
        prompt = max(0, request.prompt_tokens)
        best_missed = min(missed)
        if prompt - best_missed > best_missed:  # cached part longer than the new part: exploit
            target = min((i for i in range(len(names)) if missed[i] == best_missed), key=lambda i: (loads[i], i))
            branch = "affinity"
        else:
            target = min(range(len(names)), key=lambda i: (loads[i] + missed[i], replicas[i].load, i))
            branch = "load"
        heaviest, lightest = max(loads), min(loads)
        if loads[target] == heaviest and heaviest > self.rebalance_ratio * lightest:
            target, branch = loads.index(lightest), "load"
        return Choice(target, None, branch, note=missed[target])

    def advance(self, now: float) -> None:
        """Forget the loads recorded before the window."""
        self.load.expire(now)

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """Record the assignment's load: its missed tokens, on the chosen replica, now."""
        self.load.add(view.replicas[choice.replica].name, view.now, choice.note)
