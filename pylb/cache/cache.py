"""`SemanticCache`: the one object the proxy calls to answer a request from the cache.

Design
------
`serve(request, kind, payload, route)` wraps the proxy's normal path (`route`, which sends the
request to a replica and returns its response). For one request, in order:

  1. plan: is it cacheable, and under which partition and exact key (`pylb.cache.keys`)? If not,
     `route` at once (`x-pylb-cache: bypass`).
  2. exact: an entry under the exact key answers at once (`x-pylb-cache: hit`).
  3. join: an identical request (same exact key) already on its way upstream (the *leader*)
     is followed instead of sent again. So N identical concurrent requests cost one upstream
     request when the first one succeeds.
     - A streamed follower joins the stream live: it receives the leader's SSE pieces from the
       first one on, each as it arrives (its TTFT is the leader's, not the leader's end-to-end
       time). Until the leader's first piece, nothing is sent; if the leader ends without one
       (an error status, no capacity), the follower goes upstream itself. Once it has sent
       pieces it ends as the leader's stream ends: whole, or, when the leader's stream was cut
       (its replica failed, or its client left and pylb aborted it), with an error event, as a
       client of a cut stream gets. A leader whose pieces outgrew `cache.max_answer_bytes`
       keeps no copy from the start, so a request arriving after that goes upstream.
     - A JSON follower waits for the leader's answer and replays the stored entry; when the
       answer was not stored (an error, a length cut, a client that left) it goes upstream.
  4. similarity: when the partition holds entries, a micro-batched lookup (`pylb.cache.batcher`)
     finds its nearest entries; the first one with similarity >= the model's threshold that
     passes the token-difference guards (`pylb.cache.guards`) is the candidate. With
     `cache.threshold_policy` fixed it answers. With verified, `pylb.cache.verified` decides
     from the candidate's labels and its model's pooled labels under `cache.max_error_rate`:
     exploit (it answers) or explore (the request goes on as a miss, and the replica's answer,
     when it may be stored, is compared with the candidate's: one label for the candidate at
     that similarity, counted in the model's pool too; an answer that matched is stored for
     exact matches only, so that later neighbours keep finding the labelled entry instead of an
     unlabelled twin, as in the paper).
  5. miss: `route`, recording the answer's bytes (a *near* miss, whose nearest neighbour scores
     at least `cache.near_threshold`, passes that neighbour's replica as an affinity hint: it
     likely holds the shared prefix; the router honours it only when that replica is healthy and
     not hot); the answer is stored when it is a 200 whose
     every choice finished with `stop` (a streamed one must end with `data: [DONE]` and carry no
     error event), is not over `cache.max_answer_bytes`, and the request allowed storing. The
     first answer of an empty partition (no lookup ran, so no embedding yet) is found by exact
     key at once and by similarity once its embedding, computed after the answer went out, is back.

Verification (`cache.verify_share`, either policy): that share of the semantic hits is re-run,
after the hit went out, in a background task on an idle replica (`rerun`, given by the proxy: a
healthy replica with nothing queued or in flight in the router's view, sent through the router
at a lower priority; none idle, no re-run). Its answer is compared with the entry's: a label, and
a different answer drops the entry (`pylb_cache_detected_false_hits_total`). At most
`cache.verify_max_inflight` re-runs at once; the proxy cancels them when it stops. A re-run never
touches the request that got the hit.

A hit replays the stored body byte for byte: a streamed answer as one write of its SSE events
(the `id` and `created` of the original, so a client sees the answer it would have had), a JSON
body as it was, with `x-pylb-cache: hit` and `x-pylb-cache-entry: <id>`. `POST
/admin/cache/false-hit` with `{"entry": id}` and the same tenant credential as the request that got
the hit drops the entry and counts a false hit.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from pylb.config import CacheSettings
from pylb.observability.logging import request_id_var
from pylb.observability.metrics import LATENCY_BUCKETS, Counts, Hist

from . import guards
from .batcher import LookupBatcher
from .embedders import Embedder, create_embedder
from .keys import CachePlan, TenantKeys, plan_request
from .store import Answer, CacheStore, Entry, sse_payloads
from .verified import Labels, VerifiedPolicy, same_answer

log = logging.getLogger("pylb.cache")

STATE_KEY: Any = web.RequestKey("pylb_cache", str) if hasattr(web, "RequestKey") else "pylb_cache"  # typed keys: aiohttp >= 3.11
"""The request key under which `serve` notes hit / miss / bypass for the response header."""

Route = Callable[[list[bytes] | None, "str | None"], Awaitable[web.StreamResponse]]
"""The proxy's normal path, `route(record, affinity_hint)`: sends the request upstream (with the
replica named by `affinity_hint` preferred, `RoutingRequest.affinity_hint`); streamed pieces go to
the list when given."""

ServedBy = Callable[[], "str | None"]
"""Returns the replica (router name) that served the routed request, once `route` returned."""

Rerun = Callable[[], Awaitable["tuple[int, bytes] | None"]]
"""Sends the request once more, to an idle replica, outside the client's exchange: (status, whole
body), or None when no replica is idle (the proxy's `RoutedPath.rerun_on_idle`). Called while
the request's handler runs (it captures the request then); awaited in the background."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def finished_with_stop(body: bytes, stream: bool) -> str | None:
    """None when every choice of the answer finished with `stop`, else why the answer is not stored."""
    if not stream:
        try:
            obj = json.loads(body)
            choices = obj["choices"]
            finished = [c.get("finish_reason") for c in choices]
        except (ValueError, KeyError, TypeError, AttributeError):
            return "not an OpenAI JSON answer"
        if not finished or any(r != "stop" for r in finished):
            return f"finish_reason {finished}"
        return None
    if not body.rstrip().endswith(b"data: [DONE]"):
        return "stream did not end with [DONE]"
    reasons: dict[int, Any] = {}
    for data in sse_payloads(body):
        try:
            event = json.loads(data)
        except ValueError:
            return "an event is not JSON"
        if not isinstance(event, dict) or "error" in event:
            return "error event in the stream"
        for c in event.get("choices") or []:
            if isinstance(c, dict) and c.get("finish_reason") is not None:
                reasons[c.get("index", 0)] = c["finish_reason"]
    if not reasons or any(r != "stop" for r in reasons.values()):
        return f"finish_reason {sorted(map(str, reasons.values()))}"
    return None


class _Recording(list[bytes]):
    """The pieces of a streamed answer as the proxy relays them: kept up to `limit` bytes for the
    store (then it only notes the overflow, so a long stream that cannot be stored costs no
    memory), and handed at once to the identical requests following it live (`follow`)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.size = 0
        self.overflow = False
        self.ended = False
        self.followers: list[asyncio.Queue[bytes | None]] = []

    def append(self, piece: bytes) -> None:
        for q in self.followers:
            q.put_nowait(piece)
        self.size += len(piece)
        if self.size > self.limit:
            self.overflow = True
            self.clear()
        elif not self.overflow:
            super().append(piece)

    def follow(self) -> asyncio.Queue[bytes | None] | None:
        """A queue of the answer's pieces from the first one (those so far at once, the rest as
        they come), then None at its end; None when the answer has ended or its first pieces are
        no longer kept."""
        if self.ended or self.overflow:
            return None
        q: asyncio.Queue[bytes | None] = asyncio.Queue()
        for piece in self:
            q.put_nowait(piece)
        self.followers.append(q)
        return q

    def unfollow(self, q: asyncio.Queue[bytes | None]) -> None:
        """Stop handing pieces to `q` (its client left, or it has the whole answer)."""
        if q in self.followers:
            self.followers.remove(q)

    def end(self) -> None:
        """The answer ended (whole or not): every follower's queue gets its None."""
        self.ended = True
        for q in self.followers:
            q.put_nowait(None)


@dataclass
class _Flight:
    """A cacheable request on its way upstream, which identical requests join: `done` gets its
    entry (None when its answer was not stored); `record` carries a streamed answer's pieces."""

    done: asyncio.Future[Entry | None]
    record: _Recording | None


class CacheMetrics(Collector):
    """The `pylb_cache_*` series (registered in the proxy's registry)."""

    def __init__(self, store: CacheStore, verifying: set[asyncio.Task[None]]) -> None:
        self.store = store
        self.verifying = verifying
        """The cache's re-runs in flight (the gauge reads its size)."""
        self.requests = Counts("pylb_cache_requests_total", "requests seen by the cache, by model and result (hit_exact, hit_join, hit_semantic, miss, bypass)", ["model", "result"])
        self.bypass = Counts("pylb_cache_bypass_total", "requests the cache may not answer, by reason", ["reason"])
        self.refusals = Counts("pylb_cache_guard_refusals_total", "neighbours above the threshold refused by a guard", ["guard"])
        self.not_stored = Counts("pylb_cache_not_stored_total", "answers to cacheable requests not stored, by reason", ["reason"])
        self.false_hits = Counts("pylb_cache_false_hits_total", "hits reported wrong through /admin/cache/false-hit", ["model"])
        self.errors = Counts("pylb_cache_errors_total", "lookups that failed (embedder errors); the request went upstream", ["stage"])
        self.lookup = Hist("pylb_cache_lookup_seconds", "time from a request's arrival to the cache's decision, by outcome", ["result"], LATENCY_BUCKETS)
        self.batch = Hist("pylb_cache_batch_size", "semantic lookups per batch", [], BATCH_BUCKETS)
        self.near = Counts("pylb_cache_near_misses_total", "misses routed with their nearest neighbour's replica as an affinity hint", ["model"])
        self.decisions = Counts("pylb_cache_verified_decisions_total", "candidates decided by the verified policy, by decision (exploit, explore)", ["model", "decision"])
        self.labels = Counts("pylb_cache_labels_total", "labels recorded on entries, by source (explore, verify) and label (correct, wrong)", ["model", "source", "label"])
        self.detected = Counts("pylb_cache_detected_false_hits_total", "semantic hits whose re-run on an idle replica answered differently (entry dropped)", ["model"])
        self.verify_skipped = Counts("pylb_cache_verify_skipped_total", "re-runs of served hits not made or not compared, by reason", ["reason"])

    def collect(self) -> Iterator[Any]:
        for f in (self.requests, self.bypass, self.refusals, self.not_stored, self.false_hits, self.errors, self.lookup, self.batch, self.near,
                  self.decisions, self.labels, self.detected, self.verify_skipped):  # fmt: skip
            yield f.family()
        yield GaugeMetricFamily("pylb_cache_verifications_in_flight", "re-runs of served hits in flight", value=len(self.verifying))
        entries = GaugeMetricFamily("pylb_cache_entries", "entries in the cache, by model", labels=["model"])
        size = GaugeMetricFamily("pylb_cache_bytes", "answer bytes in the cache, by model", labels=["model"])
        for model, (n, b) in self.store.stats().items():
            entries.add_metric([model], n)
            size.add_metric([model], b)
        yield entries
        yield size


class SemanticCache:
    """See the module comment. Build with the `cache` settings; `await close()` at shutdown."""

    def __init__(self, settings: CacheSettings, embedder: Embedder | None = None, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.rng = rng or random.Random()
        self.verified = VerifiedPolicy(settings.max_error_rate, self.rng) if settings.threshold_policy == "verified" else None
        self.store = CacheStore(settings.ttl_s, settings.max_entries, settings.max_bytes, settings.device)
        self.embedder = embedder or create_embedder(settings.embedder, dim=settings.dim, url=settings.embedder_url, model=settings.embedder_model)
        self.tenants = TenantKeys(settings.tenant_header)
        self.opt_in = frozenset(settings.opt_in_models)
        self._verifying: set[asyncio.Task[None]] = set()
        self.metrics = CacheMetrics(self.store, self._verifying)
        self.batcher = LookupBatcher(
            self.embedder, self.store, settings.batch_window_ms / 1000.0, settings.max_batch, clock=time.monotonic, on_batch=self._on_batch
        )
        self._inflight: dict[bytes, _Flight] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _on_batch(self, n: int) -> None:
        self.metrics.batch.observe(n)

    def threshold(self, model: str) -> float:
        """The similarity a neighbour needs for `model`."""
        t = self.settings.thresholds.get(model)
        return float(t) if isinstance(t, (int, float)) else self.settings.threshold

    def floor(self, model: str) -> float:
        """The similarity a neighbour needs to be a candidate for `model`: the threshold, or
        with the verified policy `cache.verified_floor` when set."""
        if self.verified is not None and self.settings.verified_floor > 0:
            return self.settings.verified_floor
        return self.threshold(model)

    # ---- the proxy's hooks ------------------------------------------------------------------------

    def add_routes(self, app: web.Application) -> None:
        """The admin endpoint and the response-header hook."""
        app.router.add_post("/admin/cache/false-hit", self._false_hit)
        app.on_response_prepare.append(self._mark_response)

    async def _mark_response(self, request: web.Request, response: web.StreamResponse) -> None:
        state = request.get(STATE_KEY)
        if state is not None and "x-pylb-cache" not in response.headers:
            response.headers["x-pylb-cache"] = state

    async def serve(
        self, request: web.Request, kind: str, payload: Any, route: Route, served_by: ServedBy, rerun: Rerun | None = None
    ) -> web.StreamResponse:
        """Answer `request` (parsed JSON `payload`, `kind` "chat" or "completions") from the cache,
        or through `route` (see the module comment). `served_by` names the replica that served a
        routed answer (stored with the entry, for near-miss hints); `rerun` sends the request
        again to an idle replica (verification; None: never verified)."""
        t0 = time.perf_counter()
        plan = plan_request(kind, payload, request.headers, self.tenants, self.opt_in) if isinstance(payload, dict) else "the body is not an object"
        if isinstance(plan, str):
            request[STATE_KEY] = "bypass"
            self.metrics.bypass.inc(plan)
            self.metrics.requests.inc(str(payload.get("model", "")) if isinstance(payload, dict) else "", "bypass")
            return await route(None, None)
        now = time.monotonic()
        vector: np.ndarray | None = None
        hint: str | None = None
        candidate: tuple[Entry, float] | None = None
        if plan.lookup:
            e = self.store.get_exact(plan.exact_key, now)
            if e is not None:
                return await self._replay(request, plan, e, "hit_exact", t0)
            leader = self._inflight.get(plan.exact_key)
            if leader is not None:
                if leader.record is not None:
                    followed = await self._follow(request, plan, leader.record, t0)
                    if followed is not None:
                        return followed
                else:
                    joined = await asyncio.shield(leader.done)
                    if joined is not None and not joined.removed:
                        self.store.touch(joined)
                        return await self._replay(request, plan, joined, "hit_join", t0)
            elif self.settings.semantic and self.store.partition_size(plan.partition) > 0:
                try:
                    vector, neighbours = await self.batcher.lookup(plan.partition, plan.query)
                except Exception as exc:
                    self.metrics.errors.inc("lookup")
                    log.warning("semantic lookup failed; the request goes upstream", extra={"error": f"{type(exc).__name__}: {exc}"})
                    neighbours = []
                floor = self.floor(plan.model)
                near = self.settings.near_threshold
                if near > 0 and neighbours and neighbours[0][1] >= near and not neighbours[0][0].removed:
                    hint = neighbours[0][0].replica
                for e, sim in neighbours:
                    if sim < floor or e.removed:
                        break
                    reason = guards.refusal(plan.query, e.query)
                    if reason is not None:
                        self.metrics.refusals.inc(reason)
                        continue
                    if self.verified is not None:
                        exploit = self.verified.exploit(e.labels, sim, plan.model)
                        self.metrics.decisions.inc(plan.model, "exploit" if exploit else "explore")
                        if not exploit:
                            candidate = (e, sim)
                            break
                    self.store.touch(e)
                    resp = await self._replay(request, plan, e, "hit_semantic", t0)
                    self._maybe_verify(plan, e, sim, rerun)
                    return resp
        return await self._miss(request, plan, route, vector, t0, served_by, hint, candidate)

    async def _miss(
        self, request: web.Request, plan: CachePlan, route: Route, vector: np.ndarray | None, t0: float, served_by: ServedBy, hint: str | None,
        candidate: tuple[Entry, float] | None = None,
    ) -> web.StreamResponse:
        """Route the request upstream and store its answer when it may be; an explored
        `candidate` (entry, similarity) gets a label from that answer."""
        request[STATE_KEY] = "miss"
        self.metrics.requests.inc(plan.model, "miss")
        self.metrics.lookup.observe(time.perf_counter() - t0, "miss")
        record = _Recording(self.settings.max_answer_bytes) if plan.stream else None
        flight: _Flight | None = None
        if plan.exact_key not in self._inflight:  # else an identical request leads, and this one is not joinable
            flight = _Flight(asyncio.get_running_loop().create_future(), record)
            self._inflight[plan.exact_key] = flight
        entry: Entry | None = None
        try:
            if hint is not None:
                self.metrics.near.inc(plan.model)
            resp = await route(record, hint)
            entry = self._entry_of(plan, resp, record, served_by)
            semantic = self.settings.semantic
            if entry is not None and candidate is not None:
                e, sim = candidate
                same = same_answer(e.answer.body, e.answer.stream, entry.answer.body, entry.answer.stream)
                if same is not None:
                    self._label(e, sim, same, "explore")
                if same:  # the candidate was right: stored for exact matches only, so that its
                    semantic = False  # neighbours keep finding the labelled entry, not a twin without labels
            if entry is not None:
                self.store.put(entry, vector if semantic else None)
                if vector is None and semantic:
                    # the partition was empty (no lookup ran): found by exact key at once, and by
                    # similarity once its embedding, computed after the answer went out, is there
                    self._spawn(self._embed_later(entry))
            return resp
        finally:
            if record is not None:
                record.end()
            if flight is not None:
                del self._inflight[plan.exact_key]
                flight.done.set_result(entry)

    def _entry_of(self, plan: CachePlan, resp: web.StreamResponse, record: _Recording | None, served_by: ServedBy) -> Entry | None:
        """The entry to store for `resp`, None (counted with its reason) when it must not be stored."""
        reason = None
        if not plan.store:
            reason = "no-store"
        elif resp.status != 200:
            reason = f"status {resp.status}"
        if reason is None:
            if plan.stream:
                body = b"".join(record or [])
                if record is not None and record.overflow:
                    reason = "too large"
                elif not resp.prepared or resp.content_type != "text/event-stream":
                    reason = "not a stream"
            else:
                body = resp.body if isinstance(resp, web.Response) and isinstance(resp.body, bytes) else b""
            if reason is None:
                if len(body) > self.settings.max_answer_bytes:
                    reason = "too large"
                else:
                    reason = finished_with_stop(body, plan.stream)
        if reason is not None:
            self.metrics.not_stored.inc(reason.split(" [")[0] if reason.startswith("finish_reason") else reason)
            return None
        now = time.monotonic()
        return Entry(
            id=uuid.uuid4().hex,
            partition=plan.partition,
            exact_key=plan.exact_key,
            query=plan.query,
            model=plan.model,
            tenant=plan.tenant,
            answer=Answer(body, resp.headers.get("Content-Type", resp.content_type), plan.stream),
            replica=served_by(),
            created=now,
            expires=now + self.settings.ttl_s,
        )

    async def _embed_later(self, entry: Entry) -> None:
        try:
            vector = await self.batcher.embed_one(entry.query)
        except Exception as exc:
            self.metrics.errors.inc("embed")
            log.warning("embedding a stored answer failed; it is found by exact matches only", extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        self.store.set_vector(entry, vector)

    # ---- labels and verification -------------------------------------------------------------------

    def _label(self, e: Entry, similarity: float, correct: bool, source: str) -> None:
        if e.labels is None:
            e.labels = Labels()
        if self.verified is not None:  # counted in the model's pool too
            self.verified.record(e.labels, similarity, correct, e.model)
        else:
            e.labels.add(similarity, correct)
        self.metrics.labels.inc(e.model, source, "correct" if correct else "wrong")

    def _maybe_verify(self, plan: CachePlan, e: Entry, similarity: float, rerun: Rerun | None) -> None:
        """With probability `cache.verify_share`, re-run the request that `e` just answered, in
        the background (see the module comment)."""
        share = self.settings.verify_share
        if rerun is None or share <= 0 or self.rng.random() >= share:
            return
        if len(self._verifying) >= self.settings.verify_max_inflight:
            self.metrics.verify_skipped.inc("busy")
            return
        answer = rerun()  # now: it captures the request, whose handler is about to return
        task = asyncio.ensure_future(self._verify(plan, e, similarity, answer))
        self._verifying.add(task)
        task.add_done_callback(lambda t: self._verified(t, answer))

    def _verified(self, task: asyncio.Task[None], answer: Awaitable[Any]) -> None:
        self._verifying.discard(task)
        if inspect.iscoroutine(answer) and inspect.getcoroutinestate(answer) == inspect.CORO_CREATED:
            answer.close()  # cancelled before it started

    async def _verify(self, plan: CachePlan, e: Entry, similarity: float, answer: Awaitable[tuple[int, bytes] | None]) -> None:
        try:
            got = await answer
        except Exception as exc:  # (a cancellation is not one: it ends the task)
            self.metrics.verify_skipped.inc("error")
            log.warning("re-running a cache hit failed", extra={"entry": e.id, "error": f"{type(exc).__name__}: {exc}"})
            return
        if got is None:
            self.metrics.verify_skipped.inc("no idle replica")
            return
        status, body = got
        same = same_answer(e.answer.body, e.answer.stream, body, plan.stream) if status == 200 and finished_with_stop(body, plan.stream) is None else None
        if same is None:
            self.metrics.verify_skipped.inc("not comparable")
            return
        self._label(e, similarity, same, "verify")
        if not same and not e.removed:
            self.store.remove(e)
            self.metrics.detected.inc(e.model)
            log.info("a cache hit re-run on an idle replica answered differently; entry dropped",
                     extra={"entry": e.id, "model": e.model, "similarity": round(similarity, 4)})  # fmt: skip

    async def stop_verifying(self) -> None:
        """Cancel the re-runs in flight and wait for them to end (the proxy stops)."""
        tasks = list(self._verifying)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _follow(self, request: web.Request, plan: CachePlan, record: _Recording, t0: float) -> web.StreamResponse | None:
        """Relay the leader's stream to this identical request, each piece as the leader's
        replica sends it; None (nothing sent) when there is nothing to follow: the leader's
        pieces from the start are gone, or it ended without a piece (then the caller goes
        upstream). A stream that ends without `data: [DONE]` gets an error event, as a cut stream
        does in the proxy."""
        from pylb.proxy.errors import sse_error_event

        queue = record.follow()
        if queue is None:
            return None
        try:
            piece = await queue.get()
            if piece is None:
                return None
            request[STATE_KEY] = "hit"
            self.metrics.requests.inc(plan.model, "hit_join")
            self.metrics.lookup.observe(time.perf_counter() - t0, "hit")
            resp = web.StreamResponse(
                status=200,
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "x-request-id": request_id_var.get() or ""},
            )
            await resp.prepare(request)
            tail = b""
            while piece is not None:
                await resp.write(piece)
                tail = (tail + piece)[-32:]
                piece = await queue.get()
            if not tail.rstrip().endswith(b"data: [DONE]"):
                await resp.write(sse_error_event(502, "the identical request whose answer this stream follows was cut before its end"))
            await resp.write_eof()
            return resp
        finally:
            record.unfollow(queue)

    async def _replay(self, request: web.Request, plan: CachePlan, e: Entry, result: str, t0: float) -> web.StreamResponse:
        request[STATE_KEY] = "hit"
        self.metrics.requests.inc(plan.model, result)
        self.metrics.lookup.observe(time.perf_counter() - t0, "hit")
        headers = {
            "Content-Type": e.answer.content_type,
            "x-pylb-cache-entry": e.id,
            "x-request-id": request_id_var.get() or "",
        }
        if not e.answer.stream:
            return web.Response(status=200, body=e.answer.body, headers=headers)
        resp = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
        await resp.prepare(request)
        await resp.write(e.answer.body)
        await resp.write_eof()
        return resp

    async def _false_hit(self, request: web.Request) -> web.StreamResponse:
        """POST /admin/cache/false-hit {"entry": id}: drop the entry and count a false hit. The
        caller must carry the same tenant credential as the request that got the hit."""
        from pylb.proxy.errors import error_response

        try:
            body = json.loads(await request.read())
            entry_id = body["entry"]
            if not isinstance(entry_id, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            return error_response(400, 'the body must be a JSON object {"entry": "<x-pylb-cache-entry of the hit>"}', "entry")
        e = self.store.by_id(entry_id)
        tenant = self.tenants.tenant(request.headers)
        if e is None or tenant is None or tenant != e.tenant:
            return error_response(404, f"no cache entry {entry_id!r} for this tenant (already dropped, expired, or another tenant's)", "entry")
        self.store.remove(e)
        self.metrics.false_hits.inc(e.model)
        log.info("cache entry reported wrong and dropped", extra={"entry": entry_id, "model": e.model, "hits": e.hits})
        return web.json_response({"dropped": entry_id})

    async def close(self) -> None:
        """Cancel re-runs, wait for stores in progress, release the embedder."""
        await self.stop_verifying()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self.embedder.close()
