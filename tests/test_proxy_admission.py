"""The proxy and the router's admission control: a request the router refuses (`Overloaded`)
gets an OpenAI-style 429 with Retry-After, never a long wait; and the router's measured TTFT
prediction error is on /metrics once streamed first tokens came back."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from proxy_support import running_proxy, scrape, scripted, settings, value, wait_for

JSON = {"Content-Type": "application/json"}


async def post(s: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, dict]:
    async with s.post(url + "/v1/completions", data=json.dumps(body).encode(), headers=JSON) as r:
        raw = await r.read()
        return r.status, (json.loads(raw) if raw.startswith(b"{") else {"raw": raw}), dict(r.headers)


async def test_a_hopeless_request_gets_429_with_retry_after() -> None:
    # 1 s per prompt token and a 10 ms SLO: once the replica is busy, every request is hopeless
    overrides = dict(router__policy="dualmap", router__admission_factor=1.0, router__slo_ttft_s=0.01, router__prefill_s_per_token=1.0)
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], **overrides)) as proxy, aiohttp.ClientSession() as s:
        rep.mode = "hang"  # the first request stays in flight, never prefilled
        first = asyncio.create_task(post(s, proxy.url, {"model": rep.model, "prompt": "the first one", "max_tokens": 4}))
        await wait_for(lambda: len(rep.requests) == 1, what="the first request at the replica")
        status, body, headers = await post(s, proxy.url, {"model": rep.model, "prompt": "one too many", "max_tokens": 4})
        assert status == 429, body
        err = body["error"]
        assert err["code"] == 429 and err["type"] and "overloaded" in err["message"] and "admission limit" in err["message"]
        assert int(headers["Retry-After"]) >= 1
        assert len(rep.requests) == 1  # the refused request never reached the replica
        assert proxy.dispatcher.queue_depth == 0
        m = await scrape(proxy)
        assert value(m, "pylb_requests_total", endpoint="completions", code="429") == 1
        first.cancel()


async def test_prediction_error_is_exported_after_streamed_first_tokens() -> None:
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], router__policy="dualmap")) as proxy, aiohttp.ClientSession() as s:
        m = await scrape(proxy)
        assert "pylb_ttft_prediction_error_seconds" not in m  # no first token yet: no sample, not a made-up 0
        for i in range(3):
            body = {"model": rep.model, "prompt": f"prompt {i}", "max_tokens": 4, "stream": True}
            async with s.post(proxy.url + "/v1/completions", data=json.dumps(body).encode(), headers=JSON) as r:
                assert r.status == 200
                await r.read()
        m = await scrape(proxy)
        p50 = value(m, "pylb_ttft_prediction_error_seconds", quantile="0.5")
        p90 = value(m, "pylb_ttft_prediction_error_seconds", quantile="0.9")
        assert 0 < p50 <= p90 < 5.0
