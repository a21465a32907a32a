"""Opt-in end-to-end test against two real vLLM replicas on the CPU (issue 5 §6).

Skipped unless PYLB_VLLM_VENV and PYLB_VLLM_MODEL name a vLLM install and a model made by
`../shared/vllm/install.sh VENV MODEL` (about 2 minutes and 3.4 GB). Run it with:

    ../shared/vllm/install.sh /tmp/vllm-venv /tmp/tiny-llama
    PYLB_VLLM_VENV=/tmp/vllm-venv PYLB_VLLM_MODEL=/tmp/tiny-llama .venv/bin/pytest -m real_vllm -s

Two replicas start with small KV caches (96 blocks of 32 tokens = 3,072 tokens, one core each), so a
replica cannot hold every prefix group at once. The same shared-prefix workload (8 groups,
each request = a group's ~500-token prefix + its own suffix, groups interleaved) goes
through `pylb serve` once with round-robin and once with dualmap, each time with fresh prefix
texts so the first run's cache cannot help the second. The hit rate is read from vLLM's own
counters (`vllm:prefix_cache_hits_total` / `vllm:prefix_cache_queries_total`): with dualmap each
group stays on one replica and fits; with round-robin both replicas see every group and evict.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import aiohttp
import pytest

from pylb.demo import free_port, prefix_cache_counters, pylb_proxy, wait_ready
from pylb.fleet.scrape import FILTER_PARAMS, filtered_metrics_path, parse_vllm_metrics
from pylb.workload.replay import fetch_model, replay
from pylb.workload.synthetic import token_text
from pylb.workload.types import WorkloadRequest

pytestmark = pytest.mark.real_vllm

VENV = os.environ.get("PYLB_VLLM_VENV")
MODEL = os.environ.get("PYLB_VLLM_MODEL")
SERVE_SH = Path(os.environ.get("PYLB_VLLM_SERVE", Path(__file__).resolve().parents[1].parent / "shared/vllm/serve.sh"))

if not (VENV and MODEL):
    pytest.skip("set PYLB_VLLM_VENV and PYLB_VLLM_MODEL (see ../shared/vllm/install.sh) to run", allow_module_level=True)


def shared_prefix_workload(tag: str, groups: int = 8, rounds: int = 4) -> list[WorkloadRequest]:
    """`groups` prefixes of 500 simulated tokens (2,000 bytes; ~500-1,000 tokens of the tiny model), each sent `rounds` times with a fresh suffix, interleaved."""
    out = []
    for r in range(rounds):
        for g in range(groups):
            prefix, suffix = (f"{tag}-group-{g}", 500), (f"{tag}-group-{g}-round-{r}", 8)
            text = partial(lambda a, b: token_text(*a) + token_text(*b), prefix, suffix)
            out.append(WorkloadRequest(f"{tag}-{r}-{g}", arrival_s=0.05 * len(out), prompt_tokens=508,
                                       output_tokens=4, make_text=text))
    return out


async def wait_healthy(urls: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        for url in urls:
            while True:
                try:
                    async with session.get(f"{url}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            break
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"vLLM at {url} not healthy after {timeout_s} s")
                await asyncio.sleep(1)


@contextlib.contextmanager
def real_replicas(logs: Path, extra_args: Callable[[int], list[str]] = lambda core: [], timeout_s: float = 240) -> Iterator[list[str]]:
    """Two real vLLM replicas (96 KV blocks of 32 tokens; replica i pinned to core i, with
    `extra_args(i)` appended to its flags), healthy within `timeout_s`; their URLs. They are
    stopped on exit (terminate, then kill after 30 s), their logs in `logs`."""
    procs, urls, log_files = [], [], []
    try:
        for core in (0, 1):
            port = free_port()
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(core))
            log = open(logs / f"replica-{core}.log", "w")
            log_files.append(log)
            argv = ["bash", str(SERVE_SH), VENV, MODEL, str(port), "--num-gpu-blocks-override", "96", "--block-size", "32", *extra_args(core)]
            procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env))
            urls.append(f"http://127.0.0.1:{port}")
        asyncio.run(wait_healthy(urls, timeout_s=timeout_s))
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in log_files:
            log.close()


@pytest.fixture(scope="module")
def vllm_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with real_replicas(tmp_path_factory.mktemp("vllm")) as urls:
        yield urls


async def hit_rate_through_pylb(backends: list[str], policy: str, tag: str) -> float:
    """Fleet prefix-cache hit rate (vLLM's counters) of the workload sent through `pylb serve`."""
    with pylb_proxy(backends, policy) as (url, proc):
        await wait_ready(url, proc)
        hits0, queries0 = await prefix_cache_counters(backends)
        # 5 groups (an odd number: round-robin does not partition them by accident, as it does 8
        # interleaved groups on 2 replicas) of ~1,000 tokens each: one replica's 3,072-token cache
        # holds 3 of them, so a router that splits the groups 3/2 keeps every prefix, while each
        # round-robin replica cycles through all 5 and LRU evicts each before it is reused
        result = await replay(shared_prefix_workload(tag, groups=5), url, concurrency_limit=4, timeout_s=120)
        assert result.summary.errors == 0, result.summary.errors_by_kind
        hits1, queries1 = await prefix_cache_counters(backends)
    return (hits1 - hits0) / (queries1 - queries0)


def test_dualmap_beats_round_robin_on_real_vllm_prefix_hits(vllm_replicas: list[str]) -> None:
    rr = asyncio.run(hit_rate_through_pylb(vllm_replicas, "round-robin", "rr"))
    dm = asyncio.run(hit_rate_through_pylb(vllm_replicas, "dualmap", "dm"))
    print(f"\nvLLM prefix-cache hit rate through pylb: round-robin {rr:.1%}, dualmap {dm:.1%}")
    assert dm > rr


async def whole_and_filtered_pages(url: str) -> tuple[str, str]:
    """A replica's whole /metrics page and the one pylb's scrapes ask for (fleet.scrape_filtered)."""
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/metrics") as r:
            whole = await r.text()
        async with s.get(url + filtered_metrics_path("/metrics"), params=FILTER_PARAMS) as r:
            assert r.status == 200
            filtered = await r.text()
    return whole, filtered


def test_real_vllm_serves_the_filtered_metrics_page(vllm_replicas: list[str]) -> None:
    # vLLM mounts prometheus-client's app under /metrics/; its name[] filter keeps only what pylb reads
    for url in vllm_replicas:
        whole, filtered = asyncio.run(whole_and_filtered_pages(url))
        assert parse_vllm_metrics(filtered) == parse_vllm_metrics(whole)
        assert len(filtered) * 5 < len(whole)
        assert not any(line.startswith(("python_", "process_", "http_")) for line in filtered.splitlines())


def test_the_harness_ideal_reads_a_real_vllms_tokens_and_blocks(vllm_replicas: list[str]) -> None:
    """bench/peers/workloads.engine_ideal against real vLLM: its /tokenize and cache_config_info."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench" / "peers"))
    import workloads  # the harness's module (bench/peers/workloads.py)

    async def ideal_and_config() -> tuple[dict, list]:
        async with aiohttp.ClientSession() as s:
            model = await fetch_model(s, vllm_replicas[0], 30.0)
            pages = []
            for url in vllm_replicas:
                async with s.get(url + "/metrics") as r:
                    pages.append(parse_vllm_metrics(await r.text()))
        return await workloads.engine_ideal(vllm_replicas, model, requests), pages

    requests = shared_prefix_workload("ideal", groups=2, rounds=3)  # 2 prefixes of ~1,000 tokens, each sent 3 times
    ideal, pages = asyncio.run(ideal_and_config())
    assert ideal["block_size"] == pages[0].block_size > 0
    assert ideal["fleet_cache_blocks"] == sum(m.num_gpu_blocks for m in pages)
    # the 4 later prompts of 6 hit their prefix's whole blocks (nearly all of each prompt)
    assert 0.5 < ideal["fleet_cache"] <= ideal["unbounded"] < 4 / 6
    assert abs(ideal["unbounded"] - workloads.ideal_hit_rate(requests)) < 0.05  # the byte-level estimate is close
