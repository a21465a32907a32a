"""The semantic cache in the live proxy: real sockets, the openai SDK, fake vLLM replicas.

Every guard refuses what it must (tenant, parameters, prior context, sampling, error and cut
answers), replays are valid for the openai SDK and byte-identical, identical concurrent requests
cost one upstream request, and a reported false hit drops its entry."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import openai

from pylb.sim.server import GEN_TOKEN_TEXT

from proxy_support import MODEL, fake_fleet, running_proxy, scrape, settings, value, wait_for

SYSTEM = {"role": "system", "content": "be brief"}


def cache_settings(backends: list[str], **overrides: Any) -> Any:
    return settings(backends, cache__enabled=True, cache__threshold=0.6, cache__batch_window_ms=1.0, **overrides)


def client(proxy: Any, key: str = "alice") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0, timeout=10)


async def dispatched(proxy: Any) -> float:
    m = await scrape(proxy)
    return sum(v for k, v in m.get("pylb_replica_dispatched_total", {}).items())


async def ask(c: openai.AsyncOpenAI, query: str, history: list | None = None, **kw: Any) -> tuple[str, str]:
    """(x-pylb-cache, answer text) of a chat request."""
    msgs = [SYSTEM, *(history or []), {"role": "user", "content": query}]
    kw = {"temperature": 0, "max_tokens": 16, **kw}
    raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, **kw)
    return raw.headers["x-pylb-cache"], raw.parse().choices[0].message.content or ""


async def test_exact_and_semantic_hits_and_guards() -> None:
    async with fake_fleet(2) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy, client(proxy) as c:
        assert await ask(c, "What is the capital of France?") == ("miss", GEN_TOKEN_TEXT * 8)
        await wait_for(lambda: len(proxy.cache.store) == 1, what="the answer stored")
        assert await ask(c, "What is the capital of France?") == ("hit", GEN_TOKEN_TEXT * 8)
        assert (await ask(c, "what is the capital of France"))[0] == "hit"  # same words, other case and punctuation
        assert (await ask(c, "What is the capital of Spain?"))[0] == "miss"  # entities guard
        assert await dispatched(proxy) == 2
        m = await scrape(proxy)
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_exact") == 1
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_semantic") == 1
        assert value(m, "pylb_cache_guard_refusals_total", guard="entities") == 1
        assert value(m, "pylb_cache_entries", model=MODEL) == 2
        assert value(m, "pylb_cache_lookup_seconds_count", result="hit") == 2


async def test_every_guard_refuses() -> None:
    async with fake_fleet(2) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy:
        async with client(proxy) as alice, client(proxy, "bob") as bob:
            q = "How do I reverse a list in Python?"
            assert (await ask(alice, q))[0] == "miss"
            await wait_for(lambda: len(proxy.cache.store) == 1, what="the answer stored")
            assert (await ask(bob, q))[0] == "miss"  # another tenant
            assert (await ask(alice, q, max_tokens=17))[0] == "miss"  # another parameter
            assert (await ask(alice, q, history=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]))[0] == "miss"
            assert (await ask(alice, q, temperature=0.5))[0] == "bypass"  # sampled
            assert (await ask(alice, q, max_tokens=4))[0] == "miss"  # cut at max_tokens: finish_reason length
            assert (await ask(alice, q, max_tokens=4))[0] == "miss"  # ... so never stored
            assert (await ask(alice, q))[0] == "hit"
            assert (await ask(alice, "How do I not reverse a list in Python?"))[0] == "miss"  # negation guard
            async with aiohttp.ClientSession() as s:  # no tenant
                body = {"model": MODEL, "temperature": 0, "messages": [SYSTEM, {"role": "user", "content": q}]}
                async with s.post(proxy.url + "/v1/chat/completions", json=body) as r:
                    assert r.status == 200 and r.headers["x-pylb-cache"] == "bypass"
                async with s.post(proxy.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer alice", "Cache-Control": "no-cache"}) as r:
                    assert r.status == 200 and r.headers["x-pylb-cache"] == "miss"
                bad = {**body, "max_tokens": 10**6}  # the replica answers 400: not stored
                for _ in range(2):
                    async with s.post(proxy.url + "/v1/chat/completions", json=bad, headers={"Authorization": "Bearer alice"}) as r:
                        assert r.status == 400 and r.headers["x-pylb-cache"] == "miss"
        m = await scrape(proxy)
        assert value(m, "pylb_cache_not_stored_total", reason="finish_reason") == 2
        assert value(m, "pylb_cache_not_stored_total", reason="status 400") == 2
        assert value(m, "pylb_cache_bypass_total", reason="temperature is not 0") == 1
        assert value(m, "pylb_cache_guard_refusals_total", guard="negation") == 1


async def test_stream_and_json_replays_are_byte_identical_and_valid_for_the_sdk() -> None:
    async with fake_fleet(1) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy, client(proxy) as c:
        body = {"model": MODEL, "temperature": 0, "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True},
                "messages": [SYSTEM, {"role": "user", "content": "tell me a story"}]}  # fmt: skip
        auth = {"Authorization": "Bearer alice"}
        seen = []
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.post(proxy.url + "/v1/chat/completions", json=body, headers=auth) as r:
                    seen.append((r.headers["x-pylb-cache"], r.headers["Content-Type"], await r.read()))
                await wait_for(lambda: len(proxy.cache.store) == 1, what="the stream stored")
            json_body = {**body, "stream": False}
            del json_body["stream_options"]
            for _ in range(2):
                async with s.post(proxy.url + "/v1/chat/completions", json=json_body, headers=auth) as r:
                    seen.append((r.headers["x-pylb-cache"], r.headers["Content-Type"], await r.read()))
                await wait_for(lambda: len(proxy.cache.store) == 2, what="the JSON answer stored")
        assert [h for h, _, _ in seen] == ["miss", "hit", "miss", "hit"]
        assert seen[0][1:] == seen[1][1:] and seen[2][1:] == seen[3][1:]
        assert seen[0][2].rstrip().endswith(b"data: [DONE]")

        stream = await c.chat.completions.create(
            model=MODEL, messages=body["messages"], temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
        parts, usage = [], None
        async for ch in stream:
            if ch.choices:
                parts.append(ch.choices[0].delta.content or "")
            usage = ch.usage or usage
        assert "".join(parts) == GEN_TOKEN_TEXT * 8 and usage is not None and usage.completion_tokens == 8
        r = await c.chat.completions.create(model=MODEL, messages=body["messages"], temperature=0, max_tokens=16)
        assert r.choices[0].message.content == GEN_TOKEN_TEXT * 8 and r.choices[0].finish_reason == "stop"
        assert await dispatched(proxy) == 2


async def test_identical_concurrent_requests_cost_one_upstream_request() -> None:
    async with fake_fleet(2, speed=1.0) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy, client(proxy) as c:
        results = await asyncio.gather(*(ask(c, "Explain TCP slow start") for _ in range(12)))
        assert {text for _, text in results} == {GEN_TOKEN_TEXT * 8}
        assert sorted(h for h, _ in results) == ["hit"] * 11 + ["miss"]
        assert await dispatched(proxy) == 1
        m = await scrape(proxy)
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_join") == 11


async def test_false_hit_report_drops_the_entry_for_its_tenant_only() -> None:
    async with fake_fleet(1) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy, client(proxy) as c:
        await ask(c, "Who wrote Hamlet?")
        await wait_for(lambda: len(proxy.cache.store) == 1, what="the answer stored")
        raw = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[SYSTEM, {"role": "user", "content": "Who wrote Hamlet?"}], temperature=0, max_tokens=16
        )
        entry = raw.headers["x-pylb-cache-entry"]
        url = proxy.url + "/admin/cache/false-hit"
        async with aiohttp.ClientSession() as s:
            async with s.post(url, json={"entry": entry}, headers={"Authorization": "Bearer bob"}) as r:
                assert r.status == 404 and (await r.json())["error"]["param"] == "entry"
            async with s.post(url, data=b"nonsense", headers={"Authorization": "Bearer alice"}) as r:
                assert r.status == 400
            async with s.post(url, json={"entry": entry}, headers={"Authorization": "Bearer alice"}) as r:
                assert r.status == 200 and await r.json() == {"dropped": entry}
        assert len(proxy.cache.store) == 0
        assert (await ask(c, "Who wrote Hamlet?"))[0] == "miss"
        m = await scrape(proxy)
        assert value(m, "pylb_cache_false_hits_total", model=MODEL) == 1


async def test_cache_off_by_default_has_no_header() -> None:
    async with fake_fleet(1) as fleet, running_proxy(settings([s.url for s in fleet])) as proxy, client(proxy) as c:
        assert proxy.cache is None
        raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert "x-pylb-cache" not in raw.headers


async def test_demo_cache_line() -> None:
    from pylb.demo import cache_summary

    async with fake_fleet(1) as fleet:
        async with running_proxy(settings([s.url for s in fleet])) as proxy:
            assert await cache_summary(proxy.url) is None
        async with running_proxy(cache_settings([s.url for s in fleet])) as proxy, client(proxy) as c:
            await ask(c, "Who painted the Mona Lisa?")
            await wait_for(lambda: len(proxy.cache.store) == 1, what="the answer stored")
            await ask(c, "Who painted the Mona Lisa?")
            await ask(c, "Who painted the Mona Lisa?", temperature=1.0)
            line = await cache_summary(proxy.url)
        assert line == "semantic cache: 1 hits (exact 1), 1 misses, 1 not cacheable (temperature is not 0: 1)"


async def test_answers_over_the_size_limit_are_not_stored() -> None:
    async with fake_fleet(1, output_len=400, speed=100.0) as fleet, running_proxy(cache_settings([s.url for s in fleet], cache__max_answer_bytes=1024)) as proxy:
        async with client(proxy) as c:
            for stream in (False, True):
                for _ in range(2):
                    raw = await c.chat.completions.with_raw_response.create(
                        model=MODEL, messages=[{"role": "user", "content": "long answer please"}], temperature=0, max_tokens=1000, stream=stream
                    )
                    assert raw.headers["x-pylb-cache"] == "miss"
                    if stream:
                        assert [ch async for ch in raw.parse()][-1].choices[0].finish_reason == "stop"
                    else:
                        assert raw.parse().choices[0].finish_reason == "stop"
        m = await scrape(proxy)
        assert value(m, "pylb_cache_not_stored_total", reason="too large") == 4


# ---- join: identical requests follow the one already upstream -----------------------------------


def stream_body(content: str) -> dict[str, Any]:
    return {"model": MODEL, "temperature": 0, "max_tokens": 64, "stream": True, "messages": [SYSTEM, {"role": "user", "content": content}]}


AUTH = {"Authorization": "Bearer alice"}


async def read_stream(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, float, bytes]:
    """(x-pylb-cache, seconds to the first body bytes, the whole body) of a streamed request."""
    t0 = asyncio.get_running_loop().time()
    async with s.post(url + "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status == 200
        first = await r.content.readany()
        t_first = asyncio.get_running_loop().time() - t0
        return r.headers["x-pylb-cache"], t_first, first + await r.read()


async def test_streamed_followers_receive_the_leaders_tokens_as_they_arrive() -> None:
    """A streamed request identical to one already streaming joins it live: its first bytes come
    while the leader's stream is still running (not after its end), its bytes are the leader's,
    and the replica sees one request."""
    async with fake_fleet(1, output_len=30, speed=0.02) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy:
        url = proxy.url
        async with aiohttp.ClientSession() as s:
            loop = asyncio.get_running_loop()
            async with s.post(url + "/v1/chat/completions", json=stream_body("count to thirty"), headers=AUTH) as r:
                assert r.headers["x-pylb-cache"] == "miss"
                leader = await r.content.readany()
                t_join = loop.time()
                followers = [asyncio.create_task(read_stream(s, url, stream_body("count to thirty"))) for _ in range(3)]
                leader += await r.read()
                leader_rest = loop.time() - t_join
            results = await asyncio.gather(*followers)
        assert leader.rstrip().endswith(b"data: [DONE]") and leader.count(b"data:") >= 30
        for cache, _, body in results:
            assert cache == "hit" and body == leader
        # the followers started after the leader's first piece, and the leader streamed on for
        # about 1.5 s (30 tokens at 50 ms): each follower's first bytes came well before that end
        firsts = [t for _, t, _ in results]
        assert leader_rest > 0.8 and max(firsts) < leader_rest / 2, f"leader streamed {leader_rest:.2f} s more; followers' first bytes after {firsts}"
        assert await dispatched(proxy) == 1
        m = await scrape(proxy)
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_join") == 3
        await wait_for(lambda: len(proxy.cache.store) == 1, what="the stream stored")


async def test_identical_concurrent_streams_cost_one_upstream_request() -> None:
    async with fake_fleet(2, speed=1.0) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy:
        async with aiohttp.ClientSession() as s:
            results = await asyncio.gather(*(read_stream(s, proxy.url, stream_body("Explain TCP slow start")) for _ in range(8)))
        assert sorted(h for h, _, _ in results) == ["hit"] * 7 + ["miss"]
        assert len({b for _, _, b in results}) == 1
        assert await dispatched(proxy) == 1


async def test_a_follower_of_a_cut_stream_ends_with_an_error_and_one_of_a_failed_leader_goes_upstream() -> None:
    async with fake_fleet(1, output_len=30, speed=0.02) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy:
        url = proxy.url
        async with aiohttp.ClientSession() as s:
            # the leader's client leaves mid-stream: pylb aborts the upstream answer; the follower,
            # which already has pieces, gets an error event and the end, as a cut stream does
            r = await s.post(url + "/v1/chat/completions", json=stream_body("a story"), headers=AUTH)
            await r.content.readany()
            follower = asyncio.create_task(read_stream(s, url, stream_body("a story")))
            await wait_for(lambda: proxy.cache.metrics.requests.get(MODEL, "hit_join") == 1, what="the follower joined")
            r.close()
            cache, _, body = await follower
            assert cache == "hit"
            assert b'"error"' in body and b"cut before its end" in body and body.rstrip().endswith(b"data: [DONE]")
            assert body.count(b"data:") < 30
            assert len(proxy.cache.store) == 0

            # a leader that ends without a piece (the replica refuses it): the followers go upstream
            bad = {**stream_body("a story"), "max_tokens": 10**6}
            answers = []

            async def post() -> None:
                async with s.post(url + "/v1/chat/completions", json=bad, headers=AUTH) as r:
                    answers.append((r.status, r.headers["x-pylb-cache"]))

            await asyncio.gather(*(post() for _ in range(3)))
            assert answers == [(400, "miss")] * 3
        assert await dispatched(proxy) == 4
        m = await scrape(proxy)
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_join") == 1


async def test_a_follower_that_leaves_does_not_disturb_the_leader_or_the_others() -> None:
    """One follower's client closes its connection mid-stream: the leader and the other follower
    get the whole answer, the answer is stored, pylb keeps serving."""
    async with fake_fleet(1, output_len=30, speed=0.02) as fleet, running_proxy(cache_settings([s.url for s in fleet])) as proxy:
        url = proxy.url
        async with aiohttp.ClientSession() as s:
            leader = asyncio.create_task(read_stream(s, url, stream_body("a long poem")))
            await wait_for(lambda: len(proxy.cache._inflight) == 1, what="the leader in flight")
            stayer = asyncio.create_task(read_stream(s, url, stream_body("a long poem")))
            r = await s.post(url + "/v1/chat/completions", json=stream_body("a long poem"), headers=AUTH)
            assert r.headers["x-pylb-cache"] == "hit"
            await r.content.readany()
            r.close()  # this follower leaves
            (_, _, whole), (cache, _, same) = await leader, await stayer
        assert whole.rstrip().endswith(b"data: [DONE]") and same == whole and cache == "hit"
        await wait_for(lambda: len(proxy.cache.store) == 1, what="the answer stored")
        assert not proxy.cache._inflight
        assert await dispatched(proxy) == 1
