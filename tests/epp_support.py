"""A stand-in for Envoy's ext_proc filter, for `pylb epp`'s tests: it opens one real gRPC
`Process` stream per HTTP request, sends the phases Envoy sends in the processing mode of
examples/envoy-epp.yaml (request headers, buffered body, response headers, streamed body),
forwards the request over real HTTP to the replica pylb named, and feeds the replica's answer
back chunk by chunk. The end-to-end test with a real Envoy is tests/test_epp_envoy.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_proc_grpc
from google.protobuf import json_format, struct_pb2

from pylb.config import Settings
from pylb.epp.server import EppServer
from pylb.router.interface import Router

DEST = "x-gateway-destination-endpoint"


@asynccontextmanager
async def running_epp(s: Settings, router: Router | None = None) -> AsyncIterator[EppServer]:
    epp = EppServer(s, router=router)
    await epp.start()
    try:
        yield epp
    finally:
        await epp.stop()


def header_map(headers: dict[str, str]) -> ext_proc.HttpHeaders:
    return ext_proc.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in headers.items()])
    )


def filter_metadata(namespaces: dict[str, dict[str, Any]]) -> base_pb2.Metadata:
    """Envoy's metadata_context: namespace -> untyped struct."""
    md = base_pb2.Metadata()
    for ns, fields in namespaces.items():
        st = struct_pb2.Struct()
        st.update(fields)
        md.filter_metadata[ns].CopyFrom(st)
    return md


def set_headers(common: ext_proc.CommonResponse) -> dict[str, str]:
    """The headers a CommonResponse sets, by name."""
    return {
        o.header.key: (o.header.raw_value.decode() if o.header.raw_value else o.header.value) for o in common.header_mutation.set_headers
    }


class Exchange:
    """One HTTP request through the stand-in Envoy, phase by phase."""

    def __init__(self, call: Any, session: aiohttp.ClientSession) -> None:
        self.call = call
        self.session = session
        self.path = ""
        self.body = b""
        self.request_headers: dict[str, str] = {}
        self.dest: str | None = None  # the replica pylb chose (the first address it named)
        self.value: str | None = None  # the whole destination value: chosen, then fallbacks
        self.fallbacks: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.clear_route_cache = False
        self.response_added: dict[str, str] = {}

    async def _ask(self, req: ext_proc.ProcessingRequest) -> ext_proc.ProcessingResponse:
        await self.call.write(req)
        ans = await self.call.read()
        assert ans is not grpc.aio.EOF, "pylb ended the stream without an answer"
        return ans

    async def request(
        self,
        path: str,
        payload: Any,
        *,
        method: str = "POST",
        headers: dict[str, str] | None = None,
        metadata: dict[str, dict[str, Any]] | None = None,
    ) -> ext_proc.ProcessingResponse:
        """The request phases; returns pylb's last answer (the body's, or an ImmediateResponse).
        `payload` is JSON-encoded unless it is bytes; `metadata` goes with the headers, as
        Envoy's forwarding_namespaces do (e.g. a subset hint)."""
        self.path = path
        self.body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        h = {":method": method, ":path": path, ":authority": "gateway", "content-type": "application/json", **(headers or {})}
        self.request_headers = h
        ans = await self._ask(ext_proc.ProcessingRequest(request_headers=header_map(h), metadata_context=filter_metadata(metadata or {})))
        if ans.HasField("immediate_response"):
            return ans
        if ans.request_headers.response.header_mutation.set_headers:
            self._note(ans.request_headers.response, ans)
        ans = await self._ask(ext_proc.ProcessingRequest(request_body=ext_proc.HttpBody(body=self.body, end_of_stream=True)))
        if ans.HasField("request_body"):
            assert not ans.request_body.response.HasField("body_mutation"), "the body must pass unchanged"
            if ans.request_body.response.header_mutation.set_headers:
                self._note(ans.request_body.response, ans)
        return ans

    def _note(self, common: ext_proc.CommonResponse, ans: ext_proc.ProcessingResponse) -> None:
        self.value = set_headers(common)[DEST]
        self.dest, *self.fallbacks = self.value.split(",")
        self.clear_route_cache = common.clear_route_cache
        self.metadata = json_format.MessageToDict(ans.dynamic_metadata)

    async def forward(self, to: str | None = None, served_metadata: bool = False) -> aiohttp.ClientResponse:
        """Send the request to the replica pylb chose (or `to`, ip:port: as a data plane that
        fell back), and its response headers to pylb; with `served_metadata`, the endpoint that
        served goes with them (envoy.lb / x-gateway-destination-endpoint-served)."""
        assert self.dest is not None
        to = to or self.dest
        h = {k: v for k, v in self.request_headers.items() if not k.startswith(":")}
        h[DEST] = to
        resp = await self.session.request(self.request_headers[":method"], f"http://{to}{self.path}", data=self.body, headers=h)
        md = filter_metadata({"envoy.lb": {DEST + "-served": to}} if served_metadata else {})
        ans = await self._ask(
            ext_proc.ProcessingRequest(
                response_headers=header_map({":status": str(resp.status), "content-type": resp.headers.get("content-type", "")}),
                metadata_context=md,
            )
        )
        self.response_added = set_headers(ans.response_headers.response)
        return resp

    async def chunk(self, data: bytes, end: bool = False) -> None:
        """One piece of the response body."""
        ans = await self._ask(ext_proc.ProcessingRequest(response_body=ext_proc.HttpBody(body=data, end_of_stream=end)))
        assert ans.HasField("response_body")

    async def relay(self, resp: aiohttp.ClientResponse) -> bytes:
        """The rest of the response body, chunk by chunk, then its end; returns the body."""
        out = b""
        async for piece in resp.content.iter_any():
            out += piece
            await self.chunk(piece)
        await self.chunk(b"", end=True)
        await self.call.done_writing()
        assert await self.call.read() is grpc.aio.EOF
        return out


class FakeEnvoy:
    """Opens `Exchange`s on one gRPC channel to pylb epp."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = ext_proc_grpc.ExternalProcessorStub(self.channel)
        self.session = aiohttp.ClientSession()

    def open(self) -> Exchange:
        return Exchange(self.stub.Process(), self.session)

    async def roundtrip(self, path: str, payload: Any) -> tuple[Exchange, int, bytes]:
        """A whole request: (exchange, status the client got, body the client got)."""
        ex = self.open()
        ans = await ex.request(path, payload)
        if ans.HasField("immediate_response"):
            return ex, ans.immediate_response.status.code, ans.immediate_response.body
        resp = await ex.forward()
        body = await ex.relay(resp)
        return ex, resp.status, body

    async def close(self) -> None:
        await self.session.close()
        await self.channel.close()

    async def __aenter__(self) -> FakeEnvoy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
