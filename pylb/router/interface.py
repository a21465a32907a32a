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

and, independently of requests:

    on_metrics(replica, m, now)       a scrape of the replica's /metrics (every scrape interval)
    on_membership(replicas, now)      the set of replicas changed (first call: the initial set)

A driver never calls two methods at once (no locking needed) and never passes a `now` smaller
than the previous call's. Replicas are named by strings (the simulator uses "replica-0", ...;
the proxy uses the replica's base URL). Routers are created by name through
`pylb.router.registry` with a `RouterOptions`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

ReplicaId = str
"""A replica's name: "replica-3" in the simulator, its base URL in the live proxy."""

DEFAULT_BLOCK_CHARS = 64
"""Bytes of prompt text per router hash block (about 16 tokens at 4 bytes per token).

The router hashes the prompt text with `pylb.native.block_hashes(text_bytes, block_chars)`.
(To move to pylb/config.py, the one home of defaults, when that module exists.)"""


@dataclass(slots=True)
class RoutingRequest:
    """A request as the router sees it: no text, only what routing needs.

    Attributes:
        request_id: unique among requests in flight.
        block_hashes: chained hashes of the prompt text in blocks of `DEFAULT_BLOCK_CHARS` bytes
            (`pylb.native.block_hashes(prompt_bytes, 64)`, numpy uint64, one per full block).
            Two requests share their first k hashes exactly when their texts share the first k
            blocks.
        prompt_tokens: (estimated) prompt length in tokens.
        max_tokens: tokens the client asked for at most.
        arrival: time the request reached the router (driver clock, seconds).
        model: requested model name ("" when not known).
        stream: whether the client streams the response.
        priority: larger is more urgent (0 by default).
    """

    request_id: str
    block_hashes: np.ndarray
    prompt_tokens: int
    max_tokens: int
    arrival: float
    model: str = ""
    stream: bool = True
    priority: int = 0


class Dispatch(NamedTuple):
    """A routing decision returned by `Router.poll`: send `request_id` to `replica` now."""

    request_id: str
    replica: ReplicaId


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


@dataclass(slots=True)
class RouterOptions:
    """Settings every router factory receives (policies read what they need, ignore the rest).

    Attributes:
        slo_ttft: the TTFT target in seconds (DualMap's SLO-aware switch uses it).
        seed: seed for any randomness, so that runs are reproducible.
        block_chars: bytes per router hash block (what `RoutingRequest.block_hashes` uses).
        extra: policy-specific settings by name.
    """

    slo_ttft: float = 5.0
    seed: int = 0
    block_chars: int = DEFAULT_BLOCK_CHARS
    extra: dict[str, object] = field(default_factory=dict)


class Router(ABC):
    """The router contract (see the module docstring for the call sequence).

    Subclasses implement `submit` and `poll`; the event hooks default to doing nothing, and
    `next_wakeup` to "no timer". Every method is synchronous, does no I/O, and uses `now` as
    the only clock.
    """

    @abstractmethod
    def submit(self, request: RoutingRequest, now: float) -> None:
        """Accept a new request.

        Called by the driver once per request, when it arrives (simulator: at the request's
        scaled arrival time; proxy: when the HTTP request has been parsed). The router queues
        it; it is sent only when a later `poll` returns a `Dispatch` for it.
        """

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
