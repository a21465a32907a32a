"""A fake `RouterView` and request builders for unit tests of routing policies.

`FakeView` holds literal `ReplicaState`s and answers the view's questions the way the router
core does, from two sources: `cached` (a literal number of leading blocks per replica name, for
hand-built cases) and `holdings` (block hashes a replica was sent, filled by `Driver`, for
multi-request runs). `Driver` plays the core's part in a run: it calls `advance`, `choose` and
`on_choice`, counts the request in flight on the chosen replica, calls `on_dispatch`, and
completes requests in FIFO order. `Fixed` is a policy whose every choice a test names in the
request id, and `core` the router core around it. `ReplicaState` is read-only to policies;
`write` changes a literal one the way the core does (tests play the core, its one writer).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pylb.native import block_hashes
from pylb.router.core import CoreRouter
from pylb.router.interface import DEFAULT_BLOCK_CHARS, Dispatch, ReplicaId, ReplicaMetrics, RouterOptions, RoutingRequest
from pylb.router.policies.dualmap import MIGRATION_RULES
from pylb.router.policy import Choice, Policy, ReplicaState, RouterView

TOKENS_PER_BLOCK = DEFAULT_BLOCK_CHARS // 4
"""Tokens the fake view counts per 64-byte router block (4 bytes per token)."""


def text(tag: str, n_blocks: int) -> bytes:
    """`n_blocks` x 64 bytes of text that differ, block by block, for different `tag`s."""
    out = bytearray()
    for b in range(n_blocks):
        out += f"<{tag}:{b}>".encode().ljust(DEFAULT_BLOCK_CHARS, b".")[:DEFAULT_BLOCK_CHARS]
    return bytes(out)


def request(
    data: bytes, request_id: str = "r", *, prompt_tokens: int | None = None, model: str = "m", arrival: float = 0.0
) -> RoutingRequest:
    """A request for prompt text `data` (prompt_tokens defaults to len(data) / 4)."""
    return RoutingRequest(
        request_id=request_id,
        block_hashes=block_hashes(data, DEFAULT_BLOCK_CHARS),
        prompt_tokens=len(data) // 4 if prompt_tokens is None else prompt_tokens,
        max_tokens=16,
        arrival=arrival,
        model=model,
    )


def replicas(names: Sequence[str], loads: Sequence[int] | None = None) -> list[ReplicaState]:
    """Replica states named `names`, with `loads[i]` requests in flight (0 by default)."""
    loads = loads if loads is not None else [0] * len(names)
    return [ReplicaState(name=n, index=i, inflight_requests=load) for i, (n, load) in enumerate(zip(names, loads))]


def write(state: ReplicaState, **values: object) -> ReplicaState:
    """Set fields of a literal replica state (as the router core, their one writer, does)."""
    for name, value in values.items():
        if not hasattr(state, name):
            raise AttributeError(f"ReplicaState has no field {name!r}")
        setattr(state, "_" + name, value)
    return state


def choose(policy: Policy, req: RoutingRequest, view: object) -> Choice:
    """What the core does to place a request: advance the policy to `view.now`, choose, record."""
    policy.advance(view.now)  # type: ignore[attr-defined]
    choice = policy.choose(req, view)  # type: ignore[arg-type]
    policy.on_choice(req, choice, view)  # type: ignore[arg-type]
    return choice


def metrics(waiting: int = 0, kv_usage: float = 0.0, num_gpu_blocks: int = 0, block_size: int = 16) -> ReplicaMetrics:
    """A scrape with the fields the policies read."""
    return ReplicaMetrics(
        num_requests_running=0,
        num_requests_waiting=waiting,
        kv_cache_usage=kv_usage,
        prefix_cache_queries=0,
        prefix_cache_hits=0,
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
    )


@dataclass
class FakeView:
    """A literal `RouterView`."""

    replicas: Sequence[ReplicaState]
    now: float = 0.0
    options: RouterOptions = field(default_factory=RouterOptions)
    cached: dict[str, int] = field(default_factory=dict)
    holdings: dict[str, set[int]] = field(default_factory=dict)

    def cached_blocks(self, request: RoutingRequest) -> np.ndarray:
        n = len(request.block_hashes)
        out = []
        for r in self.replicas:
            if r.name in self.cached:
                out.append(min(self.cached[r.name], n))
                continue
            held = self.holdings.get(r.name, set())
            k = 0
            for h in request.block_hashes.tolist():
                if h not in held:
                    break
                k += 1
            out.append(k)
        return np.asarray(out, dtype=np.int64)

    def uncached_tokens(self, request: RoutingRequest, replica: int) -> int:
        cached = int(self.cached_blocks(request)[replica]) * TOKENS_PER_BLOCK
        return max(0, request.prompt_tokens - cached)

    def predicted_ttft(self, request: RoutingRequest, replica: int) -> float:
        r = self.replicas[replica]
        backlog = r.queued_tokens + r.unprefilled_tokens + self.uncached_tokens(request, replica)
        return backlog * r.prefill_seconds_per_token

    def replica_ttft(self, replica: int) -> float:
        r = self.replicas[replica]
        return (r.queued_tokens + r.unprefilled_tokens) * r.prefill_seconds_per_token

    def replica(self, name: str) -> ReplicaState | None:
        return next((r for r in self.replicas if r.name == name), None)

    def index_of(self, name: str) -> int:
        return [r.name for r in self.replicas].index(name)

    def set_members(self, names: Sequence[str]) -> None:
        """Change the replica list (keeping the state of replicas that stay), re-indexed."""
        old = {r.name: r for r in self.replicas}
        new = []
        for i, n in enumerate(names):
            new.append(write(old.get(n) or ReplicaState(name=n, index=i), index=i))
        self.replicas = new


@dataclass
class Driver:
    """Plays the router core around one policy: choose, count in flight, dispatch, complete."""

    policy: Policy
    view: FakeView
    max_inflight: int = 6
    inflight: deque[tuple[str, str]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.policy.on_membership([r.name for r in self.view.replicas])

    def route(self, req: RoutingRequest, dt: float = 0.25) -> Choice:
        """Advance the clock by `dt`, route `req`, dispatch it, complete the oldest if too many."""
        self.view.now += dt
        choice = choose(self.policy, req, self.view)
        assert 0 <= choice.replica < len(self.view.replicas)
        r = self.view.replicas[choice.replica]
        write(r, inflight_requests=r.inflight_requests + 1)
        self.view.holdings.setdefault(r.name, set()).update(req.block_hashes.tolist())
        self.policy.on_dispatch(req, choice.replica, self.view)
        self.inflight.append((req.request_id, r.name))
        while len(self.inflight) > self.max_inflight:
            self.complete_oldest()
        return choice

    def complete_oldest(self) -> None:
        request_id, name = self.inflight.popleft()
        names = [r.name for r in self.view.replicas]
        if name in names:
            i = names.index(name)
            r = self.view.replicas[i]
            write(r, inflight_requests=r.inflight_requests - 1)
            self.policy.on_complete(request_id, i, self.view)

    def set_members(self, names: Sequence[str]) -> None:
        """Replicas join or leave: update the view, tell the policy, forget the leavers' requests."""
        self.view.set_members(names)
        self.inflight = deque((rid, n) for rid, n in self.inflight if n in set(names))
        self.policy.on_membership(list(names))


# ---- the router core around a scripted policy (tests/test_router_core.py, test_router_hooks.py) ----


class Fixed(Policy):
    """Sends request "<replica>/<name>" to that replica index, with an optional alternate "<r>/<name>/<alt>"."""

    name = "fixed"

    def __init__(self, options: RouterOptions, migrates: bool = False, neighbours: bool = True, migrate_to: str = "any") -> None:
        super().__init__(options)
        self.migrates = migrates  # type: ignore[misc]
        self.migrates_to_neighbours = neighbours  # type: ignore[misc]
        self.migration_work_limits, self.migration_added_work_slo_share = MIGRATION_RULES[migrate_to]  # type: ignore[misc]
        self.memberships: list[list[str]] = []
        self.dispatched: list[tuple[str, int]] = []
        self.completed: list[tuple[str, int]] = []
        self.migrated: list[tuple[str, int, int]] = []

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        self.memberships.append(list(replicas))

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        parts = request.request_id.split("/")
        r = int(parts[0]) % len(view.replicas)
        alt = int(parts[2]) if len(parts) > 2 else None
        return Choice(r, alt, branch="affinity")

    def on_migrate(self, request: RoutingRequest, source: int, target: int, view: RouterView) -> None:
        self.migrated.append((request.request_id, source, target))

    def on_dispatch(self, request: RoutingRequest, replica: int, view: RouterView) -> None:
        self.dispatched.append((request.request_id, replica))

    def on_complete(self, request_id: str, replica: int, view: RouterView) -> None:
        self.completed.append((request_id, replica))


def req(rid: str, tokens: int = 100, arrival: float = 0.0, priority: int = 0, hashes: Sequence[int] = ()) -> RoutingRequest:
    return RoutingRequest(rid, np.array(hashes, dtype=np.uint64), tokens, 4, arrival, priority=priority)


def core(n: int = 2, migrates: bool = False, neighbours: bool = True, migrate_to: str = "any", **opts: object) -> CoreRouter:
    """A core over `Fixed` on n replicas; `migrate_to` is one of dualmap's migration target rules."""
    o = RouterOptions(**opts)  # type: ignore[arg-type]
    r = CoreRouter(Fixed(o, migrates, neighbours, migrate_to), o)
    r.on_membership([f"r{i}" for i in range(n)], 0.0)
    return r


def ids(ds: list[Dispatch]) -> list[str]:
    return [d.request_id for d in ds]
