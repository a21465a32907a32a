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
effective request capacity. Each run's row goes to stdout as soon as it finishes (and, with
--sweep, each policy's capacity once found); progress bars and notes go to stderr: the plan up
front, an estimate of the total time from the first run's wall time, then the time left at the
pace of the finished policies (estimates: runs at a higher load take longer). `--json OUT` is
rewritten atomically after every run (`"status": "running"`, then `"complete"`), so a stopped
command leaves its finished runs behind. Ctrl-C stops cleanly: one line on stderr, the finished
runs kept in OUT (`"status": "interrupted"`, capacities of the finished policies only), exit
status 130. Bad arguments print a message naming the flag and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from pylb.cli_args import UsageError, positive_float, positive_int
from pylb.fields import SettingError, parse_assignment
from pylb.router import registry
from pylb.router.interface import RouterOptions
from pylb.router.policy import PolicyOptionError
from pylb.workload.loaders import SYNTHETIC_PREFIX, load_workload
from pylb.workload.synthetic import GENERATORS
from pylb.workload.types import WorkloadRequest

from .cluster import DEFAULT_SCRAPE_INTERVAL, ClusterEvent, check_schedule, prepare_workload, simulate
from .profiles import DEFAULT_PROFILE, PROFILES, ProfileError, load_profile
from .report import DEFAULT_SLO_TARGET, DEFAULT_SLO_TTFT, RunMetrics, find_capacity, plot_attainment, summarize


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `pylb simulate` on its subparser."""
    parser.add_argument(
        "--trace",
        required=True,
        metavar="PATH|SPEC",
        help="a Mooncake trace (.jsonl), an Azure LLM inference trace (.csv), or a synthetic workload "
        f"{SYNTHETIC_PREFIX}NAME[:key=value,...] with NAME one of {', '.join(sorted(GENERATORS))} "
        f"(e.g. {SYNTHETIC_PREFIX}zipf:requests=500,seed=3; keys are the generator's parameters)",
    )
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
        f"(policy options, e.g. dualmap:migration=false), or 'all'; NAME is one of {', '.join(registry.names())} "
        "(default round-robin)",
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
    parser.add_argument(
        "--schedule",
        metavar="FILE",
        help="YAML or JSON list of cluster changes, each {at: SECONDS, kind: add|remove|fail|cancel, target: NAME} "
        "(replicas are named replica-0, replica-1, ...; 'at' is in trace seconds, divided by the rate scale like arrivals)",
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


def trace_record(path: str) -> dict[str, str | None]:
    """How results JSON names the trace: {"name": path as given (made relative to the current
    folder when absolute), "sha256": hex digest of the file's bytes, or None for a synthetic spec}."""
    if path.startswith(SYNTHETIC_PREFIX):
        return {"name": path, "sha256": None}
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    name = os.path.relpath(path) if os.path.isabs(path) else path
    return {"name": name, "sha256": digest.hexdigest()}


def _fmt(v: float | None, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


class RunTable:
    """The fixed-width table of runs, printable one row at a time as runs finish.

    Column widths come from the header, a minimum for numbers and the policy labels known up
    front, so rows printed minutes apart line up under one header."""

    NUMBER_WIDTH = 8

    def __init__(self, policies: list[str], slo_ttft: float) -> None:
        self.head = ["policy", "scale", "qps", "requests", "done", "p50 s", "p90 s", "p99 s", f"ttft<={slo_ttft:g}s", "hit", "hotspot", "wall s"]
        self.widths = [max(len(h), self.NUMBER_WIDTH) for h in self.head]
        self.widths[0] = max([len(self.head[0]), *(len(p) for p in policies)])

    @staticmethod
    def cells(m: RunMetrics) -> list[str]:
        """One run's cells, in header order."""
        return [
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

    def _line(self, cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, self.widths)))

    def header(self) -> str:
        """The header line."""
        return self._line(self.head)

    def row(self, m: RunMetrics) -> str:
        """One run's line."""
        return self._line(self.cells(m))


def format_table(runs: list[RunMetrics], slo_ttft: float) -> str:
    """The runs as a fixed-width text table (header and one line per run)."""
    table = RunTable(sorted({m.policy for m in runs}), slo_ttft)
    return "\n".join([table.header(), *(table.row(m) for m in runs)])


def format_duration(seconds: float) -> str:
    """A rough human duration: '40 s', '12 min', '1 h 05 min'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def expected_sweep_runs(max_runs: int, rel_tol: float) -> int:
    """Runs a typical capacity sweep makes: two to bracket the capacity within a factor 2, then
    the bisection steps that narrow a factor-2 bracket to 1+rel_tol; at most `max_runs`."""
    steps = math.ceil(math.log2(math.log(2) / math.log1p(rel_tol))) if rel_tol < 1 else 0
    return min(max_runs, 2 + max(steps, 0))


class Estimate:
    """How long the whole command will take, as far as one can tell: from the first run's wall
    time while nothing else is known, then from the pace of the finished policies. Runs differ
    (a higher load takes longer, a sweep stops early or late), so every figure is an estimate."""

    def __init__(self, policies: int, runs_per_policy: int, max_runs_per_policy: int) -> None:
        self.policies = policies
        self.runs_per_policy = runs_per_policy
        self.max_runs_per_policy = max_runs_per_policy
        self.started = time.monotonic()

    def plan(self, requests: int) -> str:
        """The line printed before the first run."""
        runs = (
            f"about {self.runs_per_policy} runs each (at most {self.max_runs_per_policy}, --sweep-runs)"
            if self.max_runs_per_policy > 1
            else "one run each"
        )
        policies = f"{self.policies} {'policy' if self.policies == 1 else 'policies'}"
        return f"{policies}, {runs}, {requests} requests per run; the first run's time will give an estimate of the total"

    def after_first_run(self, wall_s: float) -> str | None:
        """The estimate from the first run (None when that run was the only one)."""
        total_runs = self.policies * self.runs_per_policy
        if total_runs <= 1 and self.max_runs_per_policy <= 1:
            return None
        most = self.policies * self.max_runs_per_policy
        line = f"first run took {format_duration(wall_s)}; estimated total about {format_duration(wall_s * total_runs)} ({total_runs} runs"
        if most > total_runs:
            line += f", up to {format_duration(wall_s * most)} if every sweep makes all {self.max_runs_per_policy}"
        return line + "; runs at higher load take longer)"

    def after_policy(self, done: int) -> str | None:
        """The time left at the pace of the `done` finished policies (None when all are done)."""
        if done >= self.policies:
            return None
        elapsed = time.monotonic() - self.started
        left = elapsed / done * (self.policies - done)
        return f"{done}/{self.policies} policies done in {format_duration(elapsed)}; about {format_duration(left)} left (estimate)"


class ResultsFile:
    """`--json OUT`, rewritten after every run so that a stopped command leaves its finished
    runs behind. Each write goes to a temporary file in OUT's folder, renamed over OUT, so OUT
    is always a whole JSON document. `status` is "running", "complete" or "interrupted"."""

    def __init__(self, path: str, config: dict[str, object]) -> None:
        self.path = path
        self.config = config

    def write(self, runs: list[RunMetrics], capacity: dict[str, float | None], status: str) -> None:
        """Write the document atomically."""
        doc = {"status": status, "config": self.config, "runs": [m.to_json() for m in runs], "capacity": capacity}
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(self.path)}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=2)
                fh.write("\n")
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _progress_bar(total: int, desc: str, enabled: bool):  # -> tqdm-like object
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", leave=False, file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def _note(line: str) -> None:
    """A progress line for the person watching (stderr, so stdout stays the results)."""
    print(f"pylb simulate: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run `pylb simulate`; returns the exit status (2 for bad arguments, 130 when interrupted)."""
    try:
        return _run(args)
    except UsageError as exc:
        print(f"pylb simulate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before any run finished: nothing to keep
        _note("interrupted before the first run finished; nothing written")
        return 130


def _check_outputs(args: argparse.Namespace) -> None:
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


def load_schedule(path: str) -> list[ClusterEvent]:
    """The `--schedule` file: a YAML (or JSON) list of {at, kind, target}; UsageError naming the
    entry and field when it is not one."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise UsageError(f"argument --schedule: cannot read {path!r}: {exc}") from None
    if not isinstance(data, list):
        raise UsageError(f"argument --schedule: {path!r} must hold a list of {{at, kind, target}}, got {type(data).__name__}")
    out = []
    for k, entry in enumerate(data):
        if not isinstance(entry, dict) or set(entry) != {"at", "kind", "target"}:
            raise UsageError(f"argument --schedule: entry {k} must have exactly the keys at, kind, target, got {entry!r}")
        try:
            out.append(ClusterEvent(float(entry["at"]), str(entry["kind"]), str(entry["target"])))
        except (TypeError, ValueError) as exc:
            raise UsageError(f"argument --schedule: entry {k}: {exc}") from None
    return out


def _run(args: argparse.Namespace) -> int:
    policies = parse_policies(args.policy)
    options = router_options(args)
    schedule = load_schedule(args.schedule) if args.schedule else []
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise UsageError(f"argument --profile: {exc}") from None
    _check_outputs(args)
    show = not args.no_progress

    requests = load_trace(args.trace, args.limit)
    if not requests:
        raise UsageError(f"argument --trace: no requests in {args.trace!r}")
    try:
        check_schedule(schedule, args.replicas, [r.request_id for r in requests])
    except ValueError as exc:
        raise UsageError(f"argument --schedule: {exc}") from None
    with _progress_bar(len(requests), "hashing prompts", show) as bar:
        workload = prepare_workload(requests, profile.block_size, router_block_bytes=options.block_chars, progress=bar.update)
    del requests

    results = None
    if args.json:
        config = {
            "trace": trace_record(args.trace),
            "limit": args.limit,
            "replicas": args.replicas,
            "profile": profile.to_dict(),
            "slo_ttft": args.slo_ttft,
            "slo_target": DEFAULT_SLO_TARGET,
            "scrape_interval": args.scrape_interval,
            "sweep": bool(args.sweep),
            "sweep_tolerance": args.sweep_tolerance if args.sweep else None,
            "schedule": [dataclasses.asdict(e) for e in schedule],
            "router_options": {k: v for k, v in dataclasses.asdict(options).items() if k != "extra"},
        }
        results = ResultsFile(args.json, config)

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
                schedule=[dataclasses.replace(e, at=e.at / scale) for e in schedule],
            )
        return summarize(result, policy, args.slo_ttft)

    print(
        f"trace {args.trace}: {len(workload)} request{'' if len(workload) == 1 else 's'}; "
        f"{args.replicas} replica{'' if args.replicas == 1 else 's'} of {profile.name}; "
        f"SLO: TTFT <= {args.slo_ttft:g} s for {DEFAULT_SLO_TARGET:.0%} of requests",
        flush=True,
    )
    all_runs, capacity, interrupted = run_policies(args, policies, len(workload), run_at, results)
    if args.sweep and capacity:
        print("effective request capacity (qps): " + ", ".join(f"{p} {_fmt(c, '.2f')}" for p, c in capacity.items()), flush=True)
    if interrupted:
        where = f"; kept in {args.json}" if args.json else ""
        _note(f"interrupted: {len(capacity)} of {len(policies)} policies finished, {len(all_runs)} runs{where}")
        return 130
    if args.plot:
        plot_attainment(
            all_runs,
            args.plot,
            slo_ttft=args.slo_ttft,
            title=f"{Path(args.trace).name}: {args.replicas} x {profile.name}",
        )
    return 0


def run_policies(
    args: argparse.Namespace,
    policies: list[str],
    requests: int,
    run_at: Callable[[str, float], RunMetrics],
    results: ResultsFile | None,
) -> tuple[list[RunMetrics], dict[str, float | None], bool]:
    """Run every policy (once, or its capacity sweep), printing each run as it finishes and
    rewriting `results` after each. Ctrl-C stops between or inside runs: returns what finished
    (runs, capacity of the finished policies) and True for interrupted."""
    sweep_runs = expected_sweep_runs(args.sweep_runs, args.sweep_tolerance) if args.sweep else 1
    estimate = Estimate(len(policies), sweep_runs, args.sweep_runs if args.sweep else 1)
    _note(estimate.plan(requests))
    table = RunTable(policies, args.slo_ttft)
    print(table.header(), flush=True)
    all_runs: list[RunMetrics] = []
    capacity: dict[str, float | None] = {}

    def timed_run(policy: str, scale: float) -> RunMetrics:
        m = run_at(policy, scale)
        all_runs.append(m)
        print(table.row(m), flush=True)
        if len(all_runs) == 1:
            line = estimate.after_first_run(m.wall_s)
            if line:
                _note(line)
        if results is not None:
            results.write(all_runs, capacity, "running")
        return m

    try:
        for done, policy in enumerate(policies, 1):
            if args.sweep:
                cap, runs = find_capacity(
                    partial(timed_run, policy), start=args.sweep_start, max_runs=args.sweep_runs, rel_tol=args.sweep_tolerance
                )
                capacity[policy] = cap
                print(f"{policy}: effective request capacity {cap:.2f} qps ({len(runs)} runs)", flush=True)
            else:
                timed_run(policy, args.rate_scale)
                capacity[policy] = None
            line = estimate.after_policy(done)
            if line:
                _note(line)
    except KeyboardInterrupt:
        if results is not None:
            results.write(all_runs, capacity, "interrupted")
        return all_runs, capacity, True
    if results is not None:
        results.write(all_runs, capacity, "complete")
    return all_runs, capacity, False
