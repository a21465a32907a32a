"""Several pylb replicas agree without talking (issue 11 §2).

A gateway runs 2+ pylb pods behind one Service. Placement is a pure function of the prompt and
the membership (the dual rings, the prefix key), so the pods should send a prefix group where one
pylb would, although each sees only its share of the traffic and keeps its own load accounting,
cache mirror and hot-prefix table. Here real `pylb serve` processes (dualmap) stand in front of
one fake vLLM fleet (real HTTP, prefix caching), on a shared-prefix workload split between them:

    one      one pylb takes both clients' requests (the reference)
    two      two pylb processes, each client talks to its own
    workers  one pylb with --server-workers 2 (the kernel spreads the connections)

Each run on a fresh fleet, after a warm-up (`WARM_UP`). Compared with one pylb, the share of a prefix group's requests that
land on that group's replica (the replica serving most of them) must be within 5 points, and the
fleet's prefix-cache hit rate, read from the replicas' own counters, within 3 points. The figures
are printed (`pytest -s`)."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp

from pylb.demo import prefix_cache_counters

from proxy_support import fake_fleet, free_port_on

GROUPS = 40
"""Prefix groups. With 40 groups taking turns, a group never holds DualMap's hot share (6.12 %
of the recent requests, its own included: 2/41 at its second request), so its prefix key stays
one key block deep and the group keeps its pair of replicas; a hot group would be spread over
other replicas on purpose (its key deepens past the shared prefix), which is load balancing,
not disagreement."""

POLICY = "dualmap"
"""dualmap at its defaults. Its step 3 window (new prefix groups spread by the work this instance
placed lately) is used only while an instance's own requests are most of the fleet's work, judged
from the replicas' counters; with two instances each places about half, so they break ties by
backlog and ring order, which they compute alike (with the window used regardless: 75 % of a
group's requests on its replica against 100 % for one pylb)."""

PER_GROUP = 4
PREFIX_CHARS = 3000
"""A group's shared prefix: longer than one key block, so the key is the group's."""


def workload(seed: int = 7) -> list[tuple[int, str]]:
    """(group, prompt) in arrival order: groups take turns, each prompt = group prefix + its own question."""
    rng = random.Random(seed)
    words = ["kv", "cache", "prefix", "replica", "router", "token", "block", "ring", "prefill", "decode", "queue", "load"]

    def text(n: int) -> str:
        out = ""
        while len(out) < n:
            out += rng.choice(words) + " "
        return out[:n]

    prefixes = [f"system prompt of tenant {g}: " + text(PREFIX_CHARS) for g in range(GROUPS)]
    return [(g, prefixes[g] + f" question {i}: " + text(200)) for i in range(PER_GROUP) for g in range(GROUPS)]


@contextmanager
def pylb_serve(tmp_path: Path, name: str, backends: list[str], *extra: str) -> Iterator[str]:
    """A `pylb serve` process (dualmap); yields its base URL."""
    port = free_port_on(["127.0.0.1"])
    cmd = [sys.executable, "-P", "-m", "pylb.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--policy", POLICY,
           "--fleet-scrape-interval-s", "0.2", "--log-level", "warning", "--no-logging-access-log", *extra]  # fmt: skip
    for b in backends:
        cmd += ["--backend", b]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}
    with open(tmp_path / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, cwd=tmp_path, env=env)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:  # pragma: no cover - a hung shutdown
                proc.kill()
                proc.wait()


async def ready(url: str, times: int = 1, timeout: float = 30.0) -> None:
    """Until /ready answers 200 `times` in a row, each on a new connection (with several
    workers, each connection may reach another one)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    ok = 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        while ok < times:
            assert loop.time() < deadline, f"pylb at {url} never got ready"
            try:
                async with s.get(url + "/ready") as r:
                    ok = ok + 1 if r.status == 200 else 0
            except aiohttp.ClientConnectionError:
                ok = 0
            if ok < times:
                await asyncio.sleep(0.05)


WARM_UP = 500
"""Distinct short requests sent first, through the same split: DualMap's hot-prefix window is the
last 200 requests *a pylb has seen*, so until a pod has seen 200 it judges shares over fewer,
and with N pods each sees 1/N of the traffic: a group that is cold at one pylb (2 of its first
41) is hot at each of two (2 of ~21) and gets spread. After the warm-up each pod's window is
full, and shares are the same fractions at every pod (steady state, which is what is compared)."""


async def warm_up(entries: list[str], seed: int = 5, concurrency: int = 8) -> None:
    rng = random.Random(seed)
    todo = [(rng.choice(entries), f"warm-up request {i} {rng.random()}") for i in range(WARM_UP)]

    async def worker(s: aiohttp.ClientSession) -> None:
        while todo:
            url, prompt = todo.pop()
            async with s.post(url + "/v1/completions", json={"model": "pylb-sim", "prompt": prompt, "max_tokens": 1}) as r:
                assert r.status == 200, await r.text()
                await r.read()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        await asyncio.gather(*(worker(s) for _ in range(concurrency)))


async def run(entries: list[str], seed: int = 11) -> tuple[float, list[tuple[int, str]]]:
    """The workload, one request at a time (so that one pylb's run is reproducible), each sent
    to an entry drawn at random (seeded), as a Service spreads connections over pods. Each
    request on a new connection: with several workers, the kernel picks one per connection.
    Returns (seconds, (group, replica) per request)."""
    rng = random.Random(seed)
    served: list[tuple[int, str]] = []
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        for group, prompt in workload():
            url = rng.choice(entries)
            async with s.post(url + "/v1/completions", json={"model": "pylb-sim", "prompt": prompt, "max_tokens": 4}) as r:
                assert r.status == 200, await r.text()
                await r.read()
                served.append((group, r.headers["x-pylb-replica"]))
    return loop.time() - t0, served


def group_share(served: list[tuple[int, str]]) -> float:
    """The share of requests served by their group's replica (the one serving most of the group)."""
    by_group: dict[int, Counter[str]] = defaultdict(Counter)
    for g, replica in served:
        by_group[g][replica] += 1
    return sum(c.most_common(1)[0][1] for c in by_group.values()) / len(served)


@asynccontextmanager
async def fleet() -> AsyncIterator[list[str]]:
    async with fake_fleet(4, max_model_len=8192) as servers:  # 16k cached tokens each, ~800 per group
        yield [s.url for s in servers]


async def measure(tmp_path: Path, mode: str) -> tuple[float, float, int]:
    """(group share, fleet hit rate, pylb processes' distinct entries) of one run on a fresh fleet."""
    async with fleet() as urls:
        if mode == "one":
            with pylb_serve(tmp_path, "one", urls) as a:
                await ready(a)
                entries = [a]
                await warm_up(entries)
                h0, q0 = await prefix_cache_counters(urls)
                seconds, served = await run(entries)
        elif mode == "two":
            with pylb_serve(tmp_path, "two-a", urls) as a, pylb_serve(tmp_path, "two-b", urls) as b:
                await asyncio.gather(ready(a), ready(b))
                entries = [a, b]
                await warm_up(entries)
                h0, q0 = await prefix_cache_counters(urls)
                seconds, served = await run(entries)
        else:
            with pylb_serve(tmp_path, "workers", urls, "--server-workers", "2") as a:
                await ready(a, times=10)
                entries = [a]
                await warm_up(entries)
                h0, q0 = await prefix_cache_counters(urls)
                seconds, served = await run(entries)
        h1, q1 = await prefix_cache_counters(urls)
    assert len(served) == GROUPS * PER_GROUP
    share, hit = group_share(served), (h1 - h0) / (q1 - q0)
    print(f"{mode:8s} group share {share:.3f}  fleet hit rate {hit:.3f}  ({len(served)} requests in {seconds:.1f} s)")
    return share, hit, len(set(entries))


async def test_two_pylbs_and_two_workers_place_like_one(tmp_path: Path) -> None:
    one_share, one_hit, _ = await measure(tmp_path, "one")
    assert one_share >= 0.8 and one_hit >= 0.5, "one pylb should keep prefix groups together on this workload"
    for mode in ("two", "workers"):
        share, hit, _ = await measure(tmp_path, mode)
        assert abs(share - one_share) <= 0.05, f"{mode}: group share {share:.3f} against one pylb's {one_share:.3f}"
        assert abs(hit - one_hit) <= 0.03, f"{mode}: fleet hit rate {hit:.3f} against one pylb's {one_hit:.3f}"
