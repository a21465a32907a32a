"""`pylb demo`: pylb in front of a simulated vLLM fleet, dualmap against round-robin, side by side.

What it does, for each policy in turn (dualmap first, then round-robin):

1. starts a fresh fake vLLM fleet (`pylb sim-replicas`, 4 replicas of the `dualmap-910b`
   profile by default: real HTTP servers running the engine model of vLLM in real time), so
   every policy starts cold;
2. starts `pylb serve` in front of it with that policy;
3. replays a built-in synthetic multi-turn workload through pylb with `pylb.workload.replay`:
   chat sessions that each paste a document (a 2048-token shared system prompt, 1024-token user
   turns, 64-token answers; each turn re-sends the whole conversation so far);
4. reads the replicas' own prefix-cache counters (`vllm:prefix_cache_hits_total` over
   `vllm:prefix_cache_queries_total`, summed over the fleet) before and after;

then prints one table: hit rate from the replicas' counters, TTFT P50/P90/P99 as the client saw
it, SLO attainment, errors, and one line comparing the first two policies.

By default (`--cache-state events`) the fake replicas publish their KV-cache events over ZMQ as
vLLM does (`pylb sim-replicas --kv-events-port`) and pylb routes on them (`router.cache_state:
events`, keyed with the fake engines' simulated tokens); under the table one line per policy
compares the hit rate pylb predicted at dispatch with what the replicas counted.

Why this load (`DEMO_WORKLOAD`, rate scale 3, TTFT target 1 s): routing decides latency only
where the fleet is busy. Round-robin sends each turn of a conversation to another replica, which
has to prefill the whole conversation again; near the fleet's capacity that extra prefill
queues. In `pylb simulate` (same workload and profile, `--rate-scale 3 --slo-ttft 1`, seeds 0-3)
dualmap keeps 96-100 % of requests under 1 s and round-robin 67-83 %, median TTFT 2.0-2.5x
lower; at rate scale 2.5 round-robin still reaches 82-95 %, at 3.5 dualmap itself falls to 94-98 %.
The demo itself (real processes, `pylb demo --seed 0..3`, 50-55 s each on the shared 2-core
development machine at load average 5-11) measured dualmap 75-95 % against round-robin 51-82 %,
13-33 points apart, median TTFT 1.4-2.5x lower; the engines run in real time, so a busy machine
slows both sides.

While a policy runs and stdout is a terminal, a live view redraws every half second: per
replica, requests running and waiting (a bar) and the hit rate so far, from the replicas' own
/metrics, and the requests answered from pylb's. `--plot OUT.png` (matplotlib) draws the TTFT
distribution of each policy and their hit rates. Fleet and proxy run as subprocesses of the
`pylb` command itself, exactly as a user would start them, on 127.0.0.1 ports picked free.
Everything stops on exit, Ctrl-C included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from pylb.cli_args import positive_float, positive_int, run_async
from pylb.fleet.scrape import parse_vllm_metrics
from pylb.sim.profiles import load_profile
from pylb.workload.replay import replay
from pylb.workload.replay import RequestRecord
from pylb.workload.synthetic import multi_turn
from pylb.workload.types import WorkloadRequest

POLICIES = ("dualmap", "round-robin")
DEMO_PROFILE = "dualmap-910b"
"""Hardware profile of the fake replicas: its prefill is slow enough that 4 replicas fill up at a
request rate the proxy and replicas sustain on two CPU cores."""
DEMO_WORKLOAD = {"system_tokens": 2048, "user_tokens": 1024, "answer_tokens": 64, "rate": 1.0, "think_time_s": 4.0}
"""`multi_turn` parameters besides sessions, turns and seed: document-sized turns, so that each
turn's prefill is mostly the conversation before it (see the module comment)."""
LIVE_REFRESH_S = 0.5
"""Seconds between two frames of the live view."""
REPLICA_LINE = re.compile(r"replica \d+: (http://\S+)")
KV_EVENTS_LINE = re.compile(r"KV events (tcp://[^\s)]+)")


@dataclass(slots=True)
class DemoRow:
    """One policy's results."""

    policy: str
    requests: int
    completed: int
    errors: int
    hit_rate: float | None  # fleet prefix-cache hits / queries, from the replicas' counters
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    slo_attainment: float | None
    wall_s: float
    predicted_hit_rate: float | None = None  # pylb's prediction at dispatch (pylb_predicted_prefix_cache_hit_rate, fleet)
    cache_state: str = "predicted"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `pylb demo`."""
    parser.add_argument("--replicas", type=positive_int, default=4, metavar="N", help="fake vLLM replicas (default 4)")
    parser.add_argument("--sessions", type=positive_int, default=40, metavar="N", help="chat sessions in the workload (default 40)")
    parser.add_argument("--turns", type=positive_int, default=4, metavar="N", help="turns per session (default 4)")
    parser.add_argument("--rate-scale", type=positive_float, default=3.0, metavar="X",
                        help="replay the workload X times faster than its own clock (default 3: busy enough "
                             "that routing decides latency)")
    parser.add_argument("--speed", type=positive_float, default=1.0, metavar="X",
                        help="run the simulated engines X times faster than real time (default 1)")
    parser.add_argument("--profile", default=DEMO_PROFILE, metavar="NAME|FILE",
                        help=f"hardware profile of the fake replicas (default {DEMO_PROFILE})")
    parser.add_argument("--slo-ttft", type=positive_float, default=1.0, metavar="SECONDS",
                        help="TTFT target for the SLO attainment column (default 1 s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic workload (default 0)")
    parser.add_argument("--policies", default=",".join(POLICIES), metavar="A,B",
                        help=f"policies to compare, in order (default {','.join(POLICIES)})")
    parser.add_argument("--cache-state", choices=("events", "predicted"), default="events",
                        help="what pylb knows of the replicas' caches: their KV-cache events (the fake replicas publish "
                             "them as vLLM does) or its own prediction (default events)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="draw each policy's TTFT distribution and hit rate (needs matplotlib)")
    parser.add_argument("--no-progress", action="store_true", help="no live view or progress bar")


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
def fake_fleet(replicas: int, speed: float, profile: str = DEMO_PROFILE, kv_events: dict[str, str] | None = None) -> Iterator[list[str]]:
    """Start `pylb sim-replicas` and yield the replicas' URLs once each has printed its line.
    With `kv_events` (a dict), the replicas publish KV-cache events and it is filled with
    {replica URL: its ZMQ endpoint}."""
    args = ["sim-replicas", "--replicas", str(replicas), "--base-port", "0", "--speed", str(speed), "--profile", profile]
    if kv_events is not None:
        args += ["--kv-events-port", str(free_ports_in_a_row(replicas))]
    proc = _spawn(args, subprocess.PIPE)
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
                ev = KV_EVENTS_LINE.search(line)
                if kv_events is not None and ev:
                    kv_events[match.group(1)] = ev.group(1)
        yield urls
    finally:
        _stop(proc)


@contextlib.contextmanager
def pylb_proxy(backends: list[str], policy: str, kv_events: dict[str, str] | None = None, block_size: int = 0) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """Start `pylb serve` with `policy` in front of `backends`; yield its URL (not yet ready).
    With `kv_events` ({replica URL: ZMQ endpoint}), pylb runs with router.cache_state events on
    the fake replicas' events (their simulated tokens, `block_size` tokens per block)."""
    port = free_port()
    args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--policy", policy]
    for url in backends:
        args += ["--backend", url]
    if kv_events:
        args += ["--router-cache-state", "events", "--kv-events-tokenizer", "sim", "--kv-events-block-size", str(block_size)]
        for url, ep in kv_events.items():
            args += ["--kv-events-endpoint", f"{url}={ep}"]
    proc = _spawn(args, subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        _stop(proc)


def free_ports_in_a_row(n: int, tries: int = 50) -> int:
    """The first of n consecutive TCP ports on 127.0.0.1 that were free a moment ago."""
    for _ in range(tries):
        first = free_port()
        if first + n > 65536:
            continue
        socks = []
        try:
            for p in range(first, first + n):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return first
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports found")


async def predicted_hit_rate(url: str) -> float | None:
    """pylb's fleet-wide predicted prefix-cache hit rate, from its /metrics (None before any dispatch)."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    m = re.search(r'^pylb_predicted_prefix_cache_hit_rate\{replica="fleet"\} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


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


async def cache_summary(url: str) -> str | None:
    """One line on pylb's semantic cache from its /metrics, None when the cache is off (it is on
    when `pylb serve` got `cache.enabled` from the environment or a config file)."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(f"{url}/metrics") as resp:
        text = await resp.text()
    results: dict[str, float] = {}
    bypass: dict[str, float] = {}
    on = False
    for fam in text_string_to_metric_families(text):
        if fam.name.startswith("pylb_cache_"):
            on = True
        for sample in fam.samples:
            if sample.name == "pylb_cache_requests_total":
                results[sample.labels["result"]] = results.get(sample.labels["result"], 0) + sample.value
            elif sample.name == "pylb_cache_bypass_total":
                bypass[sample.labels["reason"]] = sample.value
    if not on:
        return None
    hits = {k: int(v) for k, v in results.items() if k.startswith("hit_")}
    why = f" ({', '.join(f'{r}: {int(n)}' for r, n in sorted(bypass.items()))})" if bypass else ""
    return (f"semantic cache: {sum(hits.values())} hits ({', '.join(f'{k[4:]} {v}' for k, v in sorted(hits.items())) or 'none'}), "
            f"{int(results.get('miss', 0))} misses, {int(results.get('bypass', 0))} not cacheable{why}")


def demo_workload(sessions: int, turns: int, seed: int) -> list[WorkloadRequest]:
    """The demo's workload: `multi_turn` with `DEMO_WORKLOAD`."""
    return multi_turn(sessions=sessions, turns=turns, seed=seed, **DEMO_WORKLOAD)  # type: ignore[arg-type]


async def run_policy(policy: str, args: argparse.Namespace, live: bool = False) -> tuple[DemoRow, list[RequestRecord]]:
    """One side of the comparison: a fresh fleet, pylb with `policy`, the workload, the counters."""
    workload = demo_workload(args.sessions, args.turns, args.seed)
    events = args.cache_state == "events"
    endpoints: dict[str, str] | None = {} if events else None
    try:
        block_size = load_profile(args.profile).block_size if events else 0
    except ValueError as exc:  # ProfileError
        raise RuntimeError(f"argument --profile: {exc}") from None
    with fake_fleet(args.replicas, args.speed, args.profile, endpoints) as backends, \
            pylb_proxy(backends, policy, endpoints, block_size) as (url, proc):
        await wait_ready(url, proc)
        hits0, queries0 = await prefix_cache_counters(backends)
        view = LiveView(policy, backends, url, len(workload)) if live else None
        drawing = asyncio.create_task(view.run()) if view else None
        try:
            result = await replay(workload, url, rate_scale=args.rate_scale, endpoint="chat",
                                  slo_ttft_s=args.slo_ttft, progress=not args.no_progress and not live, timeout_s=120.0)
        finally:
            if drawing is not None:
                drawing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drawing
        if view is not None:
            await view.draw()  # the last frame stays on screen
        hits1, queries1 = await prefix_cache_counters(backends)
        cache_line = await cache_summary(url)
        if cache_line is not None:
            print(f"pylb demo: {policy}: {cache_line}", file=sys.stderr, flush=True)
        predicted = await predicted_hit_rate(url)
    s = result.summary
    queries = queries1 - queries0
    row = DemoRow(
        policy=policy, requests=s.requests, completed=s.completed, errors=s.errors,
        hit_rate=(hits1 - hits0) / queries if queries > 0 else None,
        ttft_p50=s.ttft_p50, ttft_p90=s.ttft_p90, ttft_p99=s.ttft_p99, slo_attainment=s.slo_attainment, wall_s=s.wall_s,
        predicted_hit_rate=predicted, cache_state=args.cache_state,
    )
    return row, result.records


@dataclass(slots=True)
class ReplicaSample:
    """One replica in one frame of the live view."""

    running: int
    waiting: int
    hits: float  # prefix-cache hit tokens since the policy started
    queries: float


class LiveView:
    """Per-replica load and hit rate, redrawn in place while a policy runs (ANSI cursor moves,
    no curses): one line per replica, the replicas' own /metrics, and pylb's answered count."""

    BAR = 24

    def __init__(self, policy: str, backends: list[str], proxy_url: str, total: int, out: Any = None) -> None:
        self.policy = policy
        self.backends = backends
        self.proxy_url = proxy_url
        self.total = total
        self.out = out if out is not None else sys.stdout
        self.started = time.monotonic()
        self.base: dict[str, tuple[float, float]] = {}
        self.drawn = 0

    async def sample(self, session: aiohttp.ClientSession) -> tuple[int, list[ReplicaSample]]:
        """(requests pylb answered, one sample per replica), now."""
        reps = []
        for url in self.backends:
            async with session.get(f"{url}/metrics") as resp:
                m = parse_vllm_metrics(await resp.text())
            h0, q0 = self.base.setdefault(url, (m.prefix_cache_hits, m.prefix_cache_queries))
            reps.append(ReplicaSample(int(m.num_requests_running), int(m.num_requests_waiting),
                                      m.prefix_cache_hits - h0, m.prefix_cache_queries - q0))
        async with session.get(f"{self.proxy_url}/metrics") as resp:
            text = await resp.text()
        answered = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("pylb_requests_total{") and 'endpoint="chat"' in line)
        return int(answered), reps

    def render(self, elapsed_s: float, answered: int, reps: list[ReplicaSample]) -> list[str]:
        """The lines of one frame."""
        top = max([r.running + r.waiting for r in reps] + [1])
        lines = [f"{self.policy}: {elapsed_s:5.1f} s, {answered}/{self.total} requests answered"]
        for i, r in enumerate(reps, 1):
            busy = r.running + r.waiting
            fill = round(self.BAR * busy / top)
            hit = f"{100 * r.hits / r.queries:3.0f}%" if r.queries > 0 else "   -"
            lines.append(f"  replica {i}  {'#' * fill}{'.' * (self.BAR - fill)}  running {r.running:3d}  "
                         f"waiting {r.waiting:3d}  hit rate {hit}")
        return lines

    def show(self, lines: list[str]) -> None:
        """Write a frame over the previous one."""
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "".join(f"\x1b[2K{line}\n" for line in lines))
        self.out.flush()
        self.drawn = len(lines)

    async def draw(self) -> None:
        """Sample and show one frame (a failed read skips the frame)."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                answered, reps = await self.sample(session)
                self.show(self.render(time.monotonic() - self.started, answered, reps))

    async def run(self) -> None:
        """Redraw every LIVE_REFRESH_S until cancelled."""
        while True:
            await self.draw()
            await asyncio.sleep(LIVE_REFRESH_S)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{1000 * v:.0f}"


def format_table(rows: list[DemoRow], slo_ttft: float) -> str:
    """The side-by-side table the demo prints."""
    head = (f"{'policy':<12} {'requests':>8} {'errors':>6} {'hit rate':>9} {'TTFT P50 ms':>12} {'TTFT P90 ms':>12} "
            f"{'TTFT P99 ms':>12} {f'TTFT<={slo_ttft:g}s':>10}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.policy:<12} {r.requests:>8} {r.errors:>6} {_pct(r.hit_rate):>9} {_ms(r.ttft_p50):>12} "
                     f"{_ms(r.ttft_p90):>12} {_ms(r.ttft_p99):>12} {_pct(r.slo_attainment):>10}")
    for r in rows:
        if r.predicted_hit_rate is not None and r.hit_rate is not None:
            lines.append(f"{r.policy}: pylb predicted a {_pct(r.predicted_hit_rate)} hit rate at dispatch ({r.cache_state} cache state), "
                         f"the replicas counted {_pct(r.hit_rate)} ({100 * (r.predicted_hit_rate - r.hit_rate):+.1f} points)")
    return "\n".join(lines)


def verdict(a: DemoRow, b: DemoRow, slo_ttft: float) -> str:
    """One line comparing policy a with policy b, from the measured rows."""
    parts = []
    if a.ttft_p50 and b.ttft_p50:
        ratio = b.ttft_p50 / a.ttft_p50
        if math.isclose(ratio, 1, rel_tol=0.05):
            parts.append("the same median TTFT")
        else:
            parts.append(f"median TTFT {ratio:.1f}x lower" if ratio > 1 else f"median TTFT {1 / ratio:.1f}x higher")
    if a.slo_attainment is not None and b.slo_attainment is not None:
        d = 100 * (a.slo_attainment - b.slo_attainment)
        parts.append(f"{abs(d):.0f} points {'more' if d >= 0 else 'fewer'} requests within {slo_ttft:g} s")
    if a.hit_rate is not None and b.hit_rate is not None:
        parts.append(f"prefix-cache hit rate {100 * a.hit_rate:.0f}% against {100 * b.hit_rate:.0f}%")
    return f"{a.policy} against {b.policy}: " + ", ".join(parts) if parts else ""


def plot(rows: list[DemoRow], records: list[list[RequestRecord]], path: str, slo_ttft: float) -> None:
    """Save a PNG: each policy's TTFT distribution (left) and hit rate and SLO attainment (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    try:
        for row, recs in zip(rows, records):
            ttfts = sorted(r.ttft_s for r in recs if r.ok and r.ttft_s is not None)
            if ttfts:
                left.step(ttfts, [100 * (i + 1) / len(ttfts) for i in range(len(ttfts))], where="post", label=row.policy)
        left.axvline(slo_ttft, color="grey", linestyle="--", linewidth=1, label=f"target {slo_ttft:g} s")
        left.set_xlabel("time to first token (s)")
        left.set_ylabel("requests with a smaller TTFT (%)")
        left.set_ylim(0, 101)
        left.grid(True, alpha=0.3)
        left.legend(loc="lower right")
        x = range(len(rows))
        width = 0.38
        right.bar([i - width / 2 for i in x], [100 * (r.hit_rate or 0) for r in rows], width, label="prefix-cache hit rate")
        right.bar([i + width / 2 for i in x], [100 * (r.slo_attainment or 0) for r in rows], width, label=f"TTFT <= {slo_ttft:g} s")
        right.set_xticks(list(x), [r.policy for r in rows])
        right.set_ylabel("%")
        right.set_ylim(0, 125)
        right.set_yticks(range(0, 101, 20))
        right.legend(loc="upper center", fontsize="small", ncol=2)
        fig.suptitle("pylb demo: the same chat workload through pylb, per routing policy")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)


async def _main(args: argparse.Namespace, policies: list[str]) -> tuple[list[DemoRow], list[list[RequestRecord]]]:
    rows, records = [], []
    live = not args.no_progress and sys.stdout.isatty()
    for policy in policies:
        print(f"pylb demo: {policy}: {args.replicas} fake vLLM replicas ({args.profile}), pylb serve --policy {policy}, "
              f"{args.sessions} sessions x {args.turns} turns at rate scale {args.rate_scale:g}", file=sys.stderr, flush=True)
        row, recs = await run_policy(policy, args, live=live)
        rows.append(row)
        records.append(recs)
    return rows, records


def run(args: argparse.Namespace) -> int:
    """Run `pylb demo`; 0 when every side ran, 1 when a part failed to start, 2 for bad arguments."""
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies:
        print(f"pylb demo: error: argument --policies: no policy named in {args.policies!r}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("pylb demo: error: argument --plot: matplotlib is not installed (pip install 'pylb[plot]')", file=sys.stderr)
            return 2
    try:
        rows, records = run_async(_main(args, policies))
    except RuntimeError as exc:
        print(f"pylb demo: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(format_table(rows, args.slo_ttft))
    if len(rows) >= 2:
        print(verdict(rows[0], rows[1], args.slo_ttft))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "args": {k: v for k, v in vars(args).items() if not k.startswith("_")}}, f, indent=2)
    if args.plot:
        plot(rows, records, args.plot, args.slo_ttft)
        print(f"plot: {args.plot}")
    return 0
