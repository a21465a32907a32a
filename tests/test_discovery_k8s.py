"""Kubernetes discovery (issue 11 §1): EndpointSlices -> members, and the list/watch loop against
a fake API server (tests/fake_kube.py) that speaks the real list/watch JSON, in front of fake
vLLM replicas on their own loopback addresses (127.0.0.x, one port, as pods of one Service).

The end-to-end churn test with `pylb serve` and `pylb sim-replicas` subprocesses is in
tests/test_discovery_churn.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

pytest.importorskip("kubernetes_asyncio", reason="the k8s extra is not installed (pip install '.[k8s]')")

from pylb.fleet.discovery_k8s import members_of_slices, slice_port  # noqa: E402
from pylb.proxy.server import ProxyServer  # noqa: E402
from pylb.sim.server import FakeServerConfig, FakeVllmServer  # noqa: E402

from fake_kube import Endpoint, FakeKubeApi  # noqa: E402
from proxy_support import FAST, free_port_on, scrape, settings, value, wait_for  # noqa: E402

HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def _slice(*endpoints: dict, ports: list[dict] | None = None) -> dict:
    return {"metadata": {"name": "s"}, "endpoints": list(endpoints), "ports": ports if ports is not None else [{"name": "http", "port": 8000}]}


def test_conditions_map_to_ready_draining_and_gone() -> None:
    s = _slice(
        {"addresses": ["10.0.0.1"], "conditions": {"ready": True, "serving": True, "terminating": False}},
        {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "serving": True, "terminating": True}},
        {"addresses": ["10.0.0.3"], "conditions": {"ready": False, "serving": False, "terminating": False}},
        {"addresses": ["10.0.0.4"], "conditions": {}},  # nil ready means ready (API docs)
        {"addresses": ["10.0.0.5"], "conditions": {"ready": False, "serving": False, "terminating": True}},
        {"addresses": ["fd00::6"], "conditions": {"ready": True}},
    )
    m = members_of_slices({"s": s}, "http", "", 9)
    assert m == {
        "http://10.0.0.1:8000": True,
        "http://10.0.0.2:8000": False,
        "http://10.0.0.3:8000": False,
        "http://10.0.0.4:8000": True,
        "http://10.0.0.5:8000": False,
        "http://[fd00::6]:8000": True,
    }
    # an address in two slices (an update in two steps) is ready when either says so
    t = _slice({"addresses": ["10.0.0.2"], "conditions": {"ready": True}})
    assert members_of_slices({"s": s, "t": t}, "http", "", 9)["http://10.0.0.2:8000"] is True
    assert members_of_slices({}, "http", "", 9) == {}


def test_port_by_name_only_port_or_default() -> None:
    ports = [{"name": "http", "port": 8000}, {"name": "metrics", "port": 9090}]
    assert slice_port(ports, "metrics", 1) == 9090
    assert slice_port(ports, "grpc", 1) == 1
    assert slice_port(ports, "", 1) == 1  # two ports and no name: the setting
    assert slice_port([{"port": 8001}], "", 1) == 8001
    assert slice_port([], "", 7) == 7


@asynccontextmanager
async def replicas_on(hosts: list[str]) -> AsyncIterator[tuple[int, list[FakeVllmServer]]]:
    """One fast fake vLLM replica per loopback address, all on one port."""
    port = free_port_on(hosts)
    servers = [FakeVllmServer(FAST, FakeServerConfig(host=h, port=port, speed=1.0, output_len=8, max_model_len=4096)) for h in hosts]
    try:
        for s in servers:
            await s.start()
        yield port, servers
    finally:
        for s in servers:
            await s.stop()


@asynccontextmanager
async def kube_api() -> AsyncIterator[FakeKubeApi]:
    api = FakeKubeApi()
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


def k8s_settings(kubeconfig: Path, port: int, **overrides: object):  # noqa: ANN201
    return settings(
        [],
        fleet__discovery="k8s",
        discovery__k8s_service="vllm",
        discovery__kubeconfig=str(kubeconfig),
        discovery__port=port,
        discovery__backoff_max_s=0.2,
        **overrides,
    )


async def complete(url: str, n: int = 1) -> list[str]:
    """`n` completions through pylb; the replicas that served them."""
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.post(url + "/v1/completions", json={"model": "pylb-sim", "prompt": "hello", "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
                out.append(r.headers["x-pylb-replica"])
    return out


async def open_stream_on(session: aiohttp.ClientSession, url: str, replica: str) -> aiohttp.ClientResponse:
    """A long streamed completion through pylb that landed on `replica` (others are read to the end)."""
    for _ in range(20):
        body = {"model": "pylb-sim", "prompt": "a long answer", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        r = await session.post(url + "/v1/completions", json=body)
        assert r.status == 200
        if r.headers["x-pylb-replica"] == replica:
            return r
        await r.read()
        r.release()
    raise AssertionError(f"no stream landed on {replica}")


async def test_list_watch_join_drain_remove_bookmark_drop_and_410(tmp_path: Path) -> None:
    async with kube_api() as api, replicas_on(HOSTS) as (port, _servers):
        urls = [f"http://{h}:{port}" for h in HOSTS]
        api.put_slice("vllm-a", [Endpoint(HOSTS[0]), Endpoint(HOSTS[1])], port)
        # the kubeconfig's context names the namespace (discovery.k8s_namespace is empty)
        s = k8s_settings(api.write_kubeconfig(tmp_path / "kubeconfig", namespace=api.namespace), port)
        proxy = ProxyServer(s)
        await proxy.start()
        try:
            assert list(proxy.fleet.healthy) == urls[:2]  # the first list is in before start() returns
            assert api.list_requests[0]["labelSelector"] == "kubernetes.io/service-name=vllm"
            await wait_for(lambda: api.open_watches == 1, what="a watch")
            w = api.watch_requests[0]
            assert w["resourceVersion"] == api.list_requests[0]["answered_resourceVersion"]  # watch from the list
            assert w["allowWatchBookmarks"].lower() == "true" and w["timeoutSeconds"] == "300"

            # a new endpoint in a second slice joins (ADDED), after its probe
            api.put_slice("vllm-b", [Endpoint(HOSTS[2])], port)
            await wait_for(lambda: urls[2] in proxy.fleet.healthy, what="the new replica in rotation")
            assert set(await complete(proxy.url, 6)) == set(urls)

            # terminating (serving): draining -- out of rotation, no new requests, and the
            # stream in flight on it finishes
            async with aiohttp.ClientSession() as c:
                stream = await open_stream_on(c, proxy.url, urls[0])
                api.put_slice("vllm-a", [Endpoint(HOSTS[0], ready=False, serving=True, terminating=True), Endpoint(HOSTS[1])], port)
                await wait_for(lambda: urls[0] not in proxy.fleet.healthy, what="draining")
                assert not stream.content.at_eof()  # still streaming when the drain began
                body = await stream.read()
                assert body.rstrip().endswith(b"data: [DONE]") and b'"error"' not in body
                assert body.count(b"data: ") >= 200
            assert urls[0] in proxy.fleet.replicas and proxy.fleet.replicas[urls[0]].draining
            before = value(await scrape(proxy), "pylb_replica_dispatched_total", replica=urls[0])
            assert urls[0] not in await complete(proxy.url, 6)
            assert value(await scrape(proxy), "pylb_replica_dispatched_total", replica=urls[0]) == before
            # ready again (a readiness probe that recovered): probed, then back in rotation
            api.put_slice("vllm-a", [Endpoint(HOSTS[0]), Endpoint(HOSTS[1])], port)
            await wait_for(lambda: urls[0] in proxy.fleet.healthy, what="A back in rotation")
            assert urls[0] in await complete(proxy.url, 6)

            # a bookmark moves the resourceVersion; a dropped connection resumes from it
            rv = api.bookmark()
            await asyncio.sleep(0.2)
            watches = len(api.watch_requests)
            api.drop_watches()
            await wait_for(lambda: len(api.watch_requests) > watches, what="the watch resumed")
            assert api.watch_requests[-1]["resourceVersion"] == str(rv)
            assert len(api.list_requests) == 1  # resumed, not relisted

            # 410 Gone: list again, then watch from the new list's resourceVersion
            api.expire()
            await wait_for(lambda: len(api.list_requests) == 2 and api.open_watches == 1, what="a relist after 410")
            assert api.watch_requests[-1]["resourceVersion"] == str(api.rv)
            # the endpoint leaves while no watch saw it: the relist notices
            api.delete_slice("vllm-a")
            await wait_for(lambda: urls[0] not in proxy.fleet.replicas and urls[1] not in proxy.fleet.replicas, what="removal")
            assert list(proxy.fleet.healthy) == [urls[2]]
            assert set(await complete(proxy.url, 3)) == {urls[2]}
            assert api.unauthorized == 0
        finally:
            await proxy.stop()


async def test_api_errors_back_off_and_never_stop_the_proxy(tmp_path: Path) -> None:
    async with kube_api() as api, replicas_on(HOSTS[:1]) as (port, _servers):
        url = f"http://{HOSTS[0]}:{port}"
        api.put_slice("vllm-a", [Endpoint(HOSTS[0])], port)
        kc = api.write_kubeconfig(tmp_path / "kubeconfig", token="revoked")  # refused: 401 on every list
        s = k8s_settings(kc, port, discovery__k8s_namespace=api.namespace)
        proxy = ProxyServer(s)
        start = asyncio.get_running_loop().time()
        await proxy.start()  # serves without replicas while discovery fails
        try:
            assert asyncio.get_running_loop().time() - start < 5  # no wait for an API that refuses
            async with aiohttp.ClientSession() as c:
                async with c.get(proxy.url + "/ready") as r:
                    assert r.status == 503
                async with c.post(proxy.url + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
                    assert r.status == 503 and (await r.json())["error"]["message"]
            await wait_for(lambda: api.unauthorized >= 3, timeout=10, what="retries with backoff")
            assert value(await scrape(proxy), "pylb_background_errors_total", task="discovery") >= 3
            api.write_kubeconfig(kc)  # kubeconfig is read again on each retry: credentials can rotate
            await wait_for(lambda: url in proxy.fleet.healthy, timeout=10, what="recovery")
            assert await complete(proxy.url, 2) == [url, url]
            # the API server goes away: the membership stays, requests are still served
            await api.stop()
            await asyncio.sleep(0.5)
            assert list(proxy.fleet.healthy) == [url]
            assert await complete(proxy.url, 1) == [url]
        finally:
            await proxy.stop()


async def test_in_cluster_service_account_over_tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In a pod: no kubeconfig, KUBERNETES_SERVICE_HOST/PORT set, the service-account volume's
    token, CA certificate and namespace; the API server speaks HTTPS."""
    import ssl
    import shutil
    import subprocess

    from pylb.fleet import discovery_k8s

    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test API server's certificate")
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    key, crt = tmp_path / "key.pem", sa / "ca.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(crt)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    (sa / "token").write_text("sa-token")
    (sa / "namespace").write_text("serving\n")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(crt, key)
    api = FakeKubeApi(namespace="serving", token="sa-token")
    await api.start(ssl_context=ctx)
    monkeypatch.setattr(discovery_k8s, "SERVICE_ACCOUNT_DIR", sa)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    try:
        async with replicas_on(HOSTS[:1]) as (port, _servers):
            api.put_slice("vllm-a", [Endpoint(HOSTS[0])], port)
            s = settings([], fleet__discovery="k8s", discovery__k8s_service="vllm")
            proxy = ProxyServer(s)
            await proxy.start()
            try:
                assert list(proxy.fleet.healthy) == [f"http://{HOSTS[0]}:{port}"]
                assert api.unauthorized == 0 and len(api.list_requests) == 1
            finally:
                await proxy.stop()
    finally:
        await api.stop()


def test_k8s_mode_needs_a_service() -> None:
    from pylb.config import ConfigError

    with pytest.raises(ConfigError, match="discovery.k8s_service"):
        settings([], fleet__discovery="k8s")
