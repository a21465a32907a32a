"""pylb's /metrics with no traffic (no NaN) and with several workers (`pylb serve
--server-workers 2`: every scrape answers for all workers, counters never jump)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pylb.demo import free_port
from pylb.observability.metrics import (
    ProxyMetrics,
    ProxySnapshot,
    ReplicaLoad,
    ReplicaSnapshot,
    merge_snapshots,
    snapshot_from_dict,
)

from proxy_support import fake_fleet


def parse(text: str) -> dict[str, dict[tuple, float]]:
    """A /metrics page as {sample name: {sorted label items: value}}."""
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def test_idle_replicas_export_no_nan_hit_rates() -> None:
    """A ratio over zero tokens is left out (documented), never exported as NaN."""
    idle = ReplicaSnapshot("http://idle", healthy=True)
    busy = ReplicaSnapshot(
        "http://busy", healthy=True, load=ReplicaLoad(dispatched=2, dispatched_prompt_tokens=100, predicted_cached_tokens=40),
        observed_queries=100, observed_hits=30,
    )  # fmt: skip
    for replicas, present in (([idle], set()), ([idle, busy], {"http://busy", "fleet"})):
        metrics = ProxyMetrics()
        metrics.attach(lambda r=replicas: ProxySnapshot(predicted_known=True, replicas=r))
        page = metrics.render().decode()
        assert "NaN" not in page and "nan" not in page
        m = parse(page)
        for name in ("pylb_observed_prefix_cache_hit_rate", "pylb_predicted_prefix_cache_hit_rate"):
            assert {dict(k)["replica"] for k in m.get(name, {})} == present, name
        if present:
            assert m["pylb_observed_prefix_cache_hit_rate"][(("replica", "http://busy"),)] == 0.3
            assert m["pylb_predicted_prefix_cache_hit_rate"][(("replica", "fleet"),)] == 0.4
        # the raw counters are there, at 0, for the idle replica
        assert m["pylb_replica_prefix_cache_queries_total"][(("replica", "http://idle"),)] == 0


def test_merge_snapshots_sums_loads_and_keeps_counters_of_exited_workers() -> None:
    def rep(url: str, healthy: bool, inflight: int, dispatched: int, tokens: int, cached: int, queries: int, kv: float | None) -> ReplicaSnapshot:
        load = ReplicaLoad(inflight=inflight, unprefilled_requests=inflight, unprefilled_tokens=10 * inflight,
                           dispatched=dispatched, dispatched_prompt_tokens=tokens, predicted_cached_tokens=cached)  # fmt: skip
        return ReplicaSnapshot(url, healthy, load, observed_queries=queries, observed_hits=queries // 2, kv_cache_usage=kv)

    a = ProxySnapshot(1, 2, 1.5, True, [rep("r1", True, 1, 10, 1000, 400, 500, 0.5), rep("r2", True, 0, 5, 500, 100, 300, None)], event_loop_tasks=12)
    b = ProxySnapshot(2, 1, 2.0, True, [rep("r1", True, 2, 7, 700, 300, 520, 0.6), rep("r2", False, 1, 3, 300, 0, 290, 0.2)], event_loop_tasks=9)
    gone = ProxySnapshot(9, 9, 8.0, True, [rep("r1", True, 9, 4, 400, 0, 600, 0.9), rep("r2", True, 9, 1, 100, 0, 10, 0.9)], event_loop_tasks=50)
    assert snapshot_from_dict(__import__("dataclasses").asdict(b)) == b  # what goes through the folder comes back whole
    m = merge_snapshots([(a, True), (b, True), (gone, False)])
    assert (m.queue_depth, m.in_progress, m.hotspot_factor, m.predicted_known, m.event_loop_tasks) == (3, 3, 2.0, True, 21)  # live workers only
    r1, r2 = m.replicas
    assert (r1.load.inflight, r1.load.unprefilled_tokens) == (3, 30)  # live workers' work in progress
    assert (r1.load.dispatched, r1.load.dispatched_prompt_tokens, r1.load.predicted_cached_tokens) == (21, 2100, 700)  # all
    assert (r1.observed_queries, r1.observed_hits) == (600, 300)  # the same replica counters seen by each: the largest
    assert r1.healthy and not r2.healthy  # out of rotation in one live worker
    assert r1.kv_cache_usage == 0.5 and r2.kv_cache_usage == 0.2  # the freshest live worker that has a value


async def _get(url: str) -> tuple[int, str]:
    # a new connection each time, so the kernel may hand it to either worker
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s, s.get(url) as r:
        return r.status, await r.text()


async def test_two_workers_every_scrape_counts_every_request(tmp_path: Path) -> None:
    """Real `pylb serve --server-workers 2` in front of two fake replicas: requests and scrapes on
    fresh connections (SO_REUSEPORT spreads them over both workers). Every scrape, whichever
    worker answers it, shows the counters of all requests sent so far: monotone, exact. Were a
    scrape to show one worker's counters, 40 requests on fresh connections would have to land
    on a single worker for the counts to match, and scrapes on the other would fall short."""
    async with fake_fleet(2) as fleet:
        port = free_port()
        cmd = [sys.executable, "-m", "pylb.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--server-workers", "2",
               "--policy", "dualmap", "--fleet-scrape-interval-s", "0.1", "--no-logging-access-log"]  # fmt: skip
        for s in fleet:
            cmd += ["--backend", s.url]
        tmp = tmp_path / "tmp"  # where pylb makes the workers' shared folder
        tmp.mkdir()
        env = {**os.environ, "TMPDIR": str(tmp)}
        log = tmp_path / "serve.log"
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=tmp_path, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while log.read_text().count("pylb serving on") < 2:  # each worker prints it once it listens
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "pylb serve's workers never both listened"
                await asyncio.sleep(0.2)

            sent, seen, dispatched_seen = 0, [], []
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
                for batch in range(4):
                    for i in range(10):
                        body = {"model": "pylb-sim", "prompt": f"batch {batch} request {i} " * 20, "max_tokens": 4}
                        async with s.post(url + "/v1/completions", json=body) as r:
                            assert r.status == 200, await r.text()
                        sent += 1
                    for _ in range(3):
                        status, page = await _get(url + "/metrics")
                        assert status == 200 and "NaN" not in page
                        m = parse(page)
                        seen.append(m["pylb_requests_total"][(("code", "200"), ("endpoint", "completions"))])
                        assert seen[-1] == sent, (seen, sent)
                        assert m["pylb_e2e_seconds_count"][(("endpoint", "completions"),)] == sent
                        dispatched_seen.append(sum(v for v in m["pylb_replica_dispatched_total"].values()))
            assert seen == sorted(seen)
            # state series (published every second by each worker) catch up, and never go down
            deadline = time.monotonic() + 10
            while dispatched_seen[-1] != sent:
                assert time.monotonic() < deadline, dispatched_seen
                await asyncio.sleep(0.3)
                dispatched_seen.append(sum(parse((await _get(url + "/metrics"))[1])["pylb_replica_dispatched_total"].values()))
            assert dispatched_seen == sorted(dispatched_seen)
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        finally:
            if proc.poll() is None:
                proc.terminate()  # the parent forwards it to the workers
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()  # the workers notice within a second that their parent is gone
                    proc.wait()
    assert list(tmp.iterdir()) == []  # the workers' shared folder is gone
