"""Membership churn every second: are the clients of the other replicas unaffected?

    .venv/bin/python bench/churn.py --rounds 4 --seconds 20       # the issue's run (~3-4 min)
    .venv/bin/python bench/churn.py --rounds 1 --seconds 5        # a quick look

Processes: `pylb sim-replicas` (4 fake vLLM replicas, one process, `--speed` times real time) and
`pylb serve` in front of them (round-robin, access log off, settings from a YAML file). Two
replicas are steady; the other two leave and rejoin the static replica list by turns: every
second the file is rewritten and pylb gets SIGHUP (a live reload). The client sends streamed
completions at a steady `--rate` for `--seconds`, and records each one's status, time to first
token (TTFT) and the replica that served it (`x-pylb-replica`). A fault-free phase (the same
four replicas, no reloads) and a churn phase alternate `--rounds` times, so that both see the
same machine load; the two are compared on the requests the steady replicas served (TTFT p50
and p90, each as churn / fault-free), and for all requests (errors must be 0).

The issue's target: the steady replicas' TTFT within 10 % of the fault-free run. Results go to
stdout and bench/results/churn.json with the command.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench_support import free_port, read_replica_urls, wait_ready

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, port: int, backends: list[str]) -> None:
    lines = ["server:", f"  port: {port}", "router:", "  policy: round-robin", "logging:", "  access_log: false", "fleet:",
             "  health_interval_s: 0.2", "  backends:", *[f"    - {b}" for b in backends]]  # fmt: skip
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


async def phase(url: str, seconds: float, rate: float, churn: Any | None) -> list[tuple[int, float, str]]:
    """Streamed requests at `rate` per second for `seconds`: (status, TTFT s, replica) each."""
    out: list[tuple[int, float, str]] = []

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "pylb-sim", "prompt": f"churn {i} " + "words " * 40, "max_tokens": 16, "stream": True}
        t0 = time.perf_counter()
        ttft = -1.0
        try:
            async with s.post(url + "/v1/completions", json=body) as r:
                replica = r.headers.get("x-pylb-replica", "?")
                status = r.status
                async for line in r.content:
                    if ttft < 0 and line.startswith(b"data: {"):
                        ttft = time.perf_counter() - t0
                        if b'"error"' in line:
                            status = 599
        except aiohttp.ClientError:
            status, replica = 0, "?"
        out.append((status, ttft, replica))

    async def churner() -> None:
        k = 0
        while True:
            await asyncio.sleep(1.0)
            churn(k)
            k += 1

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        ch = asyncio.create_task(churner()) if churn is not None else None
        tasks = []
        t_start = time.perf_counter()
        i = 0
        while time.perf_counter() - t_start < seconds:
            tasks.append(asyncio.create_task(one(s, i)))
            i += 1
            await asyncio.sleep(max(0.0, t_start + i / rate - time.perf_counter()))
        await asyncio.gather(*tasks)
        if ch is not None:
            ch.cancel()
    return out


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else (values[0] if values else float("nan"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="fault-free and churn phases, alternated")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second")
    ap.add_argument("--speed", type=float, default=4.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "churn.json"))
    args = ap.parse_args()
    py = [sys.executable, "-P", "-m", "pylb.cli"]
    reps = subprocess.Popen([*py, "sim-replicas", "--replicas", "4", "--base-port", "0", "--speed", str(args.speed), "--output-len", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    pylb = None
    tmpdir = tempfile.TemporaryDirectory()
    try:
        urls = read_replica_urls(reps, 4)
        steady = set(urls[:2])
        port = free_port()
        cfg = Path(tmpdir.name) / "pylb.yaml"
        write_config(cfg, port, urls)
        pylb = subprocess.Popen([*py, "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(url + "/ready", timeout=60.0, interval=0.2))
        reloads = Counter[str]()

        def churn(k: int) -> None:
            write_config(cfg, port, urls[:2] + [urls[2 + k % 2]])
            assert pylb is not None
            pylb.send_signal(signal.SIGHUP)
            reloads["sighup"] += 1

        def calm() -> None:
            write_config(cfg, port, urls)
            assert pylb is not None
            pylb.send_signal(signal.SIGHUP)

        load0 = os.getloadavg()
        asyncio.run(phase(url, 3.0, args.rate, None))  # warm-up
        results: dict[str, list[tuple[int, float, str]]] = {"fault_free": [], "churn": []}
        for _ in range(args.rounds):
            results["fault_free"] += asyncio.run(phase(url, args.seconds, args.rate, None))
            results["churn"] += asyncio.run(phase(url, args.seconds, args.rate, churn))
            calm()
            time.sleep(2.0)  # both back in rotation before the next fault-free phase
        summary: dict[str, Any] = {}
        for name, rows in results.items():
            ok = [t for st, t, r in rows if st == 200 and r in steady]
            summary[name] = {
                "requests": len(rows),
                "statuses": dict(Counter(st for st, _, _ in rows)),
                "steady_replica_requests": len(ok),
                "steady_ttft_p50_ms": round(quantile(ok, 0.5) * 1000, 1),
                "steady_ttft_p90_ms": round(quantile(ok, 0.9) * 1000, 1),
                "by_replica": dict(Counter(r for _, _, r in rows)),
            }
        ff, ch = summary["fault_free"], summary["churn"]
        res = {
            "command": " ".join(["bench/churn.py", *sys.argv[1:]]),
            "reloads": reloads["sighup"],
            "summary": summary,
            "p50_ratio": round(ch["steady_ttft_p50_ms"] / ff["steady_ttft_p50_ms"], 3),
            "p90_ratio": round(ch["steady_ttft_p90_ms"] / ff["steady_ttft_p90_ms"], 3),
            "load_average_start": load0,
            "load_average_end": os.getloadavg(),
        }
    finally:
        for p in (pylb, reps):
            if p is not None:
                p.terminate()
                p.wait(30)
        tmpdir.cleanup()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for name in ("fault_free", "churn"):
        s = summary[name]
        print(f"{name:10s} {s['requests']} requests, statuses {s['statuses']}; steady replicas: {s['steady_replica_requests']} requests, "
              f"TTFT p50 {s['steady_ttft_p50_ms']} ms, p90 {s['steady_ttft_p90_ms']} ms")  # fmt: skip
    print(f"{res['reloads']} reloads (SIGHUP, one a second); steady replicas' TTFT churn / fault-free: p50 x{res['p50_ratio']}, p90 x{res['p90_ratio']}; "
          f"load average {load0[0]:.1f} -> {res['load_average_end'][0]:.1f}")  # fmt: skip
    print(f"results in {args.out}")
    bad = sum(n for st, n in summary["churn"]["statuses"].items() if st != 200) + sum(
        n for st, n in summary["fault_free"]["statuses"].items() if st != 200
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
