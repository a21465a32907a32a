"""Merge the runs of several `pylb simulate --json` files into one SLO-attainment plot.

Later files win for a policy label that appears in several (so a re-measured policy replaces its
older runs); `--suffix FILE=TEXT` appends TEXT to the labels of that file's runs (e.g. to tell
immediate-dispatch baselines from the same policies behind the router core).

Run:  .venv/bin/python bench/plot_runs.py OUT.png A.json B.json --suffix B.json=" (at once)"
"""

from __future__ import annotations

import argparse
import json
import sys

from pylb.sim.report import RunMetrics, plot_attainment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--suffix", action="append", default=[], metavar="FILE=TEXT")
    ap.add_argument("--only", help="comma-separated labels to keep")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    suffix = dict(s.split("=", 1) for s in args.suffix)
    by_label: dict[str, list[RunMetrics]] = {}
    slo = 5.0
    for path in args.inputs:
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        slo = doc["config"]["slo_ttft"]
        runs: dict[str, list[RunMetrics]] = {}
        for r in doc["runs"]:
            label = r["policy"] + suffix.get(path, "")
            fields = {k: (float("nan") if v is None else v) for k, v in r.items() if k != "policy"}
            runs.setdefault(label, []).append(RunMetrics(policy=label, **fields))
        by_label.update(runs)
    keep = set(args.only.split(",")) if args.only else None
    runs = [m for label, ms in by_label.items() if keep is None or label in keep for m in ms]
    plot_attainment(runs, args.out, slo_ttft=slo, title=args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
