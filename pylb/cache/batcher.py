"""Micro-batched semantic lookups.

Design
------
Concurrent requests that need a semantic lookup do not each embed their query and scan their
partition: the first one opens a batch and waits at most `window_s` (`cache.batch_window_ms`,
~1 ms) for others, or until `max_batch` queries wait (`cache.max_batch`). Then the batch runs:
one `Embedder.embed` call for all its texts (one ONNX run, or one /v1/embeddings request), and one
exact top-k similarity call per partition present in the batch (`CacheStore.search`: queries of
one partition form one [B, D] matrix against that partition's keys). Each waiter gets its query's
vector (kept to store the answer under on a miss) and its nearest entries.

A lookup that arrives when no other arrived within the last window does not wait: its batch runs
at the next event-loop turn (with whatever arrived in the same turn), so an idle cache adds no
wait; within a burst, lookups wait at most the window. A window of 0 batches the lookups that
arrive in the same event-loop turn. While a batch embeds (the only step that may leave the event
loop), new lookups gather into the next batch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .embedders import Embedder
from .store import CacheStore, Entry


@dataclass(slots=True)
class _Waiter:
    partition: bytes
    text: str
    future: asyncio.Future[tuple[np.ndarray, list[tuple[Entry, float]]]]


class LookupBatcher:
    """Gathers lookups into batches (see the module comment)."""

    def __init__(
        self,
        embedder: Embedder,
        store: CacheStore,
        window_s: float,
        max_batch: int,
        k: int = 4,
        clock: Callable[[], float] | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self.embedder = embedder
        self.store = store
        self.window_s = window_s
        self.max_batch = max_batch
        self.k = k
        self.clock = clock
        self.on_batch = on_batch
        self._waiting: list[_Waiter] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._last_arrival = -1e300
        self._running: set[asyncio.Task[None]] = set()  # batches in progress (held so they are not collected)

    async def lookup(self, partition: bytes, text: str) -> tuple[np.ndarray, list[tuple[Entry, float]]]:
        """The embedding of `text` and the `k` nearest entries of `partition`, similarity descending."""
        loop = asyncio.get_running_loop()
        w = _Waiter(partition, text, loop.create_future())
        self._waiting.append(w)
        now, last = loop.time(), self._last_arrival
        self._last_arrival = now
        if len(self._waiting) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush) if now - last < self.window_s else loop.call_soon(self._flush)
        return await w.future

    async def embed_one(self, text: str) -> np.ndarray:
        """The embedding of one text (for an answer stored without a lookup)."""
        return (await self.embedder.embed([text]))[0]

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Waiter]) -> None:
        try:
            vectors = await self.embedder.embed([w.text for w in batch])
            now = self.clock() if self.clock is not None else asyncio.get_running_loop().time()
            by_partition: dict[bytes, list[int]] = {}
            for i, w in enumerate(batch):
                by_partition.setdefault(w.partition, []).append(i)
            results: list[list[tuple[Entry, float]]] = [[] for _ in batch]
            for partition, rows in by_partition.items():
                found = self.store.search(partition, np.ascontiguousarray(vectors[rows]), self.k, now)
                for i, hits in zip(rows, found):
                    results[i] = hits
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for i, w in enumerate(batch):
                if not w.future.done():
                    w.future.set_result((vectors[i], results[i]))
        except Exception as exc:  # an embedder failure fails this batch's lookups, not the proxy
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(exc)
