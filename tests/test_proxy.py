"""The live proxy end to end: real sockets, the openai SDK through pylb to fake vLLM replicas.

Fault handling and bad input are in test_proxy_faults.py; the upstream client in
test_proxy_upstream.py; the `pylb serve` command in test_proxy_cli.py.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import openai
import pytest

from pylb.observability.metrics import SERIES
from pylb.proxy.usage import usage_from_sse_tail
from pylb.router.interface import Usage
from pylb.sim.server import GEN_TOKEN_TEXT

from proxy_support import MODEL, RecordingRouter, fake_fleet, running_proxy, scrape, scripted, settings, value, wait_for

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def client(proxy) -> openai.AsyncOpenAI:  # noqa: ANN001
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=10)


async def test_openai_sdk_completions_and_chat_stream_and_not() -> None:
    async with fake_fleet(2) as fleet, running_proxy(settings([s.url for s in fleet])) as proxy, client(proxy) as c:
        urls = {s.url for s in fleet}
        raw = await c.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
        assert raw.headers["x-pylb-replica"] in urls and raw.headers["x-request-id"] and raw.headers["x-pylb-attempts"] == "1"
        r = raw.parse()
        assert r.choices[0].text == GEN_TOKEN_TEXT * 5 and r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 90

        stream = await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, stream=True, extra_body={"ignore_eos": True})
        texts = [ch.choices[0].text async for ch in stream if ch.choices]
        assert "".join(texts) == GEN_TOKEN_TEXT * 6

        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
        chat = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=3)
        assert chat.choices[0].message.content == GEN_TOKEN_TEXT * 3

        stream = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for ch in stream:
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
            if ch.usage:
                usage = ch.usage
        assert "".join(parts) == GEN_TOKEN_TEXT * 4 and usage is not None and usage.completion_tokens == 4

        models = await c.models.list()
        assert [m.id for m in models.data] == [MODEL]
        m = await scrape(proxy)
        assert value(m, "pylb_requests_total", endpoint="completions", code="200") == 2
        assert value(m, "pylb_requests_total", endpoint="chat", code="200") == 2
        assert value(m, "pylb_ttft_seconds_count", endpoint="chat") == 1  # streamed requests only
        assert value(m, "pylb_e2e_seconds_count", endpoint="completions") == 2
        assert sum(value(m, "pylb_replica_dispatched_total", replica=u) for u in urls) == 4


async def test_router_sees_first_token_then_complete_with_usage() -> None:
    router = RecordingRouter()
    async with fake_fleet(2) as fleet, running_proxy(settings([s.url for s in fleet]), router=router) as proxy, client(proxy) as c:
        await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, extra_body={"ignore_eos": True})
        stream = await c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=3, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
        )
        [ch async for ch in stream]
        stream = await c.completions.create(model=MODEL, prompt=PROMPT + "x", max_tokens=2, stream=True, extra_body={"ignore_eos": True})
        [ch async for ch in stream]
    ids = [e[1] for e in router.of("submit")]
    assert len(ids) == 3
    for rid in ids:
        (ft,) = router.of("first_token", rid)
        (done,) = router.of("complete", rid)
        assert ft[2] == done[2] and ft[3] <= done[3]
        assert router.events.index(ft) < router.events.index(done)
    u_json, u_sse, u_est = (router.of("complete", rid)[0][4] for rid in ids)
    assert u_json == Usage(90, 3, 0)
    assert u_sse == Usage(90, 3, u_sse.cached_tokens) and u_sse.cached_tokens in (0, 88)
    # no usage in the stream: pylb's estimate (prompt estimate, one token per event, 0 cached)
    assert u_est == Usage(router.requests[ids[2]].prompt_tokens, 2, 0, reported=False)
    # the membership came first, with both replicas, and metrics were delivered
    assert router.events[0][0] == "membership" and len(router.events[0][1]) == 2
    times = [e[-1] if e[0] != "complete" else e[3] for e in router.events]
    assert times == sorted(times)  # the driver clock never goes back


async def test_headers_request_id_and_body_forwarded_as_received() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], upstream__forward_authorization=True)) as proxy, aiohttp.ClientSession() as s:
        body = b'{ "prompt" :"hi",   "model":"m",\n "max_tokens": 2, "zzz": [1, 2.50] }'
        headers = {
            "Content-Type": "application/json",
            "X-Request-Id": "abc-123",
            "X-Custom": "kept",
            "Authorization": "Bearer k",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
        }
        async with s.post(proxy.url + "/v1/completions", data=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["x-request-id"] == "abc-123"
            assert r.headers["x-pylb-replica"] == rep.url
            assert r.headers["X-Request-Id-Seen"] == "abc-123"
            await r.read()
        seen_headers, seen_body = rep.requests[-1]
        assert seen_body == body
        lower = {k.lower(): v for k, v in seen_headers.items()}
        assert lower["x-custom"] == "kept" and lower["authorization"] == "Bearer k" and lower["x-request-id"] == "abc-123"
        for hop in ("x-secret", "keep-alive", "te"):
            assert hop not in lower
        # no id from the client: pylb makes one, and the replica sees the same
        async with s.post(proxy.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}) as r:
            rid = r.headers["x-request-id"]
            assert rid and r.headers["X-Request-Id-Seen"] == rid


async def test_streams_pass_through_byte_for_byte() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url])) as proxy, aiohttp.ClientSession() as s:
        rep.events = 50
        body = {"prompt": "hi", "stream": True, "stream_options": {"include_usage": True}}
        async with s.post(rep.url + "/v1/completions", json=body) as r:
            direct = await r.read()
        async with s.post(proxy.url + "/v1/completions", json=body) as r:
            assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            via = await r.read()
        assert via == direct and via.count(b"data: ") == 52


async def test_models_merged_and_other_paths_forwarded() -> None:
    async with scripted(2) as reps, running_proxy(settings([r.url for r in reps])) as proxy, aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/v1/models") as r:
            data = await r.json()
        assert sorted(m["id"] for m in data["data"]) == ["model-0", "model-1"] and data["object"] == "list"
        seen = set()
        for _ in range(4):
            async with s.post(proxy.url + "/v1/echo?x=1", data=b"payload") as r:
                assert r.status == 200
                j = await r.json()
                assert (j["method"], j["path"], j["body"]) == ("POST", "/v1/echo?x=1", "payload")
                assert r.headers["x-pylb-replica"] == j["replica"]
                seen.add(j["replica"])
        assert seen == {reps[0].url, reps[1].url}
        async with s.get(proxy.url + "/v1/nothing-here") as r:
            assert r.status == 404  # the replica's answer, forwarded


async def test_health_ready_and_metrics_pages() -> None:
    async with fake_fleet(2) as fleet, running_proxy(settings([s.url for s in fleet])) as proxy, aiohttp.ClientSession() as s:
        async with s.get(proxy.url + "/health") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with s.get(proxy.url + "/ready") as r:
            assert r.status == 200 and (await r.json())["healthy_replicas"] == 2
        async with client(proxy) as c:
            for _ in range(4):  # round-robin: each replica sees the prompt twice, the second time cached
                await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
        await wait_for(lambda: all(r.observed_queries >= 180 for r in proxy.fleet.replicas.values()), what="scrapes")
        async with s.get(proxy.url + "/metrics") as r:
            assert r.headers["Content-Type"].startswith("text/plain")
            page = await r.text()
        documented = {line.split()[2] for line in page.splitlines() if line.startswith("# HELP ")}
        assert {n.removesuffix("_total") for n in documented} == {n.removesuffix("_total") for n in SERIES}
        m = await scrape(proxy)
        for u in (f.url for f in fleet):
            assert value(m, "pylb_replica_healthy", replica=u) == 1
            assert value(m, "pylb_replica_prefix_cache_queries_total", replica=u) == 180
            assert value(m, "pylb_replica_prefix_cache_hits_total", replica=u) == 88
        assert value(m, "pylb_observed_prefix_cache_hit_rate", replica="fleet") == pytest.approx(176 / 360)
        assert value(m, "pylb_hotspot_factor") == 1.0
        assert value(m, "pylb_queue_depth") == 0 and value(m, "pylb_requests_in_progress") == 0
        assert value(m, "pylb_event_loop_tasks") >= 1  # at least the handler answering this scrape


async def test_client_disconnect_aborts_the_request_on_the_replica() -> None:
    async with fake_fleet(1, speed=0.2) as (srv,), running_proxy(settings([srv.url])) as proxy:
        async with aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2000, "stream": True, "ignore_eos": True}
            async with s.post(proxy.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.content.readany()  # the first token arrived: the request is running
                assert srv.engine.num_running == 1
        # the client went away: pylb closes the upstream connection, the replica aborts
        await wait_for(lambda: srv.engine.num_running == 0 and not srv._pending, what="abort on the replica")
        await wait_for(lambda: proxy.dispatcher.load(srv.url).inflight == 0, what="pylb accounting")
        m = await scrape(proxy)
        assert value(m, "pylb_requests_total", endpoint="completions", code="499") == 1


async def test_client_disconnect_during_prefill_aborts_too() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url])) as proxy:
        rep.mode = "hang"
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(s.post(proxy.url + "/v1/completions", json={"prompt": "x", "stream": True}))
            await wait_for(lambda: rep.active == 1, what="request at the replica")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_for(lambda: rep.aborted == 1, what="abort on the replica")
        await wait_for(lambda: proxy.dispatcher.load(rep.url).inflight == 0, what="pylb accounting")


async def stream_until_done(port: int, body: bytes) -> bytes:
    """A client that reads a streamed answer until its `data: [DONE]` event and closes the
    connection at once (as SSE clients do), without waiting for the chunked body's last chunk."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    got = b""
    while b"data: [DONE]" not in got:
        piece = await asyncio.wait_for(reader.read(65536), 10)
        assert piece, got
        got += piece
    writer.close()
    await writer.wait_closed()
    return got


async def test_client_closing_right_after_done_is_a_success(caplog: pytest.LogCaptureFixture) -> None:
    router = RecordingRouter()
    async with scripted(1) as (rep,), running_proxy(settings([rep.url]), router=router) as proxy:
        body = json.dumps({"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}).encode()
        delays = [0.05, 0.0, 0.001] * 4  # the replica ends its stream after, with, just after [DONE]
        for delay in delays:
            rep.done_delay = delay
            got = await stream_until_done(proxy.port, body)
            assert b" 200 " in got.split(b"\r\n")[0]
        await wait_for(lambda: proxy.routed.in_progress == 0 and len(router.of("complete")) == len(delays), what="handlers done")
        m = await scrape(proxy)
    # the client received every event: a success, counted and completed as one, nothing logged
    assert value(m, "pylb_requests_total", endpoint="completions", code="499") == 0
    assert value(m, "pylb_requests_total", endpoint="completions", code="200") == len(delays)
    assert [e[4] for e in router.of("complete")] == [Usage(11, 5, 4)] * len(delays)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def shared_prompt_requests(n: int, system_chars: int) -> list[str]:
    """`n` distinct prompts behind one system prompt of `system_chars` characters (key blocks are
    2048 characters: 2048 is a system prompt that ends on a key-block boundary, 5000 one that
    does not), each with its own question of about 1,000 characters."""
    system = "".join(f"System rule {i}: answer briefly and cite sources. " for i in range(200))[:system_chars]
    return [system + f" Question {i}: " + f"tell me about topic {i} " * 40 for i in range(n)]


@pytest.mark.parametrize("system_chars", [2048, 5000])
@pytest.mark.parametrize("replicas", [2, 4])
async def test_a_fresh_dualmap_spreads_distinct_prompts_from_the_first_second(replicas: int, system_chars: int) -> None:
    # distinct conversations behind one system prompt, all in pylb's first second: no history, so
    # nothing ties any of them to a replica, and they spread over the fleet from the first one
    prompts = shared_prompt_requests(40, system_chars)
    async with fake_fleet(replicas) as servers, running_proxy(settings([x.url for x in servers], router__policy="dualmap")) as proxy:
        # placement is the question here, not start-up: on a loaded machine a first health probe
        # can time out (0.5 s in these tests), and a fleet with no replica in rotation answers 503
        await wait_for(lambda: len(proxy.fleet.healthy) == replicas, what="every replica in rotation")
        async with aiohttp.ClientSession() as s:

            async def send(i: int, prompt: str) -> str:
                await asyncio.sleep(i * 0.02)
                async with s.post(proxy.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4}) as r:
                    assert r.status == 200
                    await r.read()
                    return r.headers["x-pylb-replica"]

            placed = await asyncio.gather(*(send(i, p) for i, p in enumerate(prompts)))
    # (it used to send all of them to the replica that served the first.) The keys hash onto rings
    # built over random ports, so the spread is binomial around 1/replicas: these bounds hold but
    # for a chance under 1e-3
    counts = [placed.count(x.url) for x in servers]
    assert min(counts) >= len(prompts) / replicas / 4, counts
    assert max(counts) <= len(prompts) * (1 / replicas + 0.25), counts
    assert len(set(placed[:20])) >= 2, placed[:20]


def test_usage_from_sse_tail() -> None:
    tail = b'data: {"choices":[{"text":"a"}]}\n\ndata: {"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":3}}}\n\ndata: [DONE]\n\n'
    assert usage_from_sse_tail(tail) == Usage(5, 2, 3)
    assert usage_from_sse_tail(b"data: [DONE]\n\n") is None
    assert usage_from_sse_tail(b'ge":{"prompt_tokens":5}}\n\ndata: [DONE]\n\n') is None  # cut off
    assert usage_from_sse_tail(b'data: {"usage": null, "x": "\\"usage\\""}\n\n') is None
    # continuous usage stats: the last one wins
    two = b'data: {"usage":{"prompt_tokens":5,"completion_tokens":1}}\n\ndata: {"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'
    assert usage_from_sse_tail(two) == Usage(5, 2, 0)
    assert json.loads(tail.split(b"\n\n")[1][6:])["usage"]["prompt_tokens"] == 5


def test_docs_list_every_series() -> None:
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs" / "serve.md"
    if not docs.exists():
        pytest.skip("docs/serve.md not in this checkout")
    text = docs.read_text()
    for name, meaning in SERIES.items():
        assert f"| `{name}` | {meaning} |" in text, f"docs/serve.md: {name} missing or out of date"


async def test_slow_streaming_client_gets_every_byte_with_bounded_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from pylb.proxy.upstream import UpstreamResponse

    pauses = []
    original = UpstreamResponse.pause
    monkeypatch.setattr(UpstreamResponse, "pause", lambda self: (pauses.append(1), original(self)))
    async with scripted(1) as (rep,), running_proxy(settings([rep.url])) as proxy:
        rep.events, rep.pad, rep.event_sleep = 6000, 2000, 0  # 12 MB as fast as the replica can
        async with aiohttp.ClientSession() as s:
            async with s.post(rep.url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
                direct = await r.read()
        # a client with a small receive buffer that stops reading for a while
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", proxy.port))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock)
        body = b'{"prompt": "x", "stream": true}'
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"transfer-encoding: chunked" in head.lower()
        await wait_for(lambda: bool(pauses), timeout=10, what="pylb pausing the replica")
        raw = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        await writer.wait_closed()
    # de-chunk and compare with what the replica sent directly
    out, pos = [], 0
    while True:
        nl = raw.index(b"\r\n", pos)
        size = int(raw[pos:nl], 16)
        if size == 0:
            break
        out.append(raw[nl + 2 : nl + 2 + size])
        pos = nl + 2 + size + 2
    assert b"".join(out) == direct


async def test_http_1_0_client_stream_is_not_chunked() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url])) as proxy:
        rep.events = 20
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        body = b'{"prompt": "x", "stream": true}'
        writer.write(b"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)  # HTTP/1.0: the body ends with the connection
        writer.close()
        await writer.wait_closed()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" not in head.lower()
        assert payload.count(b"data: ") == 21 and payload.endswith(b"data: [DONE]\n\n")
