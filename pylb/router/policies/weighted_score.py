"""`weighted-score`: llm-d's default endpoint picker (Gateway API Inference Extension scorers).

Source
------
The default `EndpointPickerConfig` of the Gateway API Inference Extension (GIE) endpoint picker
that llm-d's inference scheduler builds on (`schedulingProfiles: default`: queue-scorer weight 2,
kv-cache-utilization-scorer weight 2, prefix-cache-scorer weight 3, max-score-picker), and the
plugins in GIE `pkg/epp/scheduling/framework/plugins/`: `scorer/queue.go`,
`scorer/kvcache_utilization.go`, `multi/prefix/plugin.go` + `indexer.go`,
`picker/max_score_picker.go` (GIE v1.x / llm-d inference scheduler v0.3-v0.4, 2025).

Algorithm (per request)
-----------------------
For every replica i (all replicas are candidates; the default profile has no filter):

    score_i = 2 * queue_i + 2 * kv_i + 3 * prefix_i

- queue scorer: with q_i the replica's waiting queue, `queue_i = (max_q - q_i) / (max_q - min_q)`
  over the candidates, and 1.0 for all when every q_i is equal.
- kv-cache-utilization scorer: `kv_i = 1 - kv_cache_usage_i` (`vllm:kv_cache_usage_perc`).
- prefix-cache scorer: `prefix_i = matched_i / total`, where the request's prompt is cut into
  blocks (at most `max_prefix_blocks` = 256 of them; `total` is their count, 0 -> score 0) and
  `matched_i` is the length of the leading run of those blocks in replica i's index. The index
  is the scheduler's own approximation of each replica's prefix cache: one LRU of block hashes
  per replica, capacity `lru_capacity_per_server` = 31250 blocks, or the replica's
  `num_gpu_blocks` when it reports one (`autoTune`, on by default). After a replica is picked,
  the request's blocks are added to its LRU (`PreRequest`), tail first, so the leading blocks
  are the most recently used and a replica's cached blocks of any prompt form a run from
  block 0.
- max-score picker: the highest score wins; exact ties are broken uniformly at random (GIE
  shuffles the candidates, then sorts stably by score).

Parameters (policy options: `RouterOptions.extra`, or
`pylb simulate --policy weighted-score:key=value`)
-------------------------------------------------------------------------------------------
- `queue_weight` (default 2), `kv_cache_weight` (default 2), `prefix_weight` (default 3):
  floats >= 0, the scorer weights of the default profile.
- `max_prefix_blocks` (int >= 1, default 256): GIE `maxPrefixBlocksToMatch`.
- `lru_capacity_per_server` (int >= 1, default 31250): GIE `lruCapacityPerServer`, in blocks.
- `auto_tune` (bool, default true): size each LRU from the replica's scraped KV capacity
  (`num_gpu_blocks` x `block_size` tokens; at 4 characters per token and 64-byte router blocks,
  one 16-token vLLM block is one router block).
Declared in `WeightedScorePolicy.Options`; a value out of range (e.g.
a negative weight) is a `PolicyOptionError` (a ValueError) naming the policy, option and value.

Deviations from llm-d / GIE, and why
------------------------------------
- Blocks: GIE hashes the prompt in blocks of `blockSizeTokens` (16, vLLM's block size) tokens,
  or 16 x 4 = 64 characters when it has no tokenizer. pylb's router blocks are 64 bytes, the same
  size; they are used as they are. (GIE's `autoTune` also takes the block size from the replica's
  metrics; pylb's blocks are fixed, so only the capacity is tuned.)
- Waiting queue: GIE reads vLLM's `num_requests_waiting` only, because it sends every request to
  the pod at once. pylb's router may hold requests in its own per-replica queue before dispatch;
  those would be in vLLM's waiting queue under GIE, so q_i = `ReplicaState.queued_requests` +
  the last scraped `num_requests_waiting` (0 before the first scrape). The scraped part is as
  stale as GIE's.
- Own index rather than the core's cache mirror: the policy keeps GIE's approximate LRU index of
  the requests it routed (updated at selection, in `choose`, since in GIE the picked request is
  sent at once, and these baselines never move a queued request), so it sees what llm-d would
  see, not pylb's better-informed mirror.
- Ties: broken with the policy's seeded RNG (reproducible runs) instead of an unseeded shuffle.
- Branch label: "affinity" when the picked replica has a prefix match, else "load".
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pylb.fields import at_least, non_negative, setting
from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policy import Choice, Policy, ReplicaState, RouterView, peek_choice
from pylb.router.registry import register

DEFAULT_QUEUE_WEIGHT = 2.0
DEFAULT_KV_CACHE_WEIGHT = 2.0
DEFAULT_PREFIX_WEIGHT = 3.0
DEFAULT_MAX_PREFIX_BLOCKS = 256
DEFAULT_LRU_CAPACITY_PER_SERVER = 31250
DEFAULT_BLOCK_SIZE_TOKENS = 16
"""GIE `DefaultBlockSizeTokens` (vLLM's default KV block size)."""

class PrefixIndex:
    """GIE's approximate prefix index: one LRU of block hashes per replica."""

    def __init__(self, default_capacity: int) -> None:
        self.default_capacity = default_capacity
        self.lrus: dict[ReplicaId, OrderedDict[int, None]] = {}
        self.capacity: dict[ReplicaId, int] = {}

    def add(self, hashes: list[int], name: ReplicaId, capacity: int) -> None:
        """Add a request's blocks to the replica's LRU, tail first (leading blocks most recent)."""
        lru = self.lrus.setdefault(name, OrderedDict())
        self.resize(name, capacity)
        hashes = hashes[:capacity]
        for h in reversed(hashes):
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > capacity:
            lru.popitem(last=False)

    def resize(self, name: ReplicaId, capacity: int) -> None:
        """Set the replica's LRU capacity, evicting its least recently used blocks if it shrank."""
        self.capacity[name] = capacity
        lru = self.lrus.get(name)
        while lru is not None and len(lru) > capacity:
            lru.popitem(last=False)

    def run_length(self, hashes: list[int], name: ReplicaId) -> int:
        """Leading blocks of `hashes` the replica's LRU holds (its cached blocks of a prompt form
        a run from block 0, so a binary search finds the run's end)."""
        lru = self.lrus.get(name)
        if not lru:
            return 0
        lo, hi = 0, len(hashes)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if hashes[mid - 1] in lru:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def drop_except(self, names: Sequence[ReplicaId]) -> None:
        """Forget the replicas not in `names` (GIE's `CleanUpInactivePods`)."""
        keep = set(names)
        for name in [n for n in self.lrus if n not in keep]:
            del self.lrus[name]
            self.capacity.pop(name, None)


def queue_scores(queues: Sequence[int]) -> list[float]:
    """GIE queue scorer: (max - q) / (max - min), 1.0 for everyone when all queues are equal."""
    hi, lo = max(queues), min(queues)
    if hi == lo:
        return [1.0] * len(queues)
    return [float(hi - q) / float(hi - lo) for q in queues]


def waiting_queue(replica: ReplicaState) -> int:
    """Requests waiting for the replica: in the router's queue plus vLLM's scraped waiting queue."""
    scraped = replica.metrics.num_requests_waiting if replica.metrics is not None else 0
    return replica.queued_requests + scraped


@register("weighted-score")
class WeightedScorePolicy(Policy):
    """llm-d default profile: 2 x queue + 2 x (1 - KV usage) + 3 x prefix match, max score wins."""

    name = "weighted-score"
    migrates = False
    @dataclass(frozen=True)
    class Options:
        """llm-d's default profile parameters (see the module docstring)."""

        queue_weight: float = setting(DEFAULT_QUEUE_WEIGHT, "weight of the queue scorer", check=non_negative)
        kv_cache_weight: float = setting(DEFAULT_KV_CACHE_WEIGHT, "weight of the KV-cache utilization scorer", check=non_negative)
        prefix_weight: float = setting(DEFAULT_PREFIX_WEIGHT, "weight of the prefix-cache scorer", check=non_negative)
        max_prefix_blocks: int = setting(DEFAULT_MAX_PREFIX_BLOCKS, "router blocks of a prompt the prefix scorer matches", check=at_least(1))
        lru_capacity_per_server: int = setting(DEFAULT_LRU_CAPACITY_PER_SERVER, "blocks a replica's LRU holds without autoTune", check=at_least(1))
        auto_tune: bool = setting(True, "size each LRU from the replica's scraped KV capacity")

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.queue_weight: float = self.option("queue_weight")
        self.kv_cache_weight: float = self.option("kv_cache_weight")
        self.prefix_weight: float = self.option("prefix_weight")
        self.max_prefix_blocks: int = self.option("max_prefix_blocks")
        self.lru_capacity: int = self.option("lru_capacity_per_server")
        self.auto_tune: bool = self.option("auto_tune")
        self.index = PrefixIndex(self.lru_capacity)
        self._rng = random.Random(options.seed)

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Drop the index of replicas that left (new ones start empty)."""
        self.index.drop_except(replicas)

    def capacity_of(self, replica: ReplicaState) -> int:
        """LRU capacity for a replica, in router blocks: its scraped KV capacity (autoTune,
        `num_gpu_blocks` x `block_size` tokens, at `RouterOptions.chars_per_token` bytes per token) or the
        default `lru_capacity_per_server`."""
        m = replica.metrics
        if self.auto_tune and m is not None and m.num_gpu_blocks > 0:
            tokens = m.num_gpu_blocks * (m.block_size if m.block_size > 0 else DEFAULT_BLOCK_SIZE_TOKENS)
            return max(1, int(tokens * self.options.chars_per_token) // max(1, self.options.block_chars))
        return self.lru_capacity

    def scores(self, request: RoutingRequest, view: RouterView) -> list[float]:
        """Weighted total score of every replica (index order of `view.replicas`)."""
        replicas = view.replicas
        hashes: list[int] = request.block_hashes[: self.max_prefix_blocks].tolist()
        total = len(hashes)
        queue = queue_scores([waiting_queue(r) for r in replicas])
        out = []
        for r, q in zip(replicas, queue):
            kv = 1.0 - r.kv_cache_usage
            prefix = self.index.run_length(hashes, r.name) / total if total else 0.0
            out.append(self.queue_weight * q + self.kv_cache_weight * kv + self.prefix_weight * prefix)
        return out

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Highest weighted score (seeded random among exact ties; `on_choice` indexes the request)."""
        replicas = view.replicas
        scores = self.scores(request, view)
        best = max(scores)
        tied = [i for i, s in enumerate(scores) if s == best]
        i = tied[0] if len(tied) == 1 else peek_choice(self._rng, tied)
        hashes: list[int] = request.block_hashes[: self.max_prefix_blocks].tolist()
        matched = self.index.run_length(hashes, replicas[i].name)
        return Choice(i, None, "affinity" if matched > 0 else "load", note=(len(tied), hashes))

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """Take the tie-break draw `choose` peeked, and index the request's blocks on its replica."""
        tied, hashes = choice.note
        if tied > 1:
            self._rng.choice(range(tied))  # advances the generator exactly as the draw in choose
        r = view.replicas[choice.replica]
        self.index.add(hashes, r.name, self.capacity_of(r))
