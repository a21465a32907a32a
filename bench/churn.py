"""A fault on some replicas: are the clients of the other replicas unaffected? (issue 16 §1)

    .venv/bin/python bench/churn.py --rounds 4 --seconds 20                # membership churn (~3-4 min)
    .venv/bin/python bench/churn.py --fault kill --rounds 2 --seconds 10   # one replica SIGKILLed
    .venv/bin/python bench/churn.py --fault all --rounds 2 --seconds 10    # every fault in turn

Processes: four `pylb sim-replicas` processes (one fake vLLM replica each, `--speed` times real
time) and `pylb serve` in front of them (round-robin, access log off, health probes every 0.2 s,
settings from a YAML file). Replicas 0 and 1 are steady; the fault touches the others:

  churn  replicas 2 and 3 leave and rejoin the static replica list by turns: every second the
         file is rewritten and pylb gets SIGHUP (a live reload);
  kill   replica 3 is SIGKILLed at the start of the fault phase and started again at its end;
  hang   replica 3 is SIGSTOPped (requests in flight there hang) and SIGCONTed at the end;
  slow   replica 3 is restarted 50x slower for the phase (TTFT x50), then at its own speed.

The client sends streamed completions at a steady `--rate` for `--seconds`, and records each
one's status, time to first token (TTFT) and the replica that served it (`x-pylb-replica`). A
fault-free phase and a fault phase alternate `--rounds` times, so that both see the same machine
load, with the faulty replica back in rotation before each fault-free phase; the two are compared
on the requests the steady replicas served (TTFT p50 and p90, each as fault / fault-free). A
request that failed must have failed with a clear status (an HTTP error or an error event: 599
below), never a dropped connection or a stream cut without its end (0: lost).

The issue's target: the steady replicas' TTFT within 10 % of the fault-free run. Results go to
stdout and bench/results/churn.json (one entry per fault) with the command.
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
from collections.abc import Callable
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
    """Streamed requests at `rate` per second for `seconds`: (status, TTFT s, replica) each; the
    replica is "retried" for an answer pylb got after a retry (`x-pylb-attempts` > 1: its
    first attempt went to the faulty replica, so its client was not another replica's)."""
    out: list[tuple[int, float, str]] = []

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        body = {"model": "pylb-sim", "prompt": f"churn {i} " + "words " * 40, "max_tokens": 16, "stream": True}
        t0 = time.perf_counter()
        ttft = -1.0
        try:
            async with s.post(url + "/v1/completions", json=body) as r:
                replica = r.headers.get("x-pylb-replica", "?")
                if r.headers.get("x-pylb-attempts", "1") != "1":
                    replica = "retried"
                status = r.status
                done = False
                async for line in r.content:
                    if line.startswith(b"data: {") and b'"error"' in line:
                        status = 599  # an error event: a clear error
                    elif ttft < 0 and line.startswith(b"data: {"):
                        ttft = time.perf_counter() - t0
                    done = done or line.startswith(b"data: [DONE]")
                if status == 200 and not done:
                    status = 0  # a stream cut without its end: lost
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


FAULTS = ("churn", "kill", "hang", "slow")


class Replica:
    """One `pylb sim-replicas --replicas 1` process on a fixed port: can be killed, stopped,
    continued, and started again at another speed."""

    def __init__(self, py: list[str], speed: float) -> None:
        self.py, self.speed, self.port = py, speed, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[str] | None = None

    def start(self, speed: float | None = None) -> None:
        argv = [*self.py, "sim-replicas", "--replicas", "1", "--base-port", str(self.port), "--speed", str(speed or self.speed), "--output-len", "16"]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        read_replica_urls(self.proc, 1)  # (its later output is drained, not left to fill the pipe)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            self.proc.wait(30)

    def restart(self, speed: float | None = None) -> None:
        self.stop()
        self.start(speed)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


REPLICA_FAULTS: dict[str, tuple[Callable[[Replica], None], Callable[[Replica], None]]] = {
    "kill": (Replica.kill, Replica.start),
    "hang": (lambda r: r.signal(signal.SIGSTOP), lambda r: r.signal(signal.SIGCONT)),
    "slow": (lambda r: r.restart(r.speed / 50), Replica.restart),
}
"""How each fault on one replica begins and ends (churn acts on pylb's replica list instead)."""


def run_fault(fault: str, url: str, replicas: list[Replica], cfg: Path, pylb: subprocess.Popen, args: argparse.Namespace) -> dict[str, Any]:
    """`--rounds` fault-free and `fault` phases, alternated; the comparison of the steady replicas' TTFT."""
    port = int(url.rsplit(":", 1)[1])
    urls = [r.url for r in replicas]
    steady = set(urls[:2])
    faulty = replicas[3]
    events = Counter[str]()

    def churn(k: int) -> None:
        write_config(cfg, port, urls[:2] + [urls[2 + k % 2]])
        pylb.send_signal(signal.SIGHUP)
        events["sighup"] += 1

    def begin() -> None:
        REPLICA_FAULTS[fault][0](faulty)
        events[fault] += 1

    def end() -> None:
        if fault == "churn":
            write_config(cfg, port, urls)
            pylb.send_signal(signal.SIGHUP)
        else:
            REPLICA_FAULTS[fault][1](faulty)
        asyncio.run(wait_in_rotation(url, urls))

    results: dict[str, list[tuple[int, float, str]]] = {"fault_free": [], "fault": []}
    for _ in range(args.rounds):
        results["fault_free"] += asyncio.run(phase(url, args.seconds, args.rate, None))
        if fault != "churn":
            begin()
        results["fault"] += asyncio.run(phase(url, args.seconds, args.rate, churn if fault == "churn" else None))
        end()
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
    ff, fa = summary["fault_free"], summary["fault"]
    return {
        "events": dict(events),
        "summary": summary,
        "p50_ratio": round(fa["steady_ttft_p50_ms"] / ff["steady_ttft_p50_ms"], 3),
        "p90_ratio": round(fa["steady_ttft_p90_ms"] / ff["steady_ttft_p90_ms"], 3),
    }


async def wait_in_rotation(url: str, urls: list[str], timeout: float = 30.0) -> None:
    """Until pylb's /metrics shows every one of `urls` healthy (in rotation)."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            async with s.get(url + "/metrics") as r:
                text = await r.text()
            healthy = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                       if line.startswith("pylb_replica_healthy{") and line.rstrip().endswith(" 1.0")}  # fmt: skip
            if set(urls) <= healthy:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"replicas not back in rotation within {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fault", choices=(*FAULTS, "all"), default="churn", help="the fault (default churn; all: each in turn)")
    ap.add_argument("--rounds", type=int, default=4, help="fault-free and fault phases, alternated")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    ap.add_argument("--rate", type=float, default=40.0, help="requests per second")
    ap.add_argument("--speed", type=float, default=4.0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "churn.json"))
    args = ap.parse_args()
    py = [sys.executable, "-P", "-m", "pylb.cli"]
    replicas = [Replica(py, args.speed) for _ in range(4)]
    pylb = None
    tmpdir = tempfile.TemporaryDirectory()
    faults = list(FAULTS) if args.fault == "all" else [args.fault]
    out: dict[str, Any] = {"command": " ".join(["bench/churn.py", *sys.argv[1:]]), "faults": {}}
    try:
        for r in replicas:
            r.start()
        urls = [r.url for r in replicas]
        port = free_port()
        cfg = Path(tmpdir.name) / "pylb.yaml"
        write_config(cfg, port, urls)
        pylb = subprocess.Popen([*py, "serve", "--config", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        asyncio.run(wait_ready(url + "/ready", timeout=60.0, interval=0.2))
        out["load_average_start"] = os.getloadavg()
        asyncio.run(phase(url, 3.0, args.rate, None))  # warm-up
        for fault in faults:
            out["faults"][fault] = run_fault(fault, url, replicas, cfg, pylb, args)
        out["load_average_end"] = os.getloadavg()
    finally:
        if pylb is not None:
            pylb.terminate()
            pylb.wait(30)
        for r in replicas:
            r.stop()
        tmpdir.cleanup()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    lost = 0
    for fault, res in out["faults"].items():
        for name in ("fault_free", "fault"):
            s = res["summary"][name]
            lost += s["statuses"].get(0, 0)
            print(f"{fault:6s} {name:10s} {s['requests']} requests, statuses {s['statuses']}, {s['by_replica'].get('retried', 0)} after a retry; "
                  f"steady replicas: {s['steady_replica_requests']} requests, "
                  f"TTFT p50 {s['steady_ttft_p50_ms']} ms, p90 {s['steady_ttft_p90_ms']} ms")  # fmt: skip
        print(f"{fault:6s} {res['events']}; steady replicas' TTFT {fault} / fault-free: p50 x{res['p50_ratio']}, p90 x{res['p90_ratio']}")
    print(f"load average {out['load_average_start'][0]:.1f} -> {out['load_average_end'][0]:.1f}; results in {args.out}")
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
