"""The live proxy under bad input and faults: every error status, retries, ejection and
re-admission, flapping health, slow and dying replicas, a replica process killed mid-run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys

import aiohttp
import openai
from multidict import CIMultiDict
import pytest

from pylb.sim.server import GEN_TOKEN_TEXT

from proxy_support import (
    MODEL, HoldRouter, RecordingRouter, ScriptedReplica, dead_url, running_proxy, scrape, scripted, settings, value, wait_for,
)  # fmt: skip

JSON = {"Content-Type": "application/json"}


async def post(s: aiohttp.ClientSession, url: str, body: object, path: str = "/v1/completions", **kw: object) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with s.post(url + path, data=data, headers=JSON, **kw) as r:  # type: ignore[arg-type]
        raw = await r.read()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = {"raw": raw}
        return r.status, parsed, CIMultiDict(r.headers)


def check_error(status: int, body: dict, want: int, param: str | None = None) -> None:
    assert status == want, body
    err = body["error"]
    assert err["code"] == want and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err


# ---- bad input ------------------------------------------------------------------------------------------


async def test_bad_input_gets_openai_errors_and_never_hurts_the_process() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], server__max_body_bytes=4096)) as proxy, aiohttp.ClientSession() as s:
        u = proxy.url
        cases = [
            (b"{not json", "/v1/completions", 400, "body"),
            (b"\xff\xfe\x00", "/v1/completions", 400, "body"),
            (b"[1, 2]", "/v1/completions", 400, "body"),
            (b'"just a string"', "/v1/chat/completions", 400, "body"),
            (b"", "/v1/completions", 400, "body"),
            (b"[" * 50000 + b"]" * 50000, "/v1/completions", 413, "body"),
            (json.dumps({"model": "m"}).encode(), "/v1/completions", 400, "prompt"),
            (json.dumps({"prompt": 12}).encode(), "/v1/completions", 400, "prompt"),
            (json.dumps({"prompt": "a", "max_tokens": "ten"}).encode(), "/v1/completions", 400, "max_tokens"),
            (json.dumps({"prompt": "a", "stream": 1}).encode(), "/v1/completions", 400, "stream"),
            (json.dumps({"prompt": [1, -5]}).encode(), "/v1/completions", 400, "prompt"),
            (json.dumps({"messages": [{"role": "user"}], "max_completion_tokens": 0}).encode(), "/v1/chat/completions", 400, "max_completion_tokens"),
            (json.dumps({"messages": "hello"}).encode(), "/v1/chat/completions", 400, "messages"),
            (json.dumps({"messages": [{"role": 5, "content": "x"}]}).encode(), "/v1/chat/completions", 400, "messages"),
            (json.dumps({"prompt": "x" * 5000}).encode(), "/v1/completions", 413, "body"),
        ]
        for body, path, want, param in cases:
            status, got, headers = await post(s, u, body, path)
            check_error(status, got, want, param)
            assert headers.get("x-request-id"), (body[:20], headers)
        for path in ("/nope", "/v2/completions", "/metrics/x", "/"):
            async with s.get(u + path) as r:
                check_error(r.status, await r.json(), 404)
        async with s.post(u + "/health") as r:
            check_error(r.status, await r.json(), 405)
        # garbage that is not HTTP: aiohttp answers 400 and closes; the process goes on
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"\x16\x03\x01\x02\x00garbage\r\n\r\n")
        await writer.drain()
        answer = await reader.read(100)
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
        writer.close()
        await writer.wait_closed()
        assert rep.requests == []  # nothing malformed reached the replica
        status, got, _ = await post(s, u, {"prompt": "fine"})
        assert status == 200 and got["choices"][0]["text"] == " t0"
        m = await scrape(proxy)
        assert value(m, "pylb_requests_total", endpoint="completions", code="400") == 9
        assert value(m, "pylb_requests_total", endpoint="chat", code="400") == 4
        assert value(m, "pylb_requests_total", endpoint="completions", code="413") == 2
        assert value(m, "pylb_requests_total", endpoint="other", code="404") == 4


async def test_429_when_the_queue_is_full_and_504_on_queue_timeout() -> None:
    router = HoldRouter()
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], router__max_queued=2, router__queue_timeout_s=0.3), router=router) as proxy:
        async with aiohttp.ClientSession() as s:
            held = [asyncio.create_task(post(s, proxy.url, {"prompt": f"q{i}"})) for i in range(2)]
            await wait_for(lambda: proxy.dispatcher.queue_depth == 2, what="two queued")
            status, got, headers = await post(s, proxy.url, {"prompt": "one too many"})
            check_error(status, got, 429)
            assert headers["Retry-After"] == "1"
            for status, got, _ in await asyncio.gather(*held):
                check_error(status, got, 504)
        # timed-out requests stay withdrawn: when the router opens, they are not sent
        router.open = True
        proxy.dispatcher._poll(proxy.dispatcher.now())
        assert proxy.dispatcher.queue_depth == 0 and rep.requests == []
        assert proxy.dispatcher.load(rep.url).inflight == 0
        m = await scrape(proxy)
        assert value(m, "pylb_requests_total", endpoint="completions", code="429") == 1
        assert value(m, "pylb_requests_total", endpoint="completions", code="504") == 2


async def test_queued_request_of_a_client_that_left_is_withdrawn() -> None:
    router = HoldRouter(with_cancel=True)
    async with scripted(1) as (rep,), running_proxy(settings([rep.url]), router=router) as proxy:
        async with aiohttp.ClientSession() as s:
            task = asyncio.create_task(post(s, proxy.url, {"prompt": "x"}))
            await wait_for(lambda: proxy.dispatcher.queue_depth == 1, what="queued")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await wait_for(lambda: router.cancelled != [], what="router.cancel")
        assert proxy.dispatcher.queue_depth == 0


async def test_503_with_retry_after_when_no_replica_is_healthy() -> None:
    async with running_proxy(settings([dead_url(), dead_url()])) as proxy, aiohttp.ClientSession() as s:
        assert list(proxy.fleet.healthy) == []
        status, got, headers = await post(s, proxy.url, {"prompt": "x"})
        check_error(status, got, 503)
        assert int(headers["Retry-After"]) >= 1
        async with s.get(proxy.url + "/ready") as r:
            assert r.status == 503 and (await r.json())["ready"] is False
        async with s.get(proxy.url + "/health") as r:
            assert r.status == 200
        async with s.get(proxy.url + "/v1/models") as r:
            check_error(r.status, await r.json(), 503)
        async with s.post(proxy.url + "/v1/echo", data=b"x") as r:
            check_error(r.status, await r.json(), 503)


# ---- retries and ejection -------------------------------------------------------------------------------


async def test_retry_on_5xx_goes_to_another_replica() -> None:
    router = RecordingRouter()
    async with scripted(2) as (bad, good), running_proxy(settings([bad.url, good.url], fleet__eject_5xx=100), router=router) as proxy:
        bad.mode, bad.status = "status", 503
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c:
            for _ in range(4):
                raw = await c.completions.with_raw_response.create(model="m", prompt="hello")
                assert raw.headers["x-pylb-replica"] == good.url and raw.headers["x-pylb-attempts"] == "2"
        # round-robin sends every first attempt to the bad replica, every retry to the good one
        assert len(bad.requests) == 4 and len(good.requests) == 4
        m = await scrape(proxy)
        assert value(m, "pylb_retries_total", reason="status") == 4
        assert value(m, "pylb_decisions_total", branch="retry") == 4 and value(m, "pylb_decisions_total", branch="unknown") == 4
        assert value(m, "pylb_upstream_errors_total", replica=bad.url, kind="status") == 4
    # the failed attempt was completed (usage None) before the same request was submitted again
    (rid,) = [e[1] for e in router.of("complete") if e[4] is None][:1]
    kinds = [e[0] for e in router.events if len(e) > 1 and e[1] == rid]
    # (a non-streamed attempt may get its estimated first token before its answer)
    assert [k for k in kinds if k != "first_token"] == ["submit", "complete", "submit", "complete"]
    assert kinds[-2:] == ["first_token", "complete"]


class RetryHookRouter(RecordingRouter):
    """A router with the optional retry hook: re-queues on any replica but the failed one."""

    def retry(self, request, failed_replica: str, now: float) -> None:  # noqa: ANN001
        self.events.append(("retry", request.request_id, failed_replica, now))
        self._retry_avoid = failed_replica
        self._queue.append(request.request_id)

    def poll(self, now: float):  # noqa: ANN201
        out = super().poll(now)
        avoid = getattr(self, "_retry_avoid", None)
        if avoid is not None:
            others = [r for r in self._replicas if r != avoid]
            out = [d._replace(replica=others[0]) if d.replica == avoid and others else d for d in out]
            self._retry_avoid = None
        return out


async def test_retry_hook_of_the_router_is_used_when_present() -> None:
    router = RetryHookRouter()
    async with scripted(2) as (bad, good), running_proxy(settings([bad.url, good.url], fleet__eject_5xx=100), router=router) as proxy:
        bad.mode, bad.status = "status", 502
        async with aiohttp.ClientSession() as s:
            status, _, headers = await post(s, proxy.url, {"prompt": "x"})
        assert status == 200 and headers["x-pylb-replica"] == good.url
        assert headers["x-pylb-attempts"] == "2"  # the bad replica, then the good one
    (ev,) = router.of("retry")
    assert ev[2] == bad.url
    assert len(router.of("submit", ev[1])) == 1  # the retry went through the hook, not submit


async def test_connection_errors_eject_at_once_and_probes_readmit() -> None:
    async with scripted(2) as (bad, good), running_proxy(settings([bad.url, good.url], fleet__ejection_s=0.3)) as proxy:
        bad.mode = "drop"
        async with aiohttp.ClientSession() as s:
            for _ in range(4):
                status, got, headers = await post(s, proxy.url, {"prompt": "x"})
                assert status == 200 and headers["x-pylb-replica"] == good.url
            assert list(proxy.fleet.healthy) == [good.url]
            m = await scrape(proxy)
            assert value(m, "pylb_ejections_total", replica=bad.url, reason="connect") == 1
            assert value(m, "pylb_retries_total", reason="connect") == 1
            assert value(m, "pylb_replica_healthy", replica=bad.url) == 0
            bad.mode = "ok"  # its /health kept answering 200: after the hold it comes back
            await wait_for(lambda: bad.url in proxy.fleet.healthy, what="re-admission")
            seen = {(await post(s, proxy.url, {"prompt": "x"}))[2]["x-pylb-replica"] for _ in range(4)}
            assert seen == {bad.url, good.url}


async def test_stale_keep_alive_connections_are_no_evidence_against_a_replica() -> None:
    # replicas that close idle keep-alive connections (vLLM's uvicorn does after 5 s): every
    # connection pylb pooled goes stale while the clients pause
    async with scripted(2) as reps, running_proxy(settings([r.url for r in reps])) as proxy, aiohttp.ClientSession() as s:
        for r in reps:
            r.stale_after = 0.15
        for burst in range(3):
            # four at once: two pooled connections to each replica; then one at a time, after
            # the pause, on a pool of stale connections
            answers = await asyncio.gather(*(post(s, proxy.url, {"prompt": f"b{burst}-{i}"}) for i in range(4)))
            assert [a[0] for a in answers] == [200] * 4
            await asyncio.sleep(0.25)
            for i in range(4):
                status, got, _ = await post(s, proxy.url, {"prompt": f"s{burst}-{i}"})
                assert status == 200, got
            await asyncio.sleep(0.25)
            for i in range(4):  # other /v1/ paths are forwarded on the same kind of pool
                status, got, _ = await post(s, proxy.url, {"echo": i}, path="/v1/echo")
                assert status == 200 and got["body"] == json.dumps({"echo": i}), got
            await asyncio.sleep(0.25)
        assert sum(r.stale_closed for r in reps) >= 12  # the test did send on stale connections
        m = await scrape(proxy)
        assert list(proxy.fleet.healthy) == [r.url for r in reps]
        for r in reps:
            assert value(m, "pylb_ejections_total", replica=r.url, reason="connect") == 0
            assert value(m, "pylb_upstream_errors_total", replica=r.url, kind="connect") == 0
        assert value(m, "pylb_retries_total", reason="connect") == 0
        assert value(m, "pylb_requests_total", endpoint="completions", code="200") == 24


async def test_retries_are_bounded_then_the_last_answer_is_forwarded() -> None:
    async with scripted(2) as reps, running_proxy(settings([r.url for r in reps], upstream__max_retries=3, fleet__eject_5xx=100)) as proxy:
        for r in reps:
            r.mode, r.status = "status", 503
        async with aiohttp.ClientSession() as s:
            status, got, headers = await post(s, proxy.url, {"prompt": "x"})
        assert status == 503 and got["error"]["message"] == "scripted 503"  # the replica's own answer
        assert sum(len(r.requests) for r in reps) == 4  # 1 + 3 retries
        # a 500 is not retried (it is usually about the request), but counts toward ejection
        for r in reps:
            r.mode, r.status = "status", 500
        async with aiohttp.ClientSession() as s:
            status, got, _ = await post(s, proxy.url, {"prompt": "x"})
        assert status == 500 and sum(len(r.requests) for r in reps) == 5


async def test_5xx_answers_eject_after_the_threshold() -> None:
    async with scripted(2) as (bad, good), running_proxy(settings([bad.url, good.url], fleet__eject_5xx=2, upstream__max_retries=0)) as proxy:
        bad.mode, bad.status = "status", 503
        async with aiohttp.ClientSession() as s:
            codes = [(await post(s, proxy.url, {"prompt": "x"}))[0] for _ in range(6)]
        assert codes.count(503) == 2 and codes.count(200) == 4
        assert list(proxy.fleet.healthy) == [good.url]
        assert value(await scrape(proxy), "pylb_ejections_total", replica=bad.url, reason="5xx") == 1


async def test_all_replicas_failing_to_connect_gives_502_or_503() -> None:
    async with scripted(2) as reps, running_proxy(settings([r.url for r in reps], fleet__ejection_s=30)) as proxy:
        for r in reps:
            r.mode = "drop"
        async with aiohttp.ClientSession() as s:
            status, got, headers = await post(s, proxy.url, {"prompt": "x"})
            check_error(status, got, 503)  # both ejected while retrying: none left
            assert "Retry-After" in headers
            status, got, _ = await post(s, proxy.url, {"prompt": "x"})
            check_error(status, got, 503)


# ---- slow, flapping and dying replicas -------------------------------------------------------------------


async def test_slow_replica_times_out_and_the_request_moves_on() -> None:
    async with scripted(2) as (slow, fast), running_proxy(settings([slow.url, fast.url], upstream__read_timeout_s=0.2)) as proxy:
        slow.mode, slow.delay = "slow", 1.0
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(post(s, proxy.url, {"prompt": f"q{i}"}) for i in range(4)))
        assert all(st == 200 and h["x-pylb-replica"] == fast.url for st, _, h in results)
        m = await scrape(proxy)
        assert value(m, "pylb_retries_total", reason="timeout") >= 1
        assert value(m, "pylb_upstream_errors_total", replica=slow.url, kind="timeout") >= 1


async def test_slow_replica_does_not_hold_up_others() -> None:
    async with scripted(2) as (slow, fast), running_proxy(settings([slow.url, fast.url])) as proxy:
        slow.mode, slow.delay = "slow", 0.8
        loop = asyncio.get_running_loop()
        async with aiohttp.ClientSession() as s:

            async def timed(i: int) -> tuple[str, float]:
                t0 = loop.time()
                status, _, headers = await post(s, proxy.url, {"prompt": f"q{i}"})
                assert status == 200
                return headers["x-pylb-replica"], loop.time() - t0

            results = await asyncio.gather(*(timed(i) for i in range(6)))
        assert sorted(r for r, _ in results) == sorted([slow.url] * 3 + [fast.url] * 3)
        # held up behind the slow replica, a fast one would take its 0.8 s too; the margin below
        # that is for a loaded machine (0.4 s failed once in a full suite run on 2 cores)
        fast_times = [dt for r, dt in results if r == fast.url]
        assert max(fast_times) < 0.7, fast_times
        assert all(dt >= 0.8 for r, dt in results if r == slow.url)


async def test_flapping_health_does_not_flap_membership() -> None:
    router = RecordingRouter()
    rep_flap = ScriptedReplica()
    rep_flap.health = "flap"  # good and bad probes by turns (by call, so whatever the machine's load)
    async with scripted(1) as (steady,), rep_flap, running_proxy(settings([rep_flap.url, steady.url], fleet__health_interval_s=0.05), router=router) as proxy:
        await asyncio.sleep(1.0)
        assert rep_flap.health_calls > 10
        memberships = [e[1] for e in router.of("membership")]
        # the first probe decides, then it never has two in a row: no change (never an oscillation)
        assert memberships == [[rep_flap.url, steady.url]], memberships
        assert value(await scrape(proxy), "pylb_ejections_total", replica=rep_flap.url, reason="probe") == 0


async def test_unhealthy_replica_leaves_and_returns_with_hysteresis() -> None:
    router = RecordingRouter()
    async with scripted(2) as (a, b), running_proxy(settings([a.url, b.url]), router=router) as proxy:
        a.health = 503
        await wait_for(lambda: list(proxy.fleet.healthy) == [b.url], what="ejection by probes")
        a.health = "hang"  # probe timeouts count as failures too
        await asyncio.sleep(0.2)
        assert list(proxy.fleet.healthy) == [b.url]
        a.health = 200
        await wait_for(lambda: list(proxy.fleet.healthy) == [a.url, b.url], what="re-admission")
        assert [e[1] for e in router.of("membership")] == [[a.url, b.url], [b.url], [a.url, b.url]]
        assert value(await scrape(proxy), "pylb_ejections_total", replica=a.url, reason="probe") == 1


async def test_replica_dying_mid_stream_ends_that_stream_with_an_error_event() -> None:
    async with scripted(2) as (dying, fine), running_proxy(settings([dying.url, fine.url])) as proxy:
        dying.mode, dying.events, fine.events = "die", 3, 30
        async with aiohttp.ClientSession() as s:

            async def stream() -> tuple[str, bytes]:
                async with s.post(proxy.url + "/v1/completions", json={"prompt": "x", "stream": True}) as r:
                    assert r.status == 200
                    return r.headers["x-pylb-replica"], await r.read()

            results = await asyncio.gather(*(stream() for _ in range(6)))
        for replica, body in results:
            events = [e for e in body.split(b"\n\n") if e]
            if replica == dying.url:
                assert events[:3] == [e for e in events if b'"text"' in e][:3]
                err = json.loads(events[-2][len(b"data: ") :])
                assert err["error"]["code"] == 502 and events[-1] == b"data: [DONE]"
            else:
                assert len(events) == 31 and events[-1] == b"data: [DONE]" and b"error" not in body
        assert {r for r, _ in results} == {dying.url, fine.url}
        m = await scrape(proxy)
        assert value(m, "pylb_upstream_errors_total", replica=dying.url, kind="connect") >= 1


async def test_a_killed_replica_process_mid_run(tmp_path) -> None:  # noqa: ANN001
    """Two `pylb sim-replicas` processes; one is SIGKILLed while streams run through pylb."""
    env = dict(os.environ)
    procs, urls = [], []
    try:
        for _ in range(2):
            p = subprocess.Popen(
                [sys.executable, "-P", "-m", "pylb.cli", "sim-replicas", "--replicas", "1", "--base-port", "0", "--speed", "1"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True,
            )  # fmt: skip
            procs.append(p)
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.get_running_loop().run_in_executor(None, p.stdout.readline)
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            assert found, line
            urls.append(found.group(0))
        assert all(u.startswith("http://127.0.0.1:") for u in urls), urls
        victim_url = urls[0]
        async with running_proxy(settings(urls)) as proxy, aiohttp.ClientSession() as s:
            body = {"model": MODEL, "prompt": "hello " * 50, "max_tokens": 300, "stream": True, "ignore_eos": True}

            async def stream() -> tuple[str, bytes]:
                async with s.post(proxy.url + "/v1/completions", json=body) as r:
                    assert r.status == 200
                    return r.headers["x-pylb-replica"], await r.read()

            tasks = [asyncio.create_task(stream()) for _ in range(6)]
            await wait_for(lambda: proxy.dispatcher.load(victim_url).inflight > 0, what="streams")
            await asyncio.sleep(0.3)
            procs[0].send_signal(signal.SIGKILL)
            results = await asyncio.gather(*tasks)
            # after the kill every new request is served by the survivor
            async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as c:
                for _ in range(4):
                    raw = await c.completions.with_raw_response.create(model=MODEL, prompt="after", max_tokens=2, extra_body={"ignore_eos": True})
                    assert raw.headers["x-pylb-replica"] == urls[1] and raw.parse().choices[0].text == GEN_TOKEN_TEXT * 2
            m = await scrape(proxy)
        broken = [b for r, b in results if r == victim_url]
        whole = [b for r, b in results if r == urls[1]]
        assert broken and whole
        for b in broken:
            assert b'"error"' in b and b.endswith(b"data: [DONE]\n\n")
        for b in whole:
            assert b'"error"' not in b and b.count(b"data: ") == 301
        assert list(proxy.fleet.healthy) == [urls[1]]
        assert value(m, "pylb_ejections_total", replica=victim_url, reason="connect") == 1
        total = sum(v for (labels, v) in m["pylb_requests_total"].items())
        assert total == 10  # every request counted once
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait(10)
            if p.stdout:
                p.stdout.close()
