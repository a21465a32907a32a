"""Two dualmap variants side by side at fixed rates over a regime matrix's cells.

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

Usage (from the repository root):

    .venv/bin/python bench/fixed_rate.py docs/results/regime_matrix_key_block_8.json \\
        --specs dualmap,dualmap:migrate_to=spare --factors 0.8,0.9,1.0,1.1 --out OUT.json
"""

from __future__ import annotations

import argparse
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
from pylb.sim.cluster import prepare_workload, simulate  # noqa: E402
from pylb.sim.profiles import load_profile  # noqa: E402
from pylb.sim.report import summarize  # noqa: E402


def compare_cell(cell: dict[str, Any], specs: list[str], factors: list[float], traces: str) -> dict[str, Any] | None:
    """Every spec's SLO share, hit rate and decisions at `factors` x the best other policy's capacity in
    `cell` (a merged regime-matrix cell); None for a cell without a capacity."""
    name, best = rm.best_other(cell)
    if name is None or rm.verdict(cell, best):
        return None
    profile = load_profile(cell["profile"])
    work = prepare_workload(rm.build_workload(cell["workload"], cell["requests"], rm.is_cpu(profile), traces), profile.block_size)
    slo = cell["slo_ttft"]
    runs: dict[str, list[float]] = {}
    for f in factors:
        for spec in specs:
            name, options = rm.policy_spec(spec, slo)
            router = registry.create(name, options)
            result = simulate(work, profile, cell["replicas"], router, rate_scale=f * best / cell["trace_rate"])
            m = summarize(result, spec, slo)
            runs[f"{f}|{spec}"] = [m.slo_attainment, m.hit_rate, dict(getattr(router, "decisions", {}))]
    return {"cell": [cell["workload"], cell["profile"], cell["replicas"]], "best_other": best, "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", help="regime matrix results files (merged as --table merges them)")
    ap.add_argument("--specs", required=True, help="BASELINE,VARIANT: two regime-matrix policy specs")
    ap.add_argument("--factors", default="0.9,1.0,1.1", help="rates as multiples of the best other policy's capacity")
    ap.add_argument("--traces", default=rm.TRACES)
    ap.add_argument("--out", help="JSON of every run")
    a = ap.parse_args()
    specs = a.specs.split(",")
    if len(specs) != 2:
        ap.error(f"--specs: expected BASELINE,VARIANT, got {a.specs!r}")
    try:
        factors = [float(x) for x in a.factors.split(",")]
    except ValueError:
        ap.error(f"--factors: expected numbers separated by commas, got {a.factors!r}")
    doc: dict[str, Any] = {"command": shlex.join(["python", "bench/fixed_rate.py", *sys.argv[1:]]), "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "cells": []}
    diffs = []
    for cell in rm.merged_cells(a.results):
        row = compare_cell(cell, specs, factors, a.traces)
        if row is None:
            continue
        doc["cells"].append(row)
        share = {k: v[0] for k, v in row["runs"].items()}
        d = float(np.mean([share[f"{f}|{specs[1]}"] - share[f"{f}|{specs[0]}"] for f in factors]))
        diffs.append(d)
        shares = "  ".join(f"x{f}: {100 * share[f'{f}|{specs[0]}']:5.1f}/{100 * share[f'{f}|{specs[1]}']:5.1f}" for f in factors)
        print(f"{cell['workload']:8s} {cell['profile'][:21]:21s} {cell['replicas']:2d} best {row['best_other']:8.2f}  {shares}   diff mean {100 * d:+5.1f} pts", flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(doc, indent=1))
    if diffs:
        print(f"{len(diffs)} cells: mean difference {100 * float(np.mean(diffs)):+.2f} pts; variant ahead by >= 0.5 pt in {sum(d >= 0.005 for d in diffs)}, behind by >= 0.5 pt in {sum(d <= -0.005 for d in diffs)}")


if __name__ == "__main__":
    main()
