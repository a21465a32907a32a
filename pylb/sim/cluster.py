"""Discrete-event cluster simulator: N engine replicas behind one router, in virtual time.

Design
------
`simulate(workload, profile, replicas, router)` replays a prepared workload through a router
(anything implementing `pylb.router.interface.Router`) and N `Engine`s, all on one virtual
clock, with a heap of timed events:

    arrival     request i reaches the router at arrival_s / rate_scale (trace order kept on ties)
                -> router.submit
    step end    an engine step finishes -> router.on_first_token / on_complete for its events,
                then the engine starts its next step at once if it has work
    scrape      every `scrape_interval` seconds -> router.on_metrics(replica, snapshot) for each
                replica, as the live proxy's scraper does
    wakeup      the time router.next_wakeup asked for
    schedule    a `ClusterEvent` of the run's schedule: a replica added, removed or failed, a
                client that gives up (scale-out and churn, measured offline)
    engine in   with a profile's `request_overhead` > 0: a dispatched request reaches its
                engine's queue that long after its dispatch, or `busy_request_overhead` after
                it when that engine is working at the dispatch, plus `running_request_overhead`
                per request the engine runs then (dropped if it was cancelled or its replica
                failed meanwhile: the failure already re-placed it)

While the whole cluster is idle (no engine working, nothing held by the router, no timer set),
scrapes are skipped up to the next arrival: they would only repeat the same snapshot.

The router is driven through `pylb.router.driver.RouterDriver`, the same submit / poll /
dispatch loop as the live proxy's dispatcher (queued and in-flight books, dispatch counters,
dropping the dispatch of a request whose client left). A failed replica's requests without a
first token are retried on another replica, as the proxy retries an attempt that failed before
its first byte (`router.retry`); those already streaming fail (`SimResult.failed`).

After every event the router is polled; each dispatch adds the request to its engine at that
instant, or `request_overhead` later (an idle engine starts a step immediately; a busy one takes
it at its next step). Events at the same instant run in the order step end, arrival, scrape,
wakeup, schedule, engine in, then by insertion. Decode-only stretches are simulated as fused engine steps (see `pylb.sim.engine`),
which keeps a whole-trace run to seconds without changing the timeline.

Workloads are prepared once (`prepare_workload`): every prompt's text is built, hashed for the
router (in the router's `block_chars`-byte blocks, which the requests carry as their `hashing`:
a router of another block size refuses them) and for the engine (4 * block_size bytes), and
dropped, so that a capacity sweep re-runs the simulation without re-hashing hundreds of
megabytes of text.

Per request the result records arrival, dispatch, first token and completion times, replica,
prompt, cached and output tokens (`SimResult`); `pylb.sim.report` turns it into metrics.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count

import numpy as np

from pylb import native
from pylb.router.driver import RouterDriver
from pylb.router.interface import DEFAULT_BLOCK_CHARS, BlockHashing, Overloaded, ReplicaId, Router, RoutingRequest
from pylb.workload.types import BYTES_PER_TOKEN, WorkloadRequest

from .engine import Engine, RequestRejected, StepResult
from .profiles import Profile

DEFAULT_SCRAPE_INTERVAL = 0.5
"""Seconds between metrics scrapes delivered to the router (the live proxy's default too)."""

_FUSE_STEPS = 1 << 30  # no cap on fused decode steps in virtual time
_IDLE_GRACE_S = 60.0  # keep scraping this long while only the router holds undispatched requests

# event kinds, in their order at equal times
_STEP_END, _ARRIVAL, _SCRAPE, _WAKEUP, _SCHEDULE, _ENGINE_IN = 0, 1, 2, 3, 4, 5


class SimulationError(RuntimeError):
    """The router broke the interface contract (unknown replica or request, double dispatch)."""


SCHEDULE_KINDS = ("add", "remove", "fail", "cancel")


@dataclass(frozen=True, slots=True)
class ClusterEvent:
    """A change of the cluster at virtual time `at` (seconds on the run's clock, after rate
    scaling), applied after the other events of that instant:

        add <replica>     a fresh replica (empty cache) joins the rotation (a name that left
                          before comes back as a new, empty engine)
        remove <replica>  it leaves the rotation; its requests in flight finish there
        fail <replica>    it dies: its requests without a first token are retried on another
                          replica, the ones already streaming fail; it leaves the rotation
        cancel <request>  the client gives up: a queued request is withdrawn, one in flight is
                          aborted on its engine (counted in `SimResult.failed`)
    """

    at: float
    kind: str
    target: str

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"ClusterEvent.kind must be one of {', '.join(SCHEDULE_KINDS)}, got {self.kind!r}")
        if not math.isfinite(self.at) or self.at < 0:
            raise ValueError(f"ClusterEvent.at must be a finite time >= 0, got {self.at}")


@dataclass(slots=True)
class SimRequest:
    """A workload request with its prompt already hashed for the router and for the engines.

    Attributes:
        request_id, arrival_s, prompt_tokens, output_tokens: as in `WorkloadRequest`.
        router_hashes: `block_hashes(text, router_block_bytes)` (64-byte blocks by default).
        engine_hashes: `block_hashes(text, 4 * engine_block_size)`.
        prompt_hash: `xxh3_64(text)`, the router's key for prompts shorter than one router block.
        router_hashing: how `router_hashes` were made (the `RoutingRequest.hashing` it is sent with).
    """

    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    router_hashes: np.ndarray
    engine_hashes: np.ndarray
    prompt_hash: int | None = None
    router_hashing: BlockHashing = BlockHashing()


def prepare_workload(
    requests: Sequence[WorkloadRequest],
    engine_block_size: int,
    *,
    router_block_bytes: int = DEFAULT_BLOCK_CHARS,
    batch_size: int = 64,
    progress: Callable[[int], None] | None = None,
) -> list[SimRequest]:
    """Build, hash and drop every prompt text once; returns the requests in the given order.

    `engine_block_size` is the engines' block size in tokens (the profile's `block_size`);
    `router_block_bytes` must be the router's `RouterOptions.block_chars`.
    Hashing goes through `pylb.native.block_hashes_batch`, `batch_size` prompts at a time;
    `progress(n)` is called after each batch with the number of requests it prepared.
    """
    engine_bytes = BYTES_PER_TOKEN * engine_block_size
    hashing = BlockHashing.text(router_block_bytes)
    out: list[SimRequest] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        texts = [r.prompt_text().encode("utf-8") for r in chunk]
        router = native.block_hashes_batch(texts, router_block_bytes)
        engine = router if engine_bytes == router_block_bytes else native.block_hashes_batch(texts, engine_bytes)
        whole = [native.xxh3_64(t) for t in texts]
        del texts
        for r, rh, eh, ph in zip(chunk, router, engine, whole):
            out.append(SimRequest(r.request_id, r.arrival_s, r.prompt_tokens, max(1, r.output_tokens), rh, eh, ph, hashing))
        if progress is not None:
            progress(len(chunk))
    return out


def check_schedule(schedule: Sequence[ClusterEvent], num_replicas: int, request_ids: Sequence[str]) -> None:
    """Raise ValueError naming the first event of `schedule` that cannot apply: an add of a
    replica in rotation, a remove or fail of one that is not, a cancel of an unknown request."""
    in_rotation = {f"replica-{i}" for i in range(num_replicas)}
    known = set(request_ids)
    for k, ev in enumerate(sorted(schedule, key=lambda e: e.at)):
        if ev.kind == "cancel":
            if ev.target not in known:
                raise ValueError(f"schedule event {k} (at {ev.at:g} s): cancel of unknown request {ev.target!r}")
        elif ev.kind == "add":
            if ev.target in in_rotation:
                raise ValueError(f"schedule event {k} (at {ev.at:g} s): add of {ev.target!r}, which is in rotation already")
            in_rotation.add(ev.target)
        elif ev.target not in in_rotation:
            raise ValueError(f"schedule event {k} (at {ev.at:g} s): {ev.kind} of {ev.target!r}, which is not in rotation")
        else:
            in_rotation.discard(ev.target)


@dataclass
class SimResult:
    """Per-request outcome of one simulation run (arrays indexed like the workload).

    Times are virtual seconds; NaN where the event did not happen (e.g. a request the engine
    rejected has no first token). `replica` is the index into `replicas` (every replica the run
    had, added ones last), -1 if never dispatched. `failed` marks requests that ended without
    completing: their replica failed while they streamed, or their client gave up (schedule).
    `end_time` is the last arrival, dispatch or completion. `enqueued` is when the request's last
    dispatch reached its engine's queue (dispatch + the profile's request overhead; empty when a
    result was built without it).
    """

    replicas: list[ReplicaId]
    rate_scale: float
    request_ids: list[str]
    arrival: np.ndarray
    dispatch: np.ndarray
    first_token: np.ndarray
    completion: np.ndarray
    replica: np.ndarray
    prompt_tokens: np.ndarray
    cached_tokens: np.ndarray
    output_tokens: np.ndarray
    rejected: np.ndarray
    end_time: float
    wall_s: float
    stats: dict[str, int | float] = field(default_factory=dict)
    failed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    enqueued: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def num_requests(self) -> int:
        """Requests in the workload."""
        return len(self.request_ids)

    @property
    def ttft(self) -> np.ndarray:
        """Time to first token per request (first token - arrival; NaN when none)."""
        return self.first_token - self.arrival


def simulate(
    workload: Sequence[SimRequest],
    profile: Profile,
    num_replicas: int,
    router: Router,
    *,
    rate_scale: float = 1.0,
    scrape_interval: float | None = DEFAULT_SCRAPE_INTERVAL,
    fuse_decode: bool = True,
    progress: Callable[[int], None] | None = None,
    schedule: Sequence[ClusterEvent] = (),
) -> SimResult:
    """Replay `workload` through `router` and `num_replicas` engines of `profile`.

    Args:
        workload: prepared requests (`prepare_workload`); arrivals need not be sorted.
        router: a fresh router; it receives `on_membership` with the replica names first
            ("replica-0", "replica-1", ...).
        rate_scale: arrival times are divided by it (2.0 = twice the request rate).
        scrape_interval: seconds between `on_metrics` deliveries; None for none.
        fuse_decode: simulate decode-only stretches as fused engine steps (same timeline,
            much faster); False steps every iteration (for checking).
        progress: called with the number of requests that just ended (completed, rejected or
            failed).
        schedule: membership changes, failures and cancels to apply (`ClusterEvent`).

    Returns a `SimResult`. Raises SimulationError if the router dispatches an unknown request
    or to an unknown replica, ValueError if the router refuses the workload's hashing (it was
    prepared for another `block_chars`) or the schedule names what it cannot (removing a replica
    that is not in rotation, adding one that is, cancelling an unknown request).
    """
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not rate_scale > 0 or not math.isfinite(rate_scale):
        raise ValueError(f"rate_scale must be a positive number, got {rate_scale}")
    if scrape_interval is not None and not scrape_interval > 0:
        raise ValueError(f"scrape_interval must be > 0 seconds, got {scrape_interval}")
    wall_start = time.perf_counter()

    names = [f"replica-{i}" for i in range(num_replicas)]
    name_index = {n: i for i, n in enumerate(names)}  # the current engine of each name
    engines = [Engine(profile, name=n) for n in names]
    in_rotation = list(names)
    kv_events = router.view.options.cache_state == "events"  # engines report cache changes at each step's end
    if kv_events:
        for eng in engines:
            eng.kv_events = []
    n = len(workload)
    order = sorted(range(n), key=lambda i: workload[i].arrival_s)  # stable: trace order on ties
    index_of = {workload[i].request_id: i for i in range(n)}
    if len(index_of) != n:
        raise ValueError("workload request ids must be unique")
    check_schedule(schedule, num_replicas, list(index_of))
    events = sorted(schedule, key=lambda ev: ev.at)

    def contract_broken(where: str, exc: Exception) -> None:
        if isinstance(exc, LookupError):
            raise SimulationError(f"router {where}: {exc}") from exc
        raise exc

    driver = RouterDriver(router, contract_broken)

    arrival = np.full(n, np.nan)
    dispatch = np.full(n, np.nan)
    first_token = np.full(n, np.nan)
    enqueued = np.full(n, np.nan)
    completion = np.full(n, np.nan)
    replica_of = np.full(n, -1, dtype=np.int64)
    cached = np.zeros(n, dtype=np.int64)
    rejected = np.zeros(n, dtype=bool)
    failed = np.zeros(n, dtype=bool)
    done = 0
    max_steps = _FUSE_STEPS if fuse_decode else 1
    stats = {"events": 0, "engine_calls": 0, "polls": 0, "scrapes": 0, "dispatches": 0}

    heap: list[tuple[float, int, int, int, int]] = []
    seq = count()
    step_version = [0] * num_replicas
    step_pending: list[float | None] = [None] * num_replicas
    step_result: list[StepResult | None] = [None] * num_replicas
    wake_at: float | None = None
    next_arrival = 0
    idle_since: float | None = None
    overhead = profile.request_overhead  # dispatch -> an idle engine's queue (0: at once)
    busy_overhead = profile.busy_request_overhead  # dispatch -> a working engine's queue
    per_running = profile.running_request_overhead  # and this much more per request it runs
    sends = np.zeros(n, dtype=np.int64)  # dispatches of each request so far (a delivery is of the last one)
    in_transit = 0  # requests dispatched and not yet in their engine

    def push(t: float, kind: int, arg: int = 0, ver: int = 0) -> None:
        heapq.heappush(heap, (t, kind, next(seq), arg, ver))

    def start_step(e: int, now: float) -> None:
        eng = engines[e]
        res = eng.step(now, max_steps)
        stats["engine_calls"] += 1
        step_version[e] += 1
        end = eng.busy_until
        step_pending[e] = end
        step_result[e] = res
        push(end, _STEP_END, e, step_version[e])

    def after_change(e: int, now: float) -> None:
        """Reconcile engine e's pending step event after a request was added to or removed from it."""
        eng = engines[e]
        pending = step_pending[e]
        if pending is None:
            if eng.has_work():
                start_step(e, now)
            return
        busy = eng.busy_until
        if busy != pending:  # a fused run was cut short at a step boundary
            step_version[e] += 1
            step_result[e] = None
            if busy > now:
                step_pending[e] = busy
                push(busy, _STEP_END, e, step_version[e])
            else:
                step_pending[e] = None
                start_step(e, now)

    def ended(i: int) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(1)

    def deliver(i: int, e: int, now: float) -> None:
        """Request i enters engine e's queue (or is rejected by it: a miss, reported to the router)."""
        req = workload[i]
        enqueued[i] = now
        try:
            engines[e].add_request(req.request_id, req.prompt_tokens, req.output_tokens, req.engine_hashes, now)
        except RequestRejected:
            rejected[i] = True
            driver.complete(req.request_id, names[e], now, None)
            ended(i)
            return
        after_change(e, now)

    def poll(now: float) -> None:
        nonlocal wake_at, in_transit
        stats["polls"] += 1
        for d, q in driver.poll(now):
            if q.abandoned:
                continue
            rid, rep = d.request_id, d.replica
            e = name_index.get(rep)
            if e is None or rep not in in_rotation:
                raise SimulationError(f"router dispatched {rid!r} to unknown replica {rep!r} (in rotation: {', '.join(in_rotation) or 'none'})")
            i = index_of[rid]
            replica_of[i] = e
            dispatch[i] = now
            stats["dispatches"] += 1
            sends[i] += 1
            eng = engines[e]
            delay = (busy_overhead if eng.has_work() else overhead) + per_running * eng.num_running
            if delay > 0:  # the request reaches the engine's queue later (`Profile.request_overhead`)
                in_transit += 1
                push(now + delay, _ENGINE_IN, i, int(sends[i]))
            else:
                deliver(i, e, now)
        w = driver.next_wakeup(now)
        if w is not None and w > now and (wake_at is None or w < wake_at):
            wake_at = w
            push(w, _WAKEUP)

    def apply(ev: ClusterEvent, now: float) -> None:
        """One event of the schedule (see `ClusterEvent`)."""
        if ev.kind == "cancel":
            i = index_of[ev.target]  # (the schedule was checked up front: `check_schedule`)
            sent = driver.active.get(ev.target)
            if sent is not None:
                e = name_index[sent.replica]
                if engines[e].abort(ev.target, now):
                    after_change(e, now)
                driver.complete(ev.target, sent.replica, now, None)
                failed[i] = True
                ended(i)
            elif driver.known(ev.target):
                driver.abandon(ev.target, now)
                failed[i] = True
                ended(i)
            return
        rep = ev.target
        if ev.kind == "add":
            name_index[rep] = len(engines)
            names.append(rep)
            engines.append(Engine(profile, name=rep))
            if kv_events:
                engines[-1].kv_events = []
            step_version.append(0)
            step_pending.append(None)
            step_result.append(None)
            in_rotation.append(rep)
            driver.membership(in_rotation, now)
            return
        in_rotation.remove(rep)
        driver.membership(in_rotation, now)
        if ev.kind == "fail":
            e = name_index[rep]
            step_version[e] += 1  # its pending step never ends
            step_pending[e] = None
            step_result[e] = None
            engines[e] = Engine(profile, name=rep)  # what it held is gone
            if kv_events:
                engines[e].kv_events = []
                router.on_kv_event(rep, "cleared", np.zeros(0, dtype=np.uint64), now)
            for rid in [r for r, sent in driver.active.items() if sent.replica == rep]:
                i = index_of[rid]
                streaming = not math.isnan(first_token[i])
                driver.complete(rid, rep, now, None)
                if streaming:
                    failed[i] = True
                    ended(i)
                else:
                    stats["retries"] = stats.get("retries", 0) + 1
                    req = workload[i]
                    driver.submit(_routing_request(req, arrival[i], profile.block_size if kv_events else 0), now, failed_replica=rep)

    driver.membership(list(names), workload[order[0]].arrival_s / rate_scale if n else 0.0)
    if n:
        push(workload[order[0]].arrival_s / rate_scale, _ARRIVAL)
        if scrape_interval is not None:
            push(workload[order[0]].arrival_s / rate_scale + scrape_interval, _SCRAPE)
    for k, ev in enumerate(events):
        push(ev.at, _SCHEDULE, k)
    next_event = 0  # schedule events applied so far

    now = 0.0
    while heap:
        now, kind, _, arg, ver = heapq.heappop(heap)
        stats["events"] += 1
        if kind == _STEP_END:
            e = arg
            if ver != step_version[e]:
                continue
            step_pending[e] = None
            res = step_result[e]
            step_result[e] = None
            changes = engines[e].kv_events
            if changes:
                for ev_kind, ev_hashes, _ in changes:
                    router.on_kv_event(names[e], ev_kind, np.asarray(ev_hashes, dtype=np.uint64), now)
                changes.clear()
            if res is not None and (res.first_tokens or res.finished):
                rep = names[e]
                for rid in res.first_tokens:  # (events of a request cancelled meanwhile are dropped)
                    if driver.first_token(rid, rep, now):
                        first_token[index_of[rid]] = now
                for fin in res.finished:
                    if driver.complete(fin.request_id, rep, now, fin.usage):
                        i = index_of[fin.request_id]
                        completion[i] = now
                        cached[i] = fin.usage.cached_tokens
                        ended(i)
                poll(now)
            if step_pending[e] is None and engines[e].has_work():
                start_step(e, now)
        elif kind == _ARRIVAL:
            # every request arriving at this instant, in trace order, then one poll
            while next_arrival < n:
                i = order[next_arrival]
                t = workload[i].arrival_s / rate_scale
                if t > now:
                    push(t, _ARRIVAL)
                    break
                arrival[i] = t
                next_arrival += 1
                try:
                    driver.submit(_routing_request(workload[i], t, profile.block_size if kv_events else 0), now)
                except Overloaded:  # admission control refused it: a miss, like an engine rejection
                    rejected[i] = True
                    ended(i)
            poll(now)
        elif kind == _SCRAPE:
            stats["scrapes"] += 1
            for rep in in_rotation:
                driver.metrics(rep, engines[name_index[rep]].metrics_snapshot(now), now)
            poll(now)
            assert scrape_interval is not None
            if wake_at is not None or in_transit or any(p is not None for p in step_pending):
                idle_since = None
                push(now + scrape_interval, _SCRAPE)
                continue
            if driver.queued:  # engines idle, the router holds requests: give it a grace period
                if idle_since is None:
                    idle_since = now
                if now - idle_since < _IDLE_GRACE_S:
                    push(now + scrape_interval, _SCRAPE)
                    continue
            else:
                idle_since = None
            t_next = min(
                workload[order[next_arrival]].arrival_s / rate_scale if next_arrival < n else math.inf,
                events[next_event].at if next_event < len(events) else math.inf,
            )
            if math.isfinite(t_next):  # idle until the next arrival or change: skip the scrapes that would repeat
                push(now + max(1, math.ceil((t_next - now) / scrape_interval)) * scrape_interval, _SCRAPE)
        elif kind == _ENGINE_IN:
            in_transit -= 1
            i = arg
            rid = workload[i].request_id
            sent = driver.active.get(rid)
            e = int(replica_of[i])
            # still this dispatch and still active there: not cancelled, and its replica did not fail
            # (a failure completes its requests and re-places the unstarted ones); a replica taken
            # out of rotation still serves what was sent to it
            if ver == sends[i] and sent is not None and sent.replica == names[e]:
                deliver(i, e, now)
                poll(now)
        elif kind == _WAKEUP:
            if wake_at is None or now != wake_at:
                continue
            wake_at = None
            poll(now)
        else:  # _SCHEDULE
            apply(events[arg], now)
            next_event = arg + 1
            poll(now)

    return SimResult(
        replicas=names,
        rate_scale=rate_scale,
        request_ids=[r.request_id for r in workload],
        arrival=arrival,
        dispatch=dispatch,
        first_token=first_token,
        completion=completion,
        replica=replica_of,
        prompt_tokens=np.array([r.prompt_tokens for r in workload], dtype=np.int64),
        cached_tokens=cached,
        output_tokens=np.array([r.output_tokens for r in workload], dtype=np.int64),
        rejected=rejected,
        end_time=float(np.nanmax(np.concatenate([completion, arrival, dispatch]))) if n else 0.0,
        wall_s=time.perf_counter() - wall_start,
        stats={**stats, "preemptions": sum(e.num_preemptions for e in engines), "engine_steps": sum(e.steps_total for e in engines)},
        failed=failed,
        enqueued=enqueued,
    )


def _routing_request(req: SimRequest, arrival: float, engine_block_size: int = 0) -> RoutingRequest:
    """What the router sees of a prepared request arriving at `arrival` (with its engine block
    keys when `engine_block_size` is set: the router's mirror follows the engines' KV events)."""
    return RoutingRequest(
        req.request_id,
        req.router_hashes,
        req.prompt_tokens,
        req.output_tokens,
        arrival,
        prompt_hash=req.prompt_hash,
        hashing=req.router_hashing,
        engine_keys=req.engine_hashes if engine_block_size else None,
        engine_block_size=engine_block_size,
    )
