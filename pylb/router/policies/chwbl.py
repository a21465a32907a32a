"""`chwbl`: KubeAI's consistent hashing with bounded loads (its `PrefixHash` strategy).

Source
------
KubeAI (github.com/substratusai/kubeai), `internal/loadbalancer/balance_chwbl.go` (`chwblGetAddr`,
`chwblLoadOK`, `chwblAddEndpoint`), `internal/loadbalancer/group.go`, and the `PrefixHash`
defaults in `api/k8s/v1/model_types.go` (KubeAI v0.2x, 2025). Algorithm from Mirrokni,
Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads" (SODA 2018).

Algorithm
---------
- Ring: every replica gets `replication` virtual nodes at `hash(name + str(i))`,
  i = 0..replication-1; the ring is the sorted list of those positions, rebuilt whole on every
  membership change (Envoy style: lookups never mutate it).
- Key: hash of the request's prefix. The lookup starts at the first vnode at or after the key
  (wrapping to the first vnode) and walks clockwise.
- Bound: a replica may take the request when

      load + 1 <= (total_load + 1) / n * load_factor

  with `load` its requests in flight, `total_load` the sum over all n replicas (the `+1`s count
  the new request), and `load_factor` = meanLoadPercentage / 100. When `total_load == 0` every
  replica qualifies. The first replica on the walk that qualifies gets the request.
- When no replica qualifies (possible at low load: with 8 replicas and one request in flight,
  an idle replica needs 1 <= 2/8 * 1.25), the request goes to the key's ring owner, as KubeAI's
  `defaultEndpoint`.

Parameters (policy options: `RouterOptions.extra`, or `pylb simulate --policy chwbl:key=value`)
---------------------------------------------------------------------------------------------
- `replication` (int >= 1, default 256): vnodes per replica (KubeAI `replication`, default 256).
- `load_factor` (float >= 1.0, default 1.25): KubeAI `meanLoadPercentage` 125 / 100.
- `prefix_blocks` (int >= 1, default 2): router blocks hashed into the key. KubeAI hashes the
  first `prefixCharLength` = 100 characters; pylb's blocks are 64 bytes, so 2 blocks (128 bytes)
  is the nearest whole-block prefix.
Declared in `ChwblPolicy.Options`; a value out of range (e.g.
`load_factor=0.9`) is a `PolicyOptionError` (a ValueError) naming the policy, option and value.

Deviations from KubeAI, and why
-------------------------------
- The key: KubeAI hashes `adapter + first 100 characters of the first user message` (chat) or of
  the prompt (completions). pylb's router sees no text, only the chained block hashes of the
  canonical prompt text (system prompt and tools first), so the key is the chained hash of the
  first `prefix_blocks` blocks (which identifies exactly those 128 bytes), mixed with the model
  name, through XXH3. A prompt shorter than one block (64 bytes) hashes the model name alone.
  On workloads whose first 100 characters are a shared system prompt both choices collapse to
  few keys, which is KubeAI's real behaviour too.
- Hash function: XXH3-64 (`pylb.native.xxh3_64`) instead of KubeAI's XXH64 (cespare/xxhash);
  both are uniform 64-bit hashes, so ring placement statistics are the same; exact positions
  differ.
- Load: KubeAI counts the requests its proxy has in flight per endpoint. pylb's router also
  holds requests in per-replica queues before dispatch, so load = `ReplicaState.load` (queued in
  the router + in flight), which is what KubeAI would count if the router queue were inside
  the replica.
- The walk visits each distinct replica once (in clockwise order of first appearance) instead of
  every vnode; it picks the same replica as KubeAI's vnode walk and stops after N replicas.
- Branch label: "affinity" when the ring owner takes it, "load" when the bound moved it further
  clockwise, "fallback" when no replica qualified and the owner takes it anyway.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from pylb.fields import at_least, setting
from pylb.native import xxh3_64
from pylb.router.interface import ReplicaId, RouterOptions, RoutingRequest
from pylb.router.policy import Choice, Policy, RouterView
from pylb.router.registry import register

DEFAULT_REPLICATION = 256
"""KubeAI `PrefixHash.replication` default (vnodes per endpoint)."""
DEFAULT_LOAD_FACTOR = 1.25
"""KubeAI `PrefixHash.meanLoadPercentage` default 125, as a factor."""
DEFAULT_PREFIX_BLOCKS = 2
"""Router blocks in the key: 2 x 64 bytes, the nearest to KubeAI's `prefixCharLength` = 100."""


def load_ok(load: int, total_load: int, n: int, load_factor: float) -> bool:
    """KubeAI's `chwblLoadOK`: may a replica with `load` in flight take one more request?

    `total_load` is the sum over all `n` replicas (before the new request). Computed in double
    precision exactly as KubeAI does: `load + 1 <= (total_load + 1) / n * load_factor`.
    """
    if total_load == 0:
        return True
    return float(load) + 1.0 <= float(total_load + 1) / float(n) * load_factor


class ChwblRing:
    """The consistent-hash ring: sorted vnode positions and the replica name at each.

    Built once per membership; `walk(key)` yields the replicas clockwise from the key's
    position, each once, starting with the key's owner.
    """

    def __init__(self, replicas: Sequence[ReplicaId], replication: int) -> None:
        points: dict[int, ReplicaId] = {}
        for name in replicas:
            for i in range(replication):
                # KubeAI: fmt.Sprintf("%s%d", name, replica). A position two names share (never
                # seen with 64-bit hashes) goes to the later one, as KubeAI's map assignment does.
                points[xxh3_64(f"{name}{i}".encode())] = name
        self.replicas: frozenset[ReplicaId] = frozenset(replicas)
        self.positions: list[int] = sorted(points)
        self.owners: list[ReplicaId] = [points[p] for p in self.positions]

    def __len__(self) -> int:
        return len(self.positions)

    def start(self, key: int) -> int:
        """Index of the first vnode at or after `key`, wrapping to 0 (KubeAI `chwblSearch`)."""
        i = bisect.bisect_left(self.positions, key)
        return 0 if i >= len(self.positions) else i

    def walk(self, key: int) -> list[ReplicaId]:
        """Distinct replicas in clockwise order from the key's position (owner first)."""
        n_vnodes = len(self.positions)
        n_replicas = len(self.replicas)
        seen: dict[ReplicaId, None] = {}
        i = self.start(key)
        for _ in range(n_vnodes):
            seen.setdefault(self.owners[i], None)
            if len(seen) == n_replicas:
                break
            i += 1
            if i == n_vnodes:
                i = 0
        return list(seen)


def prefix_key(request: RoutingRequest, prefix_blocks: int) -> int:
    """The ring key: XXH3 of the model name and the chained hash of the first `prefix_blocks`
    blocks (fewer when the prompt is shorter; the model name alone below one block)."""
    data = request.model.encode()
    k = min(prefix_blocks, len(request.block_hashes))
    if k > 0:
        data += int(request.block_hashes[k - 1]).to_bytes(8, "little")
    return xxh3_64(data)


@register("chwbl")
class ChwblPolicy(Policy):
    """KubeAI PrefixHash: consistent hashing with bounded loads on the prompt's prefix."""

    name = "chwbl"
    migrates = False
    @dataclass(frozen=True)
    class Options:
        """KubeAI PrefixHash's parameters (see the module docstring)."""

        replication: int = setting(DEFAULT_REPLICATION, "vnodes per replica (KubeAI replication)", check=at_least(1))
        load_factor: float = setting(DEFAULT_LOAD_FACTOR, "bound factor (KubeAI meanLoadPercentage / 100)", check=at_least(1.0))
        prefix_blocks: int = setting(DEFAULT_PREFIX_BLOCKS, "router blocks hashed into the key", check=at_least(1))

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.replication: int = self.option("replication")
        self.load_factor: float = self.option("load_factor")
        self.prefix_blocks: int = self.option("prefix_blocks")
        self._ring: ChwblRing | None = None

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Rebuild the ring for the new replica list (the old one is dropped whole)."""
        self._ring = ChwblRing(list(replicas), self.replication) if replicas else None

    @property
    def ring(self) -> ChwblRing | None:
        """The current ring (None before the first membership)."""
        return self._ring

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Walk clockwise from the prefix key to the first replica within the load bound."""
        names = [r.name for r in view.replicas]
        ring = self._ring
        assert ring is not None, "on_membership must come before choose"
        index = {name: i for i, name in enumerate(names)}
        loads = [r.load for r in view.replicas]
        total = sum(loads)
        n = len(loads)
        order = ring.walk(prefix_key(request, self.prefix_blocks))
        for step, name in enumerate(order):
            i = index[name]
            if load_ok(loads[i], total, n, self.load_factor):
                return Choice(i, None, "affinity" if step == 0 else "load")
        return Choice(index[order[0]], None, "fallback")
