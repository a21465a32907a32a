"""The queueing router core: runs any `Policy` behind the `Router` interface.

Design (DESIGN.md §4)
---------------------------------
One synchronous object, no I/O, `now` passed in. It owns everything that is not the policy's
decision: per-replica queues, dispatch budgets, in-flight accounting, the cache mirror, the TTFT
model, hotspot migration and membership. It is the only writer of `ReplicaState`; policies and
drivers read its state through `CoreView` (`view`), which has no method that changes anything.

Life of a request
  admit     with `RouterOptions.admission_factor` f > 0, a request is refused at once
            (`Overloaded`; the proxy answers 429) when its predicted TTFT exceeds f x slo_ttft on
            every replica and no replica is idle (counting, with the "cheapest" order, only the
            queued requests that go before it): in overload it would miss the SLO anyway, and
            queueing it would push the requests behind it past the SLO too. Under load this
            sheds the longest prompts first (their own prefill is in the prediction); a replica
            with no backlog always admits, so a long prompt on a quiet fleet is never refused.
            Measured (BENCHMARKS.md, "Regime matrix"): using only the backlog (leaving the
            request's own prefill out) sheds more requests and helps far less.
  submit    the policy chooses a replica (`advance(now)`, then the pure `choose`); the request
            joins that replica's queue and the policy records the choice (`on_choice`); queues are
            ordered by (priority desc, rank, arrival, submission), where rank is set by
            `RouterOptions.queue_order`: "cheapest" (default) = the request's uncached prompt
            tokens on that replica, fewest first; "cached" = its cached prefix there, longest
            first (DESIGN.md §4's order); "fifo" = none. A request that has waited
            `starvation_s` goes first whatever its rank, oldest first. A request with an
            `affinity_hint` (the semantic cache's near misses) joins the hinted replica instead
            when it is a member and not hot (below); the policy's choice becomes its alternate.
  poll      for every replica with a queue, while it has budget, the head of its queue is
            dispatched. Budget: un-prefilled requests in flight < `max_unprefilled_requests` AND
            un-prefilled tokens in flight < `max_unprefilled_tokens` (tokens the mirror thinks
            the replica must compute). A replica with nothing un-prefilled always has budget,
            so no replica idles while requests wait for it. Dispatch recomputes the request's
            mirror match on its replica (the cache may have grown since it was queued), counts
            it in flight at once (not from scraped metrics, which lag), inserts its block hashes
            into the mirror, and calls `policy.on_dispatch`.
  first token  frees its un-prefilled budget; the latency since dispatch, over the tokens that
            were ahead of it, trains the replica's and the fleet's per-token prefill time
            (`pylb.router.ttft`; a replica with few observations leans on the fleet's).
  complete  frees its in-flight slot; `policy.on_complete`.
The driver polls after every event; `next_wakeup` asks for a poll every `dispatch_interval`
seconds while anything is queued (the timer also drives hotspot detection by waiting time).

Predicted TTFT of request r on replica i (the `RouterView.predicted_ttft` every policy sees):
    (queued_tokens_i + unprefilled_tokens_i + uncached_i(r)) x prefill_seconds_per_token_i
        [+ ttft_intercept_s_i]  [+ decoding_i x ttft_seconds_per_decoding_i]
(the bracketed terms with `prefill_intercept` / `prefill_decoding`; decoding_i = requests past
their first token in flight there) and of replica i itself the same without r. Each first token
is logged at debug level ("ttft observation": tokens ahead, decoding, latency) for
`bench/ttft_model.py`. The prediction's error is measured: each request carries the TTFT
predicted when it was queued (plus the time it had waited, after a migration), and its first
token gives |predicted - observed|, observed = first token - submit; P50 and P90 over the last
`PREDICTION_WINDOW` first tokens are `ttft_prediction_error()` (the proxy's
`pylb_ttft_prediction_error_seconds`, the regime matrix's prediction error column).

Hotspot migration (policies with `migrates = True`; DualMap §4.3): on every poll, a replica h
with queued requests is *hot* when its predicted TTFT exceeds `slo_ttft` or its oldest queued
request has waited >= `hot_wait_s`. Its queued requests are examined cheapest move first (move
cost = the extra prompt tokens the request must compute on its alternate, from the mirror match
taken when it was queued), at most `migration_scan` per poll, and each moves to its `alternate`
(or, without one, the replica where its predicted TTFT is lowest) when its predicted TTFT there
is lower than h's and the target does not turn hot by it (predicted TTFT there <= slo_ttft and
no request there waiting >= hot_wait_s), until h is no longer hot. When the alternate fails
those tests (it is as hot as h: both candidates of a busy prefix group), the request may move to
a *neighbour* instead, the replica where its predicted TTFT is lowest, under the same tests
(policies with `migrates_to_neighbours`). On the DualMap profile, where TTFTs are bound by the
SLO rather than by compute, this raises dualmap's capacity (BENCHMARKS.md, "DualMap
ablations"). A policy's `migration_work_limits` (L1, L2, ...) are tried in turn: under L, a move
may go only to a replica where the request must compute at most L times the prompt tokens it
must compute on h (1: only where at least as much of it is cached; default (inf,): no limit;
(1, inf): a replica that holds the prefix first, any other only when none helps). A move that
adds prompt work to the fleet (the target holds less of the prompt than h) must also predict the
request's TTFT within the policy's `migration_added_work_slo_share` of the SLO. A moved request
keeps h as its alternate, and the policy hears of the move (`policy.on_migrate`). (Without the
"not hot" test, requests bounce between two hot replicas, several migrations per request.)

Mirror size: a replica's mirror holds its KV cache's tokens (`vllm:cache_config_info`, or
`cache_capacity_tokens` before the first scrape) in router blocks. A router block is
`block_chars` bytes, estimated at `chars_per_token` bytes per token; real tokenizers differ
(~2.2 bytes per token for the Llama tokenizer on pylb's test text), which would make the mirror
believe a replica holds 1.8x what it can. So the core learns the ratio of the replicas' reported
prompt tokens (`Usage.reported`) to its estimate, an exponential average over text prompts of at
least one block, and re-sizes every mirror when it moves by more than 5 %. Where usage is exact
(the simulator, token-id prompts) the ratio stays 1 and nothing changes.

Membership: survivors keep their indices' relative order and new replicas are appended (the
mirror's index order); `policy.on_membership` rebuilds the policy's rings (the only place it
is asked to), then the queued requests of removed replicas, and any request that arrived while
there was no replica, are re-placed with `choose`. In-flight requests of a removed replica are
still tracked until the driver reports them complete or failed (none is lost); their replica's
counters are gone with it, and the policy's `on_complete` is not called for them (the index
they had no longer names a replica).

Cache state (`RouterOptions.cache_state`): "predicted" matches a request's router blocks against
the predicted mirror (`self.mirror`: pylb's dispatches, LRU-aged). "events" also keeps an
`EventMirror` (`self.events`, `pylb.router.event_mirror`) fed by the replicas' KV-cache events
(`on_kv_event`) and by pylb's dispatches of the last `events_grace_s`, keyed by engine-exact keys;
a request that carries them (`RoutingRequest.engine_keys`) is matched there, its engine-block
match converted to router blocks (floor(blocks x engine_block_size / tokens_per_block)), so every
policy reads `cached_blocks` in the same units from either mirror. A request without engine keys
(one the proxy could not tokenize) is matched on the predicted mirror, which is kept in both modes
(`cache_comparison` counts, per replica, what each mirror said at dispatch).

Cost per request: one `choose` (for DualMap: one prefix key, one ring lookup, one mirror match),
one more mirror match and one mirror insert at dispatch, O(log queue) heap work. Queues are heaps
with lazy deletion (entries carry a version; stale ones are skipped and periodically purged).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pylb import native

from .event_mirror import EventMirror
from .interface import Dispatch, Overloaded, ReplicaId, ReplicaMetrics, ReplicaState, Router, RouterOptions, RoutingRequest, Usage
from .policy import BRANCHES, Choice, Policy
from .ttft import PrefillTimeEstimator, blended, blended_decoding, blended_intercept

log = logging.getLogger(__name__)

_QUEUED, _DISPATCHED, _PREFILLED, _UNPLACED = 0, 1, 2, 3

PREDICTION_WINDOW = 1000
"""First tokens over which the TTFT prediction error is measured (`ttft_prediction_error`)."""


@dataclass(slots=True)
class CacheComparison:
    """Per replica, with cache_state "events": what the two mirrors said at dispatch, summed over
    the requests with engine keys dispatched to it (before each dispatch was recorded)."""

    dispatches: int = 0
    prompt_tokens: int = 0
    predicted_tokens: int = 0  # cached tokens by the predicted mirror (pylb's own guess)
    events_tokens: int = 0  # cached tokens by the engine's events alone


class PolicyContractError(RuntimeError):
    """A policy answered something the contract forbids (a replica index out of range)."""


@dataclass(slots=True, eq=False)
class _Entry:
    """A request the core knows: queued, unplaced, or in flight (until it completes)."""

    req: RoutingRequest
    seq: int
    state: int = _UNPLACED
    replica: int = -1  # queue or in-flight replica; -1 when unplaced or its replica left
    alternate: int | None = None
    branch: str = ""
    cached: np.ndarray | None = None  # mirror match per replica when it was (last) queued
    cost: int = 0  # uncached tokens on `replica`, as counted in queued_tokens / unprefilled_tokens
    version: int = 0  # bumped whenever it leaves a queue: heap items of older versions are stale
    dispatched_at: float = math.nan
    ahead: int = 0  # un-prefilled tokens on the replica at dispatch, its own included
    decoding: int = 0  # requests past their first token in flight on the replica at dispatch
    mirror_held: int = 0  # leading blocks the predicted mirror held on `replica` before the dispatch credited it with the rest
    submitted_at: float = math.nan
    predicted: float = math.nan  # predicted TTFT from submit, when it was (last) queued


@dataclass(slots=True, eq=False)
class _Queue:
    """One replica's queue: three heaps over the same entries (lazy deletion) + its estimator."""

    order: list[tuple] = field(default_factory=list)  # (-priority, rank, arrival, seq, ver, e)
    aged: list[tuple] = field(default_factory=list)  # (arrival, seq, ver, e): oldest first
    moves: list[tuple] = field(default_factory=list)  # (move cost, seq, ver, e): cheapest first
    estimator: PrefillTimeEstimator | None = None


def _live(item: tuple) -> bool:
    e: _Entry = item[-1]
    return e.state == _QUEUED and e.version == item[-2]


def _within_work_limit(there: int, here: int, limit: float) -> bool:
    """A migration computing `there` prompt tokens on its target, against `here` on the hot
    replica, keeps within a policy's work limit (at most `limit` times as many)."""
    return limit == math.inf or there <= limit * here


class CoreView:
    """The read-only `RouterView` of a `CoreRouter`: what policies get in their hooks, and what
    drivers read through `Router.view`. It exposes the core's reading methods and nothing that
    changes it."""

    __slots__ = ("_core", "options", "replica", "cached_blocks", "uncached_tokens", "predicted_ttft", "replica_ttft")

    def __init__(self, core: CoreRouter) -> None:
        self._core = core
        self.options = core.options
        self.replica = core.replica
        self.cached_blocks = core.cached_blocks
        self.uncached_tokens = core.uncached_tokens
        self.predicted_ttft = core.predicted_ttft
        self.replica_ttft = core.replica_ttft

    @property
    def now(self) -> float:
        """The latest `now` the router was given."""
        return self._core.now

    @property
    def replicas(self) -> tuple[ReplicaState, ...]:
        """The replicas in index order (read-only states)."""
        return self._core.replicas

    @property
    def token_ratio(self) -> float:
        """Replica tokens per estimated prompt token (`CoreRouter.token_ratio`)."""
        return self._core.token_ratio


class CoreRouter(Router):
    """The router core around one `Policy` (see the module docstring).

    Args:
        policy: the placement policy; the core calls its hooks.
        options: router settings (limits, SLO, estimator seed, mirror size); defaults if None.
    """

    def __init__(self, policy: Policy, options: RouterOptions | None = None) -> None:
        self.policy = policy
        self.options = options if options is not None else policy.options
        o = self.options
        self.now = -math.inf
        self.replicas: tuple[ReplicaState, ...] = ()
        """The replicas in index order; the core is their one writer."""
        self._queues: list[_Queue] = []
        self._index: dict[ReplicaId, int] = {}
        self._entries: dict[str, _Entry] = {}
        self._unplaced: list[_Entry] = []
        self._seq = 0
        self._tpb = o.tokens_per_block
        self._hashings = (o.hashing(), o.hashing(token_ids=True))  # what `_new_entry` accepts
        self.token_ratio = 1.0
        """Learned replica tokens per estimated token (reported usage / `prompt_tokens`)."""
        self._ratio_in_caps = 1.0  # the ratio the mirrors' capacities were computed with
        self._default_capacity = self._capacity_blocks(o.cache_capacity_tokens)
        self.mirror = native.CacheMirror(0, self._default_capacity)
        self._mirror_version = 0
        self.events: EventMirror | None = EventMirror(o.events_grace_s) if o.cache_state == "events" else None
        """The events-fed mirror (cache_state "events"), else None."""
        self.cache_comparison: dict[ReplicaId, CacheComparison] = {}
        """With cache_state "events": per replica name, predicted against events-reported cached tokens at dispatch."""
        self._match_for: tuple[int, int, int] | None = None  # (id(request), mirror versions) of _match_val
        self._match_val: np.ndarray = np.zeros(0, dtype=np.int64)
        self._match_req: RoutingRequest | None = None  # keeps id() of the memo valid
        self._fleet_estimator = PrefillTimeEstimator(o.prefill_seconds_per_token, o.prefill_learning_rate, o.prefill_intercept, o.prefill_decoding)
        self._prices_decoding = o.prefill_decoding
        self._queued_total = 0
        self._stale = 0
        self._view = CoreView(self)
        self.decisions: Counter[str] = Counter()
        """Decisions by branch (`pylb.router.policy.BRANCHES`), as `pylb_decisions_total` counts them."""
        self.migrations = 0
        self.hints = Counter[str]()
        """Affinity hints (`RoutingRequest.affinity_hint`) by outcome: honoured, same (the policy chose
        it anyway), unknown (not a member), hot."""
        self.rejections = 0
        """Requests refused by admission control (`Overloaded`)."""
        self._prediction_errors: deque[float] = deque(maxlen=PREDICTION_WINDOW)

    # ---- RouterView (the read-only part; `view` hands out only this) -----------------------

    @property
    def view(self) -> CoreView:
        """The read-only view of this router that policies and drivers get."""
        return self._view

    def replica(self, name: ReplicaId) -> ReplicaState | None:
        """The replica named `name`, or None when it is not a member."""
        i = self._index.get(name)
        return None if i is None else self.replicas[i]

    def cached_blocks(self, request: RoutingRequest) -> np.ndarray:
        """Per replica, the request's leading router blocks the mirror believes it holds."""
        ev = self.events
        key = (id(request), self._mirror_version, ev.version if ev is not None else 0)
        if self._match_for != key or self._match_req is not request:
            if not self.replicas:
                self._match_val = np.zeros(0, np.int64)
            elif not self._predicted_mirror_matches(request):
                assert ev is not None and request.engine_keys is not None
                engine_blocks = ev.match(request.engine_keys)
                self._match_val = np.floor_divide(engine_blocks * request.engine_block_size, self._tpb).astype(np.int64)
            else:
                self._match_val = self.mirror.match(request.block_hashes)
            self._match_for = key
            self._match_req = request
        return self._match_val

    def _predicted_mirror_matches(self, request: RoutingRequest) -> bool:
        """Whether `cached_blocks` answers from the predicted mirror (else from the events mirror)."""
        return self.events is None or request.engine_keys is None or request.engine_block_size <= 0

    def uncached_tokens(self, request: RoutingRequest, replica: int) -> int:
        """Prompt tokens `replica` would compute for the request (mirror estimate, >= 0)."""
        return self._uncached(request, int(self.cached_blocks(request)[replica]))

    def predicted_ttft(self, request: RoutingRequest, replica: int) -> float:
        """(queued + un-prefilled + the request's uncached tokens) x learned seconds per token."""
        return self._ttft_with(replica, self.uncached_tokens(request, replica))

    def replica_ttft(self, replica: int) -> float:
        """Predicted TTFT of a request with nothing to compute queued on `replica` now."""
        return self._ttft_with(replica, 0)

    def _ttft_with(self, replica: int, own_tokens: int) -> float:
        """The predicted-TTFT formula: (queued + un-prefilled + own_tokens) x seconds per token,
        plus `_ttft_constant`."""
        s = self.replicas[replica]
        return (s.queued_tokens + s.unprefilled_tokens + own_tokens) * s.prefill_seconds_per_token + self._ttft_constant(s)

    def _ttft_constant(self, s: ReplicaState) -> float:
        """The part of a predicted TTFT on `s` that does not depend on the tokens ahead: the
        learned per-request constant (`prefill_intercept`) and the learned cost of the requests
        decoding there (`prefill_decoding`); 0 with neither."""
        if not self._prices_decoding:
            return s.ttft_intercept_s
        return s.ttft_intercept_s + s.decoding_requests * s.ttft_seconds_per_decoding

    def _admission_ttft(self, request: RoutingRequest, replica: int, limit: float) -> float:
        """The request's TTFT on `replica` as admission control judges it: 0 on an idle replica;
        otherwise counting only the queued requests its queue order puts ahead of it (with
        "cheapest", those of higher priority or no more uncached tokens), not the whole queue
        as `predicted_ttft` does (a short prompt overtakes long ones). The queue is scanned only
        when the answer is near `limit`."""
        s = self.replicas[replica]
        if s.queued_tokens + s.unprefilled_tokens == 0:
            return 0.0
        full = self.predicted_ttft(request, replica)
        if full <= limit or self.options.queue_order != "cheapest":
            return full
        own = self.uncached_tokens(request, replica)
        rate, const = s.prefill_seconds_per_token, self._ttft_constant(s)
        if (s.unprefilled_tokens + own) * rate + const > limit:
            return full  # hopeless before counting the queue
        ahead = 0
        for item in self._queues[replica].order:  # (-priority, rank = cost, arrival, seq, version, entry)
            if _live(item) and (-item[0] > request.priority or (-item[0] == request.priority and item[1] <= own)):
                ahead += item[-1].cost
        return (s.unprefilled_tokens + ahead + own) * rate + const

    def _new_entry(self, request: RoutingRequest, known_message: str) -> _Entry:
        """Track a request (ValueError naming it, with `known_message`, if it is tracked already,
        or when its block hashes were made with other hashing parameters than the router's)."""
        if request.hashing not in self._hashings:
            self.options.check_hashing(request)  # raises, naming both
        if request.request_id in self._entries:
            raise ValueError(f"request {request.request_id!r} {known_message}")
        e = _Entry(request, self._seq)
        self._seq += 1
        self._entries[request.request_id] = e
        return e

    def _uncached(self, request: RoutingRequest, cached_blocks: int) -> int:
        return max(0, request.prompt_tokens - int(cached_blocks * self._tpb))

    # ---- Router -----------------------------------------------------------------------------

    def submit(self, request: RoutingRequest, now: float) -> None:
        """Queue the request where the policy chooses (held unplaced while there is no replica)."""
        self._tick(now)
        e = self._new_entry(request, "was already submitted and is not complete")
        e.submitted_at = self.now
        limit = self.options.admission_factor * self.options.slo_ttft
        if limit > 0 and self.replicas:
            best = min(self._admission_ttft(request, i, limit) for i in range(len(self.replicas)))
            if best > limit:
                del self._entries[request.request_id]
                self.rejections += 1
                raise Overloaded(best, limit)
        if self.replicas:
            self._place(e)
        else:
            self._unplaced.append(e)

    def poll(self, now: float) -> list[Dispatch]:
        """Migrate off hot replicas (if the policy migrates), then dispatch within budgets."""
        self._tick(now)
        out: list[Dispatch] = []
        if self._queued_total == 0:
            return out
        if self.policy.migrates and len(self.replicas) > 1:
            self._migrate(now)
        o = self.options
        max_req, max_tok, starve = o.max_unprefilled_requests, o.max_unprefilled_tokens, o.starvation_s
        for i, q in enumerate(self._queues):
            s = self.replicas[i]
            while s.queued_requests and s.unprefilled_requests < max_req and s.unprefilled_tokens < max_tok:
                if self._oldest_wait(q, now) >= starve:
                    item = heapq.heappop(q.aged)  # live: _oldest_wait dropped the stale ones
                else:
                    item = heapq.heappop(q.order)
                    if not _live(item):
                        self._stale -= 1
                        continue
                self._dispatch(item[-1], i, now, out)
                self._stale -= 1  # the popped item
        if self._stale > 2 * self._queued_total + 256:
            self._purge()
        return out

    def on_first_token(self, request_id: str, replica: ReplicaId, now: float) -> None:
        """Free the request's un-prefilled budget and learn from its latency."""
        self._tick(now)
        e = self._entries.get(request_id)
        if e is None or e.state != _DISPATCHED:
            return
        e.state = _PREFILLED
        if e.replica < 0:
            return  # its replica left the membership
        s = self.replicas[e.replica]
        s._unprefilled_requests -= 1
        s._unprefilled_tokens -= e.cost
        if not math.isnan(e.predicted):
            self._prediction_errors.append(abs(e.predicted - (now - e.submitted_at)))
        est = self._queues[e.replica].estimator
        assert est is not None
        latency = now - e.dispatched_at
        if log.isEnabledFor(logging.DEBUG):
            log.debug("ttft observation", extra={
                "replica": s.name, "ahead_tokens": e.ahead, "decoding": e.decoding, "latency_s": round(latency, 4),
                "waited_s": round(e.dispatched_at - e.submitted_at, 4), "predicted_s": round(e.predicted, 4),
                "running_scraped": s.metrics.num_requests_running if s.metrics is not None else None,
            })  # fmt: skip
        est.observe(latency, e.ahead, e.decoding)
        fleet = self._fleet_estimator
        fleet.observe(latency, e.ahead, e.decoding)
        for q, rs in zip(self._queues, self.replicas):  # every replica leans on the fleet estimate
            assert q.estimator is not None
            rs._prefill_seconds_per_token = blended(q.estimator, fleet)
            if self.options.prefill_intercept:
                rs._ttft_intercept_s = blended_intercept(q.estimator, fleet)
            if self.options.prefill_decoding:
                rs._ttft_seconds_per_decoding = blended_decoding(q.estimator, fleet)

    def on_complete(self, request_id: str, replica: ReplicaId, now: float, usage: Usage | None) -> None:
        """Forget the request; free its in-flight slot (and budget, if it never got a first token)."""
        self._tick(now)
        e = self._entries.get(request_id)
        if e is None or e.state not in (_DISPATCHED, _PREFILLED):
            return
        del self._entries[request_id]
        if e.replica < 0:
            return
        self._count_in_flight(e, e.replica, -1)
        e.state = -1
        self.policy.on_complete(request_id, e.replica, self._view)
        if usage is not None and usage.reported and usage.prompt_tokens > 0:
            self._learn_token_ratio(e.req, usage.prompt_tokens)

    def reassign(self, request_id: str, replica: ReplicaId, now: float) -> bool:
        """Move a dispatched request's in-flight (and, before its first token, un-prefilled)
        accounting to `replica`; the policy sees it complete on the old replica and dispatched on
        the new one. The mirrors move with it: the old replica loses the blocks its dispatch
        credited it with (those it did not hold before; it never saw the request), and the new
        one is credited with the prompt. (Should another request of the same prefix have been
        dispatched to the old replica in between, it loses that credit too until its engine's
        events or its next dispatch there restore it; moves are rare: an endpoint picker's
        fallback.)"""
        self._tick(now)
        e = self._entries.get(request_id)
        new = self._index.get(replica)
        if e is None or e.state not in (_DISPATCHED, _PREFILLED) or new is None:
            return False
        if new == e.replica:
            return True
        hashes, keys = e.req.block_hashes, e.req.engine_keys
        if e.replica >= 0:
            self._count_in_flight(e, e.replica, -1)
            self.policy.on_complete(request_id, e.replica, self._view)
            if len(hashes) > e.mirror_held:
                self.mirror.remove(e.replica, hashes[e.mirror_held :])
                self._mirror_version += 1
            if self.events is not None and keys is not None:
                self.events.forget_dispatch(e.replica, keys)
        e.cost = self._uncached(e.req, int(self.cached_blocks(e.req)[new]))
        self._count_in_flight(e, new, +1)
        e.replica = new
        if len(hashes):
            e.mirror_held = int(self.mirror.match(hashes)[new])
            self.mirror.insert(new, hashes)
            self._mirror_version += 1
        if self.events is not None and keys is not None:
            self.events.record_dispatch(new, keys, now)
        self.policy.on_dispatch(e.req, new, self._view)
        return True

    _RATIO_LEARNING_RATE = 0.05
    _RATIO_RESIZE_STEP = 0.05

    def _learn_token_ratio(self, request: RoutingRequest, reported_tokens: int) -> None:
        """Fold one text prompt's reported/estimated token ratio into `token_ratio`; re-size the
        mirrors when it has moved more than `_RATIO_RESIZE_STEP` from the ratio they were sized with."""
        if request.hashing.unit != "bytes" or request.prompt_tokens < self._tpb:
            return
        sample = min(4.0, max(0.25, reported_tokens / request.prompt_tokens))
        self.token_ratio += self._RATIO_LEARNING_RATE * (sample - self.token_ratio)
        if abs(self.token_ratio / self._ratio_in_caps - 1.0) > self._RATIO_RESIZE_STEP:
            self._ratio_in_caps = self.token_ratio
            self._default_capacity = self._capacity_blocks(self.options.cache_capacity_tokens)
            for s in self.replicas:
                m = s._metrics
                tokens = m.block_size * m.num_gpu_blocks if m is not None and m.block_size > 0 and m.num_gpu_blocks > 0 else None
                self._resize_mirror(s, self._default_capacity if tokens is None else self._capacity_blocks(tokens))

    def _capacity_blocks(self, engine_tokens: int) -> int:
        """Router blocks that `engine_tokens` of a replica's KV cache hold at the learned ratio."""
        return int(engine_tokens / (self._tpb * self._ratio_in_caps))

    def _resize_mirror(self, s: ReplicaState, cap: int) -> None:
        if cap != s.cache_capacity_blocks:
            if cap < self.mirror.size(s._index):
                self._mirror_version += 1
            self.mirror.resize(s._index, cap)
            s._cache_capacity_blocks = cap

    def cancel(self, request_id: str, now: float) -> bool:
        """Withdraw a request that was submitted and not yet dispatched (its client left or its
        queue time ran out); True when withdrawn. Unknown or dispatched ids are left alone
        (False): a dispatched request ends through on_complete."""
        self._tick(now)
        e = self._entries.get(request_id)
        if e is None:
            return False
        if e.state == _QUEUED:
            self._dequeue(e)
        elif e in self._unplaced:
            self._unplaced.remove(e)
        else:
            return False
        del self._entries[request_id]
        e.state = -1
        return True

    def retry(self, request: RoutingRequest, failed_replica: ReplicaId, now: float) -> None:
        """Submit again a request whose attempt on `failed_replica` failed before any byte
        reached the client (the driver has already called `on_complete(..., None)` for it).
        It goes to its other candidate when the policy names one, otherwise to the policy's
        choice if that is another replica, otherwise to the least-loaded other replica;
        counted under the "retry" branch. The policy's `choose` is asked, but not its
        `on_choice`: the request was counted when it was first placed."""
        self._tick(now)
        e = self._new_entry(request, "is still known to the router; complete it first")
        e.submitted_at = request.arrival if math.isfinite(request.arrival) else self.now
        if not self.replicas:
            self._unplaced.append(e)
            return
        names = [s.name for s in self.replicas]
        failed = names.index(failed_replica) if failed_replica in names else -1
        self.policy.advance(now)
        choice = self.policy.choose(request, self._view)  # no on_choice: the policy counted this request already
        target = int(choice.replica)
        if target == failed or not 0 <= target < len(names):
            alt = choice.alternate
            others = [i for i in range(len(names)) if i != failed]
            if alt is not None and 0 <= alt < len(names) and alt != failed:
                target = int(alt)
            elif others:
                target = min(others, key=lambda i: (self.replicas[i].load, i))
        e.alternate = None
        self.decisions["retry"] += 1
        self._enqueue(e, target, "retry", self.cached_blocks(request).copy())

    def on_metrics(self, replica: ReplicaId, metrics: ReplicaMetrics, now: float) -> None:
        """Keep the scrape for policies; size the replica's mirror from its KV cache."""
        self._tick(now)
        i = self._index.get(replica)
        if i is None:
            return
        s = self.replicas[i]
        s._metrics = metrics
        s._metrics_at = now
        if metrics.block_size > 0 and metrics.num_gpu_blocks > 0:
            self._resize_mirror(s, self._capacity_blocks(metrics.block_size * metrics.num_gpu_blocks))
        if self.events is not None:
            self.events.set_engine_blocks(i, metrics.num_gpu_blocks)

    def on_kv_event(self, replica: ReplicaId, kind: str, keys: np.ndarray, now: float) -> None:
        """Apply a replica's KV-cache event to the events mirror (ignored in "predicted" mode and
        for replicas that are not members)."""
        self._tick(now)
        i = self._index.get(replica)
        if self.events is None or i is None:
            return
        if kind == "stored":
            self.events.stored(i, keys)
        elif kind == "removed":
            self.events.removed(i, keys)
        elif kind == "cleared":
            self.events.cleared(i)
        else:
            raise ValueError(f"unknown KV event kind {kind!r}: expected stored, removed or cleared")

    def on_membership(self, replicas: Sequence[ReplicaId], now: float) -> None:
        """Apply the new replica set: rebuild policy state, re-place orphaned queued requests."""
        self._tick(now)
        names = list(replicas)
        if len(set(names)) != len(names):
            raise ValueError(f"replica names must be unique, got {names}")
        keep = set(names)
        old = [s.name for s in self.replicas]
        removed = [i for i, n in enumerate(old) if n not in keep]
        survivors = [i for i, n in enumerate(old) if n in keep]
        added = [n for n in names if n not in self._index]
        if not removed and not added:
            return
        for i in reversed(removed):
            self.mirror.remove_replica(i)
            if self.events is not None:
                self.events.remove_replica(i)
        fleet_rate = self._fleet_estimator.seconds_per_token
        new_of = {o: k for k, o in enumerate(survivors)}
        states = [self.replicas[i] for i in survivors]
        queues = [self._queues[i] for i in survivors]
        for n in added:
            self.mirror.add_replica(self._default_capacity)
            if self.events is not None:
                self.events.add_replica()
            states.append(ReplicaState(n, 0, prefill_seconds_per_token=fleet_rate, cache_capacity_blocks=self._default_capacity))
            queues.append(_Queue(estimator=PrefillTimeEstimator(fleet_rate, self.options.prefill_learning_rate, self.options.prefill_intercept, self.options.prefill_decoding)))
        for k, s in enumerate(states):
            s._index = k
        self._mirror_version += 1
        orphans: list[_Entry] = []
        size = len(states)
        for e in self._entries.values():
            if e.state == _UNPLACED:
                continue
            if e.replica >= 0 and e.replica not in new_of:  # its replica left
                if e.state == _QUEUED:  # its queue (heaps included) goes away with the replica
                    e.version += 1
                    e.state = _UNPLACED
                    self._queued_total -= 1
                    orphans.append(e)
                e.replica = -1
                continue
            if e.replica >= 0:
                e.replica = new_of[e.replica]
            e.alternate = new_of.get(e.alternate) if e.alternate is not None else None
            if e.cached is not None:
                c = np.zeros(size, dtype=np.int64)
                c[: len(survivors)] = e.cached[survivors]
                e.cached = c
        self.replicas = tuple(states)
        self._queues = queues
        self._index = {s.name: s.index for s in states}
        self.policy.on_membership([s.name for s in states])
        pending = sorted(self._unplaced + orphans, key=lambda e: e.seq)
        self._unplaced = []
        if not states:
            self._unplaced = pending
            return
        for e in pending:
            self._place(e)

    def ttft_prediction_error(self) -> tuple[float, float] | None:
        """P50 and P90 of |predicted - observed| TTFT over the last `PREDICTION_WINDOW` first
        tokens: predicted when the request was queued (again after a migration), observed from
        submit (for a retry: from its arrival) to first token."""
        if not self._prediction_errors:
            return None
        p50, p90 = np.percentile(np.fromiter(self._prediction_errors, float), [50, 90])
        return float(p50), float(p90)

    def next_wakeup(self, now: float) -> float | None:
        """`now + dispatch_interval` while requests are queued, else no timer."""
        return now + self.options.dispatch_interval if self._queued_total else None

    # ---- introspection ----------------------------------------------------------------------

    @property
    def replica_names(self) -> list[ReplicaId]:
        """The replicas in index order (the order `replicas` and the mirror use)."""
        return [s.name for s in self.replicas]

    @property
    def queued(self) -> int:
        """Requests waiting in the router (placed or not)."""
        return self._queued_total + len(self._unplaced)

    # ---- internals --------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        if now > self.now:
            self.now = now
            if self.events is not None:
                self.events.advance(now)

    def _place(self, e: _Entry) -> None:
        n = len(self.replicas)
        self.policy.advance(self.now)
        choice = self.policy.choose(e.req, self._view)
        if not isinstance(choice, Choice) or not 0 <= choice.replica < n:
            raise PolicyContractError(
                f"policy {type(self.policy).__name__} chose {choice!r} for {e.req.request_id!r}; "
                f"expected a Choice with replica in [0, {n})"
            )
        r = int(choice.replica)
        alt = None if choice.alternate is None else int(choice.alternate)
        if alt is not None and (not 0 <= alt < n or alt == r):
            alt = None
        if e.req.affinity_hint is not None:
            choice, r, alt = self._honour_hint(e.req.affinity_hint, choice, r, alt)
        e.alternate = alt
        branch = choice.branch if choice.branch in BRANCHES else "fallback"
        self.decisions[branch] += 1
        self._enqueue(e, r, branch, self.cached_blocks(e.req).copy())
        self.policy.on_choice(e.req, choice, self._view)

    def _honour_hint(self, hint: ReplicaId, choice: Choice, r: int, alt: int | None) -> tuple[Choice, int, int | None]:
        """The placement with a request's affinity hint applied: the hinted replica when it is a
        member and not hot (the policy's choice becomes its alternate), else the policy's choice."""
        h = self._index.get(hint)
        if h is None:
            self.hints["unknown"] += 1
        elif h == r:
            self.hints["same"] += 1
        elif self._hot(h, self.now):
            self.hints["hot"] += 1
        else:
            self.hints["honoured"] += 1
            return Choice(h, r, "affinity", choice.note), h, r
        return choice, r, alt

    def _enqueue(self, e: _Entry, r: int, branch: str, cached: np.ndarray) -> None:
        req = e.req
        e.state = _QUEUED
        e.replica = r
        e.branch = branch
        e.cached = cached
        e.cost = self._uncached(req, int(cached[r]))
        s = self.replicas[r]
        s._queued_requests += 1
        s._queued_tokens += e.cost
        self._queued_total += 1
        e.predicted = (self.now - e.submitted_at) + self.replica_ttft(r)
        q = self._queues[r]
        v = e.version
        order = self.options.queue_order
        rank = e.cost if order == "cheapest" else -int(cached[r]) if order == "cached" else 0
        heapq.heappush(q.order, (-req.priority, rank, req.arrival, e.seq, v, e))
        heapq.heappush(q.aged, (req.arrival, e.seq, v, e))
        if self.policy.migrates:
            alt = e.alternate
            move = self._uncached(req, int(cached[alt])) - e.cost if alt is not None else req.prompt_tokens
            heapq.heappush(q.moves, (move, e.seq, v, e))

    def _dequeue(self, e: _Entry) -> None:
        """Take a queued entry out of its replica's queue (its heap items become stale)."""
        s = self.replicas[e.replica]
        s._queued_requests -= 1
        s._queued_tokens -= e.cost
        self._queued_total -= 1
        e.version += 1
        self._stale += 3 if self.policy.migrates else 2

    def _count_in_flight(self, e: _Entry, r: int, sign: int) -> None:
        """Add (sign +1) or take back (-1) a dispatched entry's share of replica r's in-flight
        requests and, before its first token, its un-prefilled requests and tokens."""
        s = self.replicas[r]
        if e.state == _DISPATCHED:
            s._unprefilled_requests += sign
            s._unprefilled_tokens += sign * e.cost
        s._inflight_requests += sign

    def _dispatch(self, e: _Entry, r: int, now: float, out: list[Dispatch]) -> None:
        s = self.replicas[r]
        self._dequeue(e)
        cached = int(self.cached_blocks(e.req)[r])
        e.cost = self._uncached(e.req, cached)
        e.state = _DISPATCHED
        e.dispatched_at = now
        e.ahead = s.unprefilled_tokens + e.cost
        e.decoding = s.decoding_requests
        self._count_in_flight(e, r, +1)
        if self.events is not None and e.req.engine_keys is not None:
            self._compare(e.req, r, s.name)
            self.events.record_dispatch(r, e.req.engine_keys, now)
        if len(e.req.block_hashes):
            e.mirror_held = cached if self._predicted_mirror_matches(e.req) else int(self.mirror.match(e.req.block_hashes)[r])
            self.mirror.insert(r, e.req.block_hashes)
            self._mirror_version += 1
        e.cached = None
        self.policy.on_dispatch(e.req, r, self._view)
        out.append(Dispatch(e.req.request_id, s.name, e.branch, max(0, e.req.prompt_tokens - e.cost)))

    def _compare(self, req: RoutingRequest, r: int, name: ReplicaId) -> None:
        """Count, before the dispatch is recorded, what each mirror says `r` has cached of `req`."""
        assert self.events is not None and req.engine_keys is not None
        c = self.cache_comparison.get(name)
        if c is None:
            c = self.cache_comparison[name] = CacheComparison()
        c.dispatches += 1
        c.prompt_tokens += req.prompt_tokens
        c.predicted_tokens += min(req.prompt_tokens, int(self.mirror.match(req.block_hashes)[r] * self._tpb))
        c.events_tokens += min(req.prompt_tokens, int(self.events.observed_match(req.engine_keys)[r]) * req.engine_block_size)

    def _oldest_wait(self, q: _Queue, now: float) -> float:
        aged = q.aged
        while aged and not _live(aged[0]):
            heapq.heappop(aged)
            self._stale -= 1
        return now - aged[0][0] if aged else 0.0

    def _waited_too_long(self, r: int, now: float) -> bool:
        return bool(self.replicas[r].queued_requests) and self._oldest_wait(self._queues[r], now) >= self.options.hot_wait_s

    def _hot(self, h: int, now: float) -> bool:
        return self.replica_ttft(h) > self.options.slo_ttft or self._waited_too_long(h, now)

    def _migrate(self, now: float) -> None:
        scan = self.options.migration_scan
        for h, q in enumerate(self._queues):
            if not self.replicas[h].queued_requests or not self._hot(h, now):
                continue
            kept: list[tuple] = []
            examined = 0
            while q.moves and examined < scan and self.replicas[h].queued_requests:
                item = heapq.heappop(q.moves)
                if not _live(item):
                    self._stale -= 1
                    continue
                examined += 1
                e: _Entry = item[-1]
                target = self._migration_target(e, h, now)
                if target is None:
                    kept.append(item)  # no move would help, or it would only move the hotspot
                    continue
                self._stale -= 1  # the popped moves item
                self._dequeue(e)
                e.alternate = h
                assert e.cached is not None  # set when it was queued
                self._enqueue(e, target, "migration", e.cached)
                self.policy.on_migrate(e.req, h, target, self._view)
                self.decisions["migration"] += 1
                self.migrations += 1
                if not self._hot(h, now):
                    break
            for item in kept:
                heapq.heappush(q.moves, item)

    def _migration_target(self, e: _Entry, h: int, now: float) -> int | None:
        """Where queued entry `e` on hot replica h should move: under each of the policy's
        `migration_work_limits` in turn, its alternate, else (policies with
        `migrates_to_neighbours`) the neighbour with the lowest predicted TTFT; None when no
        move lowers its predicted TTFT without turning its target hot."""
        assert e.cached is not None
        for limit in self.policy.migration_work_limits:
            tried = None
            if e.alternate is not None and e.alternate != h:
                tried = e.alternate
                if self._helps(e, h, tried, now, limit):
                    return tried
                if not self.policy.migrates_to_neighbours:
                    continue
            best = self._lowest_ttft(e, h, limit)
            if best is not None and best != tried and self._helps(e, h, best, now, limit):
                return best
        return None

    def _helps(self, e: _Entry, h: int, target: int, now: float, limit: float) -> bool:
        """Moving e from h to target keeps within the work limit, lowers e's predicted TTFT and
        does not make target hot; a move that adds prompt work to the fleet must also predict
        its TTFT within the policy's `migration_added_work_slo_share` of the SLO."""
        assert e.cached is not None
        here, there = self._uncached(e.req, int(e.cached[h])), self._uncached(e.req, int(e.cached[target]))
        if not _within_work_limit(there, here, limit):
            return False
        after = self._ttft_with(target, there)
        if not (after < self.replica_ttft(h) and after <= self.options.slo_ttft and not self._waited_too_long(target, now)):
            return False
        return there <= here or after <= self.policy.migration_added_work_slo_share * self.options.slo_ttft

    def _lowest_ttft(self, e: _Entry, h: int, limit: float) -> int | None:
        """The replica other than h, within the work limit, where e's predicted TTFT is lowest."""
        assert e.cached is not None
        here = self._uncached(e.req, int(e.cached[h]))
        best, best_t = None, math.inf
        for i in range(len(self.replicas)):
            if i == h:
                continue
            there = self._uncached(e.req, int(e.cached[i]))
            if not _within_work_limit(there, here, limit):
                continue
            t = self._ttft_with(i, there)
            if t < best_t:
                best, best_t = i, t
        return best

    def _purge(self) -> None:
        """Drop stale heap items (lazy deletion leftovers) from every queue."""
        for q in self._queues:
            q.order = [it for it in q.order if _live(it)]
            q.aged = [it for it in q.aged if _live(it)]
            q.moves = [it for it in q.moves if _live(it)]
            heapq.heapify(q.order)
            heapq.heapify(q.aged)
            heapq.heapify(q.moves)
        self._stale = 0
