"""`pylb demo`: pylb in front of a simulated vLLM fleet, dualmap against round-robin, side by side.

What it does, for each policy in turn (dualmap first, then round-robin):

1. starts a fresh fake vLLM fleet (`pylb sim-replicas`, 4 replicas by default: real HTTP
   servers running the engine model of vLLM in real time), so every policy starts cold;
2. starts `pylb serve` in front of it with that policy;
3. replays a built-in synthetic multi-turn workload (chat sessions under one shared system
   prompt, each turn extending the previous one) through pylb with `pylb.workload.replay`;
4. reads the replicas' own prefix-cache counters (`vllm:prefix_cache_hits_total` over
   `vllm:prefix_cache_queries_total`, summed over the fleet) before and after;

then prints one table: hit rate from the replicas' counters, TTFT P50/P99 as the client saw
it, SLO attainment, errors. Fleet and proxy run as subprocesses of the `pylb` command itself,
exactly as a user would start them, on 127.0.0.1 ports picked free. Everything stops on exit,
Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import aiohttp

from pylb.cli_args import positive_float, positive_int, run_async
from pylb.fleet.scrape import parse_vllm_metrics
from pylb.workload.replay import replay
from pylb.workload.synthetic import multi_turn

POLICIES = ("dualmap", "round-robin")
REPLICA_LINE = re.compile(r"replica \d+: (http://\S+)")


@dataclass(slots=True)
class DemoRow:
    """One policy's results."""

    policy: str
    requests: int
    completed: int
    errors: int
    hit_rate: float | None  # fleet prefix-cache hits / queries, from the replicas' counters
    ttft_p50: float | None
    ttft_p99: float | None
    slo_attainment: float | None
    wall_s: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `pylb demo`."""
    parser.add_argument("--replicas", type=positive_int, default=4, metavar="N", help="fake vLLM replicas (default 4)")
    parser.add_argument("--sessions", type=positive_int, default=40, metavar="N", help="chat sessions in the workload (default 40)")
    parser.add_argument("--turns", type=positive_int, default=4, metavar="N", help="turns per session (default 4)")
    parser.add_argument("--rate-scale", type=positive_float, default=2.5, metavar="X",
                        help="replay the workload X times faster than its own clock (default 2.5)")
    parser.add_argument("--speed", type=positive_float, default=1.0, metavar="X",
                        help="run the simulated engines X times faster than real time (default 1)")
    parser.add_argument("--slo-ttft", type=positive_float, default=0.5, metavar="SECONDS",
                        help="TTFT target for the SLO attainment column (default 0.5 s)")
    parser.add_argument("--policies", default=",".join(POLICIES), metavar="A,B",
                        help=f"policies to compare, in order (default {','.join(POLICIES)})")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pylb_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pylb.cli", *args]


def _spawn(args: list[str], stdout: int | None) -> subprocess.Popen[str]:
    """Start a `pylb` subcommand; its stderr (logs) goes to a temporary file read on failure."""
    log = tempfile.TemporaryFile(mode="w+t")
    # Run from a neutral folder: from a source checkout, `python -m` would import the checkout's
    # pylb (which has no compiled core) instead of the installed one.
    proc = subprocess.Popen(_pylb_command(*args), stdout=stdout, stderr=log, text=True, cwd=tempfile.gettempdir())
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _log_tail(proc: subprocess.Popen[str]) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.seek(0)
    return log.read()[-2000:].strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


@contextlib.contextmanager
def fake_fleet(replicas: int, speed: float) -> Iterator[list[str]]:
    """Start `pylb sim-replicas` and yield the replicas' URLs once each has printed its line."""
    proc = _spawn(["sim-replicas", "--replicas", str(replicas), "--base-port", "0", "--speed", str(speed)], subprocess.PIPE)
    try:
        urls: list[str] = []
        assert proc.stdout is not None
        while len(urls) < replicas:
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                raise RuntimeError(f"pylb sim-replicas exited before it was ready: {_log_tail(proc)}")
            match = REPLICA_LINE.search(line)
            if match:
                urls.append(match.group(1))
        yield urls
    finally:
        _stop(proc)


@contextlib.contextmanager
def pylb_proxy(backends: list[str], policy: str) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `pylb serve` with `policy` in front of `backends`; yield its URL (not yet ready)."""
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    for url in backends:
        args += ["--backend", url]
    proc = _spawn(args, subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        _stop(proc)


async def wait_ready(url: str, proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """Poll pylb's /ready until it answers 200 (all replicas seen healthy)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pylb serve exited with status {proc.returncode}: {_log_tail(proc)}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(f"{url}/ready", timeout=aiohttp.ClientTimeout(total=1)) as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"pylb serve at {url} was not ready after {timeout_s:.0f} s")


async def prefix_cache_counters(urls: list[str]) -> tuple[float, float]:
    """(hits, queries) summed over the replicas' `vllm:prefix_cache_*_total` counters, read
    with the same parser pylb's fleet scraper uses."""
    hits = queries = 0.0
    async with aiohttp.ClientSession() as session:
        for url in urls:
            async with session.get(f"{url}/metrics") as resp:
                metrics = parse_vllm_metrics(await resp.text())
            hits += metrics.prefix_cache_hits
            queries += metrics.prefix_cache_queries
    return hits, queries


async def run_policy(policy: str, args: argparse.Namespace) -> DemoRow:
    """One side of the comparison: a fresh fleet, pylb with `policy`, the workload, the counters."""
    workload = multi_turn(sessions=args.sessions, turns=args.turns, rate=1.0, think_time_s=4.0, seed=0)
    with fake_fleet(args.replicas, args.speed) as backends, pylb_proxy(backends, policy) as (url, proc):
        await wait_ready(url, proc)
        hits0, queries0 = await prefix_cache_counters(backends)
        result = await replay(workload, url, rate_scale=args.rate_scale, endpoint="chat",
                              slo_ttft_s=args.slo_ttft, progress=not args.no_progress, timeout_s=120.0)
        hits1, queries1 = await prefix_cache_counters(backends)
    s = result.summary
    queries = queries1 - queries0
    return DemoRow(
        policy=policy, requests=s.requests, completed=s.completed, errors=s.errors,
        hit_rate=(hits1 - hits0) / queries if queries > 0 else None,
        ttft_p50=s.ttft_p50, ttft_p99=s.ttft_p99, slo_attainment=s.slo_attainment, wall_s=s.wall_s,
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def format_table(rows: list[DemoRow], slo_ttft: float) -> str:
    """The side-by-side table the demo prints."""
    head = f"{'policy':<12} {'requests':>8} {'errors':>6} {'hit rate':>9} {'TTFT P50 ms':>12} {'TTFT P99 ms':>12} {f'TTFT<={slo_ttft:g}s':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.policy:<12} {r.requests:>8} {r.errors:>6} {_pct(r.hit_rate):>9} {_ms(r.ttft_p50):>12} "
                     f"{_ms(r.ttft_p99):>12} {_pct(r.slo_attainment):>10}")
    return "\n".join(lines)


async def _main(args: argparse.Namespace, policies: list[str]) -> list[DemoRow]:
    rows = []
    for policy in policies:
        print(f"pylb demo: {policy}: {args.replicas} fake vLLM replicas, pylb serve --policy {policy}, "
              f"{args.sessions} sessions x {args.turns} turns", file=sys.stderr, flush=True)
        rows.append(await run_policy(policy, args))
    return rows


def run(args: argparse.Namespace) -> int:
    """Run `pylb demo`; 0 when every side ran, 1 when a part failed to start."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        print(f"pylb demo: error: argument --policies: no policy named in {args.policies!r}", file=sys.stderr)
        return 2
    try:
        rows = run_async(_main(args, policies))
    except RuntimeError as exc:
        print(f"pylb demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(format_table(rows, args.slo_ttft))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}, f, indent=2)
    return 0
