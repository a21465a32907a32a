"""Determinism check: a handful of simulator runs whose per-request results must not change.

How to read the numbers: the simulator is deterministic, so a refactoring that keeps routing
behaviour must leave every run's hash unchanged. Each case prints one line,

    <case>  results=<sha256 of the per-request arrays>  metrics=<sha256 of the summary>

where the results hash covers, per request and in workload order, the dispatch, first-token and
completion times, the replica, the cached tokens and the rejected flag (`SimResult`), and the
metrics hash the summary `pylb.sim.report.summarize` gives (p50/p90/p99 TTFT, SLO attainment,
hit rate, ...; wall-clock time left out). The `cli-*` cases run `pylb simulate` itself and hash
the runs of its --json output (wall-clock time left out). With `--save DIR` each case's summary goes to
DIR/<case>.json; with `--compare FILE` the hashes are checked against a file this script wrote
with `--hashes FILE` (exit status 1 on any difference, naming the case).

Run (from the repository root; about a minute on an idle core):
    .venv/bin/python bench/determinism_check.py --hashes bench/determinism_reference.json
    .venv/bin/python bench/determinism_check.py --compare bench/determinism_reference.json
(add `--traces DIR` when the traces are not in ../shared/traces, e.g. in a worktree).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pylb.router import registry
from pylb.router.interface import RouterOptions
from pylb.sim.cluster import prepare_workload, simulate
from pylb.sim.profiles import load_profile
from pylb.sim.report import summarize
from pylb.workload.loaders import load_workload

MOONCAKE = "mooncake_conversation_trace.jsonl"
"""A file of the traces folder (`--traces`, ../shared/traces by default)."""

CASES: list[tuple[str, str, int | None, str, int, float, str, dict[str, object]]] = [
    # (case, trace, limit, profile, replicas, rate scale, policy spec, RouterOptions overrides)
    ("mc-dualmap-h100", MOONCAKE, 4000, "h100-llama3.1-8b", 4, 1.5, "dualmap", {}),
    ("mc-cache-aware-h100", MOONCAKE, 4000, "h100-llama3.1-8b", 4, 1.5, "cache-aware", {}),
    ("mc-weighted-h100", MOONCAKE, 4000, "h100-llama3.1-8b", 4, 1.5, "weighted-score", {}),
    ("mc-dualmap-910b", MOONCAKE, 4000, "dualmap-910b", 8, 1.3, "dualmap", {}),
    ("mc-preble-910b", MOONCAKE, 4000, "dualmap-910b", 8, 1.3, "preble-e2", {}),
    ("mt-chwbl-h100", "synthetic:multi-turn:sessions=400", None, "h100-llama3.1-8b", 2, 8.0, "chwbl", {}),
    ("mt-dualmap-h100", "synthetic:multi-turn:sessions=400", None, "h100-llama3.1-8b", 2, 8.0, "dualmap", {}),
    ("mt-least-load-910b", "synthetic:multi-turn:sessions=400", None, "dualmap-910b", 2, 2.0, "least-load", {}),
    # block_chars=128 through the Python API, which always hashed with the router's block size
    # (only `pylb simulate` did not: tests/test_block_hashing.py)
    ("mt-dualmap-bc128", "synthetic:multi-turn:sessions=400", None, "h100-llama3.1-8b", 2, 8.0, "dualmap", {"block_chars": 128}),
]


def _digest(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def run_case(trace: str, limit: int | None, profile_name: str, replicas: int, scale: float, spec: str,
             overrides: dict[str, object]) -> tuple[str, str, dict[str, object]]:  # fmt: skip
    """(results hash, metrics hash, summary) of one simulator run."""
    profile = load_profile(profile_name)
    options = RouterOptions(**overrides)  # type: ignore[arg-type]
    workload = prepare_workload(load_workload(trace, limit=limit), profile.block_size, router_block_bytes=options.block_chars)
    result = simulate(workload, profile, replicas, registry.create(spec, options), rate_scale=scale)
    arrays = [result.dispatch, result.first_token, result.completion, result.replica, result.cached_tokens, result.rejected]
    results_hash = _digest([np.ascontiguousarray(a).tobytes() for a in arrays] + ["\n".join(result.request_ids).encode()])
    summary = {k: v for k, v in summarize(result, spec).to_json().items() if k != "wall_s"}
    metrics_hash = _digest([json.dumps(summary, sort_keys=True).encode()])
    return results_hash, metrics_hash, summary


CLI_CASES: list[tuple[str, list[str]]] = [
    # (case, `pylb simulate` arguments): the CLI's own path (policy specs, --router-option, JSON)
    ("cli-mt-all-h100", ["--trace", "synthetic:multi-turn:sessions=200", "--replicas", "2", "--rate-scale", "8",
                         "--policy", "dualmap,cache-aware,weighted-score,preble-e2,chwbl,dualmap:migration=false"]),
    ("cli-mt-dualmap-910b", ["--trace", "synthetic:multi-turn:sessions=200", "--replicas", "2", "--profile", "dualmap-910b",
                             "--rate-scale", "2", "--policy", "dualmap,min-ttft", "--router-option", "max_unprefilled_requests=4"]),
]  # fmt: skip


def run_cli_case(argv: list[str], out_json: Path) -> tuple[str, dict[str, object]]:
    """(hash, runs) of one `pylb simulate` run: its --json runs, wall-clock times left out."""
    subprocess.run([sys.executable, "-m", "pylb.cli", "simulate", *argv, "--no-progress", "--json", str(out_json)],
                   check=True, stdout=subprocess.DEVNULL, cwd=out_json.parent)  # fmt: skip  (cwd: the installed pylb)
    doc = json.loads(out_json.read_text())
    runs = [{k: v for k, v in r.items() if k != "wall_s"} for r in doc["runs"]]
    return _digest([json.dumps(runs, sort_keys=True).encode()]), {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--save", metavar="DIR", help="write each case's summary to DIR/<case>.json")
    p.add_argument("--hashes", metavar="FILE", help="write the hashes to FILE (JSON)")
    p.add_argument("--compare", metavar="FILE", help="compare with the hashes in FILE; exit 1 on a difference")
    p.add_argument("--case", action="append", default=[], help="run only these cases (repeatable)")
    p.add_argument("--traces", default="../shared/traces", metavar="DIR", help="folder of the trace files (default ../shared/traces)")
    args = p.parse_args(argv)
    out: dict[str, dict[str, str]] = {}
    for case, trace, limit, prof, n, scale, spec, overrides in CASES:
        if args.case and case not in args.case:
            continue
        t0 = time.perf_counter()
        path = trace if trace.startswith("synthetic:") else str(Path(args.traces, trace))
        rh, mh, summary = run_case(path, limit, prof, n, scale, spec, overrides)
        out[case] = {"results": rh, "metrics": mh}
        print(f"{case:24s} results={rh[:16]}  metrics={mh[:16]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            doc = {"case": case, "trace": trace, "limit": limit, "profile": prof, "replicas": n, "rate_scale": scale,
                   "policy": spec, "router_options": overrides, "summary": summary, "hashes": out[case]}  # fmt: skip
            Path(args.save, f"{case}.json").write_text(json.dumps(doc, indent=2) + "\n")
    for case, cli_args in CLI_CASES:
        if args.case and case not in args.case:
            continue
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            mh, doc = run_cli_case(cli_args, Path(tmp, "out.json"))
        out[case] = {"metrics": mh}
        print(f"{case:24s} {'':25s}  metrics={mh[:16]}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        if args.save:
            Path(args.save).mkdir(parents=True, exist_ok=True)
            Path(args.save, f"{case}.json").write_text(json.dumps({"case": case, "argv": cli_args, **doc, "hashes": out[case]}, indent=2) + "\n")
    if args.hashes:
        command = "python bench/determinism_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(args.hashes).write_text(json.dumps({"command": command, "cases": out}, indent=2) + "\n")
    if args.compare:
        ref = json.loads(Path(args.compare).read_text())["cases"]
        diff = [c for c in out if ref.get(c) != out[c]]
        for c in diff:
            print(f"DIFFERENT: {c}: was {ref.get(c)}, now {out[c]}", file=sys.stderr)
        if diff:
            return 1
        print(f"identical: {len(out)} cases match {args.compare}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
