"""Fidelity of the simulator: the side-by-side harness's real runs against `pylb simulate`'s.

How to read it
--------------
For each results file of `bench/peers/run.py` (real vLLM replicas behind pylb and other routers),
this replays the very same workload (`bench/peers/workloads.load(spec)`: the same requests, the
same text) through `pylb.sim.cluster.simulate` with a calibrated profile (`pylb calibrate`), the
same number of replicas, rate scale and SLO, once per target, and prints per target:

    hit rate      real (vLLM's counters) vs simulated (engine counters), difference in points
    TTFT p50      real (client clock) vs simulated, ratio sim / real
    within SLO    share of requests with TTFT <= SLO, difference in points
    pass          hit within 3 points, p50 within 25 %, SLO share within 5 points (issue 9 §2)

and whether the simulator ranks pylb's targets in the same order as the real runs did (by SLO
share, then TTFT p50). Real values are the harness's means over its repetitions (min-max in the
JSON).

Slowdown fit (`--factors 1,1.1,...`): `pylb calibrate` measures one idle replica and keeps the
least of its repeats, while in the harness two replicas, the router and the client share the
machine's cores, so every step of a loaded replica takes longer than calibrated. With several
factors, every target is simulated once per factor with every step time multiplied by it
(`Profile.slowed`), and the factor with the least *fit error* is reported, per results file and
over all of them: the mean over targets of |SLO share error| / 5 points + |ln(p50 sim / real)| /
ln 1.25, the two bounds below as units (a target within both scores at most 2). A factor that
holds across rates and routers describes the machine, not one run; `--write-profile OUT.yaml`
writes the profile slowed by the overall best factor, with the command in its header. The table
is printed at that factor (at the first one when only one is given).

Loaded overhead (`--overheads 0,0.1,...`): with it, every factor is tried with every value of the
profile's `loaded_request_overhead` (the delay between dispatch and a *working* engine's queue:
on a CPU replica the API server then waits for a core the engine keeps busy), and the best pair
is reported and written.

Running overhead (`--running-overheads 0,0.1,...`): every other pair is also tried with each
value of the profile's `running_request_overhead`, seconds added to a request's overhead per
request its replica's engine runs at the dispatch (on a CPU replica the API server streams every
running request's tokens on the core that a new request's tokenization waits for).

Other SLOs (`--slos 0.5,1,2,...`): a share within one SLO is one point of the TTFT distribution,
and a model can match it while the distribution is wrong (a constant overhead that puts every
loaded request at the same latency). With the harness's per-request records (`--keep-requests`),
each target is also scored within each of these SLOs, real against simulated; the fit error then
takes the mean share error over the run's SLO and these, and a table prints both and the order
of the targets at each SLO (does the simulator rank the routers as the real runs did, at short
and at long SLOs alike?).

Running batch (`--observations DIR`): each simulated pylb run's first-token observations are
written to DIR in the live router's debug-log format ("ttft observation": tokens ahead, requests
decoding, latency), so `bench/ttft_model.py --by-decoding 2` prints the simulated latency by
running batch beside the real log's (`docs/results/ttft_logs/`).

Inside the engines: when the harness recorded vLLM's own histograms (`engine_phases`, see
`bench/peers/run.py`), a second table compares, per target, the mean time from entering the
engine's queue to the first token (vLLM: queue + prefill time), the mean decode time, the
preemptions and the engine steps with the simulated engines' (`SimResult.enqueued`,
`SimResult.stats`). Those say which part of the model is off; the fit error does not use them.

Targets map to simulated routers so:

    pylb ARGS                  the router `pylb serve ARGS` builds (`pylb.proxy.balancer.create_router`)
    sglang / vllm-router       pylb's analog of their policy, dispatching at once as they do
      sglang --policy cache_aware -> cache-aware:low_match=min-load  (SGLang's algorithm, `pylb/router/policies/cache_aware.py`,
                                    as sglang-router 0.3.2 runs it: its binary is the model gateway's, whose
                                    cache-aware policy sends a low-match request to the least-loaded worker
                                    (`select_worker_min_load`), not to the smallest tree; with smallest-tree the
                                    simulated pair split the chat workload's 8 groups 4:4, the real one 5:3 or 6:2)
      --policy power_of_two      -> least-load         (with two replicas, the less loaded of both)
      --policy round_robin       -> round-robin
      vllm-router --policy cache_aware: none. Its real hit rate on the chat workload is
      power_of_two's (48 %, against 77 % for SGLang's), so SGLang's algorithm does not describe
      it (measured 2026-12-06, docs/results/peers_chat_5x3_20261206.json); it is skipped.

Usage (from the repository root; needs `bench/peers/` from the harness):

    python bench/fidelity.py --results docs/results/peers_chat.json [--results ...] \\
        --profile cpu-small-llama [--factors 1,1.2,1.4] [--overheads 0,0.2,0.4] [--running-overheads 0,0.1] \\
        [--slos 0.5,1,2,4,8] [--observations DIR] [--write-profile OUT.yaml] [--json docs/results/fidelity.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pylb.observability.logging import JsonFormatter
from pylb.router import registry
from pylb.router.interface import Router, RouterOptions
from pylb.sim.cluster import DEFAULT_SCRAPE_INTERVAL, prepare_workload, simulate
from pylb.sim.profiles import Profile, load_profile
from pylb.sim.report import summarize

REPO = Path(__file__).resolve().parents[1]

HIT_POINTS = 3.0
P50_RATIO = 0.25
SLO_POINTS = 5.0

ANALOGS: dict[tuple[str, str], str] = {
    ("sglang", "cache_aware"): "cache-aware:low_match=min-load",
    ("sglang", "power_of_two"): "least-load",
    ("sglang", "round_robin"): "round-robin",
    ("vllm-router", "power_of_two"): "least-load",
    ("vllm-router", "round_robin"): "round-robin",
}
"""Peer router policy -> the pylb policy that stands for it in the simulator."""

DEFAULT_PEER_POLICY = {"sglang": "cache_aware", "vllm-router": "round_robin"}
"""What each peer router runs without --policy."""

_AT_ONCE = RouterOptions(max_unprefilled_tokens=1_000_000_000, max_unprefilled_requests=1_000_000_000)


def _workloads_module() -> Any:
    peers = REPO / "bench" / "peers"
    if not (peers / "workloads.py").is_file():
        raise SystemExit(f"fidelity: {peers}/workloads.py not found: the side-by-side harness (bench/peers) is needed")
    sys.path.insert(0, str(peers))
    import workloads  # type: ignore[import-not-found]

    return workloads


def sim_router(spec: str, slo_ttft: float) -> tuple[str, Router]:
    """(description, router) standing for a harness target spec `NAME=KIND ARGS`."""
    _, _, rest = spec.partition("=")
    words = shlex.split(rest)
    kind, args = words[0], words[1:]
    if kind == "pylb":
        from pylb import config
        from pylb.proxy.balancer import create_router

        parser = argparse.ArgumentParser()
        config.add_arguments(parser)
        settings = config.load_from_args(parser.parse_args([*args, "--backend", "http://127.0.0.1:1"]), env={})
        return f"pylb {settings.router.policy}" + (f" {' '.join(args)}" if args else ""), create_router(settings.router)
    policy = DEFAULT_PEER_POLICY.get(kind, "")
    if "--policy" in args:
        policy = args[args.index("--policy") + 1]
    analog = ANALOGS.get((kind, policy))
    if analog is None:
        known = ", ".join(f"{k} {p}" for k, p in ANALOGS)
        raise ValueError(f"no simulated analog for {kind} --policy {policy!r} (known: {known})")
    options = RouterOptions(
        slo_ttft=slo_ttft,
        admission_factor=0.0,  # the peers refuse nothing
        max_unprefilled_tokens=_AT_ONCE.max_unprefilled_tokens,
        max_unprefilled_requests=_AT_ONCE.max_unprefilled_requests,
    )
    return f"{analog} (analog of {kind} {policy}, at once)", registry.create(analog, options)


@dataclass
class Row:
    """One target: real (harness mean) and simulated measures."""

    results: str
    target: str
    kind: str
    simulated_as: str
    reps: int
    real_hit: float
    sim_hit: float
    real_p50: float
    sim_p50: float
    real_slo: float
    sim_slo: float
    phases: dict[str, list[float | None]] = field(default_factory=dict)
    """Engine phases, each [real, simulated] (`engine_phases`); empty when the results lack them."""
    slo_shares: dict[str, list[float]] = field(default_factory=dict)
    """`--slos`: per SLO (seconds, as text), [real, simulated] share within it; real from the
    harness's per-request records (`--keep-requests`), mean over repetitions. Empty without."""

    @property
    def hit_ok(self) -> bool:
        return abs(self.sim_hit - self.real_hit) * 100 <= HIT_POINTS

    @property
    def p50_ok(self) -> bool:
        return abs(self.sim_p50 / self.real_p50 - 1) <= P50_RATIO

    @property
    def slo_ok(self) -> bool:
        return abs(self.sim_slo - self.real_slo) * 100 <= SLO_POINTS

    @property
    def fit_error(self) -> float:
        """|SLO share error| in units of SLO_POINTS plus |ln p50 ratio| in units of ln(1 + P50_RATIO).
        With `slo_shares` (`--slos`), the share error is the mean over the run's SLO and those, so
        that the fit weighs the whole TTFT distribution, not one point of it."""
        if not (self.sim_p50 > 0 and self.real_p50 > 0):
            return math.inf
        share_errors = [abs(self.sim_slo - self.real_slo)] + [abs(sim - real) for real, sim in self.slo_shares.values()]
        return float(np.mean(share_errors)) * 100 / SLO_POINTS + abs(math.log(self.sim_p50 / self.real_p50)) / math.log(1 + P50_RATIO)


PHASES = ("wait_prefill_s", "decode_s", "preemptions", "engine_steps")
"""Engine phases compared per target: mean seconds per request from entering the engine to its
first token (vLLM: queue + prefill time), mean seconds from the first token to the last (decode
time), and per run the preemptions and engine steps of the whole fleet."""


def real_phases(target: dict[str, Any]) -> dict[str, float | None] | None:
    """A harness target's engine phases (means over repetitions), None when it did not record them."""
    ph = target.get("engine_phases")
    if not ph or ph.get("queue_mean") is None or ph.get("prefill_mean") is None:
        return None
    return {
        "wait_prefill_s": ph["queue_mean"] + ph["prefill_mean"],
        "decode_s": ph.get("decode_mean"),
        "preemptions": ph.get("preemptions"),
        "engine_steps": ph.get("engine_steps"),
    }


def sim_phases(res: Any) -> dict[str, float | None]:
    """The same phases of one simulated run (`SimResult`): from entering the engine's queue
    (`SimResult.enqueued`) to the first token, and from the first token to the last."""
    done = ~np.isnan(res.first_token) & ~np.isnan(res.completion)
    wait = res.first_token[done] - res.enqueued[done]
    decode = res.completion[done] - res.first_token[done]
    return {
        "wait_prefill_s": float(wait.mean()) if done.any() else None,
        "decode_s": float(decode.mean()) if done.any() else None,
        "preemptions": float(res.stats.get("preemptions", 0)),
        "engine_steps": float(res.stats.get("engine_steps", 0)),
    }


def fit_error(rows: list[Row]) -> float:
    """Mean `Row.fit_error` over rows (inf without any)."""
    return sum(r.fit_error for r in rows) / len(rows) if rows else math.inf


def real_context(results_path: Path) -> dict[str, Any]:
    """What the harness recorded about its real runs: command, workload, load average per target."""
    doc = json.loads(results_path.read_text())
    return {
        "real_command": doc.get("command"),
        "workload": doc.get("workload", {}).get("spec"),
        "rate_scale": doc.get("rate_scale", 1.0),
        "real_load_avg_mean": {n: (t.get("load_avg_mean") or {}).get("mean") for n, t in doc["targets"].items()},
    }


def real_slo_shares(doc: dict[str, Any], slos: list[float]) -> dict[str, dict[float, float]]:
    """Per target, per SLO: the real share within it, mean over repetitions (`bench/peers/rescore.py`'s
    rule); {} when the runs kept no per-request records."""
    runs = doc.get("runs") or []
    if not slos or not runs or any("requests" not in run for run in runs):
        return {}
    import rescore  # type: ignore[import-not-found]  # bench/peers, on sys.path with workloads

    return {target: {s: float(np.mean(v)) for s, v in per.items()} for target, per in rescore.rescore(doc, slos).items()}


class _ObservationLog(logging.Handler):
    """Collects the router core's "ttft observation" debug lines of one simulated run, formatted
    as a live pylb logs them (`pylb.observability.logging.JsonFormatter`), for `bench/ttft_model.py`."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "ttft observation":
            self.lines.append(self.format(record))


def observed_simulation(observe_to: Path | None, *args: Any, **kwargs: Any) -> Any:
    """`simulate(*args, **kwargs)`; with `observe_to`, the router core's first-token observations of
    the run are written there (JSON lines, the live router's debug format)."""
    if observe_to is None:
        return simulate(*args, **kwargs)
    core_log = logging.getLogger("pylb.router.core")
    handler, level = _ObservationLog(), core_log.level
    core_log.addHandler(handler)
    core_log.setLevel(logging.DEBUG)
    try:
        res = simulate(*args, **kwargs)
    finally:
        core_log.removeHandler(handler)
        core_log.setLevel(level)
    observe_to.write_text("".join(line + "\n" for line in handler.lines))
    return res


def compare(
    results_path: Path, profiles: list[Profile], workloads: Any, slos: Sequence[float] = (), observe_dir: Path | None = None, labels: list[str] | None = None
) -> list[list[Row]]:
    """Simulate every target of one harness results file once per profile (the profiles share
    one geometry: slowed variants of one profile); per profile, one Row per target. With `slos`,
    each row also carries the real and simulated shares within each of them (when the results
    kept per-request records). With `observe_dir`, the router core's first-token observations of
    each pylb target's simulated run go to `observe_dir/RESULTS__TARGET__VARIANT.jsonl` (`labels`:
    the variants' names), for `bench/ttft_model.py --by-decoding` beside the real run's log."""
    doc = json.loads(results_path.read_text())
    real_at = real_slo_shares(doc, list(slos))
    if slos and not real_at:
        print(f"fidelity: {results_path.name}: no per-request records (harness --keep-requests), --slos skipped", file=sys.stderr)
    spec = doc["workload"]["spec"]
    replicas = int(doc["replicas"]["count"])
    slo = float(doc["slo_ttft_s"])
    scale = float(doc.get("rate_scale", 1.0))
    requests = workloads.load(spec)
    prepared = prepare_workload(requests, profiles[0].block_size)
    out: list[list[Row]] = []
    for k, profile in enumerate(profiles):
        rows: list[Row] = []
        for name, t in doc["targets"].items():
            kind = shlex.split(t["spec"].partition("=")[2])[0]
            try:
                described, router = sim_router(t["spec"], slo)
            except ValueError as exc:
                if profile is profiles[0]:
                    print(f"fidelity: {results_path.name} target {name}: skipped: {exc}", file=sys.stderr)
                continue
            observe_to = None
            if observe_dir is not None and kind == "pylb":
                label = (labels[k] if labels else f"profile{k}").replace(" ", "_")
                observe_to = observe_dir / f"{results_path.stem}__{name}__{label}.jsonl"
            res = observed_simulation(observe_to, prepared, profile, replicas, router, rate_scale=scale, scrape_interval=DEFAULT_SCRAPE_INTERVAL)
            m = summarize(res, name, slo)
            real_ph, sim_ph = real_phases(t), sim_phases(res)
            phases = {k: [real_ph[k], sim_ph[k]] for k in PHASES} if real_ph else {}
            shares = {f"{s:g}": [real_at[name][s], summarize(res, name, s).slo_attainment] for s in slos} if name in real_at else {}
            rows.append(
                Row(
                    results=results_path.name,
                    target=name,
                    kind=kind,
                    simulated_as=described,
                    reps=int(t["reps"]),
                    real_hit=t["hit_rate"]["mean"],
                    sim_hit=m.hit_rate,
                    real_p50=t["ttft_p50"]["mean"],
                    sim_p50=m.ttft_p50 or float("nan"),
                    real_slo=t["slo_attainment"]["mean"],
                    sim_slo=m.slo_attainment,
                    phases=phases,
                    slo_shares=shares,
                )
            )
        out.append(rows)
    return out


def ranking(rows: list[Row], real: bool) -> list[str]:
    """Targets best first: higher SLO share, then lower TTFT p50."""
    key = (lambda r: (-r.real_slo, r.real_p50)) if real else (lambda r: (-r.sim_slo, r.sim_p50))
    return [r.target for r in sorted(rows, key=key)]


def table(rows: list[Row]) -> str:
    """Markdown table of the rows."""
    out = [
        "| results | target | simulated as | hit real / sim (pts) | TTFT p50 real / sim (ratio) | within SLO real / sim (pts) | pass |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        ok = "".join("y" if x else "n" for x in (r.hit_ok, r.p50_ok, r.slo_ok))
        out.append(
            f"| {r.results} | {r.target} | {r.simulated_as} | {100 * r.real_hit:.1f} / {100 * r.sim_hit:.1f} "
            f"({100 * (r.sim_hit - r.real_hit):+.1f}) | {1e3 * r.real_p50:.0f} / {1e3 * r.sim_p50:.0f} ms "
            f"({r.sim_p50 / r.real_p50:.2f}x) | {100 * r.real_slo:.1f} / {100 * r.sim_slo:.1f} "
            f"({100 * (r.sim_slo - r.real_slo):+.1f}) | {ok} |"
        )
    return "\n".join(out)


def phases_table(rows: list[Row]) -> str:
    """Markdown table of the engine phases, real / simulated, for the rows that have them ('' if none)."""
    have = [r for r in rows if r.phases]
    if not have:
        return ""

    def pair(v: list[float | None], scale: float, fmt: str) -> str:
        real, sim = v
        if real is None or sim is None:
            return "-"
        ratio = f" ({sim / real:.2f}x)" if real else ""
        return f"{real * scale:{fmt}} / {sim * scale:{fmt}}{ratio}"

    out = [
        "| results | target | queue + prefill ms real / sim | decode ms real / sim | preemptions real / sim | engine steps real / sim |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in have:
        p = r.phases
        out.append(
            f"| {r.results} | {r.target} | {pair(p['wait_prefill_s'], 1e3, '.0f')} | {pair(p['decode_s'], 1e3, '.0f')} | "
            f"{pair(p['preemptions'], 1, '.0f')} | {pair(p['engine_steps'], 1, '.0f')} |"
        )
    return "\n".join(out)


def slos_table(rows: list[Row]) -> str:
    """Markdown table of the shares within each `--slos` SLO, real / simulated, and per results
    file the targets' order at each SLO, real and simulated ('' when no row has them)."""
    have = [r for r in rows if r.slo_shares]
    if not have:
        return ""
    slos = list(have[0].slo_shares)
    out = [
        "| results | target | " + " | ".join(f"within {s} s real / sim" for s in slos) + " |",
        "| --- | --- | " + " | ".join("---" for _ in slos) + " |",
    ]
    for r in have:
        cells = [f"{100 * real:.1f} / {100 * sim:.1f} ({100 * (sim - real):+.1f})" for real, sim in r.slo_shares.values()]
        out.append(f"| {r.results} | {r.target} | " + " | ".join(cells) + " |")
    out += ["", "| results | SLO | order real | order simulated | same |", "| --- | --- | --- | --- | --- |"]
    for results in dict.fromkeys(r.results for r in have):
        mine = [r for r in have if r.results == results]
        for s in slos:
            real = [r.target for r in sorted(mine, key=lambda r: -r.slo_shares[s][0])]
            sim = [r.target for r in sorted(mine, key=lambda r: -r.slo_shares[s][1])]
            out.append(f"| {results} | {s} s | {' > '.join(real)} | {' > '.join(sim)} | {'yes' if real == sim else 'no'} |")
    return "\n".join(out)


def _parse_numbers(text: str, flag: str, positive: bool) -> list[float]:
    """Comma-separated numbers for `flag` (argparse reports the value on error)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    bad = [v for v in values if not math.isfinite(v) or v < 0 or (positive and v == 0)]
    if not values or bad:
        raise argparse.ArgumentTypeError(f"{flag}: expected {'positive' if positive else 'non-negative'} numbers, got {text!r}")
    return values


def numbers_arg(flag: str, positive: bool) -> Any:
    """An argparse `type` for `flag`: comma-separated numbers, positive (or non-negative)."""
    return lambda text: _parse_numbers(text, flag, positive)


@dataclass(frozen=True)
class Variant:
    """One candidate model: the profile slowed by `factor`, with `loaded_overhead` seconds of
    request overhead at a working replica (None: the profile's own)."""

    factor: float
    loaded_overhead: float | None
    running_overhead: float | None = None

    @property
    def label(self) -> str:
        return (
            f"x{self.factor:g}"
            + ("" if self.loaded_overhead is None else f" loaded {self.loaded_overhead * 1e3:g} ms")
            + ("" if self.running_overhead is None else f" running {self.running_overhead * 1e3:g} ms")
        )

    def profile(self, base: Profile, name: str | None = None, why: str = "") -> Profile:
        p = base.slowed(self.factor, name=name, why=why) if self.factor != 1 or name else base
        for field_name, value, unit in (("loaded_request_overhead", self.loaded_overhead, "ms"),
                                        ("running_request_overhead", self.running_overhead, "ms per running request")):  # fmt: skip
            if value is not None:
                note = f"{field_name} {value * 1e3:g} {unit} (fitted)"
                p = replace(p, **{field_name: value}, description=f"{p.description}; {note}")
        return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", action="append", required=True, metavar="FILE", help="bench/peers/run.py results JSON (repeatable)")
    parser.add_argument("--profile", default="cpu-small-llama", metavar="NAME|FILE", help="calibrated profile (default cpu-small-llama)")
    parser.add_argument("--factors", type=numbers_arg("--factors", positive=True), default=[1.0], metavar="F,F,...",
                        help="step-time slowdown factors to try; the best fit is reported (default 1)")  # fmt: skip
    parser.add_argument("--overheads", type=numbers_arg("--overheads", positive=False), default=None, metavar="S,S,...",
                        help="loaded request overheads to try with every factor, seconds (default: the profile's own)")  # fmt: skip
    parser.add_argument("--running-overheads", type=numbers_arg("--running-overheads", positive=False), default=None, metavar="S,S,...",
                        help="request overheads per request running on the replica to try with every other pair, seconds (default: the profile's own)")  # fmt: skip
    parser.add_argument("--slos", type=numbers_arg("--slos", positive=True), default=[], metavar="S,S,...",
                        help="also compare the shares within these SLOs, seconds (needs the harness's --keep-requests records)")  # fmt: skip
    parser.add_argument("--observations", type=Path, metavar="DIR",
                        help="write each simulated pylb run's first-token observations here (for bench/ttft_model.py)")  # fmt: skip
    parser.add_argument("--write-profile", metavar="OUT.yaml", help="write the profile of the best variant over all files")
    parser.add_argument("--json", metavar="OUT", help="write the rows and the rankings as JSON")
    args = parser.parse_args(argv)
    base = load_profile(args.profile)
    variants = [Variant(f, o, r) for f in args.factors for o in (args.overheads or [None]) for r in (args.running_overheads or [None])]
    profiles = [v.profile(base) for v in variants]
    labels = [v.label for v in variants]
    workloads = _workloads_module()
    given = sys.argv[1:] if argv is None else argv
    command = [a if not os.path.isabs(a) else os.path.basename(a) for a in given]  # results by name
    doc: dict[str, Any] = {"command": "python bench/fidelity.py " + " ".join(shlex.quote(a) for a in command),
                           "profile": base.to_dict(), "factors": args.factors, "overheads": args.overheads,
                           "load_avg": os.getloadavg(), "files": []}  # fmt: skip
    by_variant: list[list[Row]] = [[] for _ in profiles]
    if args.observations:
        args.observations.mkdir(parents=True, exist_ok=True)
    for path in map(Path, args.results):
        per_variant = compare(path, profiles, workloads, args.slos, args.observations, labels)
        errors = [fit_error(rows) for rows in per_variant]
        best = errors.index(min(errors))
        for k, rows in enumerate(per_variant):
            by_variant[k] += rows
        rows = per_variant[best]
        pylb_rows = [r for r in rows if r.kind == "pylb"]
        real_rank, sim_rank = ranking(pylb_rows, True), ranking(pylb_rows, False)
        all_real, all_sim = ranking(rows, True), ranking(rows, False)
        doc["files"].append({"results": path.name, **real_context(path), "fit_error": dict(zip(labels, errors)),
                             "best": labels[best], "pylb_ranking_real": real_rank,
                             "pylb_ranking_sim": sim_rank, "ranking_real": all_real, "ranking_sim": all_sim})  # fmt: skip
        if len(profiles) > 1:
            print(f"{path.name}: fit error " + ", ".join(f"{lab} {e:.2f}" for lab, e in zip(labels, errors)) + f" -> best {labels[best]}")
        print(f"{path.name}: pylb targets ranked (SLO share, then p50): real {real_rank}, simulated {sim_rank}"
              f" -> {'same' if real_rank == sim_rank else 'DIFFERENT'}; all targets: real {all_real}, simulated {all_sim}")  # fmt: skip
    errors = [fit_error(rows) for rows in by_variant]
    best = errors.index(min(errors))
    if len(profiles) > 1:
        print("all files: fit error " + ", ".join(f"{lab} {e:.2f}" for lab, e in zip(labels, errors)) + f" -> best {labels[best]}")
    print(table(by_variant[best]))
    if phases := phases_table(by_variant[best]):
        print("\nInside the engines (vLLM's own histograms against the simulated engines):\n" + phases)
    if shares := slos_table(by_variant[best]):
        print("\nAt other SLOs (the routers as they ran; only the scoring changes):\n" + shares)
    print(f"load average {os.getloadavg()[0]:.2f}; profile {base.name} {labels[best]}")
    if args.write_profile:
        from pylb.sim.calibrate import profile_yaml

        why = f"fitted by bench/fidelity.py to {len(args.results)} side-by-side results file(s), fit error {errors[best]:.2f}"
        fitted = variants[best].profile(base, name=Path(args.write_profile).stem, why=why)
        Path(args.write_profile).write_text(profile_yaml(fitted, [doc["command"]]))
        print(f"wrote {args.write_profile}")
    if args.json:
        doc["best"] = labels[best]
        doc["best_factor"] = variants[best].factor
        doc["best_loaded_overhead"] = variants[best].loaded_overhead
        doc["fit_error"] = dict(zip(labels, errors))
        doc["rows"] = [asdict(r) | {"hit_ok": r.hit_ok, "p50_ok": r.p50_ok, "slo_ok": r.slo_ok} for r in by_variant[best]]
        doc["rows_by_variant"] = {lab: [asdict(r) for r in rows] for lab, rows in zip(labels, by_variant)}
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
