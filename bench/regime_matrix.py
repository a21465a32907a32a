"""The regime matrix: every policy's capacity over workloads x hardware profiles x fleet sizes.

Design
------
A *cell* is (workload, profile, fleet size). For each cell this script reports:

* each policy's effective request capacity: the highest offered rate (qps) at which at least
  90 % of requests get their first token within the cell's SLO (`CELL_SLO`: 5 s on the GPU
  profiles, 0.5 s on the calibrated CPU vLLM profile, the side-by-side harness's SLO; where not
  even 90 % of the requests could meet it with no queue ahead of them (their own prefill on a
  working replica, its loaded request overhead included), twice that TTFT of the 90th
  percentile request, `cell_slo`), found by
  a galloping search on the rate scale (`capacity`): from a start, steps up (or down) by a
  factor that squares after each passing (failing) step until the outcome flips, then bisects
  down to a factor 1 + `--tolerance`; the policies of a cell after the first start at the first
  one's capacity, so near-equal policies cost two or three runs each;
* the two limits of `bench/capacity_bound.py` that hold for any placement: the work bound
  (replicas / mean replica-seconds of work per request, at 100 % utilisation) with one
  never-forgetting cache and with one LRU cache of the fleet's total KV size, and the SLO bound
  (the share of requests whose TTFT on an idle replica is within the SLO, never-forgetting cache);
* the prefix-cache hit rate (token-weighted, leading-prefix match in the engine's blocks, capped
  at prompt - 1 like vLLM) of one LRU cache of the fleet's total size, and of an unbounded one:
  what a router that made the fleet act as one cache would reach.

Workloads (`WORKLOADS`), each built for a request count and for a GPU or the CPU profile (the CPU
replicas have a 2,048-token context and 4,420 tokens of KV, so token counts are scaled down there):

    mooncake  the Mooncake conversation trace, first N requests (CPU: bench/peers' mooncake-scaled,
              token counts / 16)
    azure     the Azure conversation trace, first N requests: bursts and a length mix, no reuse
              (CPU: token counts / 8, prompts cut at 896)
    chat      `synthetic:sessions`: chats of ~4 turns, 20 s apart, under 8 Zipf-popular system prompts
    agent     `synthetic:sessions`: 70 % tool-agent loops (12 steps, 2 s apart) under a two-level
              shared prefix (system prompt, then tool specification)
    long      `synthetic:sessions`: ~12k-token documents, re-asked 3 times a minute apart, under a
              two-level prefix (the "unseen trace" regime of issue 10: long prompts, heavy reuse)

N: enough requests to last `--span` seconds (60) at the cell's never-forgetting work bound, at
least `--min-requests` and at most `--max-requests` (the CPU budget); the search never goes above
twice that bound (a pass there would only mean a workload too short to load the fleet). Policy
specs may carry `+admitF` (admission_factor F), `+decoding` / `+intercept` (a term of the TTFT
model: `prefill_decoding` / `prefill_intercept`), `#K` (a K-token key block, `key_block_tokens`)
and `@S` (the router told an S-second SLO instead of the cell's), e.g. `dualmap+admit1`,
`dualmap+decoding`, `dualmap#128` or `dualmap@5`.

Usage (from the repository root; the full matrix takes hours of one core, so pick cells):

    nice -n 10 .venv/bin/python bench/regime_matrix.py --out docs/results/regime_matrix.json \\
        [--workloads mooncake,chat] [--profiles h100-llama3.1-8b] [--replicas 2,8] \\
        [--policies dualmap,weighted-score,...] [--tolerance 0.1] [--max-runs 6]
    .venv/bin/python bench/regime_matrix.py --table docs/results/regime_matrix.json [AFTER.json ...]

The results file is rewritten after every cell (a stopped run keeps its finished cells) and
records the command, the load average and every run. `--table` prints the Markdown table of one
or more results files: per cell, dualmap's capacity against the best other policy's, with the
bounds and the cache hit rates; a later file's cells replace an earlier file's policies
(e.g. a run of dualmap alone after a change, over a full run before it). The table's capacities
are interpolated: where attainment crosses 90 % between the highest passing run and the lowest
failing one above it (`interpolated_capacity`), which separates policies the search's steps
would tie. A cell whose best capacity reaches the never-forgetting work bound is marked
"short": its workload ends before the queues settle, so it measures a transient, not a capacity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pylb.router import registry
from pylb.router.interface import RouterOptions
from pylb.sim.cluster import SimRequest, prepare_workload, simulate
from pylb.sim.profiles import Profile, load_profile
from pylb.sim.report import DEFAULT_SLO_TARGET, RunMetrics, meets_slo, summarize
from pylb.workload.loaders import load_workload
from pylb.workload.synthetic import sessions, text_of
from pylb.workload.types import WorkloadRequest

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))
from capacity_bound import decode_work, idle_ttft, prefill_work  # noqa: E402
from workloads import mooncake_scaled  # type: ignore[import-not-found]  # noqa: E402

TRACES = "../shared/traces"
"""Default folder of the two traces (`--traces`)."""
MOONCAKE = "mooncake_conversation_trace.jsonl"
AZURE = "AzureLLMInferenceTrace_conv.csv"
CPU_PROFILE = "cpu-small-llama"
FLEET_CPU_PROFILE = "cpu-small-llama-fleet"
"""The CPU profile slowed to the side-by-side harness's loaded fleet (`bench/fidelity.py`): its
cells are built and judged as the CPU profile's."""
AVX2_FLEET_PROFILE = "cpu-small-llama-avx2-fleet"
"""The same replica pair on the 3x slower AVX2-only machine, fitted to its real runs: CPU cells too."""
CPU_MAX_PROMPT = 896
"""Prompt cap on the CPU profile (simulated tokens; the harness's: ~1,700 real tokens of 2,048)."""

CPU_PROFILES = (CPU_PROFILE, FLEET_CPU_PROFILE, AVX2_FLEET_PROFILE)
"""The profiles whose cells use the CPU-scaled workloads (`is_cpu`)."""

CELL_SLO = {"h100-llama3.1-8b": 5.0, "dualmap-910b": 5.0, **dict.fromkeys(CPU_PROFILES, 0.5)}
"""TTFT SLO of each profile's cells (seconds); the router is told the same SLO."""

DEFAULT_POLICIES = ("dualmap", "weighted-score", "min-ttft", "preble-e2", "cache-aware")
"""The policies run in every cell: pylb's default and the strongest baselines of BENCHMARKS.md."""


def _scaled_plain(requests: list[WorkloadRequest], divide: int, max_prompt: int, max_output: int) -> list[WorkloadRequest]:
    """Requests without shared text (Azure), token counts divided by `divide` and capped."""
    out = []
    for r in requests:
        tokens = min(max_prompt, max(1, -(-r.prompt_tokens // divide)))
        out.append(
            WorkloadRequest(
                request_id=r.request_id,
                arrival_s=r.arrival_s,
                prompt_tokens=tokens,
                output_tokens=min(max_output, max(1, r.output_tokens // divide)),
                make_text=text_of(((r.request_id, tokens),)),
            )
        )
    return out


def _sessions_scaled(divide: int, **kw: Any) -> Callable[[int], list[WorkloadRequest]]:
    """A `sessions` workload with every token count divided by `divide` (1 on GPUs)."""
    tokens = ("prompt_tokens", "shared_tokens", "append_tokens", "output_tokens", "agent_append_tokens", "agent_output_tokens")

    def build(n: int) -> list[WorkloadRequest]:
        args = {k: (max(1, v // divide) if k in tokens else v) for k, v in kw.items()}
        if divide > 1:
            args["max_prompt_tokens"] = CPU_MAX_PROMPT
        return sessions(requests=n, **args)

    return build


CHAT = dict(prompt_tokens=512, shared_depth=1, shared_tokens=1024, fanout=8, reuse_share=0.7, turns=4.0,
            think_time_s=20.0, append_tokens=256, output_tokens=256)  # fmt: skip
AGENT = dict(prompt_tokens=1024, shared_depth=2, shared_tokens=2048, fanout=6, reuse_share=0.2, turns=4.0,
             agent_share=0.7, agent_turns=12.0, agent_think_s=2.0, agent_append_tokens=256, agent_output_tokens=64,
             output_tokens=256)  # fmt: skip
LONG = dict(prompt_tokens=12000, prompt_sigma=1.0, shared_depth=2, shared_tokens=1536, fanout=16, reuse_share=0.6,
            turns=3.0, think_time_s=60.0, append_tokens=512, output_tokens=300)  # fmt: skip


def build_workload(name: str, n: int, cpu: bool, traces: str = TRACES) -> list[WorkloadRequest]:
    """Workload `name` with `n` requests, scaled for the CPU profile when `cpu`."""
    if name == "mooncake":
        path = os.path.join(traces, MOONCAKE)
        if cpu:
            return list(mooncake_scaled(path, requests=n, scale=16, max_prompt_tokens=CPU_MAX_PROMPT, max_output_tokens=64))
        return load_workload(path, limit=n)
    if name == "azure":
        reqs = load_workload(os.path.join(traces, AZURE), limit=n)
        return _scaled_plain(reqs, 8, CPU_MAX_PROMPT, 64) if cpu else reqs
    params = {"chat": CHAT, "agent": AGENT, "long": LONG}[name]
    divide = (16 if name == "long" else 8) if cpu else 1
    return _sessions_scaled(divide, rate=1.0, **params)(n)


WORKLOADS = ("mooncake", "azure", "chat", "agent", "long")


# ---- bounds and single-cache hit rates ---------------------------------------------------------


def cache_hits(workload: list[SimRequest], block_size: int, capacity_blocks: float) -> np.ndarray:
    """Per request, the prompt tokens one LRU prefix cache of `capacity_blocks` engine blocks
    (math.inf: never forgets) would hit, in arrival order; leading-prefix match, capped at P - 1."""
    cache: OrderedDict[int, None] = OrderedDict()
    hits = np.zeros(len(workload))
    order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
    for i in order:
        r = workload[i]
        matched = 0
        for h in r.engine_hashes.tolist():
            if h in cache:
                matched += 1
            else:
                break
        for h in r.engine_hashes.tolist():
            cache[h] = None
            cache.move_to_end(h)
        while len(cache) > capacity_blocks:
            cache.popitem(last=False)
        hits[i] = min(matched * block_size, r.prompt_tokens - 1)
    return hits


def bounds(workload: list[SimRequest], profile: Profile, replicas: int, slo: float) -> dict[str, float]:
    """Work bounds, SLO bound and single-cache hit rates of one cell (see the module comment)."""
    prompt = np.array([r.prompt_tokens for r in workload], float)
    output = np.array([max(1, r.output_tokens) for r in workload], float)
    inf_hit = cache_hits(workload, profile.block_size, math.inf)
    fleet_hit = cache_hits(workload, profile.block_size, replicas * profile.num_blocks)
    dec = decode_work(profile, prompt, output)

    def work_bound(hit: np.ndarray) -> float:
        return replicas / float(np.mean(dec + prefill_work(profile, prompt, hit)))

    span = max(r.arrival_s for r in workload) - min(r.arrival_s for r in workload)
    return {
        "trace_rate": (len(workload) - 1) / span if span > 0 else math.nan,
        "hit_infinite_cache": float(inf_hit.sum() / prompt.sum()),
        "hit_fleet_cache": float(fleet_hit.sum() / prompt.sum()),
        "work_bound_no_cache": work_bound(np.zeros_like(prompt)),
        "work_bound_fleet_cache": work_bound(fleet_hit),
        "work_bound_infinite_cache": work_bound(inf_hit),
        "slo_bound": float(np.mean(idle_ttft(profile, prompt, inf_hit) <= slo)),
    }


# ---- capacity search ---------------------------------------------------------------------------


def capacity(run_at: Callable[[float], RunMetrics], start: float, tolerance: float, max_runs: int,
             first_step: float, max_scale: float = math.inf) -> tuple[float, float | None, list[RunMetrics]]:  # fmt: skip
    """Galloping search for the highest passing rate scale (see the module comment).
    Returns (capacity qps, its scale or None, the runs in order)."""
    runs: list[RunMetrics] = []

    def ok(scale: float) -> bool:
        m = run_at(scale)
        runs.append(m)
        return meets_slo(m, DEFAULT_SLO_TARGET)

    lo: float | None = None
    hi: float | None = None
    step = first_step
    if ok(start):
        lo = start
        # up by a growing step; the last step stops at the ceiling itself, so a policy that passes
        # everything is found there (a "short" cell) and not wherever its step overshot it
        while len(runs) < max_runs and lo < max_scale:
            nxt = min(lo * step, max_scale)
            if ok(nxt):
                lo = nxt
                step *= step
            else:
                hi = nxt
                break
    else:
        hi = start
        while len(runs) < max_runs:
            if ok(hi / step):
                lo = hi / step
                break
            hi /= step
            step *= step
            if hi < 1e-4:
                break
    while lo is not None and hi is not None and len(runs) < max_runs and hi / lo > 1 + tolerance:
        mid = math.sqrt(lo * hi)
        if ok(mid):
            lo = mid
        else:
            hi = mid
    passing = [(m.qps, m.rate_scale) for m in runs if meets_slo(m, DEFAULT_SLO_TARGET)]
    if not passing:
        return 0.0, None, runs
    qps, scale = max(passing)
    return qps, scale, runs


# ---- the matrix --------------------------------------------------------------------------------


def _write(path: str, doc: dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".regime.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    os.replace(tmp, path)


def is_cpu(profile: Profile) -> bool:
    """Whether the cells of `profile` use the CPU-scaled workloads (the CPU profiles)."""
    return profile.name in CPU_PROFILES


def cell_slo(workload_name: str, profile: Profile, args: argparse.Namespace) -> float:
    """The profile's SLO (`CELL_SLO`), unless fewer than 90 % of the workload's requests could
    meet it even with no queue ahead of them and a never-forgetting cache (no policy could pass):
    then twice that TTFT of the 90th percentile request, rounded up to 0.1 s. "No queue" is
    priced as on a replica that is working (a capacity is measured where replicas are busy): the
    request's own prefill plus the profile's `busy_request_overhead`, on a profile with a loaded
    overhead (`cpu-small-llama-fleet`: 300 ms, so a 0.5 s SLO leaves ~0.2 s for prefill and
    queueing, and the share within it barely moves with load: measured, BENCHMARKS.md)."""
    if getattr(args, "slo", None):
        return float(args.slo)
    slo = CELL_SLO.get(profile.name, 5.0)
    pilot = prepare_workload(build_workload(workload_name, args.min_requests, is_cpu(profile), args.traces), profile.block_size)
    prompt = np.array([r.prompt_tokens for r in pilot], float)
    ttft = idle_ttft(profile, prompt, cache_hits(pilot, profile.block_size, math.inf), profile.busy_request_overhead)
    if float(np.mean(ttft <= slo)) >= DEFAULT_SLO_TARGET:
        return slo
    return math.ceil(20 * float(np.percentile(ttft, 100 * DEFAULT_SLO_TARGET))) / 10


TTFT_MODEL_MARKS = {"intercept": "prefill_intercept", "decoding": "prefill_decoding"}
"""Policy spec marks that switch on a term of the router's TTFT model (`RouterOptions`)."""


def policy_spec(spec: str, slo: float) -> tuple[str, RouterOptions]:
    """A matrix policy spec as (the registry's spec, the router's options) in a cell whose SLO is
    `slo`: `NAME[+admitF][+decoding][+intercept][#K][@S]`, e.g. "dualmap+admit1"
    (admission_factor 1), "dualmap+decoding" (prefill_decoding), "dualmap#128" (128-token key
    blocks), "dualmap@5" (told a 5 s SLO instead of the cell's). Without +admitF a policy runs
    without admission control (admission_factor 0, whatever the router's default): the matrix
    compares placements, as the peer routers deploy them (refusing nothing)."""
    label, _, router_slo = spec.partition("@")
    label, _, key_block = label.partition("#")
    label, *marks = label.split("+")
    admission = [m.removeprefix("admit") for m in marks if m.startswith("admit")]
    unknown = [m for m in marks if not m.startswith("admit") and m not in TTFT_MODEL_MARKS]
    if unknown:
        raise ValueError(f"policy spec {spec!r}: unknown +{unknown[0]} (known: +admitF, {', '.join('+' + m for m in TTFT_MODEL_MARKS)})")
    options = RouterOptions(slo_ttft=float(router_slo) if router_slo else slo, seed=0,
                            admission_factor=float(admission[-1]) if admission else 0.0,
                            **{TTFT_MODEL_MARKS[m]: True for m in marks if m in TTFT_MODEL_MARKS},
                            **({"key_block_tokens": int(key_block)} if key_block else {}))  # fmt: skip
    return label, options


def run_cell(workload_name: str, profile: Profile, replicas: int, policies: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every policy's capacity in one cell, with the cell's bounds."""
    cpu = is_cpu(profile)
    slo = cell_slo(workload_name, profile, args)
    # size: enough requests to last `--span` seconds at the never-forgetting work bound (sized
    # on a pilot of --min-requests), within --min-requests and --max-requests
    pilot = prepare_workload(build_workload(workload_name, args.min_requests, cpu, args.traces), profile.block_size)
    n = min(args.max_requests, max(args.min_requests, int(args.span * bounds(pilot, profile, replicas, slo)["work_bound_infinite_cache"])))
    work = pilot if n == args.min_requests else prepare_workload(build_workload(workload_name, n, cpu, args.traces), profile.block_size)
    del pilot
    cell: dict[str, Any] = {"workload": workload_name, "profile": profile.name, "replicas": replicas, "slo_ttft": slo,
                            "requests": len(work), **bounds(work, profile, replicas, slo), "policies": {}}  # fmt: skip
    # first guess: half the never-forgetting work bound, as a rate scale of the workload; no
    # search above twice that bound (a pass there means the workload is too short to load the fleet)
    start = 0.5 * cell["work_bound_infinite_cache"] / cell["trace_rate"]
    max_scale = 2 * cell["work_bound_infinite_cache"] / cell["trace_rate"]
    first_step = 1.25
    for spec in policies:
        label, options = policy_spec(spec, slo)
        extras: dict[float, dict[str, Any]] = {}

        def run_at(scale: float, label: str = label, options: RouterOptions = options, spec: str = spec) -> RunMetrics:
            router = registry.create(label, options)
            result = simulate(work, profile, replicas, router, rate_scale=scale)
            m = summarize(result, spec, slo)
            extras[scale] = {"ttft_prediction_error": router.ttft_prediction_error(), "rejected": int(result.rejected.sum())}
            print(f"  {spec:28s} x{scale:8.3f} {m.qps:8.2f} qps  {100 * m.slo_attainment:5.1f} % in SLO  "
                  f"hit {100 * m.hit_rate:5.1f} %  ({m.wall_s:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
            return m

        t0 = time.perf_counter()
        qps, scale, runs = capacity(run_at, start, args.tolerance, args.max_runs, first_step, max_scale)
        at = next((m for m in runs if m.rate_scale == scale), None)
        cell["policies"][spec] = {
            "capacity": qps,
            "hit_rate_at_capacity": at.hit_rate if at else None,
            "hotspot_at_capacity": at.hotspot_factor if at else None,
            "wall_s": time.perf_counter() - t0,
            "ttft_prediction_error_at_capacity": extras[scale]["ttft_prediction_error"] if scale is not None else None,
            "runs": [{**m.to_json(), **extras[m.rate_scale]} for m in runs],
        }
        if scale is not None and spec == policies[0]:
            start, first_step = scale, 1 + 2 * args.tolerance
        print(f"{workload_name} x {profile.name} x {replicas}: {spec} {qps:.2f} qps", file=sys.stderr, flush=True)
    return cell


def run_matrix(args: argparse.Namespace) -> None:
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for p in policies:
        registry.parse_spec(policy_spec(p, 1.0)[0])  # fail early on a bad name
    doc: dict[str, Any] = {
        "command": "python " + " ".join(shlex.quote(a) for a in ["bench/regime_matrix.py", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average_start": os.getloadavg(),
        "slo_target": DEFAULT_SLO_TARGET,
        "status": "running",
        "cells": [],
    }
    for w in args.workloads.split(","):
        for prof in args.profiles.split(","):
            profile = load_profile(prof)
            for n in (int(x) for x in args.replicas.split(",")):
                print(f"cell {w} x {prof} x {n}", file=sys.stderr, flush=True)
                doc["cells"].append(run_cell(w, profile, n, policies, args))
                doc["load_average_now"] = os.getloadavg()
                _write(args.out, doc)
    doc["status"] = "complete"
    doc["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    _write(args.out, doc)


# ---- the table ---------------------------------------------------------------------------------


def merged_cells(paths: list[str]) -> list[dict[str, Any]]:
    """Cells of several results files; a later file's policies replace an earlier file's, and a
    later cell with another SLO (a re-run after `cell_slo` changed) replaces the whole cell."""
    cells: dict[tuple, dict[str, Any]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for c in json.load(fh)["cells"]:
                key = (c["workload"], c["profile"], c["replicas"])
                if key in cells and cells[key]["slo_ttft"] == c["slo_ttft"]:
                    cells[key]["policies"].update(c["policies"])
                else:
                    cells[key] = c
    return list(cells.values())


def interpolated_capacity(policy: dict[str, Any]) -> float:
    """The rate at which attainment crosses 90 %, interpolated linearly between the highest
    passing run and the lowest failing run above it (finer than the search's steps; the same
    number as `capacity` when no run failed above it)."""
    runs = sorted(policy["runs"], key=lambda r: r["qps"])
    passing = [r for r in runs if r["slo_attainment"] >= DEFAULT_SLO_TARGET]
    if not passing:
        return 0.0
    lo = max(passing, key=lambda r: r["qps"])
    above = [r for r in runs if r["qps"] > lo["qps"] and r["slo_attainment"] < DEFAULT_SLO_TARGET]
    if not above:
        return float(lo["qps"])
    hi = min(above, key=lambda r: r["qps"])
    f = (lo["slo_attainment"] - DEFAULT_SLO_TARGET) / (lo["slo_attainment"] - hi["slo_attainment"])
    return float(lo["qps"] + f * (hi["qps"] - lo["qps"]))


BEFORE_LABELS = ("dualmap:tie=ring", "dualmap")
"""dualmap's label in a `--before` file: the pre-change rule re-run as an option where a cell was re-run, else dualmap."""


def before_run(before: dict[tuple, dict[str, Any]], key: tuple, label: str | None = None) -> dict[str, Any] | None:
    """The cell `key`'s dualmap results in a `--before` file: under `label` when given, else
    under the first of `BEFORE_LABELS` present; None when the cell or the label is missing."""
    pol = before.get(key, {}).get("policies", {})
    return next((pol[k] for k in ((label,) if label else BEFORE_LABELS) if k in pol), None)


def verdict(c: dict[str, Any], best: float) -> str:
    """Why a cell does not count: "short" when the best capacity is at or above the never-forgetting
    work bound (the workload ends before queues settle: a transient, not a capacity), "none" when
    no policy passed."""
    if best <= 0:
        return "none"
    return "short" if best >= c["work_bound_infinite_cache"] else ""


def best_other(c: dict[str, Any]) -> tuple[str | None, float]:
    """(name, interpolated capacity) of the cell's best policy that is not a dualmap variant;
    (None, 0.0) when it has none."""
    caps = {k: interpolated_capacity(v) for k, v in c["policies"].items() if not k.startswith("dualmap")}
    return max(caps.items(), key=lambda kv: kv[1]) if caps else (None, 0.0)


def table(paths: list[str], baseline: list[str] | None = None, variant: str = "dualmap", before_label: str | None = None) -> str:
    """Markdown: per cell, `variant` (dualmap by default) against the best other policy (dualmap
    variants excluded) by interpolated capacity, and against `baseline`'s dualmap (labelled
    `before_label`, else one of `BEFORE_LABELS`) when given."""
    before = {(c["workload"], c["profile"], c["replicas"]): c for c in merged_cells(baseline)} if baseline else {}
    head = ["workload", "profile", "N", "SLO s", f"{variant} qps", "best other qps", "ratio", f"hit {variant}", "hit 1 cache",
            "work bound (1 cache / inf)", "SLO bound", "pred. err P50/P90 s", "note"]  # fmt: skip
    if before:
        head[5:5] = ["dualmap before", "ratio before"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in merged_cells(paths):
        pol = c["policies"]
        d = pol.get(variant)
        if d is None:
            continue
        name, best = best_other(c)
        best_name = name or "-"
        if name is None:
            best = math.nan
        mine = interpolated_capacity(d)
        ratio = mine / best if best > 0 else math.nan
        hit = d["hit_rate_at_capacity"]
        err = d.get("ttft_prediction_error_at_capacity")
        row = [c["workload"], c["profile"], str(c["replicas"]), f"{c['slo_ttft']:g}", f"{mine:.2f}",
               f"{best:.2f} ({best_name})", f"{ratio:.2f}", "-" if hit is None else f"{100 * hit:.1f} %",
               f"{100 * c['hit_fleet_cache']:.1f} %",
               f"{c['work_bound_fleet_cache']:.2f} / {c['work_bound_infinite_cache']:.2f}", f"{100 * c['slo_bound']:.0f} %",
               "-" if not err else f"{err[0]:.2f} / {err[1]:.2f}", verdict(c, max(best, mine))]  # fmt: skip
        if before:
            b = before_run(before, (c["workload"], c["profile"], c["replicas"]), before_label)
            bq = interpolated_capacity(b) if b else math.nan
            row[5:5] = [f"{bq:.2f}", f"{bq / best:.2f}" if best > 0 else "-"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot(paths: list[str], baseline: list[str] | None, out: str, variant: str = "dualmap", before_label: str | None = None) -> None:
    """Bar chart of `variant` (dualmap by default) / best other per valid cell (not short, not
    none): after (`paths`) and, with `baseline`, dualmap before."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before = {(c["workload"], c["profile"], c["replicas"]): c for c in merged_cells(baseline)} if baseline else {}
    labels, after_r, before_r = [], [], []
    for c in merged_cells(paths):
        pol = c["policies"]
        best = best_other(c)[1]
        if variant not in pol or verdict(c, max(best, interpolated_capacity(pol[variant]))) or best <= 0:
            continue
        key = (c["workload"], c["profile"], c["replicas"])
        short = c["profile"].removeprefix("dualmap-").split("-")[0] + ("-fit" if c["profile"].endswith("-fleet") else "")
        labels.append(f"{c['workload']} {short} x{c['replicas']}")
        after_r.append(interpolated_capacity(pol[variant]) / best)
        b = before_run(before, key, before_label)
        before_r.append(interpolated_capacity(b) / best if b else math.nan)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    x = np.arange(len(labels))
    if baseline:
        ax.bar(x - 0.2, before_r, 0.4, label="dualmap before", color="#bbbbbb")
    ax.bar(x + (0.2 if baseline else 0), after_r, 0.4, label="dualmap after", color="#3070b0")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.axhline(0.98, color="red", lw=0.8, ls="--", label="target 0.98")
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("capacity / best other policy")
    ax.set_title("Regime matrix: dualmap against the best other policy (cells that are not short)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="results JSON (rewritten after every cell)")
    ap.add_argument("--traces", default=TRACES, help=f"folder of the Mooncake and Azure traces (default {TRACES})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--profiles", default=",".join(CELL_SLO))
    ap.add_argument("--replicas", default="2,8,32")
    ap.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                    help="comma-separated policy specs; NAME@S tells the router an S-second SLO instead of the cell's")
    ap.add_argument("--slo", type=float, default=None, metavar="S",
                    help="judge every cell at an S-second SLO instead of `cell_slo`'s (e.g. where the profile's SLO sits on its TTFT floor)")
    ap.add_argument("--span", type=float, default=60.0, help="seconds of arrivals at the work bound a cell's workload should last")
    ap.add_argument("--min-requests", type=int, default=800)
    ap.add_argument("--max-requests", type=int, default=3000)
    ap.add_argument("--tolerance", type=float, default=0.1, help="stop bisecting within a factor 1+R")
    ap.add_argument("--max-runs", type=int, default=6, help="most runs per policy and cell")
    ap.add_argument("--table", nargs="+", metavar="RESULTS", help="print the Markdown table of results files")
    ap.add_argument("--before", nargs="+", metavar="RESULTS", help="with --table: dualmap's capacities before a change")
    ap.add_argument("--plot", metavar="OUT.png", help="with --table: also plot dualmap / best other per valid cell")
    ap.add_argument("--variant", default="dualmap", help="with --table (and --plot): the dualmap label compared (e.g. dualmap+admit1)")
    ap.add_argument("--before-variant", metavar="LABEL", help="with --before: dualmap's label in those files (default: dualmap:tie=ring, else dualmap)")
    args = ap.parse_args()
    if args.table:
        print(table(args.table, args.before, args.variant, args.before_variant))
        if args.plot:
            plot(args.table, args.before, args.plot, args.variant, args.before_variant)
        return
    if not args.out:
        ap.error("--out is required unless --table is given")
    for prof in args.profiles.split(","):
        load_profile(prof)
    run_matrix(args)


if __name__ == "__main__":
    main()
