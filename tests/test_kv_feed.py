"""pylb serve with router.cache_state: events against fake vLLM replicas that publish KV-cache
events over ZMQ with vLLM's frames (issue 12 §3-4): real sockets end to end."""

from __future__ import annotations

import socket

import aiohttp
import pytest

from pylb.config import ConfigError
from pylb.fleet.kv_events import BlockStored, decode_frames
from pylb.fleet.kv_feed import KV_SERIES, SimKeyer
from pylb.sim.server import FakeServerConfig, FakeVllmServer, render_chat

from proxy_support import FAST, MODEL, running_proxy, scrape, settings, value, wait_for


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_sim_keyer_reproduces_the_fake_engines_hashes() -> None:
    from pylb.sim.engine import prompt_block_hashes

    k = SimKeyer(4)
    text = "abcd" * 40
    keys = k.keys_for("completions", {"prompt": text})
    assert keys is not None and keys.prompt_tokens == 40
    assert keys.keys.tolist() == prompt_block_hashes(text.encode(), 4).tolist()
    msgs = [{"role": "user", "content": "hello " * 20}]
    chat = k.keys_for("chat", {"messages": msgs})
    assert chat is not None and chat.keys.tolist() == prompt_block_hashes(render_chat(msgs).encode(), 4).tolist()
    assert k.keys_for("chat", {"messages": "nope"}) is None


def test_events_mode_needs_a_tokenizer() -> None:
    with pytest.raises(ConfigError, match="kv_events.tokenizer"):
        settings(["http://127.0.0.1:1"], router__cache_state="events")


async def test_fake_replica_publishes_vllm_frames() -> None:
    import zmq
    import zmq.asyncio

    (port,) = free_ports(1)
    srv = FakeVllmServer(FAST, FakeServerConfig(speed=10.0, output_len=2, max_model_len=4096, kv_events_port=port))
    ctx = zmq.asyncio.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        async with srv, aiohttp.ClientSession() as http:
            sub.connect(srv.kv_events_endpoint)

            async def complete(prompt: str) -> None:
                async with http.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2}) as r:
                    assert r.status == 200

            # a SUB socket misses what is published before its connection is up: send warm-up
            # prompts until one batch arrives, then the prompt whose blocks are checked
            for i in range(40):
                await complete(f"warm-up {i:04d} " * 8)  # whole blocks: a batch of BlockStored
                if await sub.poll(200):
                    break
            else:
                pytest.fail("no KV-event batch arrived")
            while await sub.poll(100):  # the warm-ups' other batches
                await sub.recv_multipart()
            prompt = "wxyz" * 64  # 64 simulated tokens: 16 blocks of 4
            await complete(prompt)
            stored: list[int] = []
            while not stored and await sub.poll(2000):
                b = decode_frames(await sub.recv_multipart())
                stored += [int(k) for e in b.events if isinstance(e, BlockStored) for k in e.keys]
            assert stored == SimKeyer(4).keys_for("completions", {"prompt": prompt}).keys.tolist()  # type: ignore[union-attr]
    finally:
        sub.close(0)
        ctx.term()


async def test_proxy_routes_on_the_engines_events() -> None:
    n = 2
    ports = free_ports(n)
    servers = [FakeVllmServer(FAST, FakeServerConfig(speed=10.0, output_len=2, max_model_len=4096, kv_events_port=p)) for p in ports]
    for s in servers:
        await s.start()
    try:
        urls = [s.url for s in servers]
        endpoints = [f"{s.url}={s.kv_events_endpoint}" for s in servers]
        st = settings(urls, router__policy="dualmap", router__cache_state="events", kv_events__tokenizer="sim", kv_events__block_size=4,
                      kv_events__endpoints=endpoints)  # fmt: skip
        async with running_proxy(st) as proxy:
            assert proxy.kv is not None
            await wait_for(lambda: len(proxy.kv.subscribers) == n, what="subscribers")  # type: ignore[union-attr]
            for sub in proxy.kv.subscribers.values():
                assert await sub.wait_ready()
            system = "You are a careful assistant. " * 30
            async with aiohttp.ClientSession() as http:
                for i in range(12):
                    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i % 3}"}]}
                    async with http.post(proxy.url + "/v1/chat/completions", json=body) as r:
                        assert r.status == 200, await r.text()
            router = proxy.router
            await wait_for(lambda: sum(router.events.blocks(i) for i in range(n)) > 0, what="events applied")  # type: ignore[attr-defined]
            m = await scrape(proxy)
            names = {k.removesuffix("_total") for k in m} | set(m)
            for series in ("pylb_kv_events_batches", "pylb_kv_events_blocks", "pylb_kv_mirror_cached_tokens", "pylb_kv_predicted_hit_rate"):
                assert any(n_.startswith(series) for n_ in names), series
            assert sum(value(m, "pylb_kv_events_batches_total", replica=u) for u in urls) > 0
            assert value(m, "pylb_kv_keyed_requests_total", result="keyed") == 12
            # the engines' events and the fake engines agree block for block
            for i, s in enumerate(servers):
                held = router.events.blocks(i)  # type: ignore[attr-defined]
                assert held == s.engine.num_cached_blocks
            # the system prompt's requests after the first find it cached on the replica they go to
            c = router.cache_comparison  # type: ignore[attr-defined]
            assert sum(x.events_tokens for x in c.values()) > 0
            assert all(k in KV_SERIES for k in ("pylb_kv_events_resyncs_total", "pylb_kv_dispatch_cached_tokens_total"))
            busiest = max(c, key=lambda u: c[u].prompt_tokens)
            assert 0 < value(m, "pylb_kv_predicted_hit_rate", replica=busiest, mirror="events") <= 1
    finally:
        for s in servers:
            await s.stop()
