"""Engine model of one vLLM replica: paged KV cache with prefix caching, continuous batching.

Design
------
This is a step-by-step model of vLLM's V1 engine core (scheduler + KV cache manager), with the
model's forward pass replaced by a step-time formula. It is driven from outside, one step at a
time, so the same class runs under the discrete-event simulator (virtual time,
`pylb.sim.cluster`) and under the fake vLLM HTTP server (real time).

KV cache (vLLM V1 `KVCacheManager` / `BlockPool`):
  * `num_blocks` blocks of `block_size` tokens. A request holds ceil(computed tokens / block_size)
    blocks while it runs.
  * Automatic prefix caching: a *full* prompt block is identified by the chained hash of the
    prompt up to and including it. The engine takes these hashes from outside:
    `prompt_block_hashes(prompt_bytes, block_size)` = `pylb.native.block_hashes(prompt_bytes,
    4 * block_size)`, since a simulated token is 4 bytes of text (`BYTES_PER_TOKEN`). A block is
    entered in the cache when the step that computes it is scheduled (as vLLM does, so a request
    scheduled later in the same step can already hit it).
  * A new request's hit is the longest leading run of its block hashes found in the cache,
    capped at (num_tokens - 1) // block_size blocks: a fully cached prompt still recomputes its
    last token (vLLM's `max_cache_hit_length = num_tokens - 1`), losing that whole block.
  * Blocks nobody references sit in one free queue, least recently freed first; allocation
    takes from the head and evicts the cached hash of the block it takes (so cached blocks are
    evicted LRU, and blocks held by running requests never). A finishing request frees its
    blocks tail first, so a prefix's tail is evicted before its head (vLLM does the same).
  * Blocks of generated tokens, and a prompt's trailing partial block, are never cached
    (their text is not known here; the next turn of a conversation hits only its prompt part).

Scheduler (vLLM V1 `Scheduler.schedule`, FCFS):
  * Token budget `max_num_batched_tokens` per step. Running requests first, in order: each
    gets min(its remaining tokens, budget) (1 for a decoding request; a chunk for a prompt in
    chunked prefill). When its blocks cannot be allocated, the last running request is
    preempted (recompute: it frees all its blocks and goes back to the front of the waiting
    queue, keeping its generated tokens, which it recomputes on re-admission) until they can.
  * Then, if nobody was preempted in this step, waiting requests in order while the budget
    lasts and fewer than `max_num_seqs` run: prefix lookup, chunk = min(uncached tokens,
    budget), stop at the first request whose blocks cannot be allocated.
  * A step that completes a request's prompt (or its recompute) samples one token; so does
    every decode step. The first sampled token is the request's first token (TTFT ends at the
    step's end). A request finishes when it has `max_tokens` tokens (`ignore_eos` semantics).
  * Prefix-cache counters count tokens, as `vllm:prefix_cache_queries_total` and `_hits_total`
    do: at a new request's admission, queries += prompt tokens and hits += cached tokens.
    (Re-admissions after preemption are not counted, as vLLM counts them separately.)
    `usage.cached_tokens` is the hit at the first admission.

Step time (DESIGN.md §6): t = c0 + c_prefill * prefill_tokens + c_decode * decode_seqs
+ c_attn * context_tokens + c_prefill_attn * prefill_pairs, where prefill_tokens are prompt (or
recompute) tokens computed in the step, decode_seqs the requests decoding one token,
context_tokens the sum over scheduled requests of their KV length after the step, and
prefill_pairs the causal attention pairs of the prefill chunks (n*h + n*(n+1)/2 for n tokens
computed after h already computed or cached; `pylb.sim.profiles.prefill_pairs`). A profile with all costs zero gives zero-time
steps: each step still computes tokens, so a driver that loops on `step` always terminates.

Fused decode steps (simulator speed-up): `step(now, max_steps=K)` with K > 1 may return one
result that stands for up to K identical-in-shape decode steps: every running request decoding,
none finishing and none admissible from the waiting queue during them, enough free blocks for
all of them. Its duration is the exact sum of the K step times (the context grows by one token
per request per step). Such a result carries no first tokens and no finished requests (the step
that finishes a request is always returned alone), and it is cut short at the next step boundary
when a request is added or aborted in the middle of it, so fused and single stepping give the
same timeline. The real-time server steps one at a time (the default).

For the fake vLLM server (real time)
------------------------------------
* `engine.add_prompt(id, prompt_bytes, max_tokens, now)` (or `add_request` with your own
  token count and `prompt_block_hashes`); `RequestRejected` maps to HTTP 400 (vLLM rejects a
  prompt longer than the model/cache the same way).
* Loop: `res = engine.step(now)`; sleep `res.duration / speed`; then stream one token chunk per
  id in `res.sampled`, observe TTFT for `res.first_tokens`, and close the requests in
  `res.finished` with their `usage` (`cached_tokens` is `prompt_tokens_details.cached_tokens`).
  Skip ids you aborted meanwhile. Sleep until a request arrives when `has_work()` is False.
* Client disconnect: `engine.abort(id, now)` frees its blocks (they stay cached).
* `/metrics`: `metrics_snapshot(now)` gives the values of `vllm:num_requests_running`,
  `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`, `vllm:prefix_cache_queries_total`,
  `vllm:prefix_cache_hits_total`, `vllm:num_preemptions_total`, `vllm:prompt_tokens_total`,
  `vllm:generation_tokens_total` and the `block_size` / `num_gpu_blocks` labels of
  `vllm:cache_config_info` (see `pylb.router.interface.ReplicaMetrics`).
"""

from __future__ import annotations

import operator
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from functools import partial
from itertools import compress, islice, repeat, takewhile

import numpy as np

from pylb import native
from pylb.router.interface import ReplicaMetrics, Usage
from pylb.workload.types import BYTES_PER_TOKEN, tokens_in

from .profiles import Profile


_consume: Callable[[Iterable[Any]], None] = deque(maxlen=0).extend  # run an iterator for its side effects, at C speed
_not_none = partial(operator.is_not, None)
_minus_one = partial(operator.add, -1)
_plus_one = partial(operator.add, 1)


class RequestRejected(ValueError):
    """The engine cannot take this request (bad arguments, or longer than its whole KV cache)."""


def prompt_block_hashes(prompt: bytes, block_size: int) -> np.ndarray:
    """Engine block hashes of a prompt: one chained XXH3 hash per full block of `block_size` tokens.

    A simulated token is `BYTES_PER_TOKEN` (4) bytes of text, so this is
    `pylb.native.block_hashes(prompt, 4 * block_size)`.
    """
    return native.block_hashes(prompt, BYTES_PER_TOKEN * block_size)


def _hash_list(hashes: Sequence[int] | np.ndarray) -> list[int]:
    """Block hashes as Python ints, cut before the first repeated one (blocks after it are not cached)."""
    hl = hashes.tolist() if isinstance(hashes, np.ndarray) else [int(x) for x in hashes]
    if len(set(hl)) != len(hl):
        seen: set[int] = set()
        for i, h in enumerate(hl):
            if h in seen:
                return hl[:i]
            seen.add(h)
    return hl


@dataclass(slots=True)
class FinishedRequest:
    """A request that left the engine at the end of a step, with its usage."""

    request_id: str
    usage: Usage
    finish_reason: str = "length"


@dataclass(slots=True)
class StepResult:
    """What one call of `Engine.step` did; its events take effect at `start + duration`.

    Attributes:
        start: the `now` passed to `step`.
        duration: seconds the step (or the fused steps) takes.
        num_steps: engine iterations this result stands for (1, or more for fused decode
            steps; 0 when there was nothing to do).
        prefill_tokens, decode_seqs, context_tokens, prefill_pairs: the step-time inputs of the
            first iteration.
        sampled: ids of the requests that got new tokens: one each, or `num_steps` each for
            a fused result (streaming servers send one chunk per id).
        first_tokens: ids whose first token this step produced (TTFT ends at the step's end).
        finished: requests that finished in this step, with usage (their blocks are freed).
    """

    start: float
    duration: float
    num_steps: int
    prefill_tokens: int = 0
    decode_seqs: int = 0
    context_tokens: int = 0
    prefill_pairs: int = 0
    sampled: list[str] = field(default_factory=list)
    first_tokens: list[str] = field(default_factory=list)
    finished: list[FinishedRequest] = field(default_factory=list)

    @property
    def end(self) -> float:
        """Time at which the step's tokens and events exist: start + duration."""
        return self.start + self.duration


class _Req:
    """Engine-side state of one request."""

    __slots__ = (
        "rid",
        "prompt_len",
        "max_tokens",
        "hashes",
        "hash_list",
        "out",
        "computed",
        "blocks",
        "n_cached",
        "cached_tokens",
        "preemptions",
        "first_done",
        "running",
    )

    def __init__(self, rid: str, prompt_len: int, max_tokens: int, hashes: Sequence[int] | np.ndarray) -> None:
        self.rid = rid
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.hashes = hashes
        self.hash_list: list[int] | None = None  # python ints, made at first admission
        self.out = 0  # tokens generated so far
        self.computed = 0  # tokens whose KV is computed (or cached) in `blocks`
        self.blocks: list[int] = []
        self.n_cached = 0  # leading blocks already entered in (or taken from) the prefix cache
        self.cached_tokens = -1  # hit at first admission (-1: not admitted yet)
        self.preemptions = 0
        self.first_done = False
        self.running = False


class _Run:
    """A pending fused decode run: k steps starting at t0, step m (0-based) lasting a + b*m."""

    __slots__ = ("t0", "k", "a", "b", "end")

    def __init__(self, t0: float, k: int, a: float, b: float) -> None:
        self.t0 = t0
        self.k = k
        self.a = a
        self.b = b
        self.end = t0 + self.span(k)

    def span(self, m: int) -> float:
        """Duration of the first m steps: m*a + b*m*(m-1)/2."""
        return m * self.a + self.b * (m * (m - 1) // 2)

    def started_by(self, now: float) -> int:
        """How many of the k steps have started at or before `now` (0..k)."""
        dt = now - self.t0
        if dt < 0:
            return 0
        lo, hi = 1, self.k
        while lo < hi:  # smallest m in [1, k] whose start time t0 + span(m) is after now
            mid = (lo + hi) // 2
            if self.span(mid) <= dt:
                lo = mid + 1
            else:
                hi = mid
        return lo if self.span(lo) > dt else self.k


class Engine:
    """One simulated vLLM replica, driven one step at a time.

    Driving it (virtual or real time; `now` in seconds on the driver's clock):

        engine = Engine(profile)
        engine.add_request("r1", prompt_tokens, max_tokens, prompt_block_hashes(text, bs), now)
        while engine.has_work():
            res = engine.step(now)             # plans and applies one iteration
            ... wait res.duration (sleep, or advance virtual time) ...
            now = res.end                      # then deliver res.first_tokens / sampled / finished
        engine.abort("r1", now)                # client went away: frees its blocks
        engine.metrics_snapshot(now)           # vLLM /metrics values

    `step` applies the iteration's effects to the engine state at once and returns its
    duration and events, which the driver makes visible at `res.end`. Requests added or aborted
    while a step is in flight take effect at the next step, as in vLLM. Call `step` again
    no earlier than `busy_until`. Events of a request aborted while its step was in flight
    should be dropped by the driver.
    """

    def __init__(self, profile: Profile, name: str = "engine") -> None:
        self.profile = profile
        self.name = name
        self.block_size = profile.block_size
        self.num_blocks = profile.num_blocks
        self.max_num_seqs = profile.max_num_seqs
        self.max_num_batched_tokens = profile.max_num_batched_tokens
        # KV block pool (vLLM BlockPool): reference counts, cached hash per block, free queue.
        self._ref = [0] * self.num_blocks
        self._bhash: list[int | None] = [None] * self.num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self.kv_events: list[tuple[str, list[int], int | None]] | None = None
        """When a list: the prefix cache's changes are appended to it, as vLLM publishes them in KV
        events: ("stored", hashes, parent hash or None) and ("removed", hashes, None) (the fake
        server publishes and empties it after each step)."""
        # Requests.
        self._reqs: dict[str, _Req] = {}
        self._waiting: deque[_Req] = deque()
        self._running: list[_Req] = []
        self._run: _Run | None = None
        self._busy_until = float("-inf")
        # Counters (vLLM /metrics).
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0
        self.num_preemptions = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0

    # ---- driver API ------------------------------------------------------------------------

    @property
    def busy_until(self) -> float:
        """End time of the last step handed out (when the next `step` may start)."""
        return self._busy_until

    def has_work(self) -> bool:
        """True while any request is waiting or running (the driver should keep stepping)."""
        return bool(self._running or self._waiting)

    def next_step_time(self, now: float) -> float | None:
        """When the next step should start: max(now, busy_until) if there is work, else None."""
        if not self.has_work():
            return None
        return max(now, self._busy_until)

    def add_request(
        self,
        request_id: str,
        prompt_tokens: int,
        max_tokens: int,
        block_hashes: Sequence[int] | np.ndarray,
        now: float,
    ) -> None:
        """Queue a request (it joins the next step).

        Args:
            request_id: unique among the engine's requests in flight.
            prompt_tokens: prompt length in tokens (>= 1).
            max_tokens: tokens to generate (>= 1; generation never stops earlier).
            block_hashes: the prompt's full-block hashes, `prompt_block_hashes(prompt, block_size)`;
                at most prompt_tokens // block_size of them (further blocks are not cacheable).
            now: current time (cuts a fused decode run short at the next step boundary).

        Raises RequestRejected for a duplicate id, bad lengths, or a request whose prompt plus
        output cannot fit in the whole KV cache.
        """
        if request_id in self._reqs:
            raise RequestRejected(f"request {request_id!r} is already in the engine")
        if prompt_tokens < 1:
            raise RequestRejected(f"request {request_id!r}: prompt_tokens must be >= 1, got {prompt_tokens}")
        if max_tokens < 1:
            raise RequestRejected(f"request {request_id!r}: max_tokens must be >= 1, got {max_tokens}")
        if len(block_hashes) > prompt_tokens // self.block_size:
            raise RequestRejected(
                f"request {request_id!r}: {len(block_hashes)} block hashes for a prompt of {prompt_tokens} tokens "
                f"(at most {prompt_tokens // self.block_size} blocks of {self.block_size})"
            )
        capacity = self.num_blocks * self.block_size
        if prompt_tokens + max_tokens > capacity:
            raise RequestRejected(
                f"request {request_id!r}: prompt_tokens + max_tokens = {prompt_tokens + max_tokens} exceeds "
                f"the KV cache ({capacity} tokens)"
            )
        self._cut(now)
        req = _Req(request_id, prompt_tokens, max_tokens, block_hashes)
        self._reqs[request_id] = req
        self._waiting.append(req)

    def add_prompt(self, request_id: str, prompt: bytes, max_tokens: int, now: float) -> int:
        """`add_request` for a prompt given as text bytes (what the fake HTTP server has).

        Counts tokens as `tokens_in(len(prompt))` (4 bytes per token, rounded up) and hashes
        the prompt with `prompt_block_hashes`. Returns the prompt's token count.
        """
        tokens = max(1, tokens_in(len(prompt)))
        self.add_request(request_id, tokens, max_tokens, prompt_block_hashes(prompt, self.block_size), now)
        return tokens

    def abort(self, request_id: str, now: float) -> bool:
        """Remove a request and free its blocks (client disconnect). False if it is not here."""
        req = self._reqs.get(request_id)
        if req is None:
            return False
        self._cut(now)
        del self._reqs[request_id]
        if req.running:
            self._running.remove(req)
            req.running = False
            self._release(req.blocks)
            req.blocks = []
        else:
            self._waiting.remove(req)
        return True

    def step(self, now: float, max_steps: int = 1) -> StepResult:
        """Run the scheduler for one iteration starting at `now` and apply it.

        Returns the iteration's duration and events (visible at `now + duration`). With
        `max_steps > 1` the result may stand for several fused decode iterations (see the module
        docstring); the real-time server keeps the default of 1. With no work, returns an empty
        result (num_steps 0, duration 0).
        """
        self._finish_run()
        if max_steps > 1:
            fused = self._plan_fused(now, max_steps)
            if fused is not None:
                return fused
        res = self._schedule_one(now)
        self._busy_until = now + res.duration
        return res

    def metrics_snapshot(self, now: float) -> ReplicaMetrics:
        """The replica's vLLM metrics at `now` (state after every step started at or before `now`)."""
        self._advance(now)
        return ReplicaMetrics(
            num_requests_running=len(self._running),
            num_requests_waiting=len(self._waiting),
            kv_cache_usage=(self.num_blocks - len(self._free)) / self.num_blocks,
            prefix_cache_queries=self.prefix_cache_queries,
            prefix_cache_hits=self.prefix_cache_hits,
            block_size=self.block_size,
            num_gpu_blocks=self.num_blocks,
            num_preemptions=self.num_preemptions,
            prompt_tokens=self.prompt_tokens_total,
            generation_tokens=self.generation_tokens_total,
        )

    # ---- introspection (tests, the fake server) -------------------------------------------

    @property
    def num_running(self) -> int:
        """Requests in the running set."""
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        """Requests in the waiting queue (new or preempted)."""
        return len(self._waiting)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request references (including cached ones that can be evicted)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks currently entered in the prefix cache."""
        return len(self._cached)

    def cached_prefix_blocks(self, block_hashes: Sequence[int] | np.ndarray) -> int:
        """Leading blocks of `block_hashes` now in the prefix cache (no state change)."""
        n = 0
        for h in block_hashes:
            if int(h) not in self._cached:
                break
            n += 1
        return n

    def request_state(self, request_id: str) -> dict[str, int | bool] | None:
        """Progress of a request in the engine, or None when it is not (or no longer) here."""
        req = self._reqs.get(request_id)
        if req is None:
            return None
        return {
            "running": req.running,
            "computed_tokens": req.computed,
            "output_tokens": req.out,
            "blocks": len(req.blocks),
            "cached_tokens": max(req.cached_tokens, 0),
            "preemptions": req.preemptions,
        }

    # ---- block pool ------------------------------------------------------------------------

    def _allocate(self, n: int) -> list[int]:
        """Take n blocks from the head of the free queue, evicting their cached hashes."""
        free = self._free
        out = list(islice(free, n))
        _consume(map(free.__delitem__, out))
        bhash = self._bhash
        evicted = list(filter(_not_none, map(bhash.__getitem__, out)))
        if evicted:
            _consume(map(self._cached.__delitem__, evicted))  # type: ignore[arg-type]  # None filtered out above
            _consume(map(bhash.__setitem__, out, repeat(None)))
            if self.kv_events is not None:
                self.kv_events.append(("removed", evicted, None))  # type: ignore[arg-type]  # None filtered out above
        _consume(map(self._ref.__setitem__, out, repeat(1)))
        return out

    def _release(self, blocks: list[int]) -> None:
        """Drop one reference to each block; unreferenced ones join the free queue, tail first."""
        ref = self._ref
        left = list(map(_minus_one, map(ref.__getitem__, blocks)))
        _consume(map(ref.__setitem__, blocks, left))
        # unreferenced blocks (left == 0) join the free queue, last block first
        self._free.update(zip(compress(reversed(blocks), map(operator.not_, reversed(left))), repeat(None)))

    def _cache_blocks(self, req: _Req, upto_tokens: int) -> None:
        """Enter the request's prompt blocks that are full at `upto_tokens` into the prefix cache."""
        hl = req.hash_list
        assert hl is not None
        full = min(upto_tokens // self.block_size, len(hl))
        first = req.n_cached
        if full <= first:
            return
        req.n_cached = full
        cached, bhash = self._cached, self._bhash
        hs = hl[first:full]
        bl = req.blocks[first:full]
        if cached.keys().isdisjoint(hs):  # common case: none of them is cached yet
            cached.update(zip(hs, bl))
            _consume(map(bhash.__setitem__, bl, hs))
            if self.kv_events is not None:
                self.kv_events.append(("stored", hs, hl[first - 1] if first else None))
            return
        new = []
        for h, b in zip(hs, bl):  # a block computed twice: the first copy stays the cached one
            if h not in cached:
                cached[h] = b
                bhash[b] = h
                new.append(h)
        if self.kv_events is not None and new:
            self.kv_events.append(("stored", new, None))

    # ---- scheduling --------------------------------------------------------------------------

    def _admission(self, req: _Req, budget: int) -> tuple[list[int], list[int], int, int, bool]:
        """How a waiting request would be admitted with `budget` tokens left (no state change).

        Returns (hit blocks, their reference counts, tokens to compute, new blocks needed,
        whether those blocks can be allocated now).
        """
        hl = req.hash_list
        if hl is None:
            hl = req.hash_list = _hash_list(req.hashes)
        bs = self.block_size
        num_tokens = req.prompt_len + req.out
        max_hit = min((num_tokens - 1) // bs, len(hl))  # vLLM: at least one token is computed
        hits: list[int] = list(takewhile(_not_none, map(self._cached.get, islice(hl, max_hit))))  # type: ignore[arg-type]  # takewhile stops at the first None
        n_hit = len(hits)
        hit_tokens = n_hit * bs
        n_new = min(num_tokens - hit_tokens, budget)
        need = -(-(hit_tokens + n_new) // bs) - n_hit
        refs = list(map(self._ref.__getitem__, hits))
        ok = need <= len(self._free) - refs.count(0)  # hit blocks in the free queue are not free to take
        return hits, refs, n_new, need, ok

    def _preempt(self, req: _Req) -> None:
        """Recompute preemption: free all blocks, back to the front of the waiting queue."""
        req.running = False
        self._release(req.blocks)
        req.blocks = []
        req.computed = 0
        req.n_cached = 0
        req.preemptions += 1
        self.num_preemptions += 1
        self._waiting.appendleft(req)

    def _schedule_one(self, now: float) -> StepResult:
        bs = self.block_size
        budget = self.max_num_batched_tokens
        running = self._running
        free = self._free
        sched: list[tuple[_Req, int]] = []
        preempted = False

        # 1. Running requests, in order.
        i = 0
        while i < len(running) and budget > 0:
            req = running[i]
            n_new = req.prompt_len + req.out - req.computed
            if n_new > budget:
                n_new = budget
            need = -(-(req.computed + n_new) // bs) - len(req.blocks)
            ok = True
            while need > len(free):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    ok = False
                    break
            if not ok:
                break
            if need > 0:
                req.blocks.extend(self._allocate(need))
            if req.n_cached < len(req.hash_list):  # type: ignore[arg-type]
                self._cache_blocks(req, req.computed + n_new)
            sched.append((req, n_new))
            budget -= n_new
            i += 1

        # 2. Waiting requests, in order, unless this step preempted someone.
        if not preempted:
            waiting = self._waiting
            ref = self._ref
            while waiting and budget > 0 and len(running) < self.max_num_seqs:
                req = waiting[0]
                hits, refs, n_new, need, ok = self._admission(req, budget)
                if not ok:
                    break  # FCFS: nobody behind it goes first
                waiting.popleft()
                # touch: cached blocks become referenced (unreferenced ones leave the free queue)
                _consume(map(free.__delitem__, compress(hits, map(operator.not_, refs))))
                _consume(map(ref.__setitem__, hits, map(_plus_one, refs)))
                n_hit = len(hits)
                hit_tokens = n_hit * bs
                req.blocks = hits
                if need > 0:
                    req.blocks.extend(self._allocate(need))
                req.computed = hit_tokens
                req.n_cached = n_hit
                if req.preemptions == 0:
                    self.prefix_cache_queries += req.prompt_len + req.out
                    self.prefix_cache_hits += hit_tokens
                if req.cached_tokens < 0:
                    req.cached_tokens = hit_tokens
                self._cache_blocks(req, hit_tokens + n_new)
                req.running = True
                running.append(req)
                sched.append((req, n_new))
                budget -= n_new

        if not sched:
            if self.has_work():  # cannot happen for requests that fit the cache; never spin
                raise RuntimeError(f"engine {self.name}: nothing schedulable with work queued")
            return StepResult(start=now, duration=0.0, num_steps=0)

        # 3. Apply the step: compute tokens, sample, finish.
        prefill = decode = context = pairs = 0
        sampled: list[str] = []
        first: list[str] = []
        finished: list[FinishedRequest] = []
        for req, n_new in sched:
            num_tokens = req.prompt_len + req.out
            if req.out > 0 and n_new == 1 and req.computed == num_tokens - 1:
                decode += 1
            else:
                prefill += n_new
                pairs += n_new * req.computed + n_new * (n_new + 1) // 2  # profiles.prefill_pairs, inlined
            req.computed += n_new
            context += req.computed
            if req.computed == num_tokens:
                req.out += 1
                sampled.append(req.rid)
                if not req.first_done:
                    req.first_done = True
                    first.append(req.rid)
                    self.prompt_tokens_total += req.prompt_len
                if req.out >= req.max_tokens:
                    finished.append(
                        FinishedRequest(req.rid, Usage(req.prompt_len, req.out, max(req.cached_tokens, 0)))
                    )
        self.generation_tokens_total += len(sampled)
        if finished:
            for f in finished:
                req = self._reqs.pop(f.request_id)
                req.running = False
                self._release(req.blocks)
                req.blocks = []
            self._running = [r for r in running if r.running]
        self.steps_total += 1
        p = self.profile
        duration = p.c0 + p.c_prefill * prefill + p.c_decode * decode + p.c_attn * context + p.c_prefill_attn * pairs
        return StepResult(now, duration, 1, prefill, decode, context, pairs, sampled, first, finished)

    # ---- fused decode runs -----------------------------------------------------------------

    def _plan_fused(self, now: float, max_steps: int) -> StepResult | None:
        """A fused run of >= 2 event-free decode steps, or None when the next step is not one."""
        running = self._running
        n = len(running)
        if n == 0 or n > self.max_num_batched_tokens:
            return None
        k = max_steps
        context = 0
        for req in running:
            nt = req.prompt_len + req.out
            if req.out == 0 or req.computed != nt - 1:
                return None
            rem = req.max_tokens - req.out - 1  # steps before the one that finishes it
            if rem < k:
                k = rem
                if k < 2:
                    return None
            context += nt
        # Blocks the run may take: all free ones, but when the head of the waiting queue is
        # blocked, only those ahead of its first evictable hit block in the free queue. Then it
        # stays blocked for the whole run: the free blocks only get fewer and its hits stay.
        cap = len(self._free)
        if self._waiting and n < self.max_num_seqs and n < self.max_num_batched_tokens:
            hits, refs, _, _, ok = self._admission(self._waiting[0], self.max_num_batched_tokens - n)
            if ok:
                return None
            evictable = set(compress(hits, map(operator.not_, refs)))
            if evictable:
                for i, b in enumerate(islice(self._free, self._blocks_needed(k))):
                    if b in evictable:
                        cap = i
                        break
        if self._blocks_needed(k) > cap:
            lo, hi = 1, k  # largest k' with blocks_needed(k') <= cap; blocks_needed(1) may exceed too
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self._blocks_needed(mid) <= cap:
                    lo = mid
                else:
                    hi = mid - 1
            k = lo
            if k < 2:
                return None
        p = self.profile
        a = p.c0 + p.c_decode * n + p.c_attn * context
        run = _Run(now, k, a, p.c_attn * n)
        self._run = run
        self._busy_until = run.end
        return StepResult(now, run.end - now, k, 0, n, context, 0, [r.rid for r in running], [], [])

    def _blocks_needed(self, k: int) -> int:
        """New blocks the running (decoding) requests need for k more decode steps."""
        bs = self.block_size
        total = 0
        for req in self._running:
            need = -(-(req.computed + k) // bs) - len(req.blocks)
            if need > 0:
                total += need
        return total

    def _materialize(self, m: int) -> None:
        """Apply m decode steps of the pending run to every running request."""
        if m <= 0:
            return
        bs = self.block_size
        for req in self._running:
            req.out += m
            req.computed += m
            need = -(-req.computed // bs) - len(req.blocks)
            if need > 0:
                req.blocks.extend(self._allocate(need))
        self.generation_tokens_total += m * len(self._running)
        self.steps_total += m

    def _finish_run(self) -> None:
        run = self._run
        if run is not None:
            self._materialize(run.k)
            self._run = None

    def _advance(self, now: float) -> None:
        """Apply the steps of the pending run started at or before `now`; the run goes on."""
        run = self._run
        if run is None:
            return
        m = run.started_by(now)
        if m == 0:
            return
        self._materialize(m)
        if m >= run.k:
            self._run = None
            return
        run.t0 += run.span(m)
        run.a += run.b * m
        run.k -= m

    def _cut(self, now: float) -> None:
        """End the pending run after the steps started at or before `now` (a request changes)."""
        run = self._run
        if run is None:
            return
        m = run.started_by(now)
        self._materialize(m)
        self._busy_until = run.end if m >= run.k else run.t0 + run.span(m)
        self._run = None
