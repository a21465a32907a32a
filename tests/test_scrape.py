"""pylb.fleet.scrape: vLLM /metrics pages -> ReplicaMetrics (a real vLLM page and the fake server's)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest

from pylb.config import load_settings
from pylb.fleet.fleet import Fleet
from pylb.fleet.scrape import ScrapeError, filter_lines, parse_vllm_metrics
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
