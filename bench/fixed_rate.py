"""Two policy specs side by side at fixed rates over a regime matrix's cells (two dualmap
variants, or dualmap and the cell's best other policy), optionally on jittered copies too.

Design
------
A capacity found by bisection moves by a whole search step (3 %) when the share of requests
within the SLO crosses 90 % a little earlier or later, and on cells whose share is nearly flat in
the load (a tight SLO that even an idle replica barely meets) a fraction of a point moves it by
a fifth. So a routing change is confirmed here at fixed offered rates: for every cell of a
results file that has a capacity (`regime_matrix.verdict`), each spec runs at the same rates,
`--factors` times the best other policy's interpolated capacity (`regime_matrix.best_other`:
dualmap variants are not "other"), on the cell's own workload, SLO and fleet size. The simulator is
deterministic, so the two specs see the same arrivals; the difference of their SLO shares is
the change's effect at that rate. Printed per cell: each factor's shares (baseline / variant)
and the mean difference in points; `--out` keeps every run's share, hit rate and decisions by
branch (the files of the first runs, `fixed_rate_migrate_spare_*.json` and
`fixed_rate_tie_window_180_*.json`, hold the first two only).

A single run is not the whole story: near capacity a run is chaotic, and a change that moves a
few decisions early moves the share later by several points either way. `--seeds K` measures
that spread: each spec also runs on K copies of the workload whose arrivals are each moved by up
to `--jitter-s` seconds (of the run's own clock, never past half the gap to a neighbour, so the
order of arrivals and every conversation's turns stay as they were; `jittered`). The same copies
go to both specs, so the difference is paired per copy; printed are its mean over the K + 1
workloads, its standard deviation and how many the variant wins. The spec `best` is the cell's
best other policy (`regime_matrix.best_other`), so `--specs best,dualmap` asks whether dualmap's
gap to it is more than the spread; `--cells` keeps the named cells only.

The matrix sizes each cell's run to about a minute at its capacity (`regime_matrix.py`: 800 to
3,000 requests), so on a slow fleet a cell is the workload's first minute, while the caches
fill. `--requests N` runs every cell on N requests instead, to ask whether a gap holds on a
longer run.

Usage (from the repository root):

    .venv/bin/python bench/fixed_rate.py docs/results/regime_matrix_key_block_8.json \\
        --specs dualmap,dualmap:migrate_to=spare --factors 0.8,0.9,1.0,1.1 --out OUT.json
    .venv/bin/python bench/fixed_rate.py docs/results/regime_matrix_whole_key_block_8.json \\
        --specs best,dualmap --factors 1.0 --seeds 4 --cells azure/cpu-small-llama-fleet/8
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import regime_matrix as rm  # noqa: E402  (the sibling script)

from pylb.router import registry  # noqa: E402
from pylb.sim.cluster import SimRequest, prepare_workload, simulate  # noqa: E402
from pylb.sim.profiles import load_profile  # noqa: E402
from pylb.sim.report import summarize  # noqa: E402


BEST = "best"
"""The spec that names the cell's best other policy."""


def jittered(work: list[SimRequest], seed: int, jitter_s: float) -> list[SimRequest]:
    """`work` with each arrival moved by a uniform amount of at most `jitter_s` (in the
    workload's own seconds) and at most half the gap to its neighbours, so no two arrivals swap;
    seed 0 returns `work` itself."""
    if seed == 0:
        return work
    order = np.argsort([r.arrival_s for r in work], kind="stable")
    t = np.array([work[i].arrival_s for i in order], dtype=float)
    gap = np.diff(t) / 2
    room = np.minimum(np.append(gap, np.inf), np.insert(gap, 0, np.inf)) if len(t) > 1 else np.full(len(t), np.inf)
    moved = t + np.random.default_rng(seed).uniform(-1.0, 1.0, len(t)) * np.minimum(room, jitter_s)
    out = list(work)
    for i, at in zip(order.tolist(), moved.tolist()):
        out[i] = dataclasses.replace(work[i], arrival_s=max(0.0, at))
    return out


def compare_cell(cell: dict[str, Any], specs: list[str], factors: list[float], traces: str, seeds: int = 0,
                 jitter_s: float = 0.01, requests: int | None = None) -> dict[str, Any] | None:  # fmt: skip
    """Every spec's SLO share, hit rate and decisions at `factors` x the best other policy's capacity in
    `cell` (a merged regime-matrix cell), on the workload ("F|SPEC") and on `seeds` jittered
    copies of it ("F|SPEC|SEED"; `jitter_s` seconds of the run's clock); the spec `best` runs the
    cell's best other policy. The workload has the cell's own number of requests, or `requests`.
    None for a cell without a capacity."""
    name, best = rm.best_other(cell)
    if name is None or rm.verdict(cell, best):
        return None
    profile = load_profile(cell["profile"])
    count = cell["requests"] if requests is None else requests
    work = prepare_workload(rm.build_workload(cell["workload"], count, rm.is_cpu(profile), traces), profile.block_size)
    slo = cell["slo_ttft"]
    runs: dict[str, list[Any]] = {}
    for f in factors:
        scale = f * best / cell["trace_rate"]
        for seed in range(seeds + 1):
            copy = jittered(work, seed, jitter_s * scale)  # arrivals are divided by the rate scale
            for spec in specs:
                policy, options = rm.policy_spec(name if spec == BEST else spec, slo)
                router = registry.create(policy, options)
                m = summarize(simulate(copy, profile, cell["replicas"], router, rate_scale=scale), spec, slo)
                runs[f"{f}|{spec}" + (f"|{seed}" if seed else "")] = [m.slo_attainment, m.hit_rate, dict(getattr(router, "decisions", {}))]
    return {"cell": [cell["workload"], cell["profile"], cell["replicas"]], "best_other": best, "best_other_policy": name, "requests": len(work), "runs": runs}


def paired_differences(row: dict[str, Any], specs: list[str], factors: list[float], seeds: int) -> np.ndarray:
    """Per workload copy (the trace, then each seed), the variant's SLO share minus the
    baseline's, averaged over `factors`."""
    share = {k: v[0] for k, v in row["runs"].items()}
    suffix = [""] + [f"|{s}" for s in range(1, seeds + 1)]
    return np.array([np.mean([share[f"{f}|{specs[1]}{x}"] - share[f"{f}|{specs[0]}{x}"] for f in factors]) for x in suffix])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="regime matrix results files (merged as --table merges them)")
    ap.add_argument("--specs", required=True, help="BASELINE,VARIANT: two regime-matrix policy specs ('best': the cell's best other policy)")
    ap.add_argument("--factors", default="0.9,1.0,1.1", help="rates as multiples of the best other policy's capacity")
    ap.add_argument("--traces", default=rm.TRACES)
    ap.add_argument("--out", help="JSON of every run")
    ap.add_argument("--seeds", type=int, default=0, help="also run on this many jittered copies of each workload (default 0)")
    ap.add_argument("--jitter-s", type=float, default=0.01, help="the copies' largest move of an arrival, seconds (default 0.01)")
    ap.add_argument("--cells", help="only these cells: WORKLOAD/PROFILE/N,... (default: every cell with a capacity)")
    ap.add_argument("--requests", type=int, help="run every cell on this many requests (default: the cell's own number, as the matrix ran it)")
    a = ap.parse_args()
    specs = a.specs.split(",")
    if len(specs) != 2:
        ap.error(f"--specs: expected BASELINE,VARIANT, got {a.specs!r}")
    try:
        factors = [float(x) for x in a.factors.split(",")]
    except ValueError:
        ap.error(f"--factors: expected numbers separated by commas, got {a.factors!r}")
    if a.seeds < 0 or not a.jitter_s > 0:
        ap.error(f"--seeds must be >= 0 and --jitter-s > 0, got {a.seeds} and {a.jitter_s}")
    if a.requests is not None and a.requests < 1:
        ap.error(f"--requests must be >= 1, got {a.requests}")
    cells = rm.merged_cells(a.results)
    wanted = set(a.cells.split(",")) if a.cells else None
    unknown = sorted((wanted or set()) - {f"{c['workload']}/{c['profile']}/{c['replicas']}" for c in cells})
    if unknown:
        ap.error(f"--cells: no cell {', '.join(map(repr, unknown))} in the results files (WORKLOAD/PROFILE/N)")
    doc: dict[str, Any] = {"command": shlex.join(["python", "bench/fixed_rate.py", *sys.argv[1:]]), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells": []}
    diffs = []
    unsure = 0
    for cell in cells:
        if wanted is not None and f"{cell['workload']}/{cell['profile']}/{cell['replicas']}" not in wanted:
            continue
        row = compare_cell(cell, specs, factors, a.traces, a.seeds, a.jitter_s, a.requests)
        if row is None:
            continue
        doc["cells"].append(row)
        share = {k: v[0] for k, v in row["runs"].items()}
        paired = paired_differences(row, specs, factors, a.seeds)
        d = float(np.mean(paired))
        diffs.append(d)
        shares = "  ".join(f"x{f}: {100 * share[f'{f}|{specs[0]}']:5.1f}/{100 * share[f'{f}|{specs[1]}']:5.1f}" for f in factors)
        spread = ""
        if a.seeds:
            sd = float(np.std(paired, ddof=1))
            unsure += abs(d) < 2 * sd / np.sqrt(len(paired))
            spread = f" sd {100 * sd:4.1f}, variant ahead in {int(np.sum(paired > 0))} of {len(paired)}"
        print(f"{cell['workload']:8s} {cell['profile'][:21]:21s} {cell['replicas']:2d} best {row['best_other']:8.2f} ({row['best_other_policy']})  {shares}   diff mean {100 * d:+5.1f} pts{spread}", flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(doc, indent=1))
    if diffs:
        print(f"{len(diffs)} cells: mean difference {100 * float(np.mean(diffs)):+.2f} pts; variant ahead by >= 0.5 pt in {sum(d >= 0.005 for d in diffs)}, behind by >= 0.5 pt in {sum(d <= -0.005 for d in diffs)}"
              + (f"; within two standard errors of 0 (over the {a.seeds + 1} workloads) in {unsure}" if a.seeds else ""))  # fmt: skip


if __name__ == "__main__":
    main()
