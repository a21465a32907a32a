"""pylb's TTFT models replayed on what a live pylb observed: which model predicts real engines best?

    .venv/bin/python bench/ttft_model.py LOG [LOG ...]            # a table per log
    .venv/bin/python bench/ttft_model.py --json OUT.json LOG ...   # and the numbers
    .venv/bin/python bench/ttft_model.py --by-decoding 2 LOG ...   # and latency by running batch

A pylb run with `--log-level debug` logs one "ttft observation" line per first token
(`pylb.router.core`): the replica, the un-prefilled tokens ahead of the request at its dispatch
(its own included), the requests past their first token in flight there (`decoding`), and the
latency from dispatch to first token. This script feeds those observations, in their order,
through the core's estimators (`pylb.router.ttft`, one per replica and one for the fleet,
blended as the core blends them) for each model, and scores each prediction made *before* the
observation is learned (prequential, as the live router predicts): P50 and P90 of |predicted -
observed| latency. Models: through the origin (the default), `prefill_intercept` (a per-request
constant), `prefill_decoding` (a cost per decoding request), and both.

The latency scored here is the engine side of a TTFT (dispatch to first token); pylb's queue wait
before it is charged by the same per-token time and is not in these lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np

from pylb.router.ttft import PrefillTimeEstimator, blended, blended_decoding, blended_intercept

MODELS = {"origin": (False, False), "intercept": (True, False), "decoding": (False, True), "intercept+decoding": (True, True)}
"""Model name -> (prefill_intercept, prefill_decoding)."""


def read_runs(path: Path) -> list[list[dict]]:
    """The "ttft observation" records of one pylb log (JSON lines; other lines skipped), split
    into runs at the "$ COMMAND" lines `bench/peers/run.py` writes before each start of pylb
    (each run's router starts with fresh estimators). A `.gz` file is read through gzip."""
    runs: list[list[dict]] = [[]]
    with (gzip.open(path, "rt", errors="replace") if path.suffix == ".gz" else open(path, errors="replace")) as fh:
        for line in fh:
            if line.startswith("$ ") and runs[-1]:
                runs.append([])
            if '"ttft observation"' not in line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("msg") == "ttft observation":
                runs[-1].append(rec)
    return [r for r in runs if r]


def replay(observations: list[dict], affine: bool, decoding: bool, seed: float, rate: float) -> np.ndarray:
    """Absolute prediction errors (s) of one model over the observations, each predicted before
    it is learned, with the core's per-replica estimators shrunk towards the fleet's."""
    fleet = PrefillTimeEstimator(seed, rate, affine, decoding)
    # every replica of the run from its start, seeded as the core seeds the replicas it starts with
    own = {name: PrefillTimeEstimator(seed, rate, affine, decoding) for name in dict.fromkeys(o["replica"] for o in observations)}
    errors = []
    for o in observations:
        est = own[o["replica"]]
        predicted = o["ahead_tokens"] * blended(est, fleet)
        if affine:
            predicted += blended_intercept(est, fleet)
        if decoding:
            predicted += o["decoding"] * blended_decoding(est, fleet)
        errors.append(abs(predicted - o["latency_s"]))
        est.observe(o["latency_s"], o["ahead_tokens"], o["decoding"])
        fleet.observe(o["latency_s"], o["ahead_tokens"], o["decoding"])
    return np.asarray(errors)


def by_decoding(observations: list[dict], width: int) -> list[dict]:
    """Latency and tokens ahead per bin of `width` decoding counts (0..width-1, width..)."""
    k = np.array([o["decoding"] for o in observations])
    lat = np.array([o["latency_s"] for o in observations])
    ahead = np.array([o["ahead_tokens"] for o in observations])
    out = []
    for lo in range(0, int(k.max()) + 1, width):
        m = (k >= lo) & (k < lo + width)
        if m.any():
            label = str(lo) if width == 1 else f"{lo}-{lo + width - 1}"
            out.append({"decoding": label, "first_tokens": int(m.sum()), "latency_p50": float(np.median(lat[m])),
                        "latency_p90": float(np.percentile(lat[m], 90)), "ahead_p50": float(np.median(ahead[m]))})  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+", type=Path, help="pylb logs written with --log-level debug (.gz: gzip-compressed)")
    ap.add_argument("--seed", type=float, default=1e-4, help="seed per-token time (router.prefill_s_per_token; default 1e-4)")
    ap.add_argument("--rate", type=float, default=0.05, help="learning rate (router.prefill_learning_rate; default 0.05)")
    ap.add_argument("--json", type=Path, help="also write the numbers here")
    ap.add_argument("--by-decoding", type=int, default=0, metavar="W",
                    help="also print each log's latency by requests decoding at dispatch, in bins of W (e.g. 2)")
    args = ap.parse_args()
    results = []
    by_decoding_rows: list[tuple[str, list[dict]]] = []
    print("| log | runs | first tokens | latency P50 / P90 s | " + " | ".join(f"{m} P50 / P90 s" for m in MODELS) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in MODELS) + " |")
    for path in args.logs:
        runs = read_runs(path)
        obs = [o for run in runs for o in run]
        if not obs:
            print(f"{path}: no 'ttft observation' lines (was pylb run with --log-level debug?)", file=sys.stderr)
            continue
        lat = np.array([o["latency_s"] for o in obs])
        row = {"log": str(path), "runs": len(runs), "first_tokens": len(obs), "latency_p50": float(np.median(lat)), "latency_p90": float(np.percentile(lat, 90)), "models": {}}
        cells = []
        for name, (affine, decoding) in MODELS.items():
            err = np.concatenate([replay(run, affine, decoding, args.seed, args.rate) for run in runs])
            p50, p90 = float(np.median(err)), float(np.percentile(err, 90))
            row["models"][name] = {"error_p50": p50, "error_p90": p90}
            cells.append(f"{p50:.3f} / {p90:.3f}")
        if args.by_decoding > 0:
            row["by_decoding"] = by_decoding(obs, args.by_decoding)
            by_decoding_rows.append((path.name, row["by_decoding"]))
        results.append(row)
        print(f"| {path.name} | {len(runs)} | {len(obs)} | {row['latency_p50']:.3f} / {row['latency_p90']:.3f} | " + " | ".join(cells) + " |")
    for name, bins in by_decoding_rows:
        print(f"\n{name}: latency by requests decoding at dispatch\n\n| decoding | first tokens | latency P50 / P90 s | tokens ahead P50 |\n| --- | --- | --- | --- |")
        for b in bins:
            print(f"| {b['decoding']} | {b['first_tokens']} | {b['latency_p50']:.2f} / {b['latency_p90']:.2f} | {b['ahead_p50']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "results": results}, indent=1) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
