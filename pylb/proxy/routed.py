"""The routed path: a completion or chat request from its body to the replica's answer.

Design
------
A routed request: read the body (413 past `server.max_body_bytes`), parse it into a
`RoutingRequest` (`pylb.router.request`; 400 naming the field), answer 503 with `Retry-After` when
no replica is healthy, submit it to the router (429 when pylb's queue is full) and wait for its
dispatch (504 after `router.queue_timeout_s`). Then send the body *as received* to the replica,
with the client's headers minus hop-by-hop ones, and `x-request-id` (the client's, or a new one).

Responses. Streamed answers (`stream: true`, 200, `text/event-stream`) are passed through chunk by
chunk as they arrive, without re-encoding. The response head is sent to the client together with
the first chunk, so until the first byte reaches the client the request can still be retried.
The first chunk is the request's first-token event (`router.on_first_token`). After it, the
stream is spliced: each piece read from the replica is written to the client's socket from the
upstream connection's data callback (`_Splice`), with no task switch per chunk, and the replica
is paused while the client's socket buffer is full. Other answers
(non-streamed, or errors) are read whole and sent with their status and headers. Every response
carries `x-pylb-replica` (the replica's base URL), `x-pylb-attempts` and `x-request-id`.

Non-streamed requests and prefill. vLLM sends nothing of a non-streamed answer until it is
complete, so pylb cannot see when its prefill ended. Two ways were possible: turn the request into
a streamed one upstream and re-assemble the JSON answer, or estimate. pylb estimates: it fires
the first-token event at dispatch + prompt tokens x the replica's per-token prefill time, the one
the router learns from first tokens (`pylb.router.ttft`, seeded with `router.prefill_s_per_token`),
or at completion when that comes first. Reasons: the body and the answer stay byte-exact (a
re-assembled answer would have to reproduce every field vLLM may add -- logprobs, tool calls,
reasoning content, prompt logprobs, kv_transfer_params -- and follow every vLLM release); the
event only releases the router's dispatch budget, where an estimate errs by at most the request's
own prefill; and TTFT matters to streaming clients, whose first token pylb sees exactly. The
router learns its prefill speed from streamed requests only (a non-streamed client cannot
observe TTFT anyway).

Usage. `router.on_complete` gets the `usage` object of the answer: the JSON body's, or, for a
stream, the last `usage` in its final events (clients ask for it with
`stream_options.include_usage`). When a stream carries none, pylb passes an estimate: the
request's estimated prompt tokens, one completion token per SSE data event, 0 cached tokens.

Retries. A request is retried on another replica only before its first byte reached the client:
when the connection to the replica fails or times out, when the replica answers with a status in
`upstream.retry_statuses` (502, 503, 504), or when a stream breaks before its first chunk. The
failed attempt is completed in the router with `usage=None`, the replica is reported to the
fleet (a connection error ejects it at once by default, 5xx answers after a few), and the same
`RoutingRequest` (same id, same arrival) is submitted again -- through the router's optional
`retry(request, failed_replica, now)` hook when it has one, so that it goes to the request's other
candidate; otherwise with `submit`, and the router places it among the replicas in rotation (an
ejected replica is no longer among them). At most
`upstream.max_retries` retries, none starting later than `upstream.retry_deadline_s` after
arrival; after that the last answer is forwarded (or 502 when there was none).

Faults. A replica that fails mid-stream ends that stream with vLLM's in-stream error event
(`data: {"error": ...}` then `data: [DONE]`); other requests are untouched. A client that goes
away cancels its handler (aiohttp handler cancellation), which closes the upstream connection, so
vLLM aborts the request and frees its KV blocks; a request abandoned while queued is withdrawn
from the router. Every request is counted once in `pylb_requests_total` with its final status
(499 when the client left, 502 for a stream that broke after its head was sent). A client that
closes once it has a stream's `data: [DONE]` event (or every byte of the replica's answer), before
pylb wrote the chunked body's last chunk, left with the whole answer: a 200, completed in the
router with the stream's usage.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from pylb.config import Settings
from pylb.observability.logging import ACCESS_LOGGER, request_id_var
from pylb.router.interface import Dispatch, RoutingRequest, Usage
from pylb.router.request import CHAT, COMPLETIONS, RequestError, build_request, parse_json_body

from .balancer import Balancer
from .errors import NoReplica, ProxyError, UpstreamFailed, error_response, sse_error_event
from .guard import BodyBudget, read_body
from .headers import ReplicaLabels, raw_request_headers, request_skip_raw, response_headers
from .streaming import StreamSplice
from .upstream import UPSTREAM_ERRORS, UpstreamPool, UpstreamResponse
from .usage import usage_from_json_body, usage_from_sse_tail

if TYPE_CHECKING:
    from pylb.cache.cache import SemanticCache

log = logging.getLogger("pylb.proxy")
access_log = logging.getLogger(ACCESS_LOGGER)


@dataclass(slots=True)
class Exchange:
    """Book-keeping of one request through its attempts."""

    rid: str
    endpoint: str
    t_start: float
    status: int = 0
    replica: str | None = None
    attempts: int = 0
    ttft: float | None = None
    error: str | None = None
    delivered: bool = False  # the client received the whole answer (it may close before its end)
    record: list[bytes] | None = None  # the streamed answer's pieces are appended here when set (the semantic cache)


class AttemptFailed(Exception):
    """An attempt failed before the client got a byte: retry if allowed, else answer `response`."""

    def __init__(self, reason: str, message: str, response: web.StreamResponse | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.response = response


class RoutedPath:
    """The handlers of POST /v1/completions and /v1/chat/completions (see the module comment).

    The proxy owns it: it sets `pool` when it starts, `cut` when its shutdown timeout passed,
    and calls `apply` with new settings on a reload."""

    def __init__(self, settings: Settings, balancer: Balancer, names: ReplicaLabels, bodies: BodyBudget, cache: SemanticCache | None) -> None:
        self.balancer = balancer
        self.dispatcher, self.metrics, self.fleet, self.limits, self.kv = balancer.dispatcher, balancer.metrics, balancer.fleet, balancer.limits, balancer.kv
        self.names = names
        self.bodies = bodies
        self.cache = cache
        self.pool: UpstreamPool | None = None
        self.cut = False  # the shutdown timeout passed: what is still open is cut
        self.in_progress = 0  # routed requests being served
        self._ids = 0
        self._id_prefix = uuid.uuid4().hex[:16]
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Take the settings the routed path reads on every request (at start and on reload)."""
        self.settings = settings
        self.skip_raw = request_skip_raw(settings.upstream.forward_authorization)
        self.retry_statuses = frozenset(settings.upstream.retry_statuses)
        self.eject_statuses = frozenset(settings.fleet.eject_statuses)


    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETIONS, "completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT, "chat")

    def request_id(self, request: web.Request) -> str:
        rid = request.headers.get("x-request-id")
        if not rid or len(rid) > 128 or not rid.isprintable():
            self._ids += 1
            rid = f"{self._id_prefix}{self._ids:08x}"
        if self.dispatcher.known(rid):  # a client reusing an id while the first is in flight
            self._ids += 1
            rid = f"{rid}.{self._ids}"
        return rid

    async def _generate(self, request: web.Request, kind: str, endpoint: str) -> web.StreamResponse:
        t_start = time.perf_counter()
        rid = self.request_id(request)
        token = request_id_var.set(rid)
        ex = Exchange(rid, endpoint, t_start)
        self.in_progress += 1
        held = [0]
        try:
            body = await self.read_body(request, held)
            payload = parse_json_body(body)
            rreq = build_request(kind, payload, rid, self.dispatcher.now(), self.limits)
            if self.kv is not None:
                await self.kv.annotate(kind, payload, len(body), rreq)
            if self.cache is None:
                resp = await self._route(request, rreq, body, ex)
            else:  # the semantic cache answers, or calls the normal path (recording the answer)

                def route(record: list[bytes] | None, affinity_hint: str | None) -> Awaitable[web.StreamResponse]:
                    ex.record = record
                    rreq.affinity_hint = affinity_hint
                    return self._route(request, rreq, body, ex)

                def rerun() -> Awaitable[tuple[int, bytes] | None]:
                    return self.rerun_on_idle(request, rreq, body)

                resp = await self.cache.serve(request, endpoint, payload, route, lambda: ex.replica, rerun)
            ex.status = ex.status or resp.status
            return resp
        except RequestError as exc:
            ex.status, ex.error = 400, exc.message
            return error_response(400, exc.message, exc.field, {"x-request-id": rid})
        except ProxyError as exc:
            ex.status, ex.error = exc.status, exc.message
            return error_response(exc.status, exc.message, exc.param, {**exc.headers, "x-request-id": rid})
        except asyncio.CancelledError:
            if not ex.delivered:
                ex.status, ex.error = 499, "client closed the connection"
            raise
        except ConnectionResetError:  # aiohttp's ClientConnectionResetError is one
            # the client went away while pylb wrote to it: nothing to answer, nothing to log
            ex.status, ex.error = 499, "client closed the connection"
            return web.Response(status=499)
        except Exception as exc:
            ex.status, ex.error = 500, f"{type(exc).__name__}: {exc}"
            self.metrics.count_background_error("handler")
            log.exception("unhandled error while routing")
            return error_response(500, "internal error in pylb (logged)", headers={"x-request-id": rid})
        finally:
            self.bodies.give(held[0])
            self.in_progress -= 1
            e2e = time.perf_counter() - t_start
            self.metrics.count_request(endpoint, ex.status)
            self.metrics.observe_e2e(endpoint, e2e)
            if self.settings.logging.access_log and access_log.isEnabledFor(logging.INFO):
                access_log.info(
                    "request",
                    extra={
                        "method": request.method,
                        "path": request.path,
                        "status": ex.status,
                        "replica": ex.replica,
                        "attempts": ex.attempts,
                        "ttft_ms": round(ex.ttft * 1000, 3) if ex.ttft is not None else None,
                        "e2e_ms": round(e2e * 1000, 3),
                        **({"error": ex.error} if ex.error else {}),
                    },
                )
            request_id_var.reset(token)

    async def read_body(self, request: web.Request, held: list[int]) -> bytes:
        ss = self.settings.server
        return await read_body(request, ss.max_body_bytes, ss.body_timeout_s, self.bodies, held)

    async def _route(self, request: web.Request, rreq: RoutingRequest, body: bytes, ex: Exchange) -> web.StreamResponse:
        us = self.settings.upstream
        headers = raw_request_headers(request.raw_headers, rreq.request_id, self.skip_raw)
        target = request.raw_path
        deadline = rreq.arrival + us.retry_deadline_s
        retries = 0
        failed: str | None = None
        while True:
            if not self.fleet.healthy:
                raise NoReplica("no healthy replica to serve the request; retry later", headers={"Retry-After": self.balancer.retry_after})
            d = await self._wait_dispatch(rreq, failed)
            ex.replica = d.replica
            ex.attempts += 1
            try:
                return await self._attempt(request, rreq, body, headers, d, target, ex)
            except AttemptFailed as r:
                ex.error = r.message
                if self.cut:
                    raise NoReplica("pylb is shutting down; retry on another instance", headers={"Retry-After": self.balancer.retry_after}) from None
                if retries < us.max_retries and self.dispatcher.now() < deadline and self.fleet.healthy:
                    retries += 1
                    failed = d.replica
                    self.metrics.count_retry(r.reason)
                    log.info("retrying on another replica", extra={"replica": d.replica, "reason": r.reason, "error": r.message})
                    continue
                if r.response is not None:
                    return r.response
                if not self.fleet.healthy:
                    raise NoReplica(f"no healthy replica left ({r.message})", headers={"Retry-After": self.balancer.retry_after}) from None
                raise UpstreamFailed(self.names.public(f"the replica failed before answering: {r.message}", d.replica)) from None

    async def _wait_dispatch(self, rreq: RoutingRequest, failed_replica: str | None = None) -> Dispatch:
        return await self.balancer.wait_dispatch(rreq, failed_replica)

    async def _attempt(
        self, request: web.Request, rreq: RoutingRequest, body: bytes, headers: bytes, d: Dispatch, target: str, ex: Exchange
    ) -> web.StreamResponse:
        """One attempt on replica `d.replica`; raises AttemptFailed when it failed before the client got a byte."""
        assert self.pool is not None
        rid, replica = rreq.request_id, d.replica
        disp = self.dispatcher
        est_handle = self.balancer.estimate_first_token(rreq, replica)
        t_sent = time.perf_counter()
        done = False
        up: UpstreamResponse | None = None
        try:
            try:
                up = await self.pool.request(replica, "POST", target, headers, body)
            except UPSTREAM_ERRORS as exc:
                done = True
                raise self._failed(rid, replica, exc, "before the answer") from None
            status = up.status
            if rreq.stream and status == 200 and up.content_type == "text/event-stream":
                resp, done = await self._stream(request, rreq, up, replica, ex, t_sent)
                return resp
            try:
                data = await up.read()
            except UPSTREAM_ERRORS as exc:
                done = True
                raise self._failed(rid, replica, exc, "while reading the answer") from None
            resp = web.Response(status=status, body=data, headers=response_headers(up.headers, rid, self.names.label(replica), ex.attempts))
            if status >= 500:
                if status in self.eject_statuses:  # the replica says it cannot serve; a 500 answers this request only
                    self.fleet.report_5xx(replica, status)
                self.metrics.count_upstream_error(replica, "status")
                disp.complete(rid, replica, None)
                done = True
                if status in self.retry_statuses:
                    raise AttemptFailed("status", f"replica {self.names.label(replica)} answered HTTP {status}", resp)
                return resp
            self.fleet.report_success(replica)
            self._book_answer(rid, replica, status, data, sse=False)
            done = True
            return resp
        finally:
            if est_handle is not None:
                est_handle.cancel()
            if not done:  # cancelled (the client left) or an unexpected error: the replica's work is abandoned
                disp.complete(rid, replica, None)
            if up is not None:
                up.close()  # a no-op on a fully read answer; aborts an unfinished one upstream

    def rerun_on_idle(self, request: web.Request, rreq: RoutingRequest, body: bytes) -> Awaitable[tuple[int, bytes] | None]:
        """Send the request once more, outside the client's exchange (the semantic cache's
        verification of a hit): captures the request's target and headers now, and the returned
        awaitable gives (status, whole body), or None when no replica was idle or the attempt
        failed. The re-run goes through the router as its own request (id `<id>.verify<n>`, one
        priority below the client's, an affinity hint for the first idle replica) so that the
        router counts its load; it is sent only to a replica that was idle, with no retries, and
        is not counted among pylb's client requests."""
        self._ids += 1
        rid = f"{rreq.request_id}.verify{self._ids}"
        headers = raw_request_headers(request.raw_headers, rid, self.skip_raw)
        again = dataclasses.replace(rreq, request_id=rid, priority=rreq.priority - 1)
        return self._rerun(again, request.raw_path, headers, body)

    async def _rerun(self, rreq: RoutingRequest, target: str, headers: bytes, body: bytes) -> tuple[int, bytes] | None:
        idle = self.balancer.idle_replicas()
        if not idle or self.pool is None or self.cut:
            return None
        disp = self.dispatcher
        rreq.affinity_hint = idle[0]
        rreq.arrival = disp.now()
        try:
            d = await self.balancer.wait_dispatch(rreq)
        except ProxyError:
            return None
        replica = d.replica
        if replica not in idle:
            if not self.balancer.move(rreq.request_id, idle[0]):
                disp.complete(rreq.request_id, replica, None)  # busy by now, and the router cannot move it: not sent
                return None
            replica = idle[0]
        done = False
        up: UpstreamResponse | None = None
        try:
            up = await self.pool.request(replica, "POST", target, headers, body)
            data = await up.read()
            self._book_answer(rreq.request_id, replica, up.status, data, sse=rreq.stream)
            done = True
            return up.status, data
        except UPSTREAM_ERRORS as exc:
            log.info("re-run of a cache hit failed", extra={"replica": replica, "error": f"{type(exc).__name__}: {exc}"})
            return None
        finally:
            if not done:  # failed, or cancelled (pylb stops): the replica's work is abandoned
                disp.complete(rreq.request_id, replica, None)
            if up is not None:
                up.close()

    def _book_answer(self, rid: str, replica: str, status: int, data: bytes, sse: bool) -> None:
        """The router learns of an answer read whole: a 200 is its first token and completion,
        with the usage its body reports (an SSE body's last events when `sse`), any other status
        a completion without usage."""
        if status == 200:
            self.dispatcher.first_token(rid, replica)
            self.dispatcher.complete(rid, replica, usage_from_sse_tail(data[-4096:]) if sse else usage_from_json_body(data))
        else:
            self.dispatcher.complete(rid, replica, None)

    def _failed(self, rid: str, replica: str, exc: BaseException, when: str) -> AttemptFailed:
        """Book-keeping of a failed exchange; returns the AttemptFailed to raise."""
        kind = "timeout" if isinstance(exc, asyncio.TimeoutError) else "connect"
        self.dispatcher.complete(rid, replica, None)
        if not self.cut:  # pylb cut it while stopping: no evidence against the replica
            self.fleet.report_connect_error(replica, f"{type(exc).__name__}: {exc}")
            self.metrics.count_upstream_error(replica, kind)
        return AttemptFailed(kind, self.names.public(f"replica {replica} failed {when}: {type(exc).__name__}: {exc}".rstrip(": "), replica))

    async def _stream(
        self, request: web.Request, rreq: RoutingRequest, up: UpstreamResponse, replica: str, ex: Exchange, t_sent: float
    ) -> tuple[web.StreamResponse, bool]:
        """Pass an SSE stream through; returns (response, completed-in-router)."""
        rid = rreq.request_id
        disp = self.dispatcher
        try:
            first = await up.next_piece() or b""
        except UPSTREAM_ERRORS as exc:
            raise self._failed(rid, replica, exc, "before its first chunk") from None
        now = time.perf_counter()
        disp.first_token(rid, replica)
        ex.ttft = now - ex.t_start
        self.metrics.observe_ttft(ex.endpoint, ex.ttft)
        out = web.StreamResponse(status=up.status, headers=response_headers(up.headers, rid, self.names.label(replica), ex.attempts))
        await out.prepare(request)
        if not first:  # the stream ended at once, without its [DONE] event
            disp.complete(rid, replica, None)
            await self._end_truncated(out, replica, ex)
            return out, True
        await out.write(first)  # sends the head with it
        splice = StreamSplice(request.transport, up, out.headers.get("Transfer-Encoding", "").lower() == "chunked", first, ex.record)
        failed: BaseException | None = None
        try:
            await up.pipe(splice)
        except UPSTREAM_ERRORS as exc:
            failed = exc
        except asyncio.CancelledError:  # the client closed its connection (aiohttp cancels the handler)
            if splice.delivered:  # ... after the stream's last event: it has the whole answer
                self._stream_succeeded(rreq, replica, splice, ex)
            raise
        # the client has the whole answer when the stream's last event, `data: [DONE]`, reached
        # its socket; a stream that ends without it was cut short (a replica shutting down)
        whole = splice.delivered
        if not whole and splice.gone:  # the client went away mid-stream
            ex.status, ex.error = 499, "client closed the connection"
            disp.complete(rid, replica, None)
            return out, True  # the caller closes the upstream answer, which aborts it
        if whole:
            self._stream_succeeded(rreq, replica, splice, ex)
        elif failed is None:
            disp.complete(rid, replica, None)
            await self._end_truncated(out, replica, ex)
            return out, True
        elif self.cut:
            disp.complete(rid, replica, None)
            ex.status, ex.error = 503, "cut by pylb's shutdown"
            await out.write(sse_error_event(503, "pylb shut down before this stream ended"))
        else:
            self._failed(rid, replica, failed, "mid-stream")
            ex.status = 502  # counted and logged as failed, though the client saw a 200 head
            ex.error = f"replica failed mid-stream: {type(failed).__name__}: {failed}"
            await out.write(sse_error_event(502, self.names.public(f"the replica serving this stream failed: {type(failed).__name__}: {failed}".rstrip(": "), replica)))
        try:
            await out.write_eof()
        except ConnectionResetError:  # the client left before the body's last chunk
            if not whole:
                ex.status, ex.error = 499, "client closed the connection"
        return out, True

    async def _end_truncated(self, out: web.StreamResponse, replica: str, ex: Exchange) -> None:
        """A stream the replica ended without `data: [DONE]`: an error for the client (an error
        event, then the end), counted as an upstream error of kind "truncated" (not held against
        the replica's health: a replica that is shutting down does this, and its probes tell)."""
        self.metrics.count_upstream_error(replica, "truncated")
        ex.status, ex.error = 502, "the replica ended the stream before its final event"
        try:
            await out.write(sse_error_event(502, "the replica ended this stream before its final event"))
            await out.write_eof()
        except ConnectionResetError:
            ex.status = 499

    def _stream_succeeded(self, rreq: RoutingRequest, replica: str, splice: StreamSplice, ex: Exchange) -> None:
        """Book-keeping of a stream the client received whole: the replica answered well, the
        router completes the request with the stream's usage (or an estimate), status 200."""
        self.fleet.report_success(replica)
        usage = usage_from_sse_tail(splice.tail())
        if usage is None:
            usage = Usage(rreq.prompt_tokens, max(0, splice.events - 1), 0, reported=False)
        self.dispatcher.complete(rreq.request_id, replica, usage)
        ex.status, ex.delivered = 200, True
