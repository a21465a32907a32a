"""Side-by-side harness: real vLLM replicas (or fake ones), one router at a time, one workload.

Design
------
For one workload and a list of targets (routers with their settings), the harness starts N
replicas once, then for every repetition and every target, in alternating order (A B C, then
C B A, ...):

1. empties every replica's prefix cache (`POST /reset_prefix_cache`, verified once at start-up:
   a prompt that hit before the reset must miss after it; or a restart of the replicas);
2. waits for the replicas to be idle, starts the router in front of them and waits until ready;
3. reads each replica's `/metrics`, replays the workload through the router with pylb's open-loop
   replay client (`pylb.workload.replay`: TTFT from the client's clock, errors recorded), reads
   `/metrics` again once the replicas are idle, and stops the router;
4. records, from the outside only: SLO share (TTFT <= SLO over requests sent; errors are misses),
   TTFT percentiles, the prefix-cache hit rate from the replicas' own counters
   (delta `vllm:prefix_cache_hits_total` / delta `vllm:prefix_cache_queries_total`, summed),
   requests per replica (delta of `vllm:request_success_total`, every finish reason), the hotspot
   factor (busiest replica's requests / the mean), the achieved rate (completed requests per
   second of wall time), errors by kind, and the machine's load average (1-minute value at the
   start and end of the run, and the mean and max of 1-second samples during it); and, where the
   replicas export them, vLLM's own phases (`engine_phases`: mean queue, prefill and decode time
   and engine TTFT per request, engine steps, preemptions, the API servers' CPU seconds), which
   `bench/fidelity.py` compares with the simulated engines; and the CPU seconds the router's
   processes and the replay client took during the replay (`router_cpu_s`, `client_cpu_s`: on a
   machine whose cores the replicas use, a router's own CPU is taken from the engines); and for a
   pylb target, what it says of its own predictions at the end of the run (its `/metrics`): the
   fleet hit rate it predicted at dispatch (`predicted_hit_rate`, beside vLLM's counted one) and
   the P50 / P90 absolute error of its predicted against observed TTFT (`ttft_error_p50/p90`).

On a shared machine, `--nice -10` runs the replicas, the router and the client ahead of other
work (recorded in the results): their niceness and, because Linux shares the CPU fairly between
sessions whatever the niceness inside them, their sessions' autogroup niceness (run the harness
itself under `setsid` so that its own session holds nothing else). With `--lock FILE`, each measured run (and the replicas' start-up) holds an exclusive `flock`
on FILE, so others who take the same lock do not run on the shared cores at the same time; the
lock is released between runs. Everything the harness started is stopped by PID on exit,
Ctrl-C and errors included. Results: JSON with the exact command, the workload's description
(ideal hit rate of one unbounded cache included, and `engine_ideal`: the same in the replicas' own
tokens and blocks, unbounded and one LRU cache of the fleet's total size; `workloads.py`'s module
comment), every run and, per target, the mean and min-max of each measure; a Markdown table on stdout.

Usage (from the repository root; paths are examples):

    python bench/peers/run.py --replicas-kind vllm --replicas 2 \\
        --vllm-venv VENV --vllm-model MODEL_DIR [--serve-sh ../shared/vllm/serve.sh] \\
        --sglang-venv SGLANG_VENV --vllm-router-venv VLLM_ROUTER_VENV \\
        --workload 'synthetic:multi-turn:groups=8,sessions=96,turns=4,...' --slo-ttft 0.5 \\
        --target 'pylb=pylb' --target 'sglang-ca=sglang --policy cache_aware' \\
        --target 'vllmr-p2=vllm-router --policy power_of_two' --reps 3 --out bench/results/peers.json

pylb on vLLM's KV events (`router.cache_state: events`): give each replica its own event endpoint
and pylb the model's tokenizer (the harness hands pylb each replica's endpoint):

    python bench/peers/run.py ... --vllm-args "--num-gpu-blocks-override 256 --block-size 32 \\
        --prefix-caching-hash-algo sha256_cbor --kv-events-config \\
        '{\"enable_kv_cache_events\":true,\"publisher\":\"zmq\",\"endpoint\":\"ipc://{logs}/kv-{replica}.sock\"}'" \\
        --target 'pylb=pylb' --target 'pylb-events=pylb --router-cache-state events --kv-events-tokenizer {model} --kv-events-block-size 32'

The peer routers, each in its own virtual environment (any folders; pass them as below):

    python3 -m venv SGLANG_VENV && SGLANG_VENV/bin/pip install sglang-router==0.3.2
    python3 -m venv VLLM_ROUTER_VENV && VLLM_ROUTER_VENV/bin/pip install vllm-router==0.1.17

and real vLLM with `../shared/vllm/install.sh VENV MODEL_DIR`. Locations can also come from the environment: PYLB_VLLM_VENV, PYLB_VLLM_MODEL, PYLB_VLLM_SERVE,
PYLB_SGLANG_ROUTER_VENV, PYLB_VLLM_ROUTER_VENV, PYLB_PEERS_LOCK. `--replicas-kind fake` uses `pylb sim-replicas`
instead of vLLM (no vLLM needed; the smoke test does that).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import os
import platform
import shlex
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from pylb.fleet.scrape import parse_vllm_metrics
from pylb.workload.replay import fetch_model, replay

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import FakeFleet, Fleet, Procs, RouterPaths, Target, VllmConfig, VllmFleet, start_router  # noqa: E402
from workloads import describe, engine_ideal, load  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VLLM_ARGS = "--num-gpu-blocks-override 256 --block-size 32"
MEASURES = ("slo_attainment", "hit_rate", "ttft_p50", "ttft_p90", "ttft_p99", "hotspot", "request_throughput",
            "errors", "load_avg_mean", "router_cpu_s", "client_cpu_s", "predicted_hit_rate", "ttft_error_p50", "ttft_error_p90")  # fmt: skip
# what a pylb target says of its own predictions (its /metrics at the end of a run), as record keys
PYLB_VIEW = {"predicted_hit_rate": ("pylb_predicted_prefix_cache_hit_rate", {"replica": "fleet"}),
             "ttft_error_p50": ("pylb_ttft_prediction_error_seconds", {"quantile": "0.5"}),
             "ttft_error_p90": ("pylb_ttft_prediction_error_seconds", {"quantile": "0.9"}),
             # its routing decisions by branch: which of its mechanisms acted in the run
             **{f"decisions_{b.replace('-', '_')}": ("pylb_decisions_total", {"branch": b})
                for b in ("affinity", "load", "slo-switch", "spill", "migration", "retry", "fallback")}}  # fmt: skip


# ---- the machine -----------------------------------------------------------------------------------

# The CPU extensions that decide how fast vLLM's CPU backend runs this model: its bfloat16 matmuls
# need avx512_bf16 or amx_bf16, and without them take a slow path. Measured on a 2-core AVX2-only
# AMD EPYC (BENCHMARKS.md, "Side by side on real vLLM"): uncached prefill cost 5.1 ms per prompt
# token in bfloat16 (`../shared/vllm/serve.sh`'s dtype; `pylb calibrate`) and 1.05 ms with
# `--dtype float32` (a 1,287-token prompt in 1.35 s), against 0.20 ms in bfloat16 on the machine
# of the earlier runs. Results record which machine measured them.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
BF16_FEATURES = ("avx512_bf16", "amx_bf16")


def host_info(cpuinfo: str | None = None) -> dict[str, Any]:
    """The machine a run measured: cores, platform and, from `/proc/cpuinfo` (or the text given),
    the CPU model and which of `CPU_FEATURES` it has (both None where there is no cpuinfo)."""
    info: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform(), "cpu_model": None, "cpu_features": None}
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return info
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())  # the first processor's entry
    if "flags" in fields:
        flags = set(fields["flags"].split())
        info["cpu_features"] = [f for f in CPU_FEATURES if f in flags]
    info["cpu_model"] = fields.get("model name")
    return info


def bf16_note(host: dict[str, Any], vllm_args: list[str]) -> str | None:
    """A warning for replicas that will run bfloat16 on a CPU without native bfloat16 matmuls
    (no `--dtype` in the replicas' arguments, so serve.sh's bfloat16 applies), else None."""
    features = host.get("cpu_features")
    if features is None or any(f in features for f in BF16_FEATURES):
        return None
    if any(a == "--dtype" or a.startswith("--dtype=") for a in vllm_args):
        return None
    return (f"note: this CPU ({host.get('cpu_model') or 'unknown'}) has neither {' nor '.join(BF16_FEATURES)}: "
            "vLLM's bfloat16 takes a slow path here (prefill about 5x slower than float32); "
            "add --dtype float32 to --vllm-args to measure faster replicas")  # fmt: skip


# ---- replicas' counters ---------------------------------------------------------------------------


ENGINE_PHASES = {
    "queue": "vllm:request_queue_time_seconds",
    "prefill": "vllm:request_prefill_time_seconds",
    "decode": "vllm:request_decode_time_seconds",
    "ttft_engine": "vllm:time_to_first_token_seconds",
    "e2e_engine": "vllm:e2e_request_latency_seconds",
    "step_tokens": "vllm:iteration_tokens_total",
}
"""Histograms of vLLM's own per-request phases (and tokens per engine step) whose sums and counts the
harness records per replica: where a request's time went inside the engine (waiting, prefill, decode),
which the simulator's engine model must reproduce (`bench/fidelity.py` compares them)."""

ENGINE_COUNTERS = {"preemptions": "vllm:num_preemptions_total", "frontend_cpu_s": "process_cpu_seconds_total"}
"""Counters recorded beside them: preemptions, and the CPU seconds of the replica's API-server process."""


async def replica_counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """One replica's cumulative counters and current queue from its /metrics page: prefix-cache
    tokens, requests finished, and `<phase>_sum` / `<phase>_count` of each `ENGINE_PHASES` histogram
    and each `ENGINE_COUNTERS` value the page has (a fake replica lacks some)."""
    async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
        text = await resp.text()
    m = parse_vllm_metrics(text)
    out: dict[str, float] = {
        "hits": m.prefix_cache_hits,
        "queries": m.prefix_cache_queries,
        "prompt_tokens": m.prompt_tokens,
        "requests": 0.0,
        "busy": m.num_requests_running + m.num_requests_waiting,
    }
    wanted = {"vllm:request_success_total": "requests"}
    for key, hist in ENGINE_PHASES.items():
        wanted[f"{hist}_sum"], wanted[f"{hist}_count"] = f"{key}_sum", f"{key}_count"
    wanted.update({name: key for key, name in ENGINE_COUNTERS.items()})
    prefixes = tuple(wanted)
    lines = [line for line in text.splitlines() if line.startswith(prefixes)]
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key is not None:
                out[key] = out.get(key, 0.0) + sample.value
    return out


async def pylb_view(url: str) -> dict[str, float | None]:
    """pylb's own view of a run from its `/metrics`: the fleet hit rate it predicted at dispatch,
    the P50 / P90 absolute error of its TTFT predictions and its decisions by branch (`PYLB_VIEW`);
    None where absent."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            text = await resp.text()
    out: dict[str, float | None] = dict.fromkeys(PYLB_VIEW)
    names = {name for name, _ in PYLB_VIEW.values()}
    lines = [line for line in text.splitlines() if line.startswith(tuple(names))]
    for family in text_string_to_metric_families("\n".join(lines) + "\n"):
        for sample in family.samples:
            for key, (name, labels) in PYLB_VIEW.items():
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    out[key] = sample.value
    return out


def group_cpu_seconds(pgid: int) -> float | None:
    """User + system CPU seconds of every live process in process group `pgid` (a router and any
    children it started; the harness starts each router in its own group), from /proc; None
    where /proc cannot be read (not Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, seen = 0, False
    try:
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp ...
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])  # utime, stime
            seen = True
    return total / tick if seen else None


def engine_phases(per_replica: list[dict[str, float]]) -> dict[str, float | None]:
    """Fleet-wide means from per-replica counter deltas: seconds per request in each vLLM phase
    (queue, prefill, decode, engine TTFT and E2E), tokens per engine step, engine steps,
    preemptions and the API servers' CPU seconds; None where no replica reported it."""
    out: dict[str, float | None] = {}
    for key in ENGINE_PHASES:
        s = [r[f"{key}_sum"] for r in per_replica if f"{key}_sum" in r]
        c = [r[f"{key}_count"] for r in per_replica if f"{key}_count" in r]
        out[f"{key}_mean"] = sum(s) / sum(c) if c and sum(c) > 0 else None
    steps = [r["step_tokens_count"] for r in per_replica if "step_tokens_count" in r]
    out["engine_steps"] = sum(steps) if steps else None
    for key in ENGINE_COUNTERS:
        vals = [r[key] for r in per_replica if key in r]
        out[key] = sum(vals) if vals else None
    return out


async def snapshot(urls: list[str]) -> list[dict[str, float]]:
    async with aiohttp.ClientSession() as session:
        return [await replica_counters(session, url) for url in urls]


async def wait_idle(urls: list[str], timeout_s: float = 120.0) -> list[dict[str, float]]:
    """Poll until no replica has a request running or waiting; the last snapshot."""
    deadline = time.monotonic() + timeout_s
    while True:
        snap = await snapshot(urls)
        if all(s["busy"] == 0 for s in snap) or time.monotonic() > deadline:
            return snap
        await asyncio.sleep(0.5)


async def _probe(session: aiohttp.ClientSession, url: str, model: str, prompt: str) -> float:
    """Send one 1-token completion; the replica's prefix-cache hits it caused (tokens)."""
    before = (await replica_counters(session, url))["hits"]
    body = {"model": model, "prompt": prompt, "max_tokens": 1}
    async with session.post(f"{url}/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=120)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"probe to {url} answered {resp.status}: {(await resp.text())[:300]}")
        await resp.read()
    return (await replica_counters(session, url))["hits"] - before


async def verify_reset(fleet: Fleet, model: str) -> list[dict[str, float]]:
    """Check on every replica that a cache reset really empties the cache (and warm it up)."""
    from pylb.workload.synthetic import token_text

    out = []
    async with aiohttp.ClientSession() as session:
        for i in range(len(fleet.urls)):
            url = fleet.urls[i]
            prompt = token_text(f"peers-reset-probe-{i}-{time.time_ns()}", 300)
            first = await _probe(session, url, model, prompt)
            again = await _probe(session, url, model, prompt)
            await fleet.reset_caches()
            url = fleet.urls[i]  # a restart may move the replica
            after = await _probe(session, url, model, prompt)
            if again <= 0 or after > 0:
                raise RuntimeError(f"cache reset does not empty replica {i}'s cache: hits {first:g}, {again:g}, after reset {after:g}")
            out.append({"hits_first": first, "hits_repeat": again, "hits_after_reset": after})
    await fleet.reset_caches()
    return out


# ---- load average and lock ------------------------------------------------------------------------


class LoadSampler:
    """1-minute load average sampled every second while a run lasts."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            await asyncio.sleep(1.0)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@contextlib.contextmanager
def locked(path: str | None) -> Iterator[float]:
    """Hold an exclusive flock on `path` (when given); yields the seconds spent waiting for it."""
    if not path:
        yield 0.0
        return
    t0 = time.monotonic()
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield time.monotonic() - t0
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- one run --------------------------------------------------------------------------------------


async def run_one(target: Target, rep: int, args: argparse.Namespace, fleet: Fleet, procs: Procs,
                  paths: RouterPaths, workload: list, model: str) -> dict[str, Any]:  # fmt: skip
    """One target, one repetition, on fresh caches; the run's record."""
    with locked(args.lock) as lock_wait_s:
        await wait_idle(fleet.urls)
        await fleet.reset_caches()
        url, proc = await start_router(target, fleet, procs, paths, model=os.path.abspath(args.vllm_model) if args.vllm_model else "")
        try:
            before = await wait_idle(fleet.urls)
            sampler = LoadSampler()
            load_start = os.getloadavg()[0]
            sampler.start()
            router_cpu_start, client_cpu_start = group_cpu_seconds(proc.pid), time.process_time()
            started = datetime.now(timezone.utc).isoformat(timespec="seconds")
            result = await replay(workload, url, model=model, endpoint=args.endpoint, rate_scale=args.rate_scale,
                                  slo_ttft_s=args.slo_ttft, timeout_s=args.request_timeout, progress=not args.no_progress)  # fmt: skip
            await sampler.stop()
            router_cpu_end, client_cpu_s = group_cpu_seconds(proc.pid), time.process_time() - client_cpu_start
            load_end = os.getloadavg()[0]
            after = await wait_idle(fleet.urls)
            view = await pylb_view(url) if target.kind == "pylb" else dict.fromkeys(PYLB_VIEW)
        finally:
            procs.stop(proc)
    per_replica = [{k: a[k] - b[k] for k in a if k != "busy" and k in b} for a, b in zip(after, before)]
    hits = sum(r["hits"] for r in per_replica)
    queries = sum(r["queries"] for r in per_replica)
    reqs = [r["requests"] for r in per_replica]
    mean_reqs = sum(reqs) / len(reqs)
    s = result.summary
    record = {
        "target": target.name,
        "rep": rep,
        "started": started,
        "slo_attainment": s.slo_attainment,
        "hit_rate": hits / queries if queries else None,
        "ttft_p50": s.ttft_p50,
        "ttft_p90": s.ttft_p90,
        "ttft_p99": s.ttft_p99,
        "hotspot": max(reqs) / mean_reqs if mean_reqs else None,
        "request_throughput": s.request_throughput,
        "errors": s.errors,
        "errors_by_kind": s.errors_by_kind,
        "load_avg_start": load_start,
        "load_avg_end": load_end,
        "load_avg_mean": statistics.fmean(sampler.samples) if sampler.samples else load_end,
        "load_avg_max": max(sampler.samples, default=load_end),
        "lock_wait_s": lock_wait_s,
        # CPU the router and the replay client took during the replay: on a machine whose cores the
        # replicas use, a router's own CPU is taken from the engines
        "router_cpu_s": router_cpu_end - router_cpu_start if router_cpu_start is not None and router_cpu_end is not None else None,
        "client_cpu_s": client_cpu_s,
        **view,
        "per_replica": per_replica,
        "engine_phases": engine_phases(per_replica),
        "summary": asdict(s),
    }
    if args.keep_requests:
        record["requests"] = [asdict(r) for r in result.records]
    return record


async def measured_engine_ideal(urls: list[str], model: str, workload: list[Any]) -> dict[str, Any]:
    """The workload's ideal hit rates in the replicas' own tokens and blocks (`workloads.engine_ideal`),
    printed; a replica that cannot answer is recorded as the error, not a failed run."""
    try:
        ideal = await engine_ideal(urls, model, workload)
    except (ValueError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
        print(f"engine ideal not measured: {exc}", file=sys.stderr)
        return {"error": str(exc) or type(exc).__name__}
    print(f"engine ideal hit rate ({ideal['block_size']}-token blocks, the replicas' tokenizer): one unbounded cache "
          f"{ideal['unbounded'] * 100:.1f} %, one LRU cache of the fleet's {ideal['fleet_cache_blocks']} blocks "
          f"{ideal['fleet_cache'] * 100:.1f} %", file=sys.stderr)  # fmt: skip
    return ideal


def aggregate(runs: list[dict[str, Any]], targets: list[Target]) -> dict[str, dict[str, Any]]:
    """Per target and measure: mean, min and max over its repetitions (None values left out)."""
    out: dict[str, dict[str, Any]] = {}
    for t in targets:
        mine = [r for r in runs if r["target"] == t.name]
        stats: dict[str, Any] = {"spec": t.spec, "reps": len(mine)}
        for key in MEASURES:
            vals = [r[key] for r in mine if r.get(key) is not None]
            stats[key] = {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)} if vals else None
        phases: dict[str, float | None] = {}
        for key in sorted({k for r in mine for k in r.get("engine_phases", {})}):
            vals = [r["engine_phases"][key] for r in mine if r.get("engine_phases", {}).get(key) is not None]
            phases[key] = statistics.fmean(vals) if vals else None
        stats["engine_phases"] = phases
        out[t.name] = stats
    return out


def markdown_table(agg: dict[str, dict[str, Any]], slo_ttft: float) -> str:
    """The side-by-side table: mean (min-max) per target."""

    def cell(stat: dict[str, float] | None, scale: float, fmt: str) -> str:
        if stat is None:
            return "-"
        m, lo, hi = (stat[k] * scale for k in ("mean", "min", "max"))
        return f"{m:{fmt}} ({lo:{fmt}}-{hi:{fmt}})"

    head = (f"| target | reps | within SLO (TTFT <= {slo_ttft * 1000:g} ms) | prefix-cache hit (vLLM counters) | "
            "TTFT p50 ms | TTFT p99 ms | hotspot | achieved req/s | errors | load avg | router CPU s | "
            "pylb's predicted hit | pylb's TTFT error p50 / p90 ms |")  # fmt: skip
    lines = [head, "| " + " | ".join(["---"] * 13) + " |"]
    for name, s in agg.items():
        lines.append(
            f"| {name} | {s['reps']} | {cell(s['slo_attainment'], 100, '.1f')} % | {cell(s['hit_rate'], 100, '.1f')} % | "
            f"{cell(s['ttft_p50'], 1000, '.0f')} | {cell(s['ttft_p99'], 1000, '.0f')} | {cell(s['hotspot'], 1, '.2f')} | "
            f"{cell(s['request_throughput'], 1, '.2f')} | {cell(s['errors'], 1, '.0f')} | {cell(s['load_avg_mean'], 1, '.1f')} | "
            f"{cell(s.get('router_cpu_s'), 1, '.1f')} | {cell(s.get('predicted_hit_rate'), 100, '.1f')} % | "
            f"{cell(s.get('ttft_error_p50'), 1000, '.0f')} / {cell(s.get('ttft_error_p90'), 1000, '.0f')} |"
        )
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", required=True, metavar="SPEC", help="synthetic:NAME:k=v,..., mooncake-scaled:PATH:k=v,... or a trace path (see workloads.py)")
    p.add_argument("--target", action="append", required=True, metavar="NAME=KIND [ARGS]", help="a router: KIND pylb, sglang or vllm-router, then its flags; repeat")
    p.add_argument("--reps", type=int, default=1, help="repetitions; the target order alternates (default 1)")
    p.add_argument("--replicas", type=int, default=2, help="number of replicas (default 2)")
    p.add_argument("--replicas-kind", choices=("vllm", "fake"), default="vllm")
    p.add_argument("--vllm-venv", default=env("PYLB_VLLM_VENV"), help="vLLM's virtual environment ($PYLB_VLLM_VENV)")
    p.add_argument("--vllm-model", default=env("PYLB_VLLM_MODEL"), help="model folder ($PYLB_VLLM_MODEL)")
    p.add_argument("--serve-sh", default=env("PYLB_VLLM_SERVE", str(REPO.parent / "shared/vllm/serve.sh")),
                   help="replica start script ($PYLB_VLLM_SERVE; default ../shared/vllm/serve.sh beside the repository)")
    p.add_argument("--vllm-args", default=DEFAULT_VLLM_ARGS, help=f"extra vLLM flags per replica (default {DEFAULT_VLLM_ARGS!r})")
    p.add_argument("--restart-replicas", action="store_true", help="empty caches by restarting the replicas instead of POST /reset_prefix_cache")
    p.add_argument("--fake-args", default="", help="extra `pylb sim-replicas` flags (fake replicas)")
    p.add_argument("--sglang-venv", default=env("PYLB_SGLANG_ROUTER_VENV"), help="sglang-router's virtual environment ($PYLB_SGLANG_ROUTER_VENV)")
    p.add_argument("--vllm-router-venv", default=env("PYLB_VLLM_ROUTER_VENV"), help="vllm-router's virtual environment ($PYLB_VLLM_ROUTER_VENV)")
    p.add_argument("--slo-ttft", type=float, default=0.5, help="TTFT SLO in seconds (default 0.5)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--rate-scale", type=float, default=1.0, help="arrival times divided by this (default 1)")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per-request timeout, seconds (default 120)")
    p.add_argument("--lock", metavar="FILE", default=env("PYLB_PEERS_LOCK"), help="flock FILE around each measured run ($PYLB_PEERS_LOCK)")
    p.add_argument("--nice", type=int, default=0, help="niceness of the replicas, routers and the replay client "
                   "(negative: ahead of other work on a shared machine; needs root; default 0)")
    p.add_argument("--out", metavar="JSON", help="write the results here")
    p.add_argument("--log-dir", help="folder for the processes' logs (default: a new temporary folder)")
    p.add_argument("--keep-requests", action="store_true", help="also store every request's record in the JSON")
    p.add_argument("--no-progress", action="store_true")
    return p


async def main_async(args: argparse.Namespace, targets: list[Target], procs: Procs, command: str) -> dict[str, Any]:
    workload = load(args.workload)
    if not workload:
        raise ValueError(f"--workload {args.workload!r} has no requests")
    info = describe(args.workload, workload)
    if info["arrival_rate"]:
        info["offered_rate"] = info["arrival_rate"] * args.rate_scale  # what the replicas are offered
    print(f"workload: {info['requests']} requests, {info.get('offered_rate', 0):.2f} req/s over {info['arrival_span_s'] / args.rate_scale:.1f} s, "
          f"ideal hit rate (one unbounded cache) {info['ideal_hit_rate'] * 100:.1f} %", file=sys.stderr)  # fmt: skip
    paths = RouterPaths(args.sglang_venv, args.vllm_router_venv)
    host = host_info()
    if args.replicas_kind == "vllm":
        missing = [f for f, v in (("--vllm-venv", args.vllm_venv), ("--vllm-model", args.vllm_model)) if not v]
        if missing:
            raise ValueError(f"real vLLM replicas need {' and '.join(missing)} (or $PYLB_VLLM_VENV / $PYLB_VLLM_MODEL)")
        # absolute paths: the replicas start in a neutral folder, where a relative path means nothing
        config = VllmConfig(*(os.path.abspath(p) for p in (args.vllm_venv, args.vllm_model, args.serve_sh)), shlex.split(args.vllm_args))
        note = bf16_note(host, config.args)
        if note:
            print(note, file=sys.stderr)
        fleet: Fleet = VllmFleet(procs, args.replicas, config, restart=args.restart_replicas)
    else:
        fleet = FakeFleet(procs, args.replicas, shlex.split(args.fake_args))
    t0 = time.monotonic()
    with locked(args.lock):
        await fleet.start()
        async with aiohttp.ClientSession() as session:
            model = await fetch_model(session, fleet.urls[0], 30.0)
        reset_check = await verify_reset(fleet, model)
    print(f"{args.replicas} {args.replicas_kind} replicas up in {time.monotonic() - t0:.0f} s; cache reset "
          f"({fleet.reset_method}) verified", file=sys.stderr)  # fmt: skip
    info["engine_ideal"] = await measured_engine_ideal(fleet.urls, model, workload)
    runs = []
    for rep in range(args.reps):
        order = targets if rep % 2 == 0 else targets[::-1]
        for target in order:
            print(f"rep {rep + 1}/{args.reps}: {target.spec}", file=sys.stderr)
            run = await run_one(target, rep, args, fleet, procs, paths, workload, model)
            runs.append(run)
            print(f"  within SLO {run['slo_attainment'] * 100:.1f} %, hit {(run['hit_rate'] or 0) * 100:.1f} %, "
                  f"TTFT p50 {(run['ttft_p50'] or 0) * 1000:.0f} ms, hotspot {run['hotspot'] or 0:.2f}, "
                  f"errors {run['errors']}, load {run['load_avg_mean']:.1f}", file=sys.stderr)  # fmt: skip
    agg = aggregate(runs, targets)
    return {
        "command": command,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": host,
        "workload": info,
        "replicas": {"kind": args.replicas_kind, "count": args.replicas,
                     "args": args.vllm_args if args.replicas_kind == "vllm" else args.fake_args,
                     "cache_reset": fleet.reset_method, "cache_reset_check": reset_check, "model": model},  # fmt: skip
        "nice": args.nice,
        "slo_ttft_s": args.slo_ttft,
        "endpoint": args.endpoint,
        "rate_scale": args.rate_scale,
        "targets": agg,
        "runs": runs,
        "table": markdown_table(agg, args.slo_ttft),
    }


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # run the finally blocks that stop every process


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        targets = [Target.parse(t) for t in args.target]
    except ValueError as exc:
        parser.error(str(exc))
    if len({t.name for t in targets}) != len(targets):
        parser.error("--target names must be distinct")
    if args.reps < 1 or args.replicas < 1:
        parser.error("--reps and --replicas must be >= 1")
    command = shlex.join(["python", "bench/peers/run.py", *(argv if argv is not None else sys.argv[1:])])
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="pylb-peers-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"logs in {log_dir}", file=sys.stderr)
    procs = Procs(log_dir, nice=args.nice)
    if args.nice:  # the replay client measures TTFT: it must not wait for the CPU either (see procs.py)
        os.nice(args.nice)
        with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as fh:
            fh.write(str(args.nice))
    signal.signal(signal.SIGTERM, _terminate)
    try:
        results = asyncio.run(main_async(args, targets, procs, command))
    except KeyboardInterrupt:
        print("interrupted: stopping everything started", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(results["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
