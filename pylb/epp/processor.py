"""The ext_proc stream of one HTTP request: pylb's router picks the replica, Envoy forwards.

Design (issue 11 §3; the Gateway API Inference Extension's endpoint-picker protocol)
------------------------------------------------------------------------------------
Envoy's ext_proc filter opens one bidirectional `envoy.service.ext_proc.v3.ExternalProcessor/
Process` stream per HTTP request and sends the request's phases on it, each answered in order.
pylb expects the processing mode of `examples/envoy-epp.yaml`: request headers SEND, request body
BUFFERED (the whole body in one message: routing reads the prompt before Envoy picks a host),
response headers SEND, response body STREAMED (every chunk, as it passes); or GIE's reference
mode, FULL_DUPLEX_STREAMED bodies (named in the `protocol_config` of Envoy's first message):
pylb then holds the headers' answer until the body is whole, answers it with the pick, and sends
every body piece back, as that mode wants.

    request_headers   the method and `:path` decide the kind: POST /v1/completions and
                      /v1/chat/completions are routed (answered CONTINUE, the decision waits for
                      the body); any other path goes to the healthy replicas in turn, named in
                      the headers answer at once, without the router (as `pylb serve` forwards it)
    request_body      parsed with the proxy's request model (`pylb.router.request`), submitted
                      through the shared `Balancer` (the proxy's router, dispatcher and fleet),
                      and, once dispatched, answered with the header `x-gateway-destination-
                      endpoint: ip:port` set, the same value in the dynamic metadata namespace
                      `envoy.lb`, `clear_route_cache` (so that Envoy routes again and its
                      original-destination cluster reads the new value), and the body unchanged
    response_headers  the replica's status: 5xx are reported to the fleet (passive ejection,
                      `pylb_upstream_errors_total`), others reset its counters; the answer adds
                      `x-pylb-replica` (the replica's base URL) and `x-request-id`, as `pylb serve`
    response_body     for a streamed answer (200, text/event-stream) the first chunk is the first
                      token (`on_first_token`, `pylb_ttft_seconds`); a non-streamed answer gets
                      the proxy's estimated first-token event (`Balancer.estimate_first_token`).
                      At the end of the stream the router completes the request with the answer's
                      `usage` (the JSON body's, or the last SSE events'; else the proxy's estimate)

Errors are Envoy `ImmediateResponse`s carrying the OpenAI-style JSON error of `pylb serve`
(`pylb.proxy.errors.error_body`): 400 naming the field for a body that is not a routable OpenAI
request, 413 past `server.max_body_bytes`, 503 with `Retry-After` when no replica is healthy,
429 when pylb's queue is full, 504 after `router.queue_timeout_s` in the queue. A stream that
ends before the response did (the client went away, Envoy gave up) completes the request in the
router with `usage=None` (counted 499), and one that ends while queued withdraws it, exactly as
the proxy's client disconnect. Every request is counted once in `pylb_requests_total`.

GIE's endpoint-picker protocol (gateway-api-inference-extension, docs/proposals/
004-endpoint-picker-protocol), beyond the single destination:

    fallbacks         the destination is `ip:port,ip:port,...`: the router's choice first, then
                      up to `epp.fallbacks` other eligible replicas, best first by the router's
                      predicted TTFT for this request (queue, un-prefilled work, uncached prompt
                      tokens there). A data plane with retries goes down the list (Envoy: the
                      override_host load-balancing policy); 0 names one replica, which is what an
                      ORIGINAL_DST cluster can read. Header and metadata carry the same value.
    subset hint       `envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset` in the
                      request's filter metadata (a list of ip:port): pylb picks only among the
                      healthy replicas named there; none -> 503. The router is not told the
                      subset: when its choice falls outside, the subset's best replica by the
                      router's prediction takes the request and the accounting moves there.
    served endpoint   `envoy.lb` / `x-gateway-destination-endpoint-served` in the metadata of the
                      response phases (Envoy: override_host's selected_host_key, forwarded by
                      ext_proc's forwarding_namespaces): when it is not pylb's pick, the router's
                      in-flight and prefill accounting moves to the replica that served
                      (`Router.reassign`) and `pylb_retries_total{reason="epp_fallback"}` counts it.

A STREAMED request body (pieces, the headers already gone upstream) is refused with a 500 naming
the setting: the request could no longer be routed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from pylb.observability.logging import ACCESS_LOGGER, request_id_var
from pylb.proxy.errors import ProxyError, error_body
from pylb.proxy.usage import usage_from_json, usage_from_sse_tail
from pylb.router.interface import RoutingRequest, Usage
from pylb.router.request import CHAT, COMPLETIONS, RequestError, build_request, parse_json_body

if TYPE_CHECKING:
    from .server import EppServer

log = logging.getLogger("pylb.epp")
access_log = logging.getLogger(ACCESS_LOGGER)

ROUTED: dict[str, tuple[str, str]] = {"/v1/completions": (COMPLETIONS, "completions"), "/v1/chat/completions": (CHAT, "chat")}
"""Routed paths -> (request kind, endpoint label of pylb's metrics)."""


def destination(replica: str) -> str:
    """`ip:port` of a replica's base URL (`[v6]:port` for IPv6), as Envoy's original-destination
    cluster reads it; the scheme's port when the URL names none."""
    parts = urlsplit(replica)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = parts.hostname or ""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode("latin-1", "replace")),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


def _headers(msg: ext_proc.HttpHeaders) -> dict[str, str]:
    """The headers of a phase, lower-case names (Envoy sends the value in `raw_value` or `value`)."""
    return {h.key.lower(): h.raw_value.decode("latin-1") if h.raw_value else h.value for h in msg.headers.headers}


def immediate(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> ext_proc.ProcessingResponse:
    """An ImmediateResponse with pylb's OpenAI-style JSON error: Envoy answers the client with it."""
    mutation = ext_proc.HeaderMutation(
        set_headers=[_header("content-type", "application/json")] + [_header(k, v) for k, v in (headers or {}).items()]
    )
    return ext_proc.ProcessingResponse(
        immediate_response=ext_proc.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=status),  # the enum StatusCode numbers are the HTTP codes
            headers=mutation,
            body=json.dumps(error_body(status, message, param)).encode(),
            details=f"pylb_{status}",
        )
    )


_CONTINUE_HEADERS = ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse())
_CONTINUE_BODY = ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse())
_CONTINUE_RESPONSE_BODY = ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse())
_FULL_DUPLEX = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED


def _streamed(phase: str, body: bytes, end: bool) -> ext_proc.ProcessingResponse:
    """FULL_DUPLEX_STREAMED: the body piece Envoy passes on is the one the processor sends back."""
    common = ext_proc.CommonResponse(
        body_mutation=ext_proc.BodyMutation(streamed_response=ext_proc.StreamedBodyResponse(body=body, end_of_stream=end))
    )
    if phase == "request_body":
        return ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse(response=common))
    return ext_proc.ProcessingResponse(response_body=ext_proc.BodyResponse(response=common))


@dataclass(slots=True)
class _Exchange:
    """Book-keeping of one request's stream."""

    rid: str = ""
    endpoint: str = "other"
    kind: str | None = None
    t_start: float = field(default_factory=time.perf_counter)
    status: int = 0  # the answer's final status (0 until known)
    body: bytearray = field(default_factory=bytearray)
    rreq: RoutingRequest | None = None
    replica: str | None = None  # the replica the router holds the request on (until complete)
    est: asyncio.TimerHandle | None = None
    sse: bool = False
    first: bool = False  # the first body chunk of the answer came
    events: int = 0
    tail: list[bytes] = field(default_factory=list)
    answer: bytearray = field(default_factory=bytearray)
    answer_overflow: bool = False
    ttft: float | None = None
    error: str | None = None
    duplex_request: bool = False  # FULL_DUPLEX_STREAMED request body (from Envoy's protocol_config)
    duplex_response: bool = False  # FULL_DUPLEX_STREAMED response body
    headers_pending: bool = False  # duplex: the request headers' answer waits for the body
    subset: set[str] | None = None  # the data plane's subset hint (ip:port), None without one
    served_seen: bool = False  # the data plane reported the endpoint that served


class Processor(ext_proc_grpc.ExternalProcessorServicer):
    """The ext_proc service of `pylb epp` (see the module comment)."""

    def __init__(self, epp: EppServer) -> None:
        self.epp = epp
        self.balancer = epp.balancer
        s = epp.settings
        self.header = s.epp.destination_header
        self.namespace = s.epp.metadata_namespace
        self.served_key = f"{self.header}-served"
        self.subset_namespace = s.epp.subset_namespace
        self.subset_key = f"{self.header}-subset"
        self.fallbacks = s.epp.fallbacks
        self.max_body = s.server.max_body_bytes
        self.in_progress = 0
        self._turn = 0
        self._ids = 0
        self._id_prefix = uuid.uuid4().hex[:16]

    async def Process(
        self, request_iterator: AsyncIterator[ext_proc.ProcessingRequest], context: Any
    ) -> AsyncIterator[ext_proc.ProcessingResponse]:  # noqa: N802 - the gRPC method's name
        """One HTTP request's phases in, one answer per phase out (see the module comment)."""
        ex = _Exchange()
        self.in_progress += 1
        try:
            async for msg in request_iterator:
                if msg.HasField("protocol_config"):  # the first message says the body modes
                    pc = msg.protocol_config
                    ex.duplex_request = pc.request_body_mode == _FULL_DUPLEX
                    ex.duplex_response = pc.response_body_mode == _FULL_DUPLEX
                phase = msg.WhichOneof("request")
                if phase == "request_headers":
                    ex.subset = self._subset_hint(msg)
                    ans = self._request_headers(ex, msg.request_headers)
                    request_id_var.set(ex.rid)  # each stream runs in its own task, so in its own context
                    if ex.duplex_request and ans is _CONTINUE_HEADERS:
                        ex.headers_pending = True  # answered with the pick, once the body is in
                        continue
                elif ex.duplex_request and phase in ("request_body", "request_trailers"):
                    for ans in await self._duplex_request(ex, msg):
                        yield ans
                        if ans.HasField("immediate_response"):
                            return
                    continue
                elif phase == "request_body":
                    ans = await self._request_body(ex, msg.request_body)
                elif phase == "response_headers":
                    self._served(ex, msg)
                    ans = self._response_headers(ex, msg.response_headers)
                elif phase == "response_body":
                    self._served(ex, msg)
                    ans = self._response_body(ex, msg.response_body)
                elif phase == "request_trailers":
                    ans = ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse())
                elif phase == "response_trailers":
                    self._finish(ex, ended=True)
                    ans = ext_proc.ProcessingResponse(response_trailers=ext_proc.TrailersResponse())
                else:  # a phase this version does not know: nothing to answer
                    continue
                yield ans
                if ans.HasField("immediate_response"):
                    return
        except Exception as exc:  # a bug: answer 500 if the stream still stands, count, log
            ex.status, ex.error = 500, f"{type(exc).__name__}: {exc}"
            self.balancer.metrics.count_background_error("epp")
            log.exception("unhandled error in the ext_proc stream")
            yield immediate(500, "internal error in pylb (logged)")
        finally:  # the stream is over: an exchange not finished by now was cut short
            self._finish(ex, ended=False)
            self.in_progress -= 1

    # ---- request path ---------------------------------------------------------------------------

    def _request_id(self, given: str | None) -> str:
        rid = given
        if not rid or len(rid) > 128 or not rid.isprintable():
            self._ids += 1
            rid = f"{self._id_prefix}{self._ids:08x}"
        if self.balancer.dispatcher.known(rid):  # an id reused while the first is in flight
            self._ids += 1
            rid = f"{rid}.{self._ids}"
        return rid

    def _request_headers(self, ex: _Exchange, msg: ext_proc.HttpHeaders) -> ext_proc.ProcessingResponse:
        h = _headers(msg)
        ex.rid = self._request_id(h.get("x-request-id"))
        path = h.get(":path", "").split("?", 1)[0]
        routed = ROUTED.get(path) if h.get(":method", "").upper() == "POST" else None
        if routed is None:
            return self._forward(ex)
        ex.kind, ex.endpoint = routed
        if msg.end_of_stream:
            ex.status = 400
            return immediate(400, "the request has no body; expected a JSON object", "body", {"x-request-id": ex.rid})
        return _CONTINUE_HEADERS

    def _forward(self, ex: _Exchange) -> ext_proc.ProcessingResponse:
        """A path pylb does not route (e.g. /v1/models): the healthy replicas in turn."""
        healthy = self._eligible(ex)
        if not healthy:
            ex.status = 503
            return immediate(503, self._none_eligible(ex, "to forward the request to"), headers={"Retry-After": self.balancer.retry_after})
        self._turn += 1
        k = self._turn % len(healthy)
        order = healthy[k:] + healthy[:k]
        ex.replica = order[0]
        return self._pick(order[: 1 + self.fallbacks], "request_headers")

    # ---- GIE: subset hint, fallbacks, served endpoint --------------------------------------------------

    def _subset_hint(self, msg: ext_proc.ProcessingRequest) -> set[str] | None:
        """The endpoints (ip:port) the data plane allows, from the request's filter metadata
        (`envoy.lb.subset_hint` / `x-gateway-destination-endpoint-subset`: a list, or a
        comma-separated string); None when it sets none."""
        ns = msg.metadata_context.filter_metadata.get(self.subset_namespace)
        if ns is None or self.subset_key not in ns.fields:
            return None
        v = ns.fields[self.subset_key]
        kind = v.WhichOneof("kind")
        if kind == "list_value":
            items = [x.string_value for x in v.list_value.values if x.WhichOneof("kind") == "string_value"]
        elif kind == "string_value":
            items = v.string_value.split(",")
        else:
            items = []
        return {i.strip() for i in items if i.strip()}

    def _eligible(self, ex: _Exchange) -> list[str]:
        """The healthy replicas the request may go to: all, or those its subset hint names."""
        healthy = list(self.balancer.fleet.healthy)
        if ex.subset is None:
            return healthy
        return [r for r in healthy if destination(r) in ex.subset]

    def _none_eligible(self, ex: _Exchange, what: str) -> str:
        if ex.subset is None:
            return f"no healthy replica {what}"
        ex.error = "subset hint: no healthy replica in it"
        return f"no healthy replica among the {len(ex.subset)} endpoint(s) of the data plane's subset hint {what}"

    def _ranked(self, rreq: RoutingRequest, among: list[str], exclude: str) -> list[str]:
        """`among` less `exclude`, best first by the router's predicted TTFT for `rreq` (its
        queue, un-prefilled work and uncached prompt tokens there); by in-flight count when the
        router cannot predict."""
        view = self.balancer.router.view
        others = [r for r in among if r != exclude]

        def key(r: str) -> tuple[float, float]:
            st = view.replica(r)
            if st is None:
                return (float("inf"), 0.0)
            try:
                return (view.predicted_ttft(rreq, st.index), float(st.inflight_requests))
            except Exception:  # a router without predictions: least in flight
                return (0.0, float(st.inflight_requests))

        return sorted(others, key=key)

    def _by_destination(self, dest: str) -> str | None:
        """The replica (base URL) whose ip:port is `dest`."""
        for r in self.balancer.fleet.replicas:
            if destination(r) == dest:
                return r
        return None

    def _served(self, ex: _Exchange, msg: ext_proc.ProcessingRequest) -> None:
        """GIE's served endpoint (`envoy.lb` / `x-gateway-destination-endpoint-served` in the
        request's metadata, from the data plane): when it is not the replica pylb picked, the
        data plane fell back; move the router's accounting to the replica that served."""
        if ex.served_seen or ex.rreq is None or ex.replica is None:
            return
        ns = msg.metadata_context.filter_metadata.get(self.namespace)
        if ns is None or self.served_key not in ns.fields:
            return
        ex.served_seen = True
        served = ns.fields[self.served_key].string_value.strip()
        if not served or served == destination(ex.replica):
            return
        replica = self._by_destination(served)
        m = self.balancer.metrics
        m.count_retry("epp_fallback")
        if replica is None:
            log.warning(
                "the data plane served the request on an endpoint pylb does not know", extra={"served": served, "picked": ex.replica}
            )
            return
        if self.balancer.move(ex.rid, replica):
            if ex.est is not None:  # the estimate ran against the other replica's prefill rate
                ex.est.cancel()
                ex.est = self.balancer.estimate_first_token(ex.rreq, replica)
            ex.replica = replica

    def _pick(self, replicas: list[str], phase: str) -> ext_proc.ProcessingResponse:
        """The answer naming `replicas` (the chosen one, then the fallbacks): the header, the
        same value in the dynamic metadata, a fresh route."""
        dest = ",".join(destination(r) for r in replicas)
        common = ext_proc.CommonResponse(
            header_mutation=ext_proc.HeaderMutation(set_headers=[_header(self.header, dest)]), clear_route_cache=True
        )
        meta = struct_pb2.Struct()
        meta.update({self.namespace: {self.header: dest}})
        if phase == "request_headers":
            return ext_proc.ProcessingResponse(request_headers=ext_proc.HeadersResponse(response=common), dynamic_metadata=meta)
        return ext_proc.ProcessingResponse(request_body=ext_proc.BodyResponse(response=common), dynamic_metadata=meta)

    async def _request_body(self, ex: _Exchange, msg: ext_proc.HttpBody) -> ext_proc.ProcessingResponse:
        if ex.kind is None:  # not routed: the destination was named with the headers
            return _CONTINUE_BODY
        ex.body += msg.body
        if len(ex.body) > self.max_body:
            ex.status = 413
            return immediate(413, f"request body larger than {self.max_body} bytes", "body", {"x-request-id": ex.rid})
        if not msg.end_of_stream:
            # Envoy sends the body in pieces when its processing mode is STREAMED: by then the
            # headers went upstream and the request cannot be routed any more
            ex.status = 500
            return immediate(
                500,
                "pylb epp needs the whole request body before the headers go on: set Envoy's ext_proc request_body_mode to BUFFERED or FULL_DUPLEX_STREAMED",
            )
        return await self._route(ex, "request_body")

    async def _duplex_request(self, ex: _Exchange, msg: ext_proc.ProcessingRequest) -> list[ext_proc.ProcessingResponse]:
        """FULL_DUPLEX_STREAMED request body (and trailers): Envoy sends the pieces without
        waiting; pylb collects them, routes at the end of the body (or at the trailers), then
        answers in order: the headers (the pick), the body (sent back whole), the trailers."""
        trailers = msg.WhichOneof("request") == "request_trailers"
        if not ex.headers_pending:  # a path routed with the headers: pass the pieces on
            if trailers:
                return [ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse())]
            return [_streamed("request_body", msg.request_body.body, msg.request_body.end_of_stream)]
        if not trailers:
            ex.body += msg.request_body.body
            if len(ex.body) > self.max_body:
                ex.status = 413
                return [immediate(413, f"request body larger than {self.max_body} bytes", "body", {"x-request-id": ex.rid})]
            if not msg.request_body.end_of_stream:
                return []
        body = bytes(ex.body)
        ans = await self._route(ex, "request_headers")
        if ans.HasField("immediate_response"):
            return [ans]
        ex.headers_pending = False
        out = [ans, _streamed("request_body", body, not trailers)]
        if trailers:
            out.append(ext_proc.ProcessingResponse(request_trailers=ext_proc.TrailersResponse()))
        return out

    async def _route(self, ex: _Exchange, phase: str) -> ext_proc.ProcessingResponse:
        """The whole body is in: parse, route, and answer `phase` with the pick (or an error)."""
        assert ex.kind is not None
        try:
            payload = parse_json_body(bytes(ex.body))
            rreq = build_request(ex.kind, payload, ex.rid, self.balancer.dispatcher.now(), self.balancer.limits)
        except RequestError as exc:
            ex.status, ex.error = 400, exc.message
            return immediate(400, exc.message, exc.field, {"x-request-id": ex.rid})
        eligible = self._eligible(ex)
        if not eligible:
            ex.status, ex.error = 503, ex.error or "no healthy replica"
            return immediate(
                503,
                self._none_eligible(ex, "to serve the request; retry later"),
                headers={"Retry-After": self.balancer.retry_after, "x-request-id": ex.rid},
            )
        try:
            d = await self.balancer.wait_dispatch(rreq)
        except ProxyError as exc:
            ex.status, ex.error = exc.status, exc.message
            return immediate(exc.status, exc.message, exc.param, {**exc.headers, "x-request-id": ex.rid})
        replica = d.replica
        if ex.subset is not None:
            eligible = self._eligible(ex)  # again: health may have changed while it waited
            if replica not in eligible:
                # the router chose outside the subset: the subset's best by the router's own
                # prediction takes it, and the router's accounting moves there
                best = self._ranked(rreq, eligible, replica)
                if not best or not self.balancer.move(ex.rid, best[0]):
                    self.balancer.dispatcher.complete(ex.rid, replica, None)
                    ex.status, ex.error = 503, "subset hint: the router's choice is outside it and could not be moved"
                    return immediate(
                        503,
                        "no replica of the data plane's subset hint could take the request; retry later",
                        headers={"Retry-After": self.balancer.retry_after, "x-request-id": ex.rid},
                    )
                replica = best[0]
        ex.rreq, ex.replica = rreq, replica
        ex.est = self.balancer.estimate_first_token(rreq, ex.replica)
        ex.body = bytearray()
        return self._pick([ex.replica] + self._ranked(rreq, eligible, ex.replica)[: self.fallbacks], phase)

    # ---- response path ---------------------------------------------------------------------------

    def _response_headers(self, ex: _Exchange, msg: ext_proc.HttpHeaders) -> ext_proc.ProcessingResponse:
        h = _headers(msg)
        try:
            ex.status = int(h.get(":status", "0"))
        except ValueError:
            ex.status = 0
        replica, fleet = ex.replica, self.balancer.fleet
        set_headers = [_header("x-request-id", ex.rid)]
        if replica is not None:
            set_headers.append(_header("x-pylb-replica", replica))
            if ex.status >= 500:
                fleet.report_5xx(replica, ex.status)
                self.balancer.metrics.count_upstream_error(replica, "status")
            else:
                fleet.report_success(replica)
        ex.sse = ex.rreq is not None and ex.rreq.stream and ex.status == 200 and h.get("content-type", "").startswith("text/event-stream")
        ans = ext_proc.ProcessingResponse(
            response_headers=ext_proc.HeadersResponse(
                response=ext_proc.CommonResponse(header_mutation=ext_proc.HeaderMutation(set_headers=set_headers))
            )
        )
        if msg.end_of_stream:
            self._finish(ex, ended=True)
        return ans

    def _response_body(self, ex: _Exchange, msg: ext_proc.HttpBody) -> ext_proc.ProcessingResponse:
        chunk = msg.body
        if ex.rreq is not None and ex.replica is not None:
            if ex.sse:
                if chunk and not ex.first:
                    ex.first = True
                    ex.ttft = time.perf_counter() - ex.t_start
                    self.balancer.dispatcher.first_token(ex.rid, ex.replica)
                    self.balancer.metrics.observe_ttft(ex.endpoint, ex.ttft)
                if chunk:
                    ex.events += chunk.count(b"data:")
                    ex.tail = (ex.tail + [chunk])[-3:]
            elif not ex.answer_overflow:
                ex.answer += chunk
                if len(ex.answer) > self.max_body:  # too large to look for its usage: an estimate will do
                    ex.answer_overflow = True
                    ex.answer = bytearray()
        if msg.end_of_stream:
            self._finish(ex, ended=True)
        if ex.duplex_response:
            return _streamed("response_body", chunk, msg.end_of_stream)
        return _CONTINUE_RESPONSE_BODY

    def _usage(self, ex: _Exchange) -> Usage | None:
        rreq = ex.rreq
        assert rreq is not None
        if ex.sse:
            return usage_from_sse_tail(b"".join(ex.tail)) or Usage(rreq.prompt_tokens, max(0, ex.events - 1), 0)
        if ex.answer_overflow:
            return None
        try:
            return usage_from_json(json.loads(bytes(ex.answer).decode("utf-8")).get("usage"))
        except (ValueError, AttributeError):  # not JSON (UnicodeDecodeError is a ValueError)
            return None

    def _finish(self, ex: _Exchange, ended: bool) -> None:
        """The exchange is over: its answer `ended`, or its stream ended first (an error answered
        with an ImmediateResponse, or the client or Envoy went away). A routed request is
        completed in the router, with the answer's usage when it ended well, else with None and
        counted 499 (cut short). Then it is counted and logged. Runs once per exchange."""
        if ex.endpoint == "":
            return
        if ex.est is not None:
            ex.est.cancel()
            ex.est = None
        if not ended and ex.replica is not None:  # sent to a replica, the answer did not end
            ex.status, ex.error = 499, ex.error or "the stream ended before the answer did (client or Envoy gone)"
        disp = self.balancer.dispatcher
        if ex.rreq is not None and ex.replica is not None:
            if ex.status == 200:
                if not ex.first:  # the estimate's event, or an SSE answer that ended at once
                    disp.first_token(ex.rid, ex.replica)
                disp.complete(ex.rid, ex.replica, self._usage(ex))
            else:
                disp.complete(ex.rid, ex.replica, None)
        status = ex.status or 499
        e2e = time.perf_counter() - ex.t_start
        m = self.balancer.metrics
        m.count_request(ex.endpoint, status)
        m.observe_e2e(ex.endpoint, e2e)
        if self.epp.settings.logging.access_log and access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "request",
                extra={
                    "path": ex.kind or "other",
                    "status": status,
                    "replica": ex.replica,
                    "ttft_ms": round(ex.ttft * 1000, 3) if ex.ttft is not None else None,
                    "e2e_ms": round(e2e * 1000, 3),
                    **({"error": ex.error} if ex.error else {}),
                },
            )
        ex.endpoint = ""  # finished
