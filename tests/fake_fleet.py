"""A tiny deterministic driver for router tests: replicas that prefill at a fixed token rate.

It plays the driver's part of `pylb.router.interface.Router` without the engine model: each
replica prefills its dispatched requests one at a time, first come first served, at
`prefill_tps` uncached tokens per second (it keeps an unbounded set of the prompt blocks it
has seen, so shared prefixes are cheaper), sends the first token, and completes `decode_s`
later. It scrapes metrics every `scrape_s`, honours `next_wakeup`, and applies membership
changes at given times (a removed replica fails its requests: `on_complete(..., None)`).

It checks the driver-side contract on every poll (a dispatch names a live replica and a queued
request, dispatched once) and records every dispatch, so tests can compare runs.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from pylb import native
from pylb.router.interface import Dispatch, ReplicaMetrics, Router, RoutingRequest, Usage

_ARRIVAL, _PREFILL_DONE, _COMPLETE, _MEMBERSHIP, _SCRAPE, _WAKEUP = range(6)


def make_request(rid: str, text: bytes, arrival: float, *, priority: int = 0, max_tokens: int = 8) -> RoutingRequest:
    """A RoutingRequest for `text` (4 bytes per token, 64-byte router blocks)."""
    return RoutingRequest(
        rid, native.block_hashes(text, 64), max(1, len(text) // 4), max_tokens, arrival,
        priority=priority, prompt_hash=native.xxh3_64(text),
    )  # fmt: skip


def prefix_workload(n: int, *, groups: int = 12, gap: float = 0.05, seed: int = 0, shared: int = 2048) -> list[RoutingRequest]:
    """`n` requests: a universal `shared`-byte system prompt, then one of `groups` group
    prefixes of 1-3 key blocks, then a unique tail; arrivals `gap` apart."""
    rng = np.random.default_rng(seed)
    system = b"S" * shared
    heads = [bytes(f"<group {g}>", "ascii").ljust(2048 * int(rng.integers(1, 4)), b"g") for g in range(groups)]
    out = []
    for i in range(n):
        g = int(rng.integers(groups))
        tail = bytes(f"<request {i}>", "ascii").ljust(int(rng.integers(100, 3000)), b"t")
        out.append(make_request(f"q{i}", system + heads[g] + tail, i * gap, priority=int(rng.integers(0, 2))))
    return out


@dataclass
class _Replica:
    name: str
    fifo: deque = field(default_factory=deque)  # request ids waiting for prefill
    busy: str | None = None  # request id in prefill
    cache: set = field(default_factory=set)
    decoding: set = field(default_factory=set)
    hits: int = 0
    queries: int = 0


class FakeFleet:
    """Drive `router` through `requests` with membership changes `(time, names)`."""

    def __init__(
        self,
        router: Router,
        replicas: Sequence[str],
        *,
        prefill_tps: float = 20_000.0,
        decode_s: float = 0.5,
        scrape_s: float = 0.5,
        changes: Sequence[tuple[float, Sequence[str]]] = (),
    ) -> None:
        self.router = router
        self.prefill_tps = prefill_tps
        self.decode_s = decode_s
        self.scrape_s = scrape_s
        self.initial = list(replicas)
        self.changes = list(changes)
        self.live: dict[str, _Replica] = {}
        self.dispatches: list[tuple[float, str, str]] = []
        self.first_token: dict[str, float] = {}
        self.completed: dict[str, Usage | None] = {}
        self.idle_violations: list[tuple[float, str]] = []
        self._heap: list[tuple] = []
        self._seq = count()
        self._requests: dict[str, RoutingRequest] = {}
        self._submitted: set[str] = set()
        self._dispatched: dict[str, str] = {}
        self._wake: float | None = None

    def _push(self, t: float, kind: int, payload: object = None) -> None:
        heapq.heappush(self._heap, (t, kind, next(self._seq), payload))

    def _set_membership(self, names: Sequence[str], now: float) -> None:
        for name in list(self.live):
            if name not in names:
                rep = self.live.pop(name)
                for rid in [*([rep.busy] if rep.busy else []), *rep.fifo, *sorted(rep.decoding)]:
                    self.completed[rid] = None
                    self.router.on_complete(rid, name, now, None)
        for name in names:
            self.live.setdefault(name, _Replica(name))
        self.router.on_membership(list(names), now)

    def _start(self, rep: _Replica, now: float) -> None:
        if rep.busy is None and rep.fifo:
            rid = rep.fifo.popleft()
            rep.busy = rid
            req = self._requests[rid]
            hashes = req.block_hashes.tolist()
            hit = 0
            for h in hashes:
                if h not in rep.cache:
                    break
                hit += 1
            cached = min(hit * 16, req.prompt_tokens - 1)
            rep.hits += cached
            rep.queries += req.prompt_tokens
            rep.cache.update(hashes)
            self._push(now + (req.prompt_tokens - cached) / self.prefill_tps, _PREFILL_DONE, (rep.name, rid, cached))

    def _poll(self, now: float) -> None:
        for rid, name, *_ in self.router.poll(now):
            assert name in self.live, f"dispatch of {rid} to {name}, not a live replica ({sorted(self.live)})"
            assert rid in self._submitted and rid not in self._dispatched, f"{rid} dispatched twice or never submitted"
            self._dispatched[rid] = name
            self.dispatches.append((now, rid, name))
            rep = self.live[name]
            rep.fifo.append(rid)
            self._start(rep, now)
        w = self.router.next_wakeup(now)
        if w is not None and w > now and (self._wake is None or w < self._wake):
            self._wake = w
            self._push(w, _WAKEUP)
        self._check_idle(now)

    def _check_idle(self, now: float) -> None:
        """A replica with queued requests in the router must have work dispatched to it."""
        states = getattr(self.router, "replicas", None)
        if not states:
            return
        for s in states:
            if s.queued_requests and s.unprefilled_requests == 0:
                self.idle_violations.append((now, s.name))

    def run(self, requests: Sequence[RoutingRequest], until: float = 1e6) -> FakeFleet:
        """Submit every request at its arrival and run until nothing is left; returns self."""
        self._set_membership(self.initial, requests[0].arrival if requests else 0.0)
        for r in requests:
            self._requests[r.request_id] = r
            self._push(r.arrival, _ARRIVAL, r)
        for t, names in self.changes:
            self._push(t, _MEMBERSHIP, list(names))
        if requests:
            self._push(requests[0].arrival + self.scrape_s, _SCRAPE)
        while self._heap:
            now, kind, _, payload = heapq.heappop(self._heap)
            if now > until:
                break
            if kind == _ARRIVAL:
                self._submitted.add(payload.request_id)
                self.router.submit(payload, now)
            elif kind == _PREFILL_DONE:
                name, rid, cached = payload
                rep = self.live.get(name)
                if rep is None or rep.busy != rid:
                    continue  # the replica left meanwhile
                rep.busy = None
                self.first_token[rid] = now
                self.router.on_first_token(rid, name, now)
                rep.decoding.add(rid)
                req = self._requests[rid]
                self._push(now + self.decode_s, _COMPLETE, (name, rid, Usage(req.prompt_tokens, req.max_tokens, cached)))
                self._start(rep, now)
            elif kind == _COMPLETE:
                name, rid, usage = payload
                rep = self.live.get(name)
                if rep is None or rid not in rep.decoding:
                    continue
                rep.decoding.discard(rid)
                self.completed[rid] = usage
                self.router.on_complete(rid, name, now, usage)
            elif kind == _MEMBERSHIP:
                self._set_membership(payload, now)
            elif kind == _SCRAPE:
                for rep in self.live.values():
                    running = len(rep.decoding) + (rep.busy is not None)
                    self.router.on_metrics(rep.name, ReplicaMetrics(running, len(rep.fifo), min(1.0, running / 64), rep.queries, rep.hits, 16, 4096), now)
                if len(self.completed) < len(requests):
                    self._push(now + self.scrape_s, _SCRAPE)
            else:
                if self._wake != now:
                    continue
                self._wake = None
            self._poll(now)
        return self

    @property
    def undispatched(self) -> set[str]:
        """Submitted requests the router never dispatched."""
        return self._submitted - set(self._dispatched)

    def dispatch_log(self) -> list[Dispatch]:
        """Every dispatch in order, as (request id, replica)."""
        return [Dispatch(rid, name) for _, rid, name in self.dispatches]
