"""Many concurrent open streams through `pylb serve`, held, with pylb's memory sampled: what one
open stream costs pylb in bytes.

    .venv/bin/python bench/streams.py --streams 2000 --hold-s 10      # the issue's run (~1 min)
    .venv/bin/python bench/streams.py --streams 200 --hold-s 5        # a quick look

Three kinds of processes: `pylb sim-replicas` (`--replicas` fake vLLM replicas, run at `--speed`
times real time, slow, so that each stream emits a few tokens a second), `pylb serve` in front
of them (round-robin, access log off), and this client. The client raises its descriptor limit to
the hard limit (the children inherit it), warms pylb up with a few short requests, reads pylb's
idle resident memory, then opens `--streams` streamed completions (`ignore_eos`, more tokens than
the hold lasts) and waits until each has its first token. It holds them all open for `--hold-s`
seconds, sampling pylb's RSS and open descriptors every `--sample-s`, then drops every client
and samples again once pylb has let go.

Reported: streams opened and still flowing at the end of the hold (each got a token during the
hold), pylb's RSS idle / held (mean and max) / after release, and bytes per open stream =
(mean held RSS - idle RSS) / streams. RSS is what the kernel charges the process, so this
includes everything a stream costs pylb (client socket, upstream socket, buffers, tasks).
Results go to stdout and bench/results/streams.json with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench_support import read_replica_urls, start_pylb
from soak import proc_stats

REPO = Path(__file__).resolve().parents[1]


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise this process's RLIMIT_NOFILE soft limit towards `want` (at most the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


async def hold(url: str, pid: int, n: int, hold_s: float, sample_s: float, open_timeout: float) -> dict[str, Any]:
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    opened = asyncio.Event()
    n_open = 0
    first_errors: list[str] = []
    tokens = [0] * n
    tokens_at_hold = [0] * n

    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
        for i in range(20):  # warm-up: imports, pools, first allocations
            async with s.post(url + "/v1/completions", json={"model": "pylb-sim", "prompt": f"warm {i}", "max_tokens": 4}) as r:
                await r.read()
        await asyncio.sleep(1.0)
        idle_rss, idle_fds = proc_stats(pid)

        async def stream(i: int) -> None:
            nonlocal n_open
            body = {
                "model": "pylb-sim",
                "prompt": f"stream {i} " + "held open " * 8,
                "max_tokens": 100_000,
                "ignore_eos": True,
                "stream": True,
            }
            try:
                async with s.post(url + "/v1/completions", json=body) as r:
                    if r.status != 200:
                        first_errors.append(f"{r.status} {(await r.text())[:200]}")
                        return
                    first = True
                    async for line in r.content:
                        if not line.startswith(b"data: {"):
                            continue
                        tokens[i] += 1
                        if first:
                            first = False
                            n_open += 1
                            if n_open == n:
                                opened.set()
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                first_errors.append(f"{type(e).__name__}: {e}"[:200])

        t0 = time.monotonic()
        tasks = [asyncio.create_task(stream(i)) for i in range(n)]
        try:
            await asyncio.wait_for(opened.wait(), open_timeout)
        except asyncio.TimeoutError:
            pass
        open_s = time.monotonic() - t0
        tokens_at_hold[:] = tokens
        samples: list[tuple[float, float, int]] = []
        t1 = time.monotonic()
        while time.monotonic() - t1 < hold_s:
            rss, fds = proc_stats(pid)
            samples.append((round(time.monotonic() - t1, 1), rss, fds))
            await asyncio.sleep(sample_s)
        flowing = sum(1 for a, b in zip(tokens_at_hold, tokens) if b > a)
        still_open = sum(1 for t in tasks if not t.done())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    # The client side is closed; give pylb a moment to notice and release.
    await asyncio.sleep(5.0)
    after_rss, after_fds = proc_stats(pid)
    held = [r for _, r, _ in samples]
    mean_held = statistics.fmean(held)
    return {
        "streams": n,
        "opened": n_open,
        "seconds_to_open": round(open_s, 1),
        "open_errors": len(first_errors),
        "open_error_examples": first_errors[:5],
        "still_open_at_end_of_hold": still_open,
        "flowing_during_hold": flowing,
        "tokens_during_hold": sum(tokens) - sum(tokens_at_hold),
        "rss_mb_idle": round(idle_rss, 1),
        "fds_idle": idle_fds,
        "rss_mb_held_mean": round(mean_held, 1),
        "rss_mb_held_max": round(max(held), 1),
        "rss_mb_held_spread": round((max(held) - min(held)) / mean_held, 4),
        "fds_held_max": max(f for _, _, f in samples),
        "rss_mb_after_release": round(after_rss, 1),
        "fds_after_release": after_fds,
        "bytes_per_stream": round((mean_held - idle_rss) * 1024 * 1024 / max(n_open, 1)),
        "samples": samples,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=2000)
    ap.add_argument("--replicas", type=int, default=8, help="fake replicas (each runs at most 256 requests at once)")
    ap.add_argument("--speed", type=float, default=0.05, help="engine speed vs real time (slow: ~3 tokens a second per stream)")
    ap.add_argument("--hold-s", type=float, default=30.0)
    ap.add_argument("--sample-s", type=float, default=1.0)
    ap.add_argument("--open-timeout-s", type=float, default=120.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "streams.json"))
    args = ap.parse_args()
    nofile = raise_nofile(4 * args.streams + 1024)  # client sockets here, in pylb twice, at the replicas
    py = [sys.executable, "-P", "-m", "pylb.cli"]
    reps = subprocess.Popen(
        [*py, "sim-replicas", "--replicas", str(args.replicas), "--base-port", "0", "--speed", str(args.speed), "--max-model-len", "200000"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    pylb = None
    try:
        urls = read_replica_urls(reps, args.replicas)
        pylb, url = start_pylb(urls)
        load0 = os.getloadavg()
        res = asyncio.run(hold(url, pylb.pid, args.streams, args.hold_s, args.sample_s, args.open_timeout_s))
        res.update(
            command=" ".join(["bench/streams.py", *sys.argv[1:]]), nofile_limit=list(nofile), replicas=args.replicas, speed=args.speed,
            load_average_start=load0, load_average_end=os.getloadavg(),
        )  # fmt: skip
    finally:
        for p in (pylb, reps):
            if p is not None:
                p.terminate()
                p.wait(30)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"{res['opened']}/{res['streams']} streams open after {res['seconds_to_open']} s ({res['open_errors']} errors); "
          f"held {args.hold_s:g} s: {res['still_open_at_end_of_hold']} still open, {res['flowing_during_hold']} got tokens during the hold "
          f"({res['tokens_during_hold']} tokens); load average {res['load_average_start'][0]:.1f} -> {res['load_average_end'][0]:.1f}")  # fmt: skip
    print(f"pylb RSS: idle {res['rss_mb_idle']} MB, held mean {res['rss_mb_held_mean']} MB (max {res['rss_mb_held_max']}, spread "
          f"{res['rss_mb_held_spread']:.1%}), after release {res['rss_mb_after_release']} MB; descriptors idle {res['fds_idle']}, "
          f"held max {res['fds_held_max']}, after release {res['fds_after_release']}")  # fmt: skip
    print(f"bytes per open stream: {res['bytes_per_stream']:,}")
    print(f"results in {args.out}")
    return 0 if res["opened"] == res["streams"] else 1


if __name__ == "__main__":
    sys.exit(main())
