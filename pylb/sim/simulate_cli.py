"""`pylb simulate`: replay a trace through simulated vLLM replicas, per routing policy.

    pylb simulate --trace PATH --replicas N --profile NAME|FILE --policy SPEC[,SPEC...]|all
                  [--rate-scale X | --sweep] [--slo-ttft S] [--json OUT] [--plot OUT.png]
                  [--limit N] [--scrape-interval S] [--sweep-runs N] [--sweep-start X] [--sweep-tolerance R]
                  [--router-option FIELD=VALUE ...]

A SPEC is a registered policy name, optionally with policy options: `NAME[:key=value...]`,
e.g. `dualmap:migration=false`, `dualmap:key_depth=2` or `cache-aware:cache_threshold=0.5`
(ablations and the baselines' published parameters, reported under that label; each policy's
module comment lists its options; `all` means every registered name, without options). `--router-option` sets a field of
`RouterOptions` for every policy (e.g. `max_unprefilled_tokens=8192`).

The trace is loaded and every prompt hashed once; then each policy runs at the rate scale
given, or, with --sweep, at the rate scales `pylb.sim.report.find_capacity` picks to find its
effective request capacity. A table of the runs goes to stdout, progress bars to stderr.
Bad arguments print a message naming the flag and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from pathlib import Path

from pylb.cli_args import UsageError, positive_float, positive_int
from pylb.fields import SettingError, parse_assignment
from pylb.router import registry
from pylb.router.interface import RouterOptions
from pylb.router.policy import PolicyOptionError
from pylb.workload.loaders import SYNTHETIC_PREFIX, load_workload
from pylb.workload.types import WorkloadRequest

from .cluster import DEFAULT_SCRAPE_INTERVAL, prepare_workload, simulate
from .profiles import DEFAULT_PROFILE, PROFILES, ProfileError, load_profile
from .report import DEFAULT_SLO_TARGET, DEFAULT_SLO_TTFT, RunMetrics, find_capacity, plot_attainment, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `pylb simulate` on its subparser."""
    parser.add_argument("--trace", required=True, metavar="PATH", help="trace file (Mooncake .jsonl)")
    parser.add_argument("--replicas", type=positive_int, default=8, metavar="N", help="simulated vLLM replicas (default 8)")
    parser.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME|FILE",
        help=f"hardware profile: one of {', '.join(PROFILES)}, or a YAML file (default {DEFAULT_PROFILE})",
    )
    parser.add_argument(
        "--policy",
        default="round-robin",
        metavar="NAME[,NAME...]",
        help="routing policies to compare, comma-separated, each NAME or NAME:key=value[:key=value...] "
        "(policy options, e.g. dualmap:migration=false), or 'all' (default round-robin)",
    )
    parser.add_argument(
        "--router-option",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set a RouterOptions field for every policy, e.g. max_unprefilled_tokens=8192 (repeatable)",
    )
    load = parser.add_mutually_exclusive_group()
    load.add_argument(
        "--rate-scale", type=positive_float, default=1.0, metavar="X", help="divide arrival times by X (default 1)"
    )
    load.add_argument(
        "--sweep", action="store_true", help="search each policy's effective request capacity (bisection on the rate scale)"
    )
    parser.add_argument(
        "--slo-ttft", type=positive_float, default=DEFAULT_SLO_TTFT, metavar="SECONDS", help="TTFT SLO (default 5)"
    )
    parser.add_argument("--json", metavar="OUT", help="write runs and capacities as JSON")
    parser.add_argument("--plot", metavar="OUT.png", help="plot SLO attainment against QPS per policy")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="use only the first N requests")
    parser.add_argument(
        "--scrape-interval",
        type=positive_float,
        default=DEFAULT_SCRAPE_INTERVAL,
        metavar="SECONDS",
        help=f"metrics scrape interval delivered to the router (default {DEFAULT_SCRAPE_INTERVAL})",
    )
    parser.add_argument("--sweep-runs", type=positive_int, default=8, metavar="N", help="most runs per policy in --sweep (default 8)")
    parser.add_argument(
        "--sweep-start", type=positive_float, default=1.0, metavar="X", help="first rate scale of --sweep (default 1)"
    )
    parser.add_argument(
        "--sweep-tolerance",
        type=positive_float,
        default=0.05,
        metavar="R",
        help="stop bisecting when the failing and passing rate scales are within a factor 1+R (default 0.05)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed passed to the routers (default 0)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def load_trace(path: str, limit: int | None) -> list[WorkloadRequest]:
    """Load `--trace`: a trace file (.jsonl Mooncake, .csv Azure) or a `synthetic:NAME[:k=v,...]` spec."""
    if not path.startswith(SYNTHETIC_PREFIX) and not Path(path).is_file():
        raise UsageError(f"argument --trace: no such file: {path!r}")
    try:
        return load_workload(path, limit=limit)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"argument --trace: {exc}") from None


def parse_policies(spec: str) -> list[str]:
    """'all' -> every registered policy; otherwise comma-separated specs, each checked and
    returned in canonical form (`NAME[:key=value...]`)."""
    known = registry.names()
    if spec.strip() == "all":
        return known
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise UsageError(f"argument --policy: no policy named in {spec!r}")
    labels = []
    for item in items:
        name = item.split(":", 1)[0].strip()
        if name not in known:
            raise UsageError(f"argument --policy: unknown policy {name!r}: expected one of {', '.join(known)} or all")
        try:
            labels.append(registry.parse_spec(item).label)
        except PolicyOptionError as exc:
            raise UsageError(f"argument --policy: {exc}") from None
    return list(dict.fromkeys(labels))


_ROUTER_FIELDS = [f.name for f in dataclasses.fields(RouterOptions) if f.name not in ("extra", "slo_ttft", "seed")]
"""The RouterOptions fields --router-option sets (the policy spec, --slo-ttft and --seed set the others)."""


def router_options(args: argparse.Namespace) -> RouterOptions:
    """RouterOptions from --slo-ttft, --seed and every --router-option FIELD=VALUE (each value
    parsed and checked as its `RouterOptions` declaration says, `pylb.fields`)."""
    values: dict[str, object] = {}
    for item in args.router_option:
        if item.partition("=")[0].strip() not in _ROUTER_FIELDS or "=" not in item:
            raise UsageError(f"argument --router-option: expected FIELD=VALUE with FIELD one of {', '.join(_ROUTER_FIELDS)}, got {item!r}")
        try:
            key, value = parse_assignment(RouterOptions, item)
        except SettingError as exc:
            raise UsageError(f"argument --router-option: {exc.field} {exc.reason}, got {exc.value!r}") from None
        values[key] = value
    try:
        return RouterOptions(slo_ttft=args.slo_ttft, seed=args.seed, **values)  # type: ignore[arg-type]
    except SettingError as exc:
        raise UsageError(f"argument --router-option: {exc.field.removeprefix('RouterOptions.')} {exc.reason}, got {exc.value!r}") from None


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_table(runs: list[RunMetrics], slo_ttft: float) -> str:
    """The runs as a fixed-width text table."""
    head = ["policy", "scale", "qps", "requests", "done", "p50 s", "p90 s", "p99 s", f"ttft<={slo_ttft:g}s", "hit", "hotspot", "wall s"]
    rows = [
        [
            m.policy,
            _fmt(m.rate_scale, ".3g"),
            _fmt(m.qps, ".2f"),
            str(m.requests),
            str(m.completed),
            _fmt(m.ttft_p50, ".3f"),
            _fmt(m.ttft_p90, ".3f"),
            _fmt(m.ttft_p99, ".3f"),
            _fmt(100 * m.slo_attainment, ".1f") + "%",
            _fmt(100 * m.hit_rate, ".1f") + "%",
            _fmt(m.hotspot_factor, ".2f"),
            _fmt(m.wall_s, ".1f"),
        ]
        for m in runs
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in [head, *rows]]
    return "\n".join(lines)


def _progress_bar(total: int, desc: str, enabled: bool):  # -> tqdm-like object
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def run(args: argparse.Namespace) -> int:
    """Run `pylb simulate`; returns the exit status (2 for bad arguments)."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"pylb simulate: error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    policies = parse_policies(args.policy)
    options = router_options(args)
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise UsageError(f"argument --profile: {exc}") from None
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("argument --plot: matplotlib is not installed (pip install 'pylb[plot]')") from None
    for flag, value in (("--json", args.json), ("--plot", args.plot)):
        if value:
            parent = os.path.dirname(os.path.abspath(value))
            if not os.path.isdir(parent):
                raise UsageError(f"argument {flag}: directory does not exist: {parent!r}")
    show = not args.no_progress

    requests = load_trace(args.trace, args.limit)
    if not requests:
        raise UsageError(f"argument --trace: no requests in {args.trace!r}")
    with _progress_bar(len(requests), "hashing prompts", show) as bar:
        workload = prepare_workload(requests, profile.block_size, router_block_bytes=options.block_chars, progress=bar.update)
    del requests

    all_runs: list[RunMetrics] = []

    def run_at(policy: str, scale: float) -> RunMetrics:
        with _progress_bar(len(workload), f"{policy} x{scale:.3g}", show) as bar:
            result = simulate(
                workload,
                profile,
                args.replicas,
                registry.create(policy, options),
                rate_scale=scale,
                scrape_interval=args.scrape_interval,
                progress=bar.update,
            )
        m = summarize(result, policy, args.slo_ttft)
        all_runs.append(m)
        return m

    capacity: dict[str, float | None] = {}
    for policy in policies:
        if args.sweep:
            cap, _ = find_capacity(
                lambda s, p=policy: run_at(p, s), start=args.sweep_start, max_runs=args.sweep_runs, rel_tol=args.sweep_tolerance
            )
            capacity[policy] = cap
        else:
            run_at(policy, args.rate_scale)
            capacity[policy] = None

    print(
        f"trace {args.trace}: {len(workload)} requests; {args.replicas} replicas of {profile.name}; "
        f"SLO: TTFT <= {args.slo_ttft:g} s for {DEFAULT_SLO_TARGET:.0%} of requests"
    )
    print(format_table(all_runs, args.slo_ttft))
    if args.sweep:
        print("effective request capacity (qps): " + ", ".join(f"{p} {c:.2f}" for p, c in capacity.items()))

    if args.json:
        doc = {
            "config": {
                "trace": args.trace,
                "limit": args.limit,
                "replicas": args.replicas,
                "profile": profile.to_dict(),
                "slo_ttft": args.slo_ttft,
                "slo_target": DEFAULT_SLO_TARGET,
                "scrape_interval": args.scrape_interval,
                "sweep": bool(args.sweep),
                "sweep_tolerance": args.sweep_tolerance if args.sweep else None,
                "router_options": {k: v for k, v in dataclasses.asdict(options).items() if k != "extra"},
            },
            "runs": [m.to_json() for m in all_runs],
            "capacity": capacity,
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=2)
            fh.write("\n")
    if args.plot:
        plot_attainment(
            all_runs,
            args.plot,
            slo_ttft=args.slo_ttft,
            title=f"{Path(args.trace).name}: {args.replicas} x {profile.name}",
        )
    return 0

