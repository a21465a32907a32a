"""Issue 16 §0: what an attacker found, each case as a test (client-caused errors never count
against a replica, client time and size limits, path traversal, hung and truncating replicas,
hostile /metrics pages, https replicas, encoded bodies and huge numbers, secrets in logs,
shutdown). Real sockets throughout; raw ones where an HTTP client would clean the request up."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import ssl
import time
from pathlib import Path

import aiohttp
import pytest

from proxy_support import HoldRouter, raw, ScriptedReplica, running_proxy, scrape, scripted, settings, value, wait_for

JSON = {"Content-Type": "application/json"}


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1]) if answer.startswith((b"HTTP/1.1 ", b"HTTP/1.0 ")) else 0


async def post(s: aiohttp.ClientSession, url: str, body: object, **kw: object) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**JSON, **kw.pop("headers", {})}  # type: ignore[dict-item]
    async with s.post(url + "/v1/completions", data=data, headers=headers, **kw) as r:  # type: ignore[arg-type]
        raw_body = await r.read()
        try:
            parsed = json.loads(raw_body)
        except ValueError:
            parsed = {"raw": raw_body}
        return r.status, parsed, dict(r.headers)


# ---- 1. a client's request never counts against a replica ------------------------------------------------


async def test_absolute_form_targets_get_400_and_never_eject_a_replica() -> None:
    async with scripted(2) as reps, running_proxy(settings([r.url for r in reps], fleet__ejection_s=30)) as proxy:
        body = b'{"prompt": "hello"}'
        for _ in range(8):
            for target in (b"http://x/v1/completions", b"http://127.0.0.1:1/v1/x", b"127.0.0.1:80"):
                answer = await raw(proxy.port, b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (target, len(body), body))
                assert status_of(answer) == 400, answer[:200]
        assert list(proxy.fleet.healthy) == [r.url for r in reps]
        m = await scrape(proxy)
        assert sum(m.get("pylb_ejections_total", {}).values()) == 0
        assert sum(len(r.requests) for r in reps) == 0
        async with aiohttp.ClientSession() as s:
            assert (await post(s, proxy.url, {"prompt": "x"}))[0] == 200


async def test_a_bad_prompt_answered_500_again_and_again_never_ejects_its_replica() -> None:
    async with scripted(2) as (bad, good), running_proxy(settings([bad.url, good.url], fleet__eject_5xx=2, upstream__max_retries=0)) as proxy:
        bad.mode, bad.status = "status", 500
        async with aiohttp.ClientSession() as s:
            codes = [(await post(s, proxy.url, {"prompt": "the same bad prompt"}))[0] for _ in range(8)]
        assert codes.count(500) == 4 and codes.count(200) == 4
        assert list(proxy.fleet.healthy) == [bad.url, good.url]
        assert value(await scrape(proxy), "pylb_ejections_total", replica=bad.url, reason="5xx") == 0


# ---- 2. client time, connections and bodies --------------------------------------------------------------


async def test_slow_headers_idle_connections_and_slow_bodies_are_cut() -> None:
    limits = {"server__header_timeout_s": 0.3, "server__keepalive_timeout_s": 0.6, "server__body_timeout_s": 0.3}
    async with scripted(1) as reps, running_proxy(settings([reps[0].url], **limits)) as proxy:
        t0 = time.monotonic()
        answer = await raw(proxy.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", wait=5)
        assert status_of(answer) == 408 and time.monotonic() - t0 < 2.0, answer
        t0 = time.monotonic()
        assert await raw(proxy.port, b"", wait=5) == b"" and 0.5 < time.monotonic() - t0 < 2.5  # idle: closed
        t0 = time.monotonic()
        answer = await raw(proxy.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{", wait=5)
        assert status_of(answer) == 408 and b'"param": "body"' in answer and time.monotonic() - t0 < 2.0, answer
        await wait_for(lambda: proxy._guard is not None and proxy._guard.open_connections == 0, what="every connection closed")


async def test_idle_connections_cannot_take_every_slot() -> None:
    async with scripted(1) as reps, running_proxy(settings([reps[0].url], server__max_connections=16)) as proxy:
        hogs = [await asyncio.open_connection("127.0.0.1", proxy.port) for _ in range(40)]
        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(5):
                    assert (await post(s, proxy.url, {"prompt": "x"}))[0] == 200
            assert proxy._guard is not None and proxy._guard.open_connections <= 16 and proxy._guard.evicted >= 24
        finally:
            for _, w in hogs:
                w.close()


async def test_bodies_are_bounded_while_read() -> None:
    async with scripted(1) as reps, running_proxy(settings([reps[0].url], server__max_body_bytes=4096, server__max_buffered_body_bytes=6000)) as proxy:
        answer = await raw(proxy.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n{", wait=3)
        assert status_of(answer) == 413, answer  # by its declared length, before reading
        chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n"
        answer = await raw(proxy.port, chunked * 1 + (b"400\r\n" + b"x" * 1024 + b"\r\n") * 5, wait=3)
        assert status_of(answer) == 413, answer
        # two slow 3,000-byte bodies at once pass 6,000 bytes held: the second gets 503
        r1, w1 = await asyncio.open_connection("127.0.0.1", proxy.port)
        w1.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b" " * 3500)
        await asyncio.sleep(0.2)
        answer = await raw(proxy.port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n\r\n" + b" " * 3500, wait=3)
        assert status_of(answer) == 503 and b"Retry-After" in answer, answer
        w1.close()
        await wait_for(lambda: proxy._bodies.held == 0, what="held body bytes given back")


# ---- 3. path traversal -------------------------------------------------------------------------------------


TRAVERSALS = [
    b"/v1/../metrics", b"/v1/%2e%2e/reset_prefix_cache", b"/v1/%2E%2E/health", b"/v1/./completions", b"//v1/models",
    b"/v1//completions", b"/v1/x%2f..%2freset_prefix_cache", b"/v1/%5c..%5creset", b"/v1/a%00b", b"/v1/.%2e/x",
]  # fmt: skip


@pytest.mark.parametrize("target", TRAVERSALS)
async def test_paths_out_of_v1_never_reach_a_replica(target: bytes) -> None:
    async with scripted(1) as reps, running_proxy(settings([reps[0].url])) as proxy:
        for method in (b"GET", b"POST"):
            answer = await raw(proxy.port, b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" % (method, target))
            assert status_of(answer) == 400, (target, answer[:300])
            assert b'"param": "path"' in answer


# ---- 4. hung and truncating replicas -----------------------------------------------------------------------


async def test_a_hung_replica_ejected_by_probes_fails_its_requests_promptly() -> None:
    async with scripted(2) as (hung, good):
        cfg = settings([hung.url, good.url], upstream__read_timeout_s=120.0, fleet__health_timeout_s=0.2, fleet__ejection_s=30)
        async with running_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
            hung.mode, hung.health = "hang", "hang"
            t0 = time.monotonic()
            answers = await asyncio.gather(*(post(s, proxy.url, {"prompt": f"p{i}"}) for i in range(4)))
            assert [a[0] for a in answers] == [200] * 4  # retried on the good replica before their first byte
            assert time.monotonic() - t0 < 5.0
            # mid-stream: the client gets an error event, then the end
            hung.mode, hung.health = "stall", 200
            await wait_for(lambda: hung.url in proxy.fleet.healthy, timeout=10, what="the replica back")
            good.health = "hang"  # only the hung one to send to
            await wait_for(lambda: proxy.fleet.healthy == [hung.url], timeout=10, what="the good one out")
            good.health = 200
            t0 = time.monotonic()
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True}) as r:
                assert r.status == 200
                first = await r.content.readany()
                hung.health = "hang"
                rest = await asyncio.wait_for(r.content.read(), 10)
            text = (first + rest).decode()
            assert "t0" in text and '"error"' in text and text.rstrip().endswith("data: [DONE]")
            assert time.monotonic() - t0 < 6.0


async def test_a_replica_streaming_while_its_health_probe_hangs_is_busy_not_hung() -> None:
    """A probe that times out while the replica sends data on a stream is not counted (its API
    server is slow, its engine works): the stream ends normally and the replica stays in rotation;
    once nothing flows, the same probes eject it."""
    async with scripted(2) as (busy, other):
        cfg = settings([busy.url, other.url], fleet__health_timeout_s=0.1, fleet__health_interval_s=0.1)
        async with running_proxy(cfg) as proxy, aiohttp.ClientSession() as s:
            busy.events, busy.event_sleep = 30, 0.05  # 1.5 s of stream, a chunk every 50 ms
            other.health = "hang"  # `other` leaves rotation, so the stream goes to `busy`
            await wait_for(lambda: proxy.fleet.healthy == [busy.url], timeout=10, what="only the busy replica")
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True}) as r:
                assert r.status == 200
                first = await r.content.readany()
                busy.health = "hang"  # probes time out from now on, while the stream flows
                rest = await asyncio.wait_for(r.content.read(), 10)
                assert busy.url in proxy.fleet.healthy  # 1.5 s of probes timing out, none counted
            text = (first + rest).decode()
            assert '"error"' not in text and "t29" in text and text.rstrip().endswith("data: [DONE]")
            assert value(await scrape(proxy), "pylb_ejections_total", replica=busy.url, reason="probe") == 0
            # nothing flows any more: the hanging probes count, and the replica leaves
            await wait_for(lambda: busy.url not in proxy.fleet.healthy, timeout=10, what="the idle hung replica out")


async def test_a_stream_ended_without_done_is_an_error() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url])) as proxy, aiohttp.ClientSession() as s:
        rep.mode = "truncate"
        async with s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True}) as r:
            text = (await r.read()).decode()
        assert '"error"' in text and text.rstrip().endswith("data: [DONE]") and text.count("[DONE]") == 1
        m = await scrape(proxy)
        assert value(m, "pylb_requests_total", endpoint="completions", code="502") == 1
        assert value(m, "pylb_upstream_errors_total", replica=rep.url, kind="truncated") == 1
        assert list(proxy.fleet.healthy) == [rep.url]


# ---- 5. hostile /metrics pages -------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "+Inf", "-Inf"])
async def test_non_finite_metrics_never_stop_pylb(bad: str) -> None:
    async with scripted(1) as (rep,):
        rep.metrics_page = f'vllm:num_requests_running{{engine="0"}} {bad}\nvllm:num_requests_waiting{{engine="0"}} {bad}\n'
        async with running_proxy(settings([rep.url])) as proxy, aiohttp.ClientSession() as s:
            assert (await post(s, proxy.url, {"prompt": "x"}))[0] == 200
            await wait_for(lambda: rep.metrics_calls >= 3, what="scrapes")
            assert value(await scrape(proxy), "pylb_scrape_errors_total", replica=rep.url) >= 2


async def test_a_huge_metrics_page_fails_the_scrape() -> None:
    async with scripted(1) as (rep,):
        rep.metrics_page = "vllm:num_requests_running 1\n" + "# " + "x" * 3_000_000 + "\n"
        async with running_proxy(settings([rep.url], fleet__max_metrics_bytes=1_000_000)) as proxy:
            await wait_for(lambda: rep.metrics_calls >= 2, what="scrapes")
            assert value(await scrape(proxy), "pylb_scrape_errors_total", replica=rep.url) >= 1
            assert proxy.fleet.replicas[rep.url].metrics is None


# ---- 6. https replicas -------------------------------------------------------------------------------------


async def test_https_replicas_work_with_a_ca_file(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    rep = ScriptedReplica()
    await rep.start(ssl_context=ctx)
    try:
        assert rep.url.startswith("https://")
        async with running_proxy(settings([rep.url], upstream__ca_file=str(crt))) as proxy, aiohttp.ClientSession() as s:
            assert list(proxy.fleet.healthy) == [rep.url]
            assert (await post(s, proxy.url, {"prompt": "x"}))[0] == 200
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True}) as r:
                assert (await r.read()).rstrip().endswith(b"data: [DONE]")
            await wait_for(lambda: rep.metrics_calls >= 1, what="a scrape over TLS")
        # without the CA the replica is not trusted: never healthy, requests get 503
        async with running_proxy(settings([rep.url])) as proxy, aiohttp.ClientSession() as s:
            assert list(proxy.fleet.healthy) == []
            assert (await post(s, proxy.url, {"prompt": "x"}))[0] == 503
    finally:
        await rep.stop()


# ---- 7. encoded bodies, huge numbers ------------------------------------------------------------------------


async def test_encoded_bodies_and_huge_numbers() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], server__max_body_bytes=1 << 20)) as proxy, aiohttp.ClientSession() as s:
        body = json.dumps({"prompt": "zipped", "max_tokens": 3}).encode()
        status, _, _ = await post(s, proxy.url, gzip.compress(body), headers={"Content-Encoding": "gzip"})
        assert status == 200
        headers, got = rep.requests[-1]
        assert got == body and "Content-Encoding" not in headers
        status, err, _ = await post(s, proxy.url, b"\x1f\x8bnot gzip at all", headers={"Content-Encoding": "gzip"})
        assert status == 400 and err["error"]["param"] == "body"
        status, err, _ = await post(s, proxy.url, gzip.compress(body)[:-6], headers={"Content-Encoding": "gzip"})
        assert status == 400
        t0 = time.process_time()
        bomb = gzip.compress(b" " * (64 << 20))  # 64 MiB of spaces, ~64 KB on the wire
        status, err, _ = await post(s, proxy.url, bomb, headers={"Content-Encoding": "gzip"})
        assert status == 413 and "decoded" in err["error"]["message"]
        assert time.process_time() - t0 < 5  # compressing it here is most of that
        status, err, _ = await post(s, proxy.url, body, headers={"Content-Encoding": "br"})
        assert status == 415
        digits = "9" * 5000
        for field, text in (("max_tokens", f'{{"prompt": "x", "max_tokens": {digits}}}'), ("n", f'{{"prompt": "x", "n": {digits}}}'),
                            ("prompt", f'{{"prompt": [1, 2, {digits}]}}'), ("max_tokens", '{"prompt": "x", "max_tokens": 99999999999999999999}')):  # fmt: skip
            status, err, _ = await post(s, proxy.url, text.encode())
            assert status == 400 and err["error"]["param"] == field, (field, err)
        assert len(rep.requests) == 1


# ---- 8. logs and replica addresses -------------------------------------------------------------------------


async def test_malformed_requests_never_log_their_bytes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with scripted(1) as (rep,), running_proxy(settings([rep.url])) as proxy:
        secret = b"Authorization: Bearer sk-TOPSECRET\r\n"
        prompt = b'{"prompt": "my private prompt"}'
        cases = [
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + secret + b"Bad\x01Header: y\r\nContent-Length: 31\r\n\r\n" + prompt,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + secret + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n" + prompt,
            b"P\x00ST /v1/completions HTTP/1.1\r\n" + secret + b"\r\n" + prompt,
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + secret + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n" + prompt,
        ]
        for case in cases:
            answer = await raw(proxy.port, case)
            assert 400 <= status_of(answer) < 500, answer[:200]
    text = "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    assert "TOPSECRET" not in text and "private prompt" not in text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_replica_addresses_can_be_hidden() -> None:
    async with scripted(2) as (rep, dead), running_proxy(settings([rep.url], server__expose_replicas=False)) as proxy, aiohttp.ClientSession() as s:
        status, _, headers = await post(s, proxy.url, {"prompt": "x"})
        assert status == 200 and headers["x-pylb-replica"].startswith("replica-") and "127.0.0.1" not in headers["x-pylb-replica"]
        rep.mode = "drop"
        status, err, headers = await post(s, proxy.url, {"prompt": "x"})
        assert status in (502, 503)
        assert "127.0.0.1" not in json.dumps(err) and rep.url.split(":")[-1] not in err["error"]["message"]


# ---- 9. shutdown ------------------------------------------------------------------------------------------


async def test_shutdown_keeps_its_timeout_and_ends_open_streams_with_an_error() -> None:
    async with scripted(1) as (rep,):
        rep.events, rep.event_sleep = 1000, 0.05  # a 50 s stream
        router = HoldRouter()
        router.open = True
        from pylb.proxy.server import ProxyServer

        proxy = ProxyServer(settings([rep.url], server__shutdown_timeout_s=0.5), router=router)
        await proxy.start()
        async with aiohttp.ClientSession() as s:
            resp = await s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True})
            assert resp.status == 200
            await resp.content.readany()
            router.open = False
            queued = asyncio.ensure_future(post(s, proxy.url, {"prompt": "queued"}))
            await wait_for(lambda: proxy.dispatcher.queue_depth == 1, what="a queued request")
            t0 = time.monotonic()
            stopping = asyncio.ensure_future(proxy.stop())
            await asyncio.sleep(0.1)
            status, err, headers = await queued
            assert status == 503 and "Retry-After" in headers
            rest = (await asyncio.wait_for(resp.content.read(), 5)).decode()
            await stopping
            assert time.monotonic() - t0 < 0.5 + 1.5
            assert '"error"' in rest and rest.rstrip().endswith("data: [DONE]")
            resp.release()


async def test_ready_is_false_while_draining() -> None:
    async with scripted(1) as (rep,):
        rep.events, rep.event_sleep = 20, 0.05  # a 1 s stream
        from pylb.proxy.server import ProxyServer

        proxy = ProxyServer(settings([rep.url], server__shutdown_timeout_s=5))
        await proxy.start()
        async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as probe:
            async with probe.get(proxy.url + "/ready") as r:  # opens the connection the probe below reuses
                assert r.status == 200
            resp = await s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True})
            stopping = asyncio.ensure_future(proxy.stop())
            await asyncio.sleep(0.1)
            async with probe.get(proxy.url + "/ready") as r:  # new connections are refused; this one was open
                assert r.status == 503 and (await r.json())["draining"] is True
            text = (await resp.read()).decode()
            assert '"error"' not in text and text.rstrip().endswith("data: [DONE]")  # finished within the timeout
            await stopping


async def test_idle_upstream_connections_do_not_pile_up() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], upstream__max_idle_per_replica=4, upstream__keepalive_s=0.5)) as proxy:
        rep.mode, rep.delay = "slow", 0.2
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
            codes = await asyncio.gather(*(post(s, proxy.url, {"prompt": f"{i}"}) for i in range(40)))
        assert [c[0] for c in codes] == [200] * 40
        assert proxy._pool is not None and proxy._pool.idle_connections <= 4
        await wait_for(lambda: proxy._pool is not None and proxy._pool.idle_connections == 0, timeout=3, what="idle connections closed")
