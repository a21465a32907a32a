"""pylb.fleet.scrape: vLLM /metrics pages -> ReplicaMetrics (a real vLLM page and the fake server's)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from pylb.config import load_settings
from pylb.fleet.fleet import Fleet
from pylb.fleet.scrape import FILTER_PARAMS, ScrapeError, filter_lines, filtered_metrics_path, parse_vllm_metrics
from pylb.observability.metrics import ProxyMetrics
from pylb.sim.profiles import Profile
from pylb.sim.server import FakeServerConfig, FakeVllmServer

REPO = Path(__file__).resolve().parents[1]


def sample_path() -> Path:
    """metrics-sample.txt in ../shared/vllm beside the repository, shared/vllm inside it, or $PYLB_VLLM_DIR."""
    for d in (os.environ.get("PYLB_VLLM_DIR"), REPO.parent / "shared" / "vllm", REPO / "shared" / "vllm"):
        if d and (Path(d) / "metrics-sample.txt").is_file():
            return Path(d) / "metrics-sample.txt"
    pytest.skip("metrics-sample.txt not found (../shared/vllm beside the repository, or $PYLB_VLLM_DIR)")


def test_real_vllm_page() -> None:
    m = parse_vllm_metrics(sample_path().read_text())
    assert (m.num_requests_running, m.num_requests_waiting) == (0, 0)
    assert m.kv_cache_usage == 0.0
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (2787, 1152)
    assert (m.block_size, m.num_gpu_blocks) == (128, 8192)
    assert (m.prompt_tokens, m.generation_tokens, m.num_preemptions) == (2787, 48, 0)


def test_filter_keeps_only_the_series_read() -> None:
    text = sample_path().read_text()
    kept = filter_lines(text).splitlines()
    assert 5 < len(kept) < 20
    assert all(line.startswith("vllm:") for line in kept)
    assert not any(line.startswith("vllm:num_requests_waiting_by_reason") for line in kept)


PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting{engine="1",model_name="m"} 4.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.25
vllm:prefix_cache_queries_total{engine="0",model_name="m"} 100.0
vllm:prefix_cache_queries_total{engine="1",model_name="m"} 50.0
vllm:prefix_cache_hits_total{engine="0",model_name="m"} 10.0
vllm:prefix_cache_hits_total{engine="1",model_name="m"} 5.0
vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0
vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="1000"} 1.0
"""


def test_data_parallel_engines_are_summed() -> None:
    m = parse_vllm_metrics(PAGE)
    assert (m.num_requests_running, m.num_requests_waiting) == (5, 5)
    assert m.kv_cache_usage == pytest.approx(0.375)
    assert (m.prefix_cache_queries, m.prefix_cache_hits) == (150, 15)
    assert (m.block_size, m.num_gpu_blocks) == (16, 2000)


def test_older_vllm_names_and_missing_series() -> None:
    page = 'vllm:num_requests_running{model_name="m"} 1\nvllm:gpu_cache_usage_perc{model_name="m"} 0.75\nvllm:gpu_prefix_cache_queries_total{model_name="m"} 8\n'
    m = parse_vllm_metrics(page)
    assert m.num_requests_running == 1 and m.num_requests_waiting == 0
    assert m.kv_cache_usage == 0.75 and m.prefix_cache_queries == 8 and m.prefix_cache_hits == 0
    assert (m.block_size, m.num_gpu_blocks) == (0, 0)  # no cache_config_info: unknown
    m = parse_vllm_metrics('vllm:num_requests_waiting 2\nvllm:cache_config_info{block_size="None",num_gpu_blocks="x"} 1\n')
    assert (m.num_requests_waiting, m.block_size, m.num_gpu_blocks) == (2, 0, 0)
    # labels that float() reads but no integer is (found by tests/test_hostile_input.py's fuzzing)
    m = parse_vllm_metrics('vllm:num_requests_waiting 2\nvllm:cache_config_info{block_size="INF",num_gpu_blocks="nan"} 1\n')
    assert (m.block_size, m.num_gpu_blocks) == (0, 0)


@pytest.mark.parametrize(
    "page",
    ["", "hello world\n", "# just comments\n", "process_cpu_seconds_total 3\n", 'vllm:num_requests_running{engine="0" 1\n', "vllm:num_requests_running abc\n"],
)
def test_not_a_vllm_page(page: str) -> None:
    with pytest.raises(ScrapeError):
        parse_vllm_metrics(page)


async def test_fake_server_page() -> None:
    profile = Profile(name="t", block_size=4, num_blocks=512, max_num_seqs=8, max_num_batched_tokens=512, c0=1e-3, c_prefill=1e-5, c_decode=0.0, c_attn=0.0)
    async with FakeVllmServer(profile, FakeServerConfig(speed=10.0, max_model_len=1024)) as srv, aiohttp.ClientSession() as s:
        body = {"model": "pylb-sim", "prompt": "abcd" * 40, "max_tokens": 2, "ignore_eos": True}
        for _ in range(2):
            async with s.post(srv.url + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.read()
        async with s.get(srv.url + "/metrics") as r:
            text = await r.text()
    m = parse_vllm_metrics(text)
    assert (m.block_size, m.num_gpu_blocks) == (4, 512)
    assert m.prefix_cache_queries == 80  # 2 x 40 tokens
    assert m.prefix_cache_hits == 36  # the second request hits all but the last block's worth
    assert m.generation_tokens == 4 and m.prompt_tokens == 80
    assert (m.num_requests_running, m.num_requests_waiting) == (0, 0)


async def test_a_slow_metrics_page_is_late_not_failed_and_delays_no_other_replica() -> None:
    # an idle vLLM replica on a busy CPU host answered /metrics past 1 s about once in 5 minutes
    from proxy_support import scripted

    async with scripted(2) as (slow, fast):
        settings = load_settings({"fleet.backends": [slow.url, fast.url], "fleet.scrape_interval_s": 0.05}, env={})
        metrics = ProxyMetrics()
        seen: list[str] = []
        fleet = Fleet(settings.fleet, metrics, lambda replicas: None, lambda replica, m: seen.append(replica))
        await fleet.start()
        try:
            slow.metrics_delay = 1.3
            seen.clear()
            await asyncio.sleep(2.0)
        finally:
            await fleet.stop()
    # the slow replica's scrapes succeed, late, one at a time; the fast one is scraped every tick
    assert metrics.scrape_errors.get(slow.url) == 0 and not fleet.replicas[slow.url].scrape_failing
    assert 1 <= seen.count(slow.url) <= 2
    assert seen.count(fast.url) >= 20
    assert slow.metrics_calls <= 1 + 2  # the baseline, then never a scrape on top of one in flight


# ---- the filtered page (fleet.scrape_filtered) ---------------------------------------------------


class _PagesReplica:
    """A replica with vLLM's two metrics routes: `/metrics` (the whole page, query ignored) and
    `/metrics/` (prometheus-client's app: only the `name[]` series) answering `filtered_status`
    instead when that is not 200 (404: a server without it). Requests to each are counted."""

    def __init__(self) -> None:
        self.filtered_status = 200
        self.filtered_empty = False  # an empty 200: what a multiprocess registry's filter answers
        self.calls = {"whole": 0, "filtered": 0}
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> _PagesReplica:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._whole)
        app.router.add_get("/metrics/", self._filtered)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def _whole(self, request: web.Request) -> web.Response:
        self.calls["whole"] += 1
        return web.Response(text=PAGE + "# TYPE big histogram\nbig_bucket{le=\"1\"} 1\n")

    async def _filtered(self, request: web.Request) -> web.Response:
        self.calls["filtered"] += 1
        if self.filtered_status != 200:
            return web.Response(status=self.filtered_status)
        if self.filtered_empty:
            return web.Response(text="")
        names = set(request.query.getall("name[]", []))
        return web.Response(text="".join(line + "\n" for line in PAGE.splitlines() if line.split("{")[0] in names))


@asynccontextmanager
async def _scraping(url: str, **settings: object) -> AsyncIterator[tuple[Fleet, ProxyMetrics, list]]:
    """A started fleet scraping `url` every 50 ms: (the fleet, its metrics, the ReplicaMetrics
    delivered so far); stopped on leaving."""
    config = load_settings({"fleet.backends": [url], "fleet.scrape_interval_s": 0.05, **settings}, env={})
    metrics = ProxyMetrics()
    seen: list = []
    fleet = Fleet(config.fleet, metrics, lambda replicas: None, lambda replica, m: seen.append(m))
    await fleet.start()
    try:
        yield fleet, metrics, seen
    finally:
        await fleet.stop()


async def _scrape_for(url: str, seconds: float, **settings: object) -> tuple[Fleet, ProxyMetrics, list]:
    async with _scraping(url, **settings) as (fleet, metrics, seen):
        await asyncio.sleep(seconds)
    return fleet, metrics, seen


async def test_scrapes_ask_the_fake_vllm_for_only_the_series_read() -> None:
    profile = Profile(name="t", block_size=4, num_blocks=512, max_num_seqs=8, max_num_batched_tokens=512, c0=1e-3, c_prefill=1e-5, c_decode=0.0, c_attn=0.0)
    async with FakeVllmServer(profile, FakeServerConfig(speed=10.0, max_model_len=1024)) as srv:
        fleet, metrics, seen = await _scrape_for(srv.url, 0.3)
        async with aiohttp.ClientSession() as s:
            async with s.get(srv.url + "/metrics") as r:
                whole = await r.text()
            async with s.get(srv.url + filtered_metrics_path("/metrics"), params=FILTER_PARAMS) as r:
                filtered = await r.text()
    assert fleet.replicas[srv.url].serves_filtered_page is True and metrics.scrape_errors.get(srv.url) == 0
    assert seen and seen[-1] == parse_vllm_metrics(whole) == parse_vllm_metrics(filtered)
    samples = [line for line in filtered.splitlines() if not line.startswith("#")]
    assert samples and all(line.startswith("vllm:") for line in samples)
    assert not any("_bucket" in line for line in samples)  # no histograms
    assert len(filtered) * 5 < len(whole)


@pytest.mark.parametrize("answer", ["404", "empty page"])
async def test_a_replica_without_the_filtered_page_is_scraped_whole(answer: str) -> None:
    async with _PagesReplica() as replica:
        if answer == "404":
            replica.filtered_status = 404
        else:
            replica.filtered_empty = True
        fleet, metrics, seen = await _scrape_for(replica.url, 0.3)
    assert fleet.replicas[replica.url].serves_filtered_page is False
    assert metrics.scrape_errors.get(replica.url) == 0  # the fallback is not a failed scrape
    assert len(seen) >= 3 and seen[-1] == parse_vllm_metrics(PAGE)
    assert replica.calls["filtered"] == 1 and replica.calls["whole"] >= 3  # asked once, never again


async def test_a_filtered_page_that_goes_away_fails_one_scrape_then_the_whole_page_is_used() -> None:
    async with _PagesReplica() as replica, _scraping(replica.url) as (fleet, metrics, seen):
        await asyncio.sleep(0.2)
        assert fleet.replicas[replica.url].serves_filtered_page is True and replica.calls["whole"] == 0
        replica.filtered_status = 404  # e.g. replaced by a server without prometheus-client's app
        before = len(seen)
        await asyncio.sleep(0.3)
    assert metrics.scrape_errors.get(replica.url) == 1
    assert fleet.replicas[replica.url].serves_filtered_page is False
    assert len(seen) > before + 2 and seen[-1] == parse_vllm_metrics(PAGE)


async def test_a_server_error_on_the_filtered_page_is_a_failed_scrape_not_a_verdict() -> None:
    # a 503 (a replica still starting) says nothing about the filter: the scrape fails, and the
    # filter is asked for again next time
    async with _PagesReplica() as replica:
        replica.filtered_status = 503
        async with _scraping(replica.url) as (fleet, metrics, seen):
            await asyncio.sleep(0.2)
            assert fleet.replicas[replica.url].serves_filtered_page is None and not seen
            failed = metrics.scrape_errors.get(replica.url)
            replica.filtered_status = 200
            await asyncio.sleep(0.2)
    assert failed >= 2 and replica.calls["whole"] == 0
    assert fleet.replicas[replica.url].serves_filtered_page is True and seen[-1] == parse_vllm_metrics(PAGE)


async def test_scrape_filtered_off_asks_for_the_whole_page() -> None:
    async with _PagesReplica() as replica:
        fleet, metrics, seen = await _scrape_for(replica.url, 0.3, **{"fleet.scrape_filtered": False})
    assert replica.calls["filtered"] == 0 and replica.calls["whole"] >= 3
    assert fleet.replicas[replica.url].serves_filtered_page is None and seen[-1] == parse_vllm_metrics(PAGE)
