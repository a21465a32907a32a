"""Grid of router settings on a trace: SLO attainment of policies x RouterOptions at fixed rates.

How to read the numbers: each row is one whole-trace simulation (pylb.sim) of one policy spec
with one set of RouterOptions overrides at one rate scale; `att` is the fraction of requests
with TTFT <= SLO (the effective capacity is the highest rate where it stays >= 90 %), `hit` the
token-weighted prefix-cache hit rate, `hot` the hotspot factor. Rows of one run share the
prepared workload and the machine, so compare rows, not runs.

Run (the dispatch-limit sweep of BENCHMARKS.md):
    .venv/bin/python bench/router_grid.py --trace ../shared/traces/mooncake_conversation_trace.jsonl \
        --policy dualmap,least-load --scale 3.08,3.22 \
        --grid max_unprefilled_tokens=2048,8192,16384,65536 --grid max_unprefilled_requests=1,2,8 \
        --json bench/results/limits.json
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time

from pylb.router import registry
from pylb.router.interface import RouterOptions
from pylb.sim.cluster import prepare_workload, simulate
from pylb.sim.profiles import load_profile
from pylb.sim.report import summarize
from pylb.workload.loaders import describe_workload, load_workload


def parse_grid(items: list[str]) -> list[dict[str, object]]:
    """['a=1,2', 'b=3'] -> [{'a': 1, 'b': 3}, {'a': 2, 'b': 3}] (values typed like RouterOptions')."""
    defaults = RouterOptions()
    axes = []
    for item in items:
        key, _, values = item.partition("=")
        kind = type(getattr(defaults, key))
        axes.append([(key, kind(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--profile", default="h100-llama3.1-8b")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--policy", default="dualmap")
    ap.add_argument("--scale", default="3.08")
    ap.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...")
    ap.add_argument("--slo-ttft", type=float, default=5.0)
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    profile = load_profile(args.profile)
    workload = prepare_workload(load_workload(args.trace, limit=args.limit), profile.block_size)
    rows = []
    print(f"{'policy':28} {'options':48} {'scale':>5} {'qps':>6} {'att':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'hit':>6} {'hot':>5} {'migr':>6} {'wall':>5}")
    for spec, overrides, scale in itertools.product(args.policy.split(","), parse_grid(args.grid), [float(s) for s in args.scale.split(",")]):
        opts = dataclasses.replace(RouterOptions(slo_ttft=args.slo_ttft), **overrides)
        router = registry.create(spec, opts)
        t0 = time.perf_counter()
        res = simulate(workload, profile, args.replicas, router, rate_scale=scale)
        m = summarize(res, spec, args.slo_ttft)
        migrations = getattr(router, "migrations", 0)
        ov = " ".join(f"{k}={v}" for k, v in overrides.items())
        print(
            f"{spec:28} {ov:48} {scale:5.3g} {m.qps:6.2f} {100 * m.slo_attainment:5.1f}% {m.ttft_p50 or 0:7.2f} "
            f"{m.ttft_p90 or 0:7.2f} {m.ttft_p99 or 0:7.2f} {100 * m.hit_rate:5.1f}% {m.hotspot_factor:5.2f} {migrations:6d} {time.perf_counter() - t0:5.1f}",
            flush=True,
        )
        rows.append({**m.to_json(), "options": overrides, "migrations": migrations, "preemptions": res.stats.get("preemptions", 0)})
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"trace": describe_workload(args.trace), "profile": profile.name, "replicas": args.replicas, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
