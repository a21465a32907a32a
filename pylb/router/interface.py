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

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import numpy as np

ReplicaId = str
"""A replica's name: "replica-3" in the simulator, its base URL in the live proxy."""

DEFAULT_BLOCK_CHARS = 64
"""Bytes of prompt text per router hash block (about 16 tokens at 4 bytes per token): the default
of `RouterOptions.block_chars`, the block size the router expects `RoutingRequest.block_hashes`
to use."""

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
    """

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


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


@dataclass(slots=True)
class RouterOptions:
    """Settings every router receives: the one place their defaults are written.

    Policies read what they need and ignore the rest; the core router (`pylb.router.core`)
    reads the dispatch, estimator, mirror and migration settings. Invalid values raise
    `ValueError` naming the field, the value and the reason when the options are built.

    Attributes:
        slo_ttft: the TTFT target in seconds (DualMap's SLO-aware switch uses slo_ttft / 2;
            hotspot detection uses slo_ttft).
        seed: seed for any randomness, so that runs are reproducible.
        block_chars: bytes per router hash block (what `RoutingRequest.block_hashes` uses).
        chars_per_token: bytes of prompt text per token, for converting router blocks to
            tokens (4: pylb's simulated tokenizer, and about right for English BPE text).
        key_block_tokens: tokens per key block of the prefix key (DualMap: 512). Must be a
            whole number of router blocks: key_block_tokens * chars_per_token % block_chars == 0.
        max_unprefilled_tokens: dispatch budget per replica: a queued request is sent only while
            the replica's un-prefilled tokens in flight (dispatched, no first token yet) are
            below this. 8192 = one full chunked-prefill step of vLLM's default
            max_num_batched_tokens, so the engine always has a step of prefill to run, while the
            rest waits in the router where it can be ordered and migrated. Chosen by measurement
            (BENCHMARKS.md, "Dispatch limits"): 2k-8k tie; 16k and more lose 1-10 points of SLO
            attainment near capacity on Mooncake.
        max_unprefilled_requests: dispatch budget per replica in requests, as above (16: lets
            short prompts batch; a gate of 1, DualMap's own, is the best on Mooncake's long
            prompts but raises P99 TTFT 7x on the Azure trace's short ones). A replica with
            nothing un-prefilled always takes its next queued request, whatever its size.
        queue_order: how a replica's router queue is ordered after priority: "cheapest"
            (fewest uncached prompt tokens first: shortest prefill first, which a TTFT
            percentile target rewards), "cached" (longest cached prefix first, DESIGN.md §4's
            first order) or "fifo" (arrival only). Chosen by measurement (BENCHMARKS.md).
        starvation_s: a queued request that has waited this long is dispatched next on its
            replica whatever its rank (oldest first), so no request waits forever behind a
            stream of cheaper ones.
        dispatch_interval: seconds between the core's timer polls while requests are queued
            (the timer re-checks dispatch and hotspots even when no event arrives).
        hot_wait_s: a replica is hot when its oldest queued request has waited this long
            (DualMap: 3 s), or when its predicted TTFT exceeds slo_ttft.
        migration_scan: most queued requests examined per hot replica per poll when migrating
            (bounds the work of one poll; the cheapest are examined first).
        prefill_seconds_per_token: seed of the learned per-token prefill time, before any
            TTFT is observed (1e-4 s: between an 8B model on an H100, ~4e-5, and DualMap's
            Ascend 910B figure, 1.6e-4).
        prefill_learning_rate: weight of each new observation in the estimator's decayed sums
            (0 < rate <= 1; 0.05 forgets the seed after ~60 first tokens).
        cache_capacity_tokens: the cache mirror's capacity per replica until the replica's
            `vllm:cache_config_info` is scraped (then block_size * num_gpu_blocks).
        extra: policy-specific settings by name (each policy documents and validates its own).
    """

    slo_ttft: float = 5.0
    seed: int = 0
    block_chars: int = DEFAULT_BLOCK_CHARS
    chars_per_token: int = 4
    key_block_tokens: int = 512
    max_unprefilled_tokens: int = 8192
    max_unprefilled_requests: int = 16
    queue_order: str = "cheapest"
    starvation_s: float = 30.0
    dispatch_interval: float = 0.05
    hot_wait_s: float = 3.0
    migration_scan: int = 16
    prefill_seconds_per_token: float = 1.0e-4
    prefill_learning_rate: float = 0.05
    cache_capacity_tokens: int = 262_144
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.queue_order not in QUEUE_ORDERS:
            raise ValueError(f"RouterOptions.queue_order must be one of {', '.join(QUEUE_ORDERS)}, got {self.queue_order!r}")
        for name in ("slo_ttft", "dispatch_interval", "hot_wait_s", "prefill_seconds_per_token", "starvation_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"RouterOptions.{name} must be a positive number, got {v!r}")
        for name in ("block_chars", "chars_per_token", "key_block_tokens", "max_unprefilled_tokens",
                     "max_unprefilled_requests", "migration_scan"):  # fmt: skip
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"RouterOptions.{name} must be a positive integer, got {v!r}")
        v = self.cache_capacity_tokens
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"RouterOptions.cache_capacity_tokens must be an integer >= 0, got {v!r}")
        v = self.prefill_learning_rate
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"RouterOptions.prefill_learning_rate must be in (0, 1], got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"RouterOptions.seed must be an integer, got {self.seed!r}")
        if (self.key_block_tokens * self.chars_per_token) % self.block_chars:
            raise ValueError(
                f"RouterOptions.key_block_tokens must be a whole number of router blocks: {self.key_block_tokens} tokens x "
                f"{self.chars_per_token} bytes is not a multiple of block_chars={self.block_chars}"
            )
        if not isinstance(self.extra, dict):
            raise ValueError(f"RouterOptions.extra must be a dict, got {type(self.extra).__name__}")

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
    """

    __slots__ = ("_name", "_index", "_queued_requests", "_queued_tokens", "_inflight_requests", "_unprefilled_requests",
                 "_unprefilled_tokens", "_metrics", "_metrics_at", "_prefill_seconds_per_token", "_cache_capacity_blocks")  # fmt: skip

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

    @abstractmethod
    def submit(self, request: RoutingRequest, now: float) -> None:
        """Accept a new request.

        Called by the driver once per request, when it arrives (simulator: at the request's
        scaled arrival time; proxy: when the HTTP request has been parsed). The router queues
        it; it is sent only when a later `poll` returns a `Dispatch` for it. Raises ValueError
        for a request it cannot take (an id it still tracks; hashes made with other parameters
        than its own, `RouterOptions.check_hashing`).
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

    def next_wakeup(self, now: float) -> float | None:
        """The next time the router wants `poll` called even if no event happens, or None.

        Called by the driver after each `poll`. A returned time must be later than `now`
        (anything else is ignored); the driver may poll earlier, on events, and asks again after
        every poll. Routers with a dispatch timer return its next expiry.
        """
        return None
