"""`pylb epp` (issue 11 §3): the ext_proc endpoint picker, driven over real gRPC by a stand-in for
Envoy (tests/epp_support.py) that forwards each request over real HTTP to the fake vLLM replica
pylb named. What a real Envoy does with pylb's answers is tests/test_epp_envoy.py's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pylb.cli import main
from pylb.epp.processor import destination
from pylb.router.interface import Usage

from epp_support import DEST, FakeEnvoy, running_epp
from proxy_support import HoldRouter, RecordingRouter, dead_url, fake_fleet, free_port_on, scrape, settings, value, wait_for

CHAT = {"model": "pylb-sim", "messages": [{"role": "user", "content": "hello from the gateway"}], "max_tokens": 4}
COMPLETION = {"model": "pylb-sim", "prompt": "once upon a time", "max_tokens": 4}


def epp_settings(backends: list[str], **overrides: object) -> object:
    return settings(backends, epp__grpc_port=0, epp__metrics_port=0, **overrides)


def test_destination_is_ip_port() -> None:
    assert destination("http://10.0.0.5:8000") == "10.0.0.5:8000"
    assert destination("http://[fd00::5]:8000") == "[fd00::5]:8000"
    assert destination("https://10.0.0.5") == "10.0.0.5:443"


async def test_routes_chat_and_completions_streamed_and_not() -> None:
    async with fake_fleet(2) as servers:
        urls = [s.url for s in servers]
        async with running_epp(epp_settings(urls)) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            seen = set()
            for path, payload in (("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)):
                for stream in (False, True):
                    ex, status, body = await envoy.roundtrip(path, {**payload, "stream": stream})
                    assert status == 200, body
                    assert ex.dest is not None and f"http://{ex.dest}" in urls
                    assert ex.clear_route_cache
                    assert ex.metadata == {"envoy.lb": {DEST: ex.value}}  # the header's value
                    assert ex.value == ",".join([ex.dest, *ex.fallbacks]) and len(ex.fallbacks) == 1  # 2 replicas: 1 other
                    assert ex.response_added["x-pylb-replica"] == f"http://{ex.dest}"
                    if stream:
                        assert body.rstrip().endswith(b"data: [DONE]")
                    else:
                        assert json.loads(body)["usage"]["completion_tokens"] == 4
                    seen.add(ex.dest)
            assert len(seen) == 2  # round-robin over both
            m = await scrape_epp(epp)
            assert value(m, "pylb_requests_total", endpoint="chat", code="200") == 2
            assert value(m, "pylb_requests_total", endpoint="completions", code="200") == 2
            assert value(m, "pylb_ttft_seconds_count", endpoint="chat") == 1  # streamed ones only
            assert sum(value(m, "pylb_replica_dispatched_total", replica=u) for u in urls) == 4
            assert all(value(m, "pylb_replica_inflight_requests", replica=u) == 0 for u in urls)


async def scrape_epp(epp: object) -> dict[str, dict[tuple, float]]:
    class _Url:
        url = epp.metrics_url  # type: ignore[attr-defined]

    return await scrape(_Url)  # type: ignore[arg-type]


async def test_the_response_path_drives_in_flight_and_prefill_accounting() -> None:
    router = RecordingRouter()
    async with fake_fleet(1) as servers:
        url = servers[0].url
        async with running_epp(epp_settings([url]), router=router) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            load = epp.balancer.dispatcher.load
            ex = envoy.open()
            await ex.request("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}})
            assert (load(url).inflight, load(url).unprefilled_requests) == (1, 1)  # dispatched, no token yet
            resp = await ex.forward()
            first = await resp.content.readany()
            await ex.chunk(first)
            assert (load(url).inflight, load(url).unprefilled_requests) == (1, 0)  # the first chunk is the first token
            (rid,) = router.requests
            assert len(router.of("first_token", rid)) == 1 and not router.of("complete", rid)
            await ex.relay(resp)
            (done,) = router.of("complete", rid)
            assert done[2] == url and isinstance(done[4], Usage) and done[4].completion_tokens == 4
            assert load(url).inflight == 0

            # a client that leaves mid-stream: completed with usage None, counted 499
            ex = envoy.open()
            await ex.request("/v1/chat/completions", {**CHAT, "stream": True, "max_tokens": 64})
            resp = await ex.forward()
            await ex.chunk(await resp.content.readany())
            ex.call.cancel()
            resp.close()
            rid2 = next(r for r in router.requests if r != rid)
            await wait_for(lambda: bool(router.of("complete", rid2)), what="completion of the cut stream")
            assert router.of("complete", rid2)[0][4] is None and load(url).inflight == 0
            await wait_for(lambda: epp.balancer.metrics.requests.get("chat", "499") == 1, what="the 499")


async def test_non_streamed_first_token_is_the_proxys_estimate() -> None:
    router = RecordingRouter()
    async with fake_fleet(1) as servers:
        s = epp_settings([servers[0].url], router__prefill_s_per_token=1e-9)
        async with running_epp(s, router=router) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            ex = envoy.open()
            await ex.request("/v1/completions", COMPLETION)
            (rid,) = router.requests
            await wait_for(lambda: bool(router.of("first_token", rid)), what="the estimated first token")
            assert not router.of("complete", rid)  # before the answer
            await ex.relay(await ex.forward())
            assert router.of("complete", rid)[0][4].prompt_tokens > 0


async def test_errors_are_immediate_openai_json() -> None:
    async with fake_fleet(1) as servers:
        async with running_epp(epp_settings([servers[0].url])) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            for payload, field in ((b"{not json", "body"), ({"model": "m"}, "messages"), ({"model": "m", "messages": "hi"}, "messages")):
                ex = envoy.open()
                ans = await ex.request("/v1/chat/completions", payload)
                imm = ans.immediate_response
                assert imm.status.code == 400, ans
                err = json.loads(imm.body)["error"]
                assert err["code"] == 400 and err["param"] == field and err["type"] == "BadRequestError"
                assert any(h.header.key == "content-type" for h in imm.headers.set_headers)
            m = await scrape_epp(epp)
            assert value(m, "pylb_requests_total", endpoint="chat", code="400") == 3


async def test_no_healthy_replica_is_503_with_retry_after() -> None:
    async with running_epp(epp_settings([dead_url()])) as epp, FakeEnvoy(epp.grpc_target) as envoy:
        ans = await envoy.open().request("/v1/completions", COMPLETION)
        imm = ans.immediate_response
        assert imm.status.code == 503 and json.loads(imm.body)["error"]["type"] == "ServiceUnavailableError"
        assert {h.header.key for h in imm.headers.set_headers} >= {"Retry-After", "content-type"}
        ans = await envoy.open().request("/v1/models", b"", method="GET")
        assert ans.immediate_response.status.code == 503


async def test_queue_full_is_429() -> None:
    router = HoldRouter(with_cancel=True)
    async with fake_fleet(1) as servers:
        async with (
            running_epp(epp_settings([servers[0].url], router__max_queued=1), router=router) as epp,
            FakeEnvoy(epp.grpc_target) as envoy,
        ):
            held = envoy.open()
            waiting = asyncio.create_task(held.request("/v1/completions", COMPLETION))
            await wait_for(lambda: epp.balancer.dispatcher.queue_depth == 1, what="the first request queued")
            ans = await envoy.open().request("/v1/completions", COMPLETION)
            assert ans.immediate_response.status.code == 429
            assert json.loads(ans.immediate_response.body)["error"]["type"] == "RateLimitError"
            router.open = True
            epp.balancer.dispatcher._poll(epp.balancer.dispatcher.now())
            ans = await waiting
            assert ans.HasField("request_body")
            await held.relay(await held.forward())
            m = await scrape_epp(epp)
            assert value(m, "pylb_requests_total", endpoint="completions", code="429") == 1
            assert value(m, "pylb_requests_total", endpoint="completions", code="200") == 1


async def test_other_paths_go_to_healthy_replicas_in_turn() -> None:
    async with fake_fleet(2) as servers:
        urls = [s.url for s in servers]
        async with running_epp(epp_settings(urls)) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            dests = set()
            for _ in range(2):
                ex = envoy.open()
                ans = await ex.request("/v1/models", b"", method="GET")
                assert ans.HasField("request_body")
                resp = await ex.forward()
                assert resp.status == 200 and json.loads(await ex.relay(resp))["data"][0]["id"] == "pylb-sim"
                dests.add(ex.dest)
            assert {f"http://{d}" for d in dests} == set(urls)


async def test_grpc_health_and_metrics_listener() -> None:
    async with fake_fleet(1) as servers:
        url = servers[0].url
        async with running_epp(epp_settings([url])) as epp:
            async with grpc.aio.insecure_channel(epp.grpc_target) as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                for name in ("", "liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
                    r = await stub.Check(health_pb2.HealthCheckRequest(service=name))
                    assert r.status == health_pb2.HealthCheckResponse.SERVING, name
                await servers[0].stop()  # the only replica goes: not ready, still alive
                await wait_for(lambda: not epp.balancer.fleet.healthy, what="the replica out")
                await asyncio.sleep(2 * epp.settings.fleet.health_interval_s)

                async def status(name: str) -> int:
                    return (await stub.Check(health_pb2.HealthCheckRequest(service=name))).status

                await wait_for_async(lambda: status("readiness"), health_pb2.HealthCheckResponse.NOT_SERVING)
                assert await status("liveness") == health_pb2.HealthCheckResponse.SERVING
            async with aiohttp.ClientSession() as c:
                async with c.get(epp.metrics_url + "/ready") as r:
                    assert r.status == 503 and (await r.json())["ready"] is False
                async with c.get(epp.metrics_url + "/health") as r:
                    assert r.status == 200
                async with c.get(epp.metrics_url + "/metrics") as r:
                    text = await r.text()
            assert "pylb_replica_healthy" in text and "pylb_requests_total" in text and "pylb_queue_depth" in text


async def wait_for_async(get: object, want: int, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (got := await get()) != want:  # type: ignore[operator]
        assert loop.time() < deadline, f"still {got}, want {want}"
        await asyncio.sleep(0.05)


def test_cli_settings_and_errors(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("PYLB_")]:
        monkeypatch.delenv(k)
    assert main(["epp", "--backend", "http://10.0.0.5:8000", "--epp-grpc-port", "9102", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "grpc_port: 9102" in out and "metadata_namespace: envoy.lb" in out
    assert main(["epp", "--backend", "http://10.0.0.5:8000", "--epp-grpc-port", "70000"]) == 2
    assert "epp.grpc_port" in capsys.readouterr().err
    assert main(["epp", "--backend", "http://10.0.0.5:8000", "--server-workers", "2"]) == 2
    assert "server.workers" in capsys.readouterr().err
    assert main(["epp"]) == 2
    assert "no backend" in capsys.readouterr().err


async def test_a_stream_that_ends_while_queued_withdraws_the_request() -> None:
    router = HoldRouter(with_cancel=True)
    async with fake_fleet(1) as servers:
        async with running_epp(epp_settings([servers[0].url]), router=router) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            ex = envoy.open()
            waiting = asyncio.create_task(ex.request("/v1/completions", COMPLETION))
            await wait_for(lambda: epp.balancer.dispatcher.queue_depth == 1, what="the request queued")
            ex.call.cancel()  # Envoy gave up on the request (its client left)
            with pytest.raises(asyncio.CancelledError):
                await waiting
            await wait_for(lambda: epp.balancer.dispatcher.queue_depth == 0, what="the withdrawal")
            assert len(router.cancelled) == 1
            await wait_for(lambda: epp.balancer.metrics.requests.get("completions", "499") == 1, what="the 499")


async def test_pylb_epp_process_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    async with fake_fleet(1) as servers:
        grpc_port, metrics_port = free_port_on(["127.0.0.1"]), free_port_on(["127.0.0.1"])
        cmd = [sys.executable, "-P", "-m", "pylb.cli", "epp", "--backend", servers[0].url, "--epp-grpc-port", str(grpc_port),
               "--epp-metrics-port", str(metrics_port), "--fleet-health-interval-s", "0.1", "--log-level", "warning"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}
        with open(tmp_path / "epp.log", "w") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path, env=env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while True:
                    assert proc.poll() is None, (tmp_path / "epp.log").read_text()
                    try:
                        r = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                        if r.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    except grpc.aio.AioRpcError:
                        pass
                    assert loop.time() < deadline, "pylb epp never got ready"
                    await asyncio.sleep(0.1)
            async with FakeEnvoy(f"127.0.0.1:{grpc_port}") as envoy:
                ex, status, body = await envoy.roundtrip("/v1/chat/completions", {**CHAT, "stream": True})
                assert status == 200 and ex.dest == servers[0].url.removeprefix("http://")
            async with aiohttp.ClientSession() as c, c.get(f"http://127.0.0.1:{metrics_port}/metrics") as r:
                assert 'pylb_requests_total{code="200",endpoint="chat"} 1.0' in await r.text()
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# ---- GIE's endpoint-picker protocol: fallbacks, subset hint, served endpoint --------------------------


def dest_of(url: str) -> str:
    return url.removeprefix("http://")


async def test_fallbacks_name_other_replicas_after_the_choice() -> None:
    async with fake_fleet(4) as servers:
        urls = [s.url for s in servers]
        for n, expect in ((2, 2), (0, 0), (8, 3)):  # the setting, capped by the other healthy replicas
            async with running_epp(epp_settings(urls, epp__fallbacks=n)) as epp, FakeEnvoy(epp.grpc_target) as envoy:
                ex, status, _ = await envoy.roundtrip("/v1/completions", COMPLETION)
                assert status == 200
                assert len(ex.fallbacks) == expect and len({ex.dest, *ex.fallbacks}) == 1 + expect
                assert all(f"http://{d}" in urls for d in ex.fallbacks)
                assert ex.metadata == {"envoy.lb": {DEST: ex.value}}
                # a path pylb does not route gets fallbacks too
                other = envoy.open()
                await other.request("/v1/models", b"", method="GET")
                assert len(other.fallbacks) == expect
                await other.relay(await other.forward())
                assert all(epp.balancer.dispatcher.load(u).inflight == 0 for u in urls)


async def test_subset_hint_limits_the_pick_and_an_empty_intersection_is_503() -> None:
    async with fake_fleet(3) as servers:
        urls = [s.url for s in servers]
        async with running_epp(epp_settings(urls)) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            allowed = [dest_of(urls[1]), dest_of(urls[2])]
            hint = {"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": allowed + ["10.255.0.1:8000"]}}
            picked = []
            for i in range(6):  # round-robin would put two of them on urls[0]
                ex = envoy.open()
                ans = await ex.request("/v1/chat/completions", {**CHAT, "stream": i % 2 == 1}, metadata=hint)
                assert ans.HasField("request_body")
                assert ex.dest in allowed and ex.fallbacks and set(ex.fallbacks) <= set(allowed) and ex.dest not in ex.fallbacks
                await ex.relay(await ex.forward())
                picked.append(ex.dest)
            assert set(picked) == set(allowed)
            load = epp.balancer.dispatcher.load
            assert load(urls[0]).dispatched == 0 and load(urls[1]).dispatched + load(urls[2]).dispatched == 6
            assert all(load(u).inflight == 0 and load(u).unprefilled_requests == 0 for u in urls)
            # as a comma-separated string, too
            ex = envoy.open()
            await ex.request(
                "/v1/completions",
                COMPLETION,
                metadata={"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": dest_of(urls[0])}},
            )
            assert ex.value == dest_of(urls[0])
            await ex.relay(await ex.forward())
            # none of the subset is a healthy replica: 503, nothing routed
            for subset in (["10.255.0.1:8000"], []):
                ex = envoy.open()
                ans = await ex.request(
                    "/v1/completions", COMPLETION, metadata={"envoy.lb.subset_hint": {"x-gateway-destination-endpoint-subset": subset}}
                )
                assert ans.immediate_response.status.code == 503
                assert "subset" in json.loads(ans.immediate_response.body)["error"]["message"]
            assert sum(load(u).dispatched for u in urls) == 7
            m = await scrape_epp(epp)
            assert value(m, "pylb_requests_total", endpoint="completions", code="503") == 2


async def test_served_endpoint_moves_the_accounting_to_the_replica_that_served() -> None:
    async with fake_fleet(2) as servers:
        urls = [s.url for s in servers]
        async with running_epp(epp_settings(urls)) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            load = epp.balancer.dispatcher.load
            ex = envoy.open()
            await ex.request("/v1/chat/completions", {**CHAT, "stream": True})
            picked, other = f"http://{ex.dest}", f"http://{ex.fallbacks[0]}"
            assert load(picked).inflight == 1 and load(other).inflight == 0
            resp = await ex.forward(to=ex.fallbacks[0], served_metadata=True)  # as if the pick was down
            assert ex.response_added["x-pylb-replica"] == other
            assert load(picked).inflight == 0 and load(other).inflight == 1
            assert load(other).unprefilled_requests == 1  # no token yet
            await ex.relay(resp)
            assert all(load(u).inflight == 0 and load(u).unprefilled_requests == 0 for u in urls)
            assert load(picked).dispatched == 0 and load(other).dispatched == 1
            # the served endpoint is the pick: nothing moves
            ex2 = envoy.open()
            await ex2.request("/v1/completions", COMPLETION)
            await ex2.relay(await ex2.forward(served_metadata=True))
            m = await scrape_epp(epp)
            assert value(m, "pylb_retries_total", reason="epp_fallback") == 1
            assert value(m, "pylb_requests_total", endpoint="chat", code="200") == 1


async def test_full_duplex_streamed_body_is_routed_at_its_end_and_sent_back() -> None:
    """FULL_DUPLEX_STREAMED (GIE's reference mode): Envoy sends the headers and the body pieces
    without waiting; pylb answers once the body is whole, headers (the pick) then body (sent back,
    as this mode wants), and echoes the response body pieces."""
    from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as ext_proc

    from epp_support import header_map

    duplex = processing_mode_pb2.ProcessingMode.FULL_DUPLEX_STREAMED
    async with fake_fleet(2) as servers:
        urls = [s.url for s in servers]
        async with running_epp(epp_settings(urls)) as epp, FakeEnvoy(epp.grpc_target) as envoy:
            call = envoy.stub.Process()
            body = json.dumps({**CHAT, "stream": True}).encode()
            h = {":method": "POST", ":path": "/v1/chat/completions", "content-type": "application/json"}
            await call.write(
                ext_proc.ProcessingRequest(
                    request_headers=header_map(h),
                    protocol_config=ext_proc.ProtocolConfiguration(request_body_mode=duplex, response_body_mode=duplex),
                )
            )
            await call.write(ext_proc.ProcessingRequest(request_body=ext_proc.HttpBody(body=body[:10])))
            await call.write(ext_proc.ProcessingRequest(request_body=ext_proc.HttpBody(body=body[10:], end_of_stream=True)))
            first = await call.read()
            assert first.HasField("request_headers")
            dest = first.request_headers.response.header_mutation.set_headers[0].header.raw_value.decode().split(",")[0]
            assert first.request_headers.response.clear_route_cache and f"http://{dest}" in urls
            second = await call.read()
            sent = second.request_body.response.body_mutation.streamed_response
            assert sent.body == body and sent.end_of_stream
            async with envoy.session.post(
                f"http://{dest}/v1/chat/completions", data=body, headers={"content-type": "application/json"}
            ) as resp:
                await call.write(
                    ext_proc.ProcessingRequest(response_headers=header_map({":status": "200", "content-type": "text/event-stream"}))
                )
                assert (await call.read()).HasField("response_headers")
                got = b""
                async for piece in resp.content.iter_any():
                    await call.write(ext_proc.ProcessingRequest(response_body=ext_proc.HttpBody(body=piece)))
                    got += (await call.read()).response_body.response.body_mutation.streamed_response.body
            await call.write(ext_proc.ProcessingRequest(response_body=ext_proc.HttpBody(body=b"", end_of_stream=True)))
            assert (await call.read()).response_body.response.body_mutation.streamed_response.end_of_stream
            await call.done_writing()
            assert got.rstrip().endswith(b"data: [DONE]")
            assert all(epp.balancer.dispatcher.load(u).inflight == 0 for u in urls)
            assert epp.balancer.metrics.requests.get("chat", "200") == 1


def test_router_reassign_moves_the_mirrors_credit_with_the_request() -> None:
    """After a move the old replica is no longer credited with the blocks its dispatch added (it
    never saw the request; what it held before stays), and the new one holds the prompt."""
    from policy_fakes import core, req

    r = core(2)
    r.submit(req("0/warm", tokens=64, hashes=[11, 12]), 0.0)
    assert [d.replica for d in r.poll(0.0)] == ["r0"]
    r.on_complete("0/warm", "r0", 0.1, None)
    r.submit(req("0/x", tokens=128, hashes=[11, 12, 13, 14]), 0.2)
    assert [d.replica for d in r.poll(0.2)] == ["r0"]
    probe = req("probe", hashes=[11, 12, 13, 14])
    assert list(r.cached_blocks(probe)) == [4, 0]  # credited at dispatch
    assert r.reassign("0/x", "r1", 0.3)
    assert list(r.cached_blocks(probe)) == [2, 4]  # r0 keeps what it held before; r1 holds the prompt
    assert r.reassign("0/x", "r0", 0.4)  # and back: r1 had nothing before
    assert list(r.cached_blocks(probe)) == [4, 0]


def test_router_reassign_moves_in_flight_and_prefill_accounting() -> None:
    """The hook behind the served endpoint and the subset hint: `Router.reassign` (the core's)
    through `RouterDriver.move`; the policy sees a completion on the old replica and a dispatch
    on the new one."""
    from policy_fakes import core, req

    from pylb.router.driver import RouterDriver

    r = core(3)
    d = RouterDriver(r)
    d.membership(["r0", "r1", "r2"], 0.0)
    d.submit(req("0/a", tokens=40), 0.0)
    (disp, _), *_ = d.poll(0.0)
    assert disp.replica == "r0"
    st = r.view.replica
    assert (st("r0").inflight_requests, st("r0").unprefilled_requests) == (1, 1)
    assert not d.move("0/a", "r0", 0.1) and not d.move("nope", "r1", 0.1) and not d.move("0/a", "r9", 0.1)
    assert d.move("0/a", "r2", 0.1)
    assert (st("r0").inflight_requests, st("r0").unprefilled_requests, st("r0").unprefilled_tokens) == (0, 0, 0)
    assert (st("r2").inflight_requests, st("r2").unprefilled_requests, st("r2").unprefilled_tokens) == (1, 1, 40)
    assert d.counts["r0"].dispatched == 0 and d.counts["r2"].dispatched == 1
    assert r.policy.completed == [("0/a", 0)] and r.policy.dispatched[-1] == ("0/a", 2)  # type: ignore[attr-defined]
    d.first_token("0/a", "r2", 0.2)
    assert d.move("0/a", "r1", 0.3)  # after the first token: in flight only
    assert (st("r1").inflight_requests, st("r1").unprefilled_requests) == (1, 0) and st("r2").inflight_requests == 0
    d.complete("0/a", "r1", 0.4, Usage(40, 4, 0))
    assert all(st(n).inflight_requests == 0 and st(n).unprefilled_requests == 0 for n in ("r0", "r1", "r2"))
