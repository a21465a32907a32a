"""The router interface: the one contract between pylb's router and the drivers that feed it.

Design (DESIGN.md §2)
---------------------
A router is one synchronous object with no I/O that never reads the clock: every call takes
`now` (seconds, on the driver's clock: virtual time in the simulator, a monotonic clock in the
live proxy). Two drivers call it, with the same sequence of events:

    pylb.sim.cluster   discrete-event simulator, virtual time, simulated vLLM engines
    pylb.proxy         asyncio HTTP proxy, real time, real or fake vLLM replicas

The life of a request, as the driver sees it:

    submit(req, now)                  the request arrived at the router
    poll(now) -> [Dispatch, ...]      the driver asks which queued requests to send where, and
                                      sends them; it polls after every event it delivers and
                                      at the time next_wakeup(now) asks for
    on_first_token(id, replica, now)  the replica produced the request's first token
    on_complete(id, replica, now, u)  the request finished (u: usage), or failed (u is None)
    retry(req, failed_replica, now)   its attempt failed before the client got a byte: place it
                                      again (after on_complete(..., None) for the attempt)
    cancel(id, now) -> bool           the client left while it was queued: withdraw it (False:
                                      the router cannot, and the driver completes it with usage
                                      None when it is dispatched)

and, independently of requests:

    on_metrics(replica, m, now)       a scrape of the replica's /metrics (every scrape interval)
    on_membership(replicas, now)      the set of replicas changed (first call: the initial set)
    on_kv_event(replica, kind, keys, now)  a KV-cache event of a replica's engine (stored,
                                      removed, cleared), for routers with cache_state "events"

and, to read, never to write: `view`, the router's `RouterView` (per replica: requests queued,
in flight and un-prefilled, the learned per-token prefill time, the last scrape; per request:
the predicted TTFT and the cache match). Policies get the same view, and nothing else of the
router.

A driver never calls two methods at once (no locking needed) and never passes a `now` smaller
than the previous call's. Replicas are named by strings (the simulator uses "replica-0", ...;
the proxy uses the replica's base URL). Routers are created by name through
`pylb.router.registry` with a `RouterOptions`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

from pylb.fields import SettingError, at_least, check_fields, fraction, one_of, positive, setting

ReplicaId = str
"""A replica's name: "replica-3" in the simulator, its base URL in the live proxy."""

DEFAULT_BLOCK_CHARS = 64
"""Bytes of prompt text per router hash block (about 16 tokens at 4 bytes per token): the default
of `RouterOptions.block_chars`, the block size the router expects `RoutingRequest.block_hashes`
to use."""

DEFAULT_SLO_TTFT = 5.0
"""The TTFT target in seconds (`RouterOptions.slo_ttft`; the simulator's reports use it too)."""

BYTES_PER_TOKEN = 4
"""Bytes of UTF-8 prompt text per estimated token: the router's tokenizer-free estimate
(`RouterOptions.chars_per_token`, the proxy's request model), and pylb's simulated tokenizer
(`pylb.workload.types`)."""

TOKEN_ID_BYTES = 4
"""Bytes of one token id when a token-id prompt is hashed (ids are hashed as uint32 values), so
a token-id prompt is hashed `block_chars // TOKEN_ID_BYTES` ids per block: the same bytes per
block as text."""


@dataclass(frozen=True, slots=True)
class BlockHashing:
    """How a request's block hashes were made: `pylb.native.block_hashes(prompt, block_size, seed)`
    over the prompt's UTF-8 bytes (`unit` "bytes") or over its token ids as uint32 values (`unit`
    "tokens"). Hashes made with other parameters name other blocks, so a router refuses a request
    whose hashing is not the one its `RouterOptions.block_chars` implies (`RouterOptions.hashing`).

    Attributes:
        block_size: bytes (unit "bytes") or token ids (unit "tokens") per block.
        unit: "bytes" or "tokens".
        seed: the hash seed (pylb always hashes with 0).
    """

    block_size: int = DEFAULT_BLOCK_CHARS
    unit: str = "bytes"
    seed: int = 0

    @classmethod
    def text(cls, block_chars: int) -> BlockHashing:
        """The hashing of a text prompt in blocks of `block_chars` bytes."""
        return cls(block_chars, "bytes")

    @classmethod
    def token_ids(cls, block_chars: int) -> BlockHashing:
        """The hashing of a token-id prompt for a router of `block_chars`-byte blocks."""
        return cls(max(1, block_chars // TOKEN_ID_BYTES), "tokens")

    def describe(self) -> str:
        """E.g. "64-byte blocks" or "16-token-id blocks", with the seed when it is not 0."""
        what = f"{self.block_size}-byte blocks" if self.unit == "bytes" else f"{self.block_size}-token-id blocks"
        return what if self.seed == 0 else f"{what}, seed {self.seed}"


TEXT_HASHING = BlockHashing()
"""The default hashing: text in `DEFAULT_BLOCK_CHARS`-byte blocks, seed 0."""


@dataclass(slots=True)
class RoutingRequest:
    """A request as the router sees it: no text, only what routing needs.

    Attributes:
        request_id: unique among requests in flight.
        block_hashes: chained hashes of the prompt in blocks (`hashing` says how they were made:
            by default `pylb.native.block_hashes(prompt_bytes, 64)`), numpy uint64, one per full
            block. Two requests share their first k hashes exactly when their texts share the
            first k blocks.
        prompt_tokens: (estimated) prompt length in tokens.
        max_tokens: tokens the client asked for at most.
        arrival: time the request reached the router (driver clock, seconds).
        model: requested model name ("" when not known).
        stream: whether the client streams the response.
        priority: larger is more urgent (0 by default).
        prompt_hash: optional 64-bit hash of the whole prompt text
            (`pylb.native.xxh3_64(prompt_bytes)`), filled by whoever builds the request (the
            simulator, and the proxy's request model `pylb.router.request`, always). Routers
            use it only to key a prompt too short to have a single full block (fewer than
            `block_chars` bytes); it must be a pure function of the prompt (never of the
            request id), so that every router replica places the same prompt the same way.
            None when not known.
        hashing: the block size, unit and seed `block_hashes` were made with; the router refuses
            a request whose hashing differs from its own (`RouterOptions.hashing`).
        engine_keys: the prompt's engine-exact block keys (`pylb.router.engine_keys`: vLLM's
            block hashes as uint64, one per full block of `engine_block_size` tokens), or None.
            With `RouterOptions.cache_state` "events" the router matches them against the
            events-fed mirror; without them the request is matched on the predicted mirror.
        engine_block_size: tokens per engine block of `engine_keys` (0 when there are none).
        affinity_hint: a replica the caller would like (e.g. the semantic cache's: the replica
            that answered this request's nearest neighbour, which likely holds a shared prefix),
            or None. Advisory: the core honours it only when that replica is a member and not
            hot; otherwise the policy's own choice stands.
    """

    request_id: str
    block_hashes: np.ndarray
    prompt_tokens: int
    max_tokens: int
    arrival: float
    model: str = ""
    stream: bool = True
    priority: int = 0
    prompt_hash: int | None = None
    hashing: BlockHashing = TEXT_HASHING
    engine_keys: np.ndarray | None = None
    engine_block_size: int = 0
    affinity_hint: ReplicaId | None = None


class Dispatch(NamedTuple):
    """A routing decision returned by `Router.poll`: send `request_id` to `replica` now.

    `branch` says why this replica (`pylb.router.policy.BRANCHES`, "" when the router does not
    say) and `cached_tokens` how many prompt tokens the router expects the replica to have
    cached; drivers use both for metrics (decisions by branch, predicted hit rate).
    """

    request_id: str
    replica: ReplicaId
    branch: str = ""
    cached_tokens: int = 0


@dataclass(slots=True)
class Usage:
    """Token usage of a finished request, as vLLM reports it in the OpenAI `usage` object.

    Attributes:
        prompt_tokens: prompt length in tokens.
        completion_tokens: tokens generated.
        cached_tokens: prompt tokens served from the prefix cache when the request was first
            scheduled (`usage.prompt_tokens_details.cached_tokens`).
        reported: True when the replica reported these numbers; False when the driver estimated
            them (a stream that carried no `usage`). The core learns the replicas' tokens per
            estimated token only from reported usage.
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reported: bool = True


@dataclass(slots=True)
class ReplicaMetrics:
    """One scrape of a replica's `/metrics`, with vLLM's metric names in the comments.

    Counters are cumulative since the replica started, like Prometheus counters.

    Attributes:
        num_requests_running: `vllm:num_requests_running`.
        num_requests_waiting: `vllm:num_requests_waiting`.
        kv_cache_usage: `vllm:kv_cache_usage_perc`, a fraction in [0, 1] (blocks in use by
            requests / all blocks; cached but unreferenced blocks count as free).
        prefix_cache_queries: `vllm:prefix_cache_queries_total`, prompt tokens looked up (tokens).
        prefix_cache_hits: `vllm:prefix_cache_hits_total`, of those, tokens found cached.
        block_size: tokens per KV block (`vllm:cache_config_info{block_size}`).
        num_gpu_blocks: KV blocks (`vllm:cache_config_info{num_gpu_blocks}`).
        num_preemptions: `vllm:num_preemptions_total`.
        prompt_tokens: `vllm:prompt_tokens_total`.
        generation_tokens: `vllm:generation_tokens_total`.
    """

    num_requests_running: int
    num_requests_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    block_size: int
    num_gpu_blocks: int
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


QUEUE_ORDERS = ("cheapest", "cached", "fifo")
"""The values of `RouterOptions.queue_order`."""

CACHE_STATES = ("predicted", "events")
"""The values of `RouterOptions.cache_state`: the predicted LRU mirror of pylb's own dispatches,
or the replicas' KV-cache events (`pylb.router.event_mirror`)."""


@dataclass(slots=True)
class RouterOptions:
    """Settings every router receives: the one place their defaults are written.

    Policies read what they need and ignore the rest; the core router (`pylb.router.core`)
    reads the dispatch, estimator, mirror and migration settings. Each field is declared with
    `pylb.fields.setting` (default, help, check), and `pylb.config` derives pylb serve's router
    settings from these declarations. Invalid values raise `pylb.fields.SettingError` (a
    ValueError) naming the field ("RouterOptions.NAME" in `field`), the value and the reason
    when the options are built.

    Why these defaults:
        max_unprefilled_tokens: 8192 = one full chunked-prefill step of vLLM's default
            max_num_batched_tokens, so the engine always has a step of prefill to run while the
            rest waits in the router, where it can be ordered and migrated; chosen by measurement
            (BENCHMARKS.md, "Dispatch limits").
        max_unprefilled_requests: 16 lets short prompts batch; a gate of 1 (DualMap's own) suits
            long prompts and hurts short ones (BENCHMARKS.md).
        queue_order: "cheapest" (fewest uncached prompt tokens first: shortest prefill first,
            which a TTFT percentile target rewards), "cached" (longest cached prefix first,
            DESIGN.md §4's first order) or "fifo"; chosen by measurement (BENCHMARKS.md).
        prefill_seconds_per_token: 1e-4 s lies between an 8B model on an H100 and DualMap's
            Ascend 910B figure; prefill_learning_rate 0.05 forgets the seed after ~60 first tokens.
        extra: policy-specific settings by name (each policy declares and checks its own).
    """

    slo_ttft: float = setting(DEFAULT_SLO_TTFT, "TTFT target in seconds (DualMap's SLO-aware switch and hotspot detection use it)", check=positive)
    seed: int = setting(0, "seed for any randomness in the policy")
    block_chars: int = setting(DEFAULT_BLOCK_CHARS, "bytes of prompt text per router hash block (~16 tokens); token-id prompts use block_chars/4 ids", check=at_least(TOKEN_ID_BYTES))
    chars_per_token: int = setting(BYTES_PER_TOKEN, "bytes of prompt text per token, for converting router blocks to tokens", check=at_least(1))
    key_block_tokens: int = setting(64, "tokens per key block of DualMap's prefix key (its granularity; the deepest key is 8192 tokens at any size); a whole number of router blocks (x 4 bytes a multiple of block_chars)", check=at_least(1))
    max_unprefilled_tokens: int = setting(8192, "dispatch budget per replica: prompt tokens sent and not yet prefilled, at most", check=at_least(1))
    max_unprefilled_requests: int = setting(16, "dispatch budget per replica: requests sent and not yet prefilled, at most", check=at_least(1))
    queue_order: str = setting("cheapest", f"order of a replica's queue after priority: {', '.join(QUEUE_ORDERS)} (fewest uncached tokens, longest cached prefix, or arrival first)", check=one_of(*QUEUE_ORDERS))
    starvation_s: float = setting(30.0, "a request queued this long goes next on its replica, whatever its rank", check=positive)
    dispatch_interval: float = setting(0.05, "seconds between the router's timer polls while requests are queued", check=positive)
    admission_factor: float = setting(0.0, "admission control: refuse a request (`Overloaded`) when its predicted TTFT exceeds this x slo_ttft on every replica and none is idle; 0 admits everything", check=at_least(0))
    hot_wait_s: float = setting(3.0, "a replica is hot (its queue migrates) when its oldest queued request waited this long", check=positive)
    migration_scan: int = setting(16, "queued requests examined per hot replica per poll when migrating", check=at_least(1))
    prefill_seconds_per_token: float = setting(1.0e-4, "seed of a replica's per-token prefill time (s), until learned: the router's TTFT prediction and the proxy's non-streamed prefill estimate", check=positive)
    prefill_learning_rate: float = setting(0.05, "weight of each observed first token in the learned per-token prefill time", check=fraction)
    prefill_intercept: bool = setting(False, "learn a per-request TTFT constant beside the per-token prefill time (fit d = c + a x s, not through the origin)")
    prefill_decoding: bool = setting(False, "learn a TTFT cost per request decoding on the replica (fit d = a x s + k x u, k = requests past their first token in flight there)")
    cache_capacity_tokens: int = setting(262_144, "cache mirror capacity per replica (tokens) until vllm:cache_config_info is scraped", check=at_least(0))
    cache_state: str = setting(
        "predicted", f"what policies see of each replica's prefix cache: {' or '.join(CACHE_STATES)} (vLLM KV-cache events with engine-exact keys; see kv_events)", check=one_of(*CACHE_STATES)
    )
    events_grace_s: float = setting(5.0, "cache_state events: pylb's own dispatches count as cached this long (at least half of it) before the engine's events confirm them", check=positive)
    extra: dict[str, object] = setting({}, "policy-specific settings (a mapping; see the policy's module comment)")

    def __post_init__(self) -> None:
        check_fields(self, "RouterOptions")
        if (self.key_block_tokens * self.chars_per_token) % self.block_chars:
            raise SettingError(
                "RouterOptions.key_block_tokens",
                self.key_block_tokens,
                f"must be a whole number of router blocks: {self.key_block_tokens} tokens x {self.chars_per_token} bytes "
                f"is not a multiple of block_chars={self.block_chars}",
            )

    @property
    def tokens_per_block(self) -> float:
        """Tokens per router hash block (block_chars / chars_per_token; 16 by default)."""
        return self.block_chars / self.chars_per_token

    def hashing(self, token_ids: bool = False) -> BlockHashing:
        """The hashing the router expects of a text prompt (of a token-id prompt: `token_ids`)."""
        return BlockHashing.token_ids(self.block_chars) if token_ids else BlockHashing.text(self.block_chars)

    def check_hashing(self, request: RoutingRequest) -> None:
        """Raise ValueError when `request.hashing` is not what these options expect."""
        h = request.hashing
        if h != self.hashing(h.unit == "tokens"):
            raise ValueError(
                f"request {request.request_id!r} was hashed in {h.describe()}, but this router works in "
                f"{self.hashing(h.unit == 'tokens').describe()} (RouterOptions.block_chars={self.block_chars}): "
                "hash the prompt with the router's block size"
            )

    @property
    def blocks_per_key_block(self) -> int:
        """Router blocks per key block of the prefix key (32 by default)."""
        return self.key_block_tokens * self.chars_per_token // self.block_chars


class ReplicaState:
    """What the router knows about one replica, read-only: written only by the router core.

    Policies read it in `RouterView.replicas`, drivers through `Router.view` (the live proxy's
    in-flight gauges and prefill estimate). The core writes the underscore fields; nothing else
    does, so there is one copy of each number.

    Attributes:
        name: the replica's id (simulator "replica-3"; proxy: base URL).
        index: position in `RouterView.replicas` (and in the cache mirror).
        queued_requests: requests waiting in the router's queue for this replica.
        queued_tokens: uncached prompt tokens of those (what they will cost to prefill).
        inflight_requests: dispatched to the replica and not yet complete.
        unprefilled_requests: dispatched, first token not yet seen.
        unprefilled_tokens: uncached prompt tokens of those.
        metrics: the last scrape of the replica's /metrics (None before the first).
        metrics_at: when that scrape was delivered (driver clock).
        prefill_seconds_per_token: the core's learned per-token prefill time on this replica.
        cache_capacity_blocks: the mirror's capacity for it, in router blocks.
        ttft_intercept_s: the learned per-request constant of its TTFT (0 unless the
            `prefill_intercept` option is on).
        ttft_seconds_per_decoding: the learned TTFT cost of each request decoding on it (0
            unless the `prefill_decoding` option is on).
    """

    __slots__ = ("_name", "_index", "_queued_requests", "_queued_tokens", "_inflight_requests", "_unprefilled_requests",
                 "_unprefilled_tokens", "_metrics", "_metrics_at", "_prefill_seconds_per_token", "_cache_capacity_blocks",
                 "_ttft_intercept_s", "_ttft_seconds_per_decoding")  # fmt: skip

    def __init__(
        self,
        name: ReplicaId,
        index: int,
        queued_requests: int = 0,
        queued_tokens: int = 0,
        inflight_requests: int = 0,
        unprefilled_requests: int = 0,
        unprefilled_tokens: int = 0,
        metrics: ReplicaMetrics | None = None,
        metrics_at: float | None = None,
        prefill_seconds_per_token: float = 0.0,
        cache_capacity_blocks: int = 0,
    ) -> None:
        self._name = name
        self._index = index
        self._queued_requests = queued_requests
        self._queued_tokens = queued_tokens
        self._inflight_requests = inflight_requests
        self._unprefilled_requests = unprefilled_requests
        self._unprefilled_tokens = unprefilled_tokens
        self._metrics = metrics
        self._metrics_at = metrics_at
        self._prefill_seconds_per_token = prefill_seconds_per_token
        self._cache_capacity_blocks = cache_capacity_blocks
        self._ttft_intercept_s = 0.0
        self._ttft_seconds_per_decoding = 0.0

    name = property(lambda self: self._name, doc="The replica's id.")
    index = property(lambda self: self._index, doc="Position in `RouterView.replicas` and the mirror.")
    queued_requests = property(lambda self: self._queued_requests, doc="Requests in the router's queue for it.")
    queued_tokens = property(lambda self: self._queued_tokens, doc="Uncached prompt tokens of those.")
    inflight_requests = property(lambda self: self._inflight_requests, doc="Dispatched and not yet complete.")
    unprefilled_requests = property(lambda self: self._unprefilled_requests, doc="Dispatched, no first token yet.")
    unprefilled_tokens = property(lambda self: self._unprefilled_tokens, doc="Uncached prompt tokens of those.")
    metrics = property(lambda self: self._metrics, doc="The last scrape (None before the first).")
    metrics_at = property(lambda self: self._metrics_at, doc="When that scrape was delivered.")
    prefill_seconds_per_token = property(lambda self: self._prefill_seconds_per_token, doc="Learned per-token prefill time.")
    cache_capacity_blocks = property(lambda self: self._cache_capacity_blocks, doc="The mirror's capacity, in router blocks.")
    ttft_intercept_s = property(lambda self: self._ttft_intercept_s, doc="Learned per-request TTFT constant (0 unless `prefill_intercept`).")
    ttft_seconds_per_decoding = property(lambda self: self._ttft_seconds_per_decoding, doc="Learned TTFT cost per request decoding there (0 unless `prefill_decoding`).")

    @property
    def decoding_requests(self) -> int:
        """Requests in flight on the replica past their first token (decoding)."""
        return self._inflight_requests - self._unprefilled_requests

    @property
    def load(self) -> int:
        """Requests the replica owes: queued in the router plus in flight on it."""
        return self._queued_requests + self._inflight_requests

    @property
    def kv_cache_usage(self) -> float:
        """Last scraped `vllm:kv_cache_usage_perc` (fraction), 0.0 before the first scrape."""
        return self._metrics.kv_cache_usage if self._metrics is not None else 0.0

    def __repr__(self) -> str:
        fields = ", ".join(f"{f[1:]}={getattr(self, f)!r}" for f in self.__slots__)
        return f"ReplicaState({fields})"


class RouterView(Protocol):
    """The read-only view of a router's state: what policies read in `choose`, and drivers
    through `Router.view`. Nothing in it changes the router."""

    @property
    def now(self) -> float:
        """The latest `now` the router was given."""

    @property
    def options(self) -> RouterOptions:
        """The router's settings."""

    @property
    def replicas(self) -> Sequence[ReplicaState]:
        """The replicas in index order (the order of `cached_blocks` and of the mirror)."""

    def replica(self, name: ReplicaId) -> ReplicaState | None:
        """The replica named `name`, or None when it is not a member."""

    def cached_blocks(self, request: RoutingRequest) -> np.ndarray:
        """Per replica (by index), how many of the request's leading router blocks the cache
        mirror believes the replica holds (int64 array, len == len(replicas))."""

    def uncached_tokens(self, request: RoutingRequest, replica: int) -> int:
        """Prompt tokens the replica would have to prefill for this request (mirror estimate)."""

    def predicted_ttft(self, request: RoutingRequest, replica: int) -> float:
        """Predicted TTFT in seconds if the request were queued on `replica` now:
        (queued + un-prefilled + this request's uncached tokens) x learned per-token time."""

    def replica_ttft(self, replica: int) -> float:
        """Predicted TTFT on `replica` of a request with nothing to compute."""

    @property
    def token_ratio(self) -> float:
        """Replica tokens per estimated prompt token, learned from reported usage (1.0 before any)."""


class Overloaded(Exception):
    """`Router.submit` refuses a request that would wait hopelessly long (admission control,
    `RouterOptions.admission_factor`): the proxy answers 429 with `Retry-After`, the simulator
    counts the request as rejected.

    Attributes:
        predicted_ttft: the request's lowest predicted TTFT over the replicas, seconds.
        limit: the TTFT above which requests are refused (admission_factor x slo_ttft), seconds.
    """

    def __init__(self, predicted_ttft: float, limit: float) -> None:
        super().__init__(f"predicted time to first token {predicted_ttft:.1f} s on every replica, over the admission limit of {limit:.1f} s")
        self.predicted_ttft = predicted_ttft
        self.limit = limit


class Router(ABC):
    """The router contract (see the module docstring for the call sequence).

    Subclasses implement `submit`, `poll` and `view`; the event hooks default to doing
    nothing, `retry` to a plain `submit`, `cancel` to "cannot withdraw" and `next_wakeup` to "no
    timer". Every method is synchronous, does no I/O, and uses `now` as the only clock.
    """

    @property
    @abstractmethod
    def view(self) -> RouterView:
        """The router's read-only state (see `RouterView`); the same object for the router's life."""

    def on_kv_event(self, replica: ReplicaId, kind: str, keys: np.ndarray, now: float) -> None:  # noqa: B027 - optional hook
        """A KV-cache event of `replica`'s engine: `kind` "stored" or "removed" with the blocks'
        engine keys (uint64), or "cleared" (keys empty: the engine dropped its cache, or its event
        stream broke and pylb resyncs). Routers without an events mirror ignore it."""

    @abstractmethod
    def submit(self, request: RoutingRequest, now: float) -> None:
        """Accept a new request.

        Called by the driver once per request, when it arrives (simulator: at the request's
        scaled arrival time; proxy: when the HTTP request has been parsed). The router queues
        it; it is sent only when a later `poll` returns a `Dispatch` for it. Raises ValueError
        for a request it cannot take (an id it still tracks; hashes made with other parameters
        than its own, `RouterOptions.check_hashing`), and `Overloaded` for one its admission
        control refuses (the router then does not track it).
        """

    def retry(self, request: RoutingRequest, failed_replica: ReplicaId, now: float) -> None:
        """Place again a request whose attempt on `failed_replica` failed before any byte reached
        the client; the driver has called `on_complete(..., None)` for that attempt first.

        Called by the live proxy (same request id). A router may send it elsewhere than
        `failed_replica`; this default submits it again. Policies do not count a retried
        request a second time (it is the same request).
        """
        self.submit(request, now)

    def cancel(self, request_id: str, now: float) -> bool:
        """Withdraw a request that was submitted and not yet dispatched (its client left or its
        queue time ran out). Returns True when it was withdrawn; False when the router cannot
        withdraw it (this default) or does not hold it queued, and then the driver completes it
        with usage None, unsent, if it is dispatched later."""
        return False

    @abstractmethod
    def poll(self, now: float) -> list[Dispatch]:
        """Return the requests to send now, each with its replica, and forget them as queued.

        Called by the driver after every event it delivers (submit, first token, completion,
        metrics, membership) and at the time `next_wakeup` named. The driver sends each
        dispatch at once, in list order. A dispatch must name a replica of the current
        membership and a request that was submitted and not yet dispatched.
        """

    def reassign(self, request_id: str, replica: ReplicaId, now: float) -> bool:
        """A dispatched request is being served by `replica`, not by the replica it was
        dispatched to (a data plane in front of pylb tried its fallbacks, or pylb narrowed the
        choice to a subset after the dispatch): move its in-flight and un-prefilled accounting
        there. Returns True when moved; False when the router does not hold the request in
        flight, `replica` is not a member, or the router cannot move requests (this default),
        and then the driver keeps the accounting where it is."""
        return False

    def on_first_token(self, request_id: str, replica: ReplicaId, now: float) -> None:
        """The replica produced the request's first output token (its prefill is done).

        Called by the driver when the first token arrives (simulator: at the end of the engine
        step that finished the prefill; proxy: when the first streamed chunk arrives). Called at
        most once per request, before `on_complete`.
        """

    def on_complete(self, request_id: str, replica: ReplicaId, now: float, usage: Usage | None) -> None:
        """The request left the replica.

        Called by the driver once per dispatched request: when the replica finished it
        (`usage` is its token usage) or when it failed or was aborted (`usage` is None; e.g. the
        replica rejected it, the connection broke, the client went away).
        """

    def on_metrics(self, replica: ReplicaId, metrics: ReplicaMetrics, now: float) -> None:
        """A fresh scrape of the replica's metrics.

        Called by the driver for every replica every scrape interval (0.5 s by default in the
        simulator and the proxy). The values may lag the router's own in-flight accounting.
        """

    def on_membership(self, replicas: Sequence[ReplicaId], now: float) -> None:
        """The full, ordered list of live replicas (not a delta).

        Called by the driver before the first `submit` with the initial replicas, and again
        whenever replicas join or leave. Requests queued for a replica that left must be
        re-placed, not dropped.
        """

    def ttft_prediction_error(self) -> tuple[float, float] | None:
        """P50 and P90 of |predicted - observed| TTFT (seconds) over the router's recent first
        tokens, where observed is first token minus submit; None when the router does not
        predict, or has seen no first token yet."""
        return None

    def next_wakeup(self, now: float) -> float | None:
        """The next time the router wants `poll` called even if no event happens, or None.

        Called by the driver after each `poll`. A returned time must be later than `now`
        (anything else is ignored); the driver may poll earlier, on events, and asks again after
        every poll. Routers with a dispatch timer return its next expiry.
        """
        return None
