"""DNS discovery (issue 11 §1): a name resolved every discovery.interval_s; its addresses join
and leave the rotation. No external DNS: the resolver is injected (a function the test
controls), and one test resolves "localhost" through the real system resolver."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from pylb.config import ConfigError
from pylb.fleet.discovery import DnsDiscovery, replica_url, system_resolve
from pylb.proxy.server import ProxyServer
from pylb.sim.server import FakeServerConfig, FakeVllmServer

from proxy_support import FAST, free_port_on, scrape, settings, value, wait_for

HOSTS = ["127.0.0.21", "127.0.0.22", "127.0.0.23"]


def test_urls_bracket_ipv6() -> None:
    assert replica_url("http", "10.1.2.3", 8000) == "http://10.1.2.3:8000"
    assert replica_url("https", "fd00::1", 8000) == "https://[fd00::1]:8000"
    assert replica_url("http", "vllm-0.vllm", 80) == "http://vllm-0.vllm:80"


def test_dns_mode_needs_a_name_and_a_bare_one() -> None:
    with pytest.raises(ConfigError, match="discovery.dns_name"):
        settings([], fleet__discovery="dns")
    with pytest.raises(ConfigError, match="bare host name"):
        settings([], fleet__discovery="dns", discovery__dns_name="http://vllm:8000")
    with pytest.raises(ConfigError, match="fleet.discovery"):
        settings([], fleet__discovery="consul")


class Zone:
    """A resolver the test controls: `records` are the name's addresses, `error` a getaddrinfo error."""

    def __init__(self, records: list[str]) -> None:
        self.records = records
        self.error: int | None = None
        self.calls = 0

    async def resolve(self, name: str) -> list[str]:
        self.calls += 1
        assert name == "vllm.serving.svc.cluster.local"
        if self.error is not None:
            raise socket.gaierror(self.error, "test resolver failure")
        return list(self.records)


@asynccontextmanager
async def replicas_on(hosts: list[str]) -> AsyncIterator[int]:
    port = free_port_on(hosts)
    servers = [FakeVllmServer(FAST, FakeServerConfig(host=h, port=port, speed=10.0, output_len=4, max_model_len=4096)) for h in hosts]
    try:
        for s in servers:
            await s.start()
        yield port
    finally:
        for s in servers:
            await s.stop()


async def served_by(url: str, n: int) -> set[str]:
    out = set()
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.post(url + "/v1/completions", json={"model": "pylb-sim", "prompt": "hi", "max_tokens": 2}) as r:
                assert r.status == 200, await r.text()
                out.add(r.headers["x-pylb-replica"])
    return out


async def test_addresses_join_and_leave_with_the_records() -> None:
    async with replicas_on(HOSTS) as port:
        urls = [f"http://{h}:{port}" for h in HOSTS]
        zone = Zone(HOSTS[:2])
        s = settings(
            [], fleet__discovery="dns", discovery__dns_name="vllm.serving.svc.cluster.local", discovery__port=port,
            discovery__interval_s=0.05, discovery__backoff_max_s=0.1,
        )  # fmt: skip
        proxy = ProxyServer(s)
        d = proxy.fleet.discovery
        assert isinstance(d, DnsDiscovery) and d.port == port and d.resolve is system_resolve
        d.resolve = zone.resolve
        await proxy.start()
        try:
            assert list(proxy.fleet.healthy) == urls[:2]
            assert await served_by(proxy.url, 4) == set(urls[:2])
            zone.records = HOSTS[1:]  # one leaves, one joins
            await wait_for(lambda: list(proxy.fleet.healthy) == urls[1:], what="the new records")
            assert urls[0] not in proxy.fleet.replicas
            assert await served_by(proxy.url, 4) == set(urls[1:])

            # a failing resolver keeps the last list (and counts), then recovers
            zone.error = socket.EAI_AGAIN
            calls = zone.calls
            await wait_for(lambda: zone.calls >= calls + 3, what="retries")
            assert list(proxy.fleet.healthy) == urls[1:]
            assert value(await scrape(proxy), "pylb_background_errors_total", task="discovery") >= 3
            zone.error = None
            zone.records = HOSTS
            await wait_for(lambda: set(proxy.fleet.healthy) == set(urls), what="recovery")

            # a name with no address (a headless Service with no ready pod): no replica, 503
            zone.error = socket.EAI_NONAME
            await wait_for(lambda: not proxy.fleet.healthy, what="an empty fleet")
            async with aiohttp.ClientSession() as c, c.post(proxy.url + "/v1/completions", json={"model": "m", "prompt": "x"}) as r:
                assert r.status == 503 and "Retry-After" in r.headers
            zone.error = None
            await wait_for(lambda: set(proxy.fleet.healthy) == set(urls), what="replicas again")
        finally:
            await proxy.stop()


async def test_an_address_that_fails_its_probe_stays_out() -> None:
    async with replicas_on(HOSTS[:1]) as port:
        zone = Zone([HOSTS[0], "127.0.0.29"])  # nothing listens on the second
        s = settings([], fleet__discovery="dns", discovery__dns_name="vllm.serving.svc.cluster.local", discovery__port=port, discovery__interval_s=0.05)
        proxy = ProxyServer(s)
        proxy.fleet.discovery.resolve = zone.resolve  # type: ignore[union-attr]
        await proxy.start()
        try:
            assert set(proxy.fleet.replicas) == {f"http://{HOSTS[0]}:{port}", f"http://127.0.0.29:{port}"}
            assert list(proxy.fleet.healthy) == [f"http://{HOSTS[0]}:{port}"]
            async with aiohttp.ClientSession() as c, c.get(proxy.url + "/ready") as r:
                assert (await r.json()) == {"ready": True, "healthy_replicas": 1, "replicas": 2}
        finally:
            await proxy.stop()


async def test_system_resolver_on_localhost() -> None:
    """The real getaddrinfo path, on a name every machine resolves locally."""
    addrs = await system_resolve("localhost")
    assert "127.0.0.1" in addrs and len(addrs) == len(set(addrs))
    async with replicas_on(["127.0.0.1"]) as port:
        s = settings([], fleet__discovery="dns", discovery__dns_name="localhost", discovery__port=port, discovery__interval_s=0.2)
        proxy = ProxyServer(s)
        await proxy.start()
        try:
            # ::1, when the resolver also gives it, has no replica listening: its probe keeps it out
            assert list(proxy.fleet.healthy) == [f"http://127.0.0.1:{port}"]
            assert await served_by(proxy.url, 2) == {f"http://127.0.0.1:{port}"}
        finally:
            await proxy.stop()


def test_serve_cli_names_the_missing_discovery_setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from pylb import cli

    for k in list(os.environ):
        if k.startswith("PYLB_"):
            monkeypatch.delenv(k)
    assert cli.main(["serve", "--fleet-discovery", "dns"]) == 2
    err = capsys.readouterr().err
    assert "discovery.dns_name" in err and "--backend" not in err  # no backend list is needed
    assert cli.main(["serve", "--fleet-discovery", "dns", "--discovery-dns-name", "vllm.ns.svc", "--print-config"]) == 0
    assert "dns_name: vllm.ns.svc" in capsys.readouterr().out


async def test_a_removed_replica_leaves_no_dispatcher_entry() -> None:
    """The dispatcher's per-replica counters go with a replica that discovery removes (they stayed
    forever before: a fleet whose pods come and go grew one entry per address ever seen); a
    replica that is only ejected keeps them."""
    async with replicas_on(HOSTS) as port:
        urls = [f"http://{h}:{port}" for h in HOSTS]
        zone = Zone(HOSTS)
        s = settings([], fleet__discovery="dns", discovery__dns_name="vllm.serving.svc.cluster.local", discovery__port=port, discovery__interval_s=0.05)
        proxy = ProxyServer(s)
        proxy.fleet.discovery.resolve = zone.resolve  # type: ignore[union-attr]
        await proxy.start()
        try:
            await wait_for(lambda: list(proxy.fleet.healthy) == urls, timeout=10, what="all three in rotation")
            assert await served_by(proxy.url, 6) == set(urls)
            assert set(proxy.dispatcher.driver.counts) == set(urls)
            kept = proxy.dispatcher.driver.counts[urls[1]].dispatched
            zone.records = HOSTS[1:]
            await wait_for(lambda: urls[0] not in proxy.fleet.replicas, what="the removal")
            assert set(proxy.dispatcher.driver.counts) == set(urls[1:])
            m = await scrape(proxy)
            assert value(m, "pylb_replica_dispatched_total", replica=urls[0]) == 0
            assert value(m, "pylb_replica_dispatched_total", replica=urls[1]) == kept >= 1

            proxy.fleet.report_connect_error(urls[1], "test: ejected, still a member")
            assert urls[1] not in proxy.fleet.healthy and urls[1] in proxy.dispatcher.driver.counts

            zone.records = HOSTS  # back under the same address: counted from zero
            await wait_for(lambda: urls[0] in proxy.fleet.healthy, what="the return")
            assert await served_by(proxy.url, 1) <= set(urls)
            assert proxy.dispatcher.driver.counts.get(urls[0]) is None or proxy.dispatcher.driver.counts[urls[0]].dispatched <= 1
        finally:
            await proxy.stop()
