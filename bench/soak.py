"""Soak run of `pylb serve` (issue 16 §3): a steady mix of requests for a long time, with pylb's
resources sampled throughout (resident memory, descriptors, and the asyncio tasks alive in its
event loop, `pylb_event_loop_tasks`).

    .venv/bin/python bench/soak.py --requests 1000000 --rate 400     # the issue's run (~45 min)
    .venv/bin/python bench/soak.py --requests 20000 --rate 200       # a short run (~2 min)

Three kinds of processes: `pylb sim-replicas` (4 fake vLLM replicas, run 20x faster than real
time), `pylb serve` in front of them (round-robin, access log off), and this client, which sends
`--requests` requests at `--rate` per second (at most `--concurrency` in flight): 45 % streamed,
45 % JSON, 5 % clients that leave mid-stream, 5 % bad requests (400). Every `--sample-s` seconds
it reads pylb's resident memory and open descriptors from /proc. At the end it compares the
clients' counts with pylb's own `pylb_requests_total`.

How to read it: RSS and descriptors after warm-up (the first 10 % of the samples) should stay
flat (the report gives the spread of the rest as a fraction of their mean; target within 10 %),
descriptors should come back to their idle count once the load stops (no leaked sockets), the
event loop's tasks to their count before the load (no leaked tasks), and
`pylb_requests_total` must equal what the clients saw (a client that left mid-stream is a 499, or a
200 when the whole stream had reached it first). The load
average is printed (the development machine is shared). Results go to stdout and
bench/results/soak.json with the command that produced them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench_support import read_replica_urls, start_pylb

REPO = Path(__file__).resolve().parents[1]


def proc_stats(pid: int) -> tuple[float, int]:
    """(RSS in MB, open descriptors) of process `pid`."""
    rss = 0.0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def one(s: aiohttp.ClientSession, url: str, i: int, kind: str, out: Counter[str]) -> None:
    prompt = f"session {i % 50} " + "shared words " * 30 + f"turn {i}"
    try:
        if kind == "bad":
            async with s.post(url + "/v1/completions", data=b'{"prompt": ', headers={"Content-Type": "application/json"}) as r:
                await r.read()
                out[str(r.status)] += 1
            return
        body = {"model": "pylb-sim", "prompt": prompt, "max_tokens": 16, "stream": kind != "json"}
        async with s.post(url + "/v1/completions", json=body) as r:
            if kind == "leave":
                await r.content.readany()
                r.close()  # the client goes away mid-stream
                out["left"] += 1
                return
            data = await r.read()
            if r.status == 200 and kind == "stream" and b'"error"' in data:
                out["502"] += 1
            else:
                out[str(r.status)] += 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        out[f"client error {type(exc).__name__}"] += 1


async def event_loop_tasks(s: aiohttp.ClientSession, url: str) -> int:
    """pylb's `pylb_event_loop_tasks` (asyncio tasks alive in its loop), from its /metrics."""
    async with s.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=30)) as r:
        text = await r.text()
    line = next(line for line in text.splitlines() if line.startswith("pylb_event_loop_tasks "))
    return int(float(line.split()[1]))


async def drive(url: str, pid: int, n: int, rate: float, concurrency: int, sample_s: float) -> dict[str, Any]:
    rng = random.Random(0)
    out: Counter[str] = Counter()
    samples: list[tuple[float, float, int, int]] = []
    sem = asyncio.Semaphore(concurrency)
    done = asyncio.Event()
    async with aiohttp.ClientSession() as s:
        idle_tasks_before = await event_loop_tasks(s, url)
    t0 = time.monotonic()

    async def sampler() -> None:
        async with aiohttp.ClientSession() as metrics_session:
            while not done.is_set():
                rss, fds = proc_stats(pid)
                tasks = await event_loop_tasks(metrics_session, url)
                samples.append((round(time.monotonic() - t0, 1), round(rss, 1), fds, tasks))
                try:
                    await asyncio.wait_for(done.wait(), sample_s)
                except asyncio.TimeoutError:
                    pass

    async def guarded(s: aiohttp.ClientSession, i: int, kind: str) -> None:
        try:
            await one(s, url, i, kind, out)
        finally:
            sem.release()

    sampling = asyncio.create_task(sampler())
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=60)) as s:
        for i in range(n):
            due = t0 + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await sem.acquire()
            r = rng.random()
            kind = "stream" if r < 0.45 else "json" if r < 0.90 else "leave" if r < 0.95 else "bad"
            t = asyncio.create_task(guarded(s, i, kind))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        await asyncio.gather(*tasks)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(2.0)  # connections settle
    idle_rss, idle_fds = proc_stats(pid)
    done.set()
    await sampling
    async with aiohttp.ClientSession() as s:
        idle_tasks_after = await event_loop_tasks(s, url)
        async with s.get(url + "/metrics") as r:
            text = await r.text()
    counted: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.name == "pylb_requests_total" and smp.labels.get("endpoint") == "completions":
                counted[smp.labels["code"]] = smp.value
    rest = samples[max(1, len(samples) // 10) :] or samples  # a run too short for a warm-up keeps every sample

    def spread(values: list[float]) -> float:
        mean = sum(values) / len(values)
        return round((max(values) - min(values)) / mean, 3) if mean else 0.0

    return {
        "requests": n, "seconds": round(elapsed, 1), "achieved_rate": round(n / elapsed, 1), "client_counts": dict(out),
        "pylb_requests_total": counted, "counts_match": counts_match(out, counted),
        "rss_mb_after_warmup": [min(x[1] for x in rest), max(x[1] for x in rest)], "rss_spread": spread([x[1] for x in rest]),
        "fds_after_warmup": [min(x[2] for x in rest), max(x[2] for x in rest)], "fds_idle_after": idle_fds, "rss_mb_idle_after": round(idle_rss, 1),
        "tasks_after_warmup": [min(x[3] for x in rest), max(x[3] for x in rest)], "tasks_idle_before": idle_tasks_before, "tasks_idle_after": idle_tasks_after,
        "samples": samples,
    }  # fmt: skip


def counts_match(out: Counter[str], counted: dict[str, float]) -> bool:
    """pylb's counts by status equal the clients'. A client that left mid-stream is a 499, or a
    200 when the (short) stream had reached it whole before pylb saw it leave."""
    others = {k: float(v) for k, v in out.items() if k not in ("200", "left")}
    mine = {k: v for k, v in counted.items() if k not in ("200", "499")}
    return others == mine and counted.get("200", 0) + counted.get("499", 0) == out["200"] + out["left"] and counted.get("499", 0) <= out["left"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--rate", type=float, default=400.0, help="requests per second")
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "soak.json"))
    args = ap.parse_args()
    py = [sys.executable, "-P", "-m", "pylb.cli"]
    reps = subprocess.Popen([*py, "sim-replicas", "--replicas", "4", "--base-port", "0", "--speed", "20", "--output-len", "16", "--max-model-len", "8192"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    pylb = None
    try:
        urls = read_replica_urls(reps, 4)
        pylb, url = start_pylb(urls)
        load0 = os.getloadavg()
        res = asyncio.run(drive(url, pylb.pid, args.requests, args.rate, args.concurrency, args.sample_s))
        res.update(command=" ".join(["bench/soak.py", *sys.argv[1:]]), load_average_start=load0, load_average_end=os.getloadavg())
    finally:
        for p in (pylb, reps):
            if p is not None:
                p.terminate()
                p.wait(30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{res['requests']:,} requests in {res['seconds']} s ({res['achieved_rate']}/s), load average {res['load_average_start'][0]:.1f} -> {res['load_average_end'][0]:.1f}")
    print(f"client counts {res['client_counts']}; pylb_requests_total {res['pylb_requests_total']}; match: {res['counts_match']}")
    print(f"after warm-up: RSS {res['rss_mb_after_warmup'][0]}-{res['rss_mb_after_warmup'][1]} MB (spread {res['rss_spread']:.1%}), "
          f"descriptors {res['fds_after_warmup'][0]}-{res['fds_after_warmup'][1]}, idle after the load: {res['fds_idle_after']} descriptors, {res['rss_mb_idle_after']} MB")  # fmt: skip
    print(f"event-loop tasks: {res['tasks_idle_before']} idle before, {res['tasks_after_warmup'][0]}-{res['tasks_after_warmup'][1]} under load, {res['tasks_idle_after']} idle after")
    print(f"results in {args.out}")
    return 0 if res["counts_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
