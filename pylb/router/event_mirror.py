"""The events-fed cache mirror: what each replica's engine said it holds (issue 12 §3).

Design
------
`router.cache_state: events` replaces the router's guess of each replica's prefix cache (the
predicted LRU mirror, `pylb.native.CacheMirror` over router blocks) by the engine's own account,
keyed by engine-exact block keys (`pylb.router.engine_keys`: vLLM's block hashes as 64-bit keys):

  observed   one native `CacheMirror` over engine block keys, written only by KV events:
             BlockStored -> insert, BlockRemoved -> remove, AllBlocksCleared -> clear. Its
             capacity is not what evicts (the engine's BlockRemoved events do); it is a safety
             bound of `capacity_factor` x the replica's scraped num_gpu_blocks (a replica whose
             removals were lost cannot grow the mirror without bound), else `default_capacity`.
  recent     pylb's own dispatches of the last `grace_s` seconds: the engine stores a prompt's
             blocks only when it schedules it, and its event reaches pylb a few milliseconds to
             seconds later, so a burst of requests sharing a new prefix would otherwise all see
             a cold cache. Two generations of native mirrors, rotated every grace_s / 2, so a
             dispatch is remembered between grace_s / 2 and grace_s seconds, O(1) per rotation.

A BlockRemoved removes the blocks from recent as well: the engine evicted them, whatever pylb
sent (under memory pressure a prefix can be evicted within the grace period).

match(keys) = per replica, the longest leading run of `keys` in observed or in recent. Both sets
are closed under prefixes (a chained key names its whole prefix; the engine stores and pylb
records whole leading runs), so the union's leading match is the larger of the two matches.

A resync (a gap in the replica's event stream, a restart, a reconnect) clears the replica's
observed blocks; the events that follow rebuild them. Replica indices follow the router core's
(dense, `remove_replica(i)` shifts later ones down), like the predicted mirror.
"""

from __future__ import annotations

import numpy as np

from pylb import native

DEFAULT_GRACE_S = 5.0
"""How long pylb's own dispatches count as cached before the engine's events confirm them."""


class EventMirror:
    """Per replica, the engine blocks its KV events reported, plus pylb's recent dispatches.

    Args:
        grace_s: how long a dispatch counts (between grace_s/2 and grace_s; see module comment).
        default_capacity: the safety bound on a replica's observed blocks before its cache size
            is scraped.
        capacity_factor: the bound once it is scraped, as a multiple of num_gpu_blocks.
    """

    def __init__(self, grace_s: float = DEFAULT_GRACE_S, default_capacity: int = 1 << 22, capacity_factor: float = 2.0) -> None:
        if grace_s <= 0:
            raise ValueError(f"grace_s must be positive, got {grace_s}")
        self.grace_s = grace_s
        self.default_capacity = default_capacity
        self.capacity_factor = capacity_factor
        self.observed = native.CacheMirror(0, default_capacity)
        self._recent = [native.CacheMirror(0, default_capacity), native.CacheMirror(0, default_capacity)]
        self._rotated_at = -np.inf
        self.version = 0
        """Bumped on every change (the router memoises matches by it)."""

    @property
    def num_replicas(self) -> int:
        """Replicas tracked."""
        return self.observed.num_replicas

    # ---- membership ----------------------------------------------------------------------------

    def add_replica(self) -> int:
        """Append an empty replica; returns its index."""
        for m in self._recent:
            m.add_replica(self.default_capacity)
        self.version += 1
        return self.observed.add_replica(self.default_capacity)

    def remove_replica(self, i: int) -> None:
        """Forget replica i; later indices shift down by one."""
        self.observed.remove_replica(i)
        for m in self._recent:
            m.remove_replica(i)
        self.version += 1

    def set_engine_blocks(self, i: int, num_gpu_blocks: int) -> None:
        """Bound replica i's observed blocks by capacity_factor x its scraped KV cache size."""
        if num_gpu_blocks > 0:
            self.observed.resize(i, max(1, int(num_gpu_blocks * self.capacity_factor)))

    # ---- writes --------------------------------------------------------------------------------

    def stored(self, i: int, keys: np.ndarray) -> None:
        """BlockStored: the engine holds these blocks (a leading run: parent first)."""
        if len(keys):
            self.observed.insert(i, keys)
            self.version += 1

    def removed(self, i: int, keys: np.ndarray) -> int:
        """BlockRemoved: returns how many of them the mirror held. The engine's word wins over
        pylb's recent dispatches too (it evicted them, whatever pylb sent)."""
        n = self.observed.remove(i, keys) if len(keys) else 0
        for r in self._recent:
            r.remove(i, keys)
        self.version += 1
        return int(n)

    def cleared(self, i: int, recent: bool = True) -> None:
        """AllBlocksCleared (`recent` True: pylb's recent dispatches there are gone too), or a
        resync (`recent` False: they still stand until the new events arrive)."""
        self.observed.clear(i)
        if recent:
            for r in self._recent:
                r.clear(i)
        self.version += 1

    def record_dispatch(self, i: int, keys: np.ndarray, now: float) -> None:
        """pylb sent a prompt with these leading block keys to replica i at `now`."""
        self.advance(now)
        if len(keys):
            self._recent[0].insert(i, keys)
            self.version += 1

    def forget_dispatch(self, i: int, keys: np.ndarray) -> None:
        """pylb's dispatch of these keys to replica i did not happen there (the request was served
        elsewhere): drop them from i's recent dispatches (its observed blocks stay)."""
        if len(keys):
            for r in self._recent:
                r.remove(i, keys)
            self.version += 1

    def advance(self, now: float) -> None:
        """Rotate the recent-dispatch generations when grace_s / 2 has passed."""
        if now - self._rotated_at < self.grace_s / 2:
            return
        n = self.num_replicas
        fresh = native.CacheMirror(n, self.default_capacity)
        if now - self._rotated_at >= self.grace_s:  # both generations are stale
            self._recent = [fresh, native.CacheMirror(n, self.default_capacity)]
        else:
            self._recent = [fresh, self._recent[0]]
        self._rotated_at = now
        self.version += 1

    # ---- reads ---------------------------------------------------------------------------------

    def match(self, keys: np.ndarray) -> np.ndarray:
        """Per replica, the number of leading `keys` it holds (observed or recently dispatched)."""
        m = self.observed.match(keys)
        for r in self._recent:
            np.maximum(m, r.match(keys), out=m)
        return m

    def observed_match(self, keys: np.ndarray) -> np.ndarray:
        """Per replica, the leading `keys` its events reported (no recent dispatches)."""
        return self.observed.match(keys)

    def blocks(self, i: int) -> int:
        """Blocks replica i's events reported it holds (what the engine's cache has, by events)."""
        return int(self.observed.size(i))
