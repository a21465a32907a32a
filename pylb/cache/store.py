"""The semantic cache's entries: exact and similarity lookups, TTL and LRU bounds per model.

Design
------
Entries live in partitions (`pylb.cache.keys`: tenant + the whole request with the query masked).
Each partition keeps its entries' query embeddings as the rows of one float32 matrix, grown by
doubling; a removed entry's row is filled with the partition's last row, so rows [0, n) are always
the live entries and a lookup is one exact `pylb.native.topk_similarity` call over them (no
approximate index: rows are stored unit-length, so the lookup skips key norms; at cache sizes -- thousands to a million rows -- exact search is a few ms on a
CPU core and far less on a GPU, see bench/bench_cache.py). With `device` "cuda" (or "auto" on a
pylb built with CUDA, with a device and CuPy present) each partition also keeps a device copy of
its matrix, refreshed on the first lookup after a change, so keys stay on the device.

Entries are also found by exact key (a dict), and are bounded per model: `ttl_s` after they were
stored they are dropped (entries are stored in time order, so a sweep from the oldest end finds
the expired ones), and past `max_entries` or `max_bytes` (answer bytes) the least recently used
go first (an OrderedDict per model, touched by every hit).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pylb import native


def sse_payloads(body: bytes) -> Iterator[bytes]:
    """The `data:` payloads of a whole SSE body (a stored or re-run stream), in order, the final
    `[DONE]` left out; each is one event's JSON text, not parsed."""
    for line in body.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data != b"[DONE]":
                yield data


@dataclass(slots=True, eq=False)
class Answer:
    """A stored answer: the replica's body as received (a JSON body, or the SSE stream's bytes)
    and its content type."""

    body: bytes
    content_type: str
    stream: bool


@dataclass(slots=True, eq=False)
class Entry:
    """One cached answer and what it answers."""

    id: str
    partition: bytes
    exact_key: bytes
    query: str
    model: str
    tenant: bytes
    answer: Answer
    replica: str | None
    created: float
    expires: float
    hits: int = 0
    row: int = -1  # its row in the partition's key matrix; -1 when it has no vector
    removed: bool = False
    labels: Any = None  # `pylb.cache.verified.Labels` once a label was recorded (cache.threshold_policy verified, or verification)

    @property
    def size(self) -> int:
        """Bytes the entry accounts for (its answer and query)."""
        return len(self.answer.body) + len(self.query)


@dataclass(slots=True)
class _Partition:
    keys: np.ndarray | None = None  # [capacity, D]
    entries: list[Entry] = field(default_factory=list)  # row i -> its entry
    device_keys: Any = None  # CuPy copy of keys[:n], None when stale


@dataclass(slots=True)
class _ModelEntries:
    lru: OrderedDict[bytes, Entry] = field(default_factory=OrderedDict)  # by exact key, oldest use first
    by_age: deque[Entry] = field(default_factory=deque)  # stored order (expiry order: one TTL for all)
    bytes: int = 0


def cuda_usable() -> bool:
    """Whether similarity can run on a CUDA device here (built with CUDA, a device, CuPy)."""
    if not (native.built_with_cuda() and native.cuda_available()):
        return False
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


class CacheStore:
    """Entries by exact key and by partition (see the module comment). Not thread-safe: the proxy
    calls it from its event loop only."""

    def __init__(self, ttl_s: float, max_entries: int, max_bytes: int, device: str = "auto") -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        if device == "cuda" and not cuda_usable():
            raise RuntimeError("cache.device is cuda, but pylb has no CUDA device here (built without CUDA, no GPU, or no CuPy)")
        self.cuda = device == "cuda" or (device == "auto" and cuda_usable())
        self._exact: dict[bytes, Entry] = {}
        self._ids: dict[str, Entry] = {}
        self._partitions: dict[bytes, _Partition] = {}
        self._models: dict[str, _ModelEntries] = {}

    # ---- reads ----------------------------------------------------------------------------------

    def get_exact(self, exact_key: bytes, now: float) -> Entry | None:
        """The live entry stored under `exact_key` (touched as used), None when there is none."""
        e = self._exact.get(exact_key)
        if e is None:
            return None
        if e.expires <= now:
            self.remove(e)
            return None
        self.touch(e)
        return e

    def by_id(self, entry_id: str) -> Entry | None:
        """The entry with id `entry_id`, None when it is gone."""
        return self._ids.get(entry_id)

    def touch(self, e: Entry) -> None:
        """Mark `e` as just used (LRU); an entry not (or not yet) in the store only counts the hit."""
        e.hits += 1
        m = self._models.get(e.model)
        if m is not None and m.lru.get(e.exact_key) is e:
            m.lru.move_to_end(e.exact_key)

    def partition_size(self, partition: bytes) -> int:
        """Entries with a vector in `partition`."""
        p = self._partitions.get(partition)
        return len(p.entries) if p is not None else 0

    def searchable(self) -> int:
        """Entries with a vector, over all partitions."""
        return sum(len(p.entries) for p in self._partitions.values())

    def search(self, partition: bytes, queries: np.ndarray, k: int, now: float) -> list[list[tuple[Entry, float]]]:
        """The `k` nearest live entries of `partition` for each row of `queries` (float32 [B, D],
        L2-normalised), by cosine similarity descending: one `topk_similarity` call."""
        p = self._partitions.get(partition)
        n = len(p.entries) if p is not None else 0
        if p is None or n == 0 or p.keys is None:
            return [[] for _ in range(len(queries))]
        if self.cuda:
            import cupy as cp

            if p.device_keys is None:
                p.device_keys = cp.asarray(p.keys[:n])
            idx_d, sim_d = native.topk_similarity(cp.asarray(queries), p.device_keys, k)
            idx, sim = cp.asnumpy(idx_d), cp.asnumpy(sim_d)
        else:
            idx, sim = native.topk_similarity(queries, p.keys[:n], k, keys_unit=True)
        out = []
        for row_i, row_s in zip(idx.tolist(), sim.tolist()):
            hits = [(p.entries[i], s) for i, s in zip(row_i, row_s) if p.entries[i].expires > now]
            out.append(hits)
        return out

    # ---- writes ---------------------------------------------------------------------------------

    def put(self, e: Entry, vector: np.ndarray | None) -> None:
        """Store `e` (replacing an entry with the same exact key) with its query embedding `vector`
        (float32 [D], or None: found by exact key only), then enforce the model's bounds."""
        old = self._exact.get(e.exact_key)
        if old is not None:
            self.remove(old)
        m = self._models.setdefault(e.model, _ModelEntries())
        self._exact[e.exact_key] = e
        self._ids[e.id] = e
        m.lru[e.exact_key] = e
        m.by_age.append(e)
        m.bytes += e.size
        if vector is not None:
            self._add_row(e, vector)
        self._evict(e.model, e.created)

    def set_vector(self, e: Entry, vector: np.ndarray) -> None:
        """Give `e`, stored without a vector, its query embedding (a no-op when `e` was dropped
        meanwhile or already has one): from then on similarity lookups find it too."""
        if not e.removed and e.row < 0 and self._exact.get(e.exact_key) is e:
            self._add_row(e, vector)

    def _add_row(self, e: Entry, vector: np.ndarray) -> None:
        p = self._partitions.setdefault(e.partition, _Partition())
        n = len(p.entries)
        if p.keys is None or p.keys.shape[1] != vector.shape[0]:
            if p.keys is not None:  # an embedder of another size (openai learns its size): start over
                for old_e in list(p.entries):
                    self.remove(old_e)
                p = self._partitions.setdefault(e.partition, _Partition())
                n = 0
            p.keys = np.zeros((16, vector.shape[0]), np.float32)
        elif n == p.keys.shape[0]:
            grown = np.zeros((2 * n, p.keys.shape[1]), np.float32)
            grown[:n] = p.keys
            p.keys = grown
        norm = float(np.linalg.norm(vector))
        p.keys[n] = vector / norm if norm > 0 else vector  # unit rows: lookups skip the key norms
        p.entries.append(e)
        e.row = n
        p.device_keys = None

    def remove(self, e: Entry) -> None:
        """Drop `e` (no-op when already dropped)."""
        if e.removed:
            return
        e.removed = True
        self._exact.pop(e.exact_key, None)
        self._ids.pop(e.id, None)
        m = self._models[e.model]
        m.lru.pop(e.exact_key, None)
        m.bytes -= e.size
        if e.row >= 0:
            p = self._partitions[e.partition]
            last = len(p.entries) - 1
            moved = p.entries[last]
            assert p.keys is not None
            if e.row != last:
                p.keys[e.row] = p.keys[last]
                p.entries[e.row] = moved
                moved.row = e.row
            p.entries.pop()
            p.device_keys = None
            e.row = -1
            if not p.entries:
                del self._partitions[e.partition]

    def expire(self, now: float) -> int:
        """Drop every entry whose TTL has passed; returns how many."""
        dropped = 0
        for model in list(self._models):
            dropped += self._expire_model(model, now)
        return dropped

    def _expire_model(self, model: str, now: float) -> int:
        m = self._models[model]
        dropped = 0
        while m.by_age and (m.by_age[0].removed or m.by_age[0].expires <= now):
            e = m.by_age.popleft()
            if not e.removed:
                self.remove(e)
                dropped += 1
        return dropped

    def _evict(self, model: str, now: float) -> None:
        self._expire_model(model, now)
        m = self._models[model]
        while m.lru and (len(m.lru) > self.max_entries or m.bytes > self.max_bytes):
            self.remove(next(iter(m.lru.values())))  # the least recently used

    # ---- state for /metrics ----------------------------------------------------------------------

    def stats(self) -> dict[str, tuple[int, int]]:
        """Model -> (entries, answer bytes)."""
        return {model: (len(m.lru), m.bytes) for model, m in self._models.items()}

    def __len__(self) -> int:
        return len(self._exact)
