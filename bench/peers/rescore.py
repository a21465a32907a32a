"""Score a side-by-side result at other TTFT SLOs than the one it ran with.

    .venv/bin/python bench/peers/rescore.py RESULTS.json --slo 0.5,1,2

`bench/peers/run.py --keep-requests` stores every request's record in its results file; this
script recomputes each target's SLO share (`pylb.workload.replay.slo_share`, the harness's own
rule: TTFT <= SLO over the requests sent, errors and refusals are misses) at each given SLO, mean and range over the
repetitions. The SLO a *router* was told is part of its target's flags and does not change
here: a target told one SLO and scored at another is labelled by its flags as it ran.

Why: a fixed 0.5 s SLO means different things on different machines. Where an idle replica's
prefill of the workload's prompts takes about 0.5 s (the 2-core AVX2 machine of BENCHMARKS.md),
a 0.5 s share counts the requests that were lucky, not the router's work; scoring the same runs
at a few multiples of the idle TTFT shows whether a ranking holds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from pylb.workload.replay import slo_share


def rescore(results: dict, slos: list[float]) -> dict[str, dict[float, list[float]]]:
    """Per target, per SLO: the share of each repetition (in run order)."""
    out: dict[str, dict[float, list[float]]] = {}
    for run in results["runs"]:
        if "requests" not in run:
            raise ValueError(f"run {run['target']} #{run.get('rep')} has no per-request records (run the harness with --keep-requests)")
        per = out.setdefault(run["target"], {s: [] for s in slos})
        for s in slos:
            per[s].append(slo_share([(bool(r.get("ok")), r.get("ttft_s")) for r in run["requests"]], s) or 0.0)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="a bench/peers/run.py results file written with --keep-requests")
    ap.add_argument("--slo", default="0.5,1,2", help="TTFT SLOs in seconds, comma-separated (default 0.5,1,2)")
    args = ap.parse_args()
    try:
        slos = [float(x) for x in args.slo.split(",")]
    except ValueError:
        ap.error(f"--slo: not a list of numbers: {args.slo!r}")
    if not slos or min(slos) <= 0:
        ap.error(f"--slo: every SLO must be > 0, got {args.slo!r}")
    try:
        table = rescore(json.loads(args.results.read_text()), slos)
    except ValueError as exc:
        print(f"{args.results}: {exc}", file=sys.stderr)
        return 1
    print("| target | reps | " + " | ".join(f"within {s:g} s" for s in slos) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in slos) + " |")
    for target, per in table.items():
        cells = [f"{100 * statistics.fmean(v):.1f} ({100 * min(v):.1f}-{100 * max(v):.1f}) %" for v in per.values()]
        print(f"| {target} | {len(next(iter(per.values())))} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
