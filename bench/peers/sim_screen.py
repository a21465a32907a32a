"""Screen harness targets in the simulator before spending real-vLLM time on them.

How to read it
--------------
The side-by-side harness (`bench/peers/run.py`) takes 2-3 minutes per run on two CPU replicas, and
its repetitions spread by 10-25 points within a short SLO; a routing variant worth a real batch
should first hold in the simulator. This runs the harness's own targets (`NAME=pylb ARGS`,
`NAME=sglang --policy ...`, simulated as `bench/fidelity.py` simulates them: the very router
`pylb serve ARGS` builds, or pylb's analog of the peer's policy dispatching at once) on the
harness's workload spec, once per seed of the workload's generator and per rate scale, on a
profile fitted to the real pair (`--profile cpu-small-llama-avx2-quiet` by default: the AVX2
machine with nothing else running, BENCHMARKS.md "The AVX2 machine alone"), and prints per rate
scale the mean over the seeds of each target's share within each SLO and its hit rate.

The simulator's ranking is only as good as its fit: on that profile it reproduces most real
shares within 2 s and beyond to 5 points (all to 12), but not every target's share within 0.5-1 s
(BENCHMARKS.md lists where it is wrong), so a screen chooses what to run for real, and the real
batch decides.

Usage (from the repository root):

    python bench/peers/sim_screen.py --workload synthetic:multi-turn:groups=8,sessions=48,... \\
        --slo-ttft 0.5 --rate-scales 0.15,0.19,0.23,0.27,0.35 --seeds 0,1,2,3,4 \\
        --target 'told=pylb --router-slo-ttft-s 0.5' --target 'sglang-ca=sglang --policy cache_aware' \\
        [--slos 0.5,1,2,4,8] [--replicas 2] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "peers"))

import fidelity  # noqa: E402  (bench/fidelity.py: the harness targets' simulated routers)
import workloads  # noqa: E402  (bench/peers/workloads.py: the harness's workload specs)

from pylb.sim.cluster import DEFAULT_SCRAPE_INTERVAL, prepare_workload, simulate  # noqa: E402
from pylb.sim.profiles import load_profile  # noqa: E402
from pylb.sim.report import summarize  # noqa: E402
from pylb.workload.loaders import SYNTHETIC_PREFIX  # noqa: E402


def with_seed(spec: str, seed: int) -> str:
    """The workload spec with its generator's `seed` set (any seed it had dropped): the parameters
    split as `pylb.workload.loaders.parse_synthetic` splits them."""
    if not spec.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"--workload {spec!r}: only synthetic workloads have seeds")
    name, _, params = spec[len(SYNTHETIC_PREFIX) :].partition(":")
    kept = [item for item in filter(None, (x.strip() for x in params.split(","))) if item.partition("=")[0].strip() != "seed"]
    return f"{SYNTHETIC_PREFIX}{name}:" + ",".join([*kept, f"seed={seed}"])


def screen(workload: str, targets: dict[str, str], slo_ttft: float, rate_scales: list[float], seeds: list[int],
           share_slos: list[float], profile_name: str, replicas: int) -> dict[str, Any]:  # fmt: skip
    """Simulate every target per seed and rate scale; the routers are told `slo_ttft` (the
    harness's SLO) and scored within each of `share_slos`. Returns {scale: {target: {"within":
    {slo: mean share %}, "hit": mean %, "per_seed": [...]}}}."""
    profile = load_profile(profile_name)
    out: dict[str, Any] = {}
    for seed in seeds:
        prepared = prepare_workload(workloads.load(with_seed(workload, seed)), profile.block_size)
        for scale in rate_scales:
            cell = out.setdefault(f"{scale:g}", {})
            for name, spec in targets.items():
                _, router = fidelity.sim_router(f"{name}={spec}", slo_ttft)
                res = simulate(prepared, profile, replicas, router, rate_scale=scale, scrape_interval=DEFAULT_SCRAPE_INTERVAL)
                row = {f"{s:g}": 100 * summarize(res, name, s).slo_attainment for s in share_slos}
                row["hit"] = 100 * summarize(res, name, slo_ttft).hit_rate
                cell.setdefault(name, {"per_seed": []})["per_seed"].append({"seed": seed, **row})
    for cell in out.values():
        for t in cell.values():
            runs = t["per_seed"]
            t["within"] = {f"{s:g}": sum(r[f"{s:g}"] for r in runs) / len(runs) for s in share_slos}
            t["hit"] = sum(r["hit"] for r in runs) / len(runs)
    return out


def table(result: dict[str, Any], slos: list[float]) -> str:
    """Markdown: one row per rate scale and target, the mean shares and hit rate."""
    head = "| rate scale | target | " + " | ".join(f"within {s:g} s" for s in slos) + " | hit |"
    lines = [head, "|" + " --- |" * (len(slos) + 3)]
    for scale, cell in result.items():
        for name, t in cell.items():
            shares = " | ".join(f"{t['within'][f'{s:g}']:.1f} %" for s in slos)
            lines.append(f"| {scale} | {name} | {shares} | {t['hit']:.1f} % |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, check every target and the workload, screen, print and write."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", required=True, help="the harness's workload spec (synthetic: seeds are set per run)")
    parser.add_argument("--target", action="append", required=True, metavar="NAME=KIND ARGS", help="a harness target (repeatable)")
    parser.add_argument("--slo-ttft", type=float, default=0.5, help="the harness's SLO, seconds (default 0.5)")
    parser.add_argument("--rate-scales", type=fidelity.numbers_arg("--rate-scales", positive=True), required=True, metavar="X,X,...")
    parser.add_argument("--seeds", default="0,1,2", metavar="N,N,...", help="workload generator seeds (default 0,1,2)")
    parser.add_argument("--slos", type=fidelity.numbers_arg("--slos", positive=True), default=[0.5, 1, 2, 4, 8], metavar="S,S,...")
    parser.add_argument("--profile", default="cpu-small-llama-avx2-quiet", metavar="NAME|FILE")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--json", metavar="OUT", help="also write the result (per seed too) as JSON")
    args = parser.parse_args(argv)
    targets: dict[str, str] = {}
    for t in args.target:
        name, sep, spec = t.partition("=")
        if not sep or not name or not spec.strip():
            parser.error(f"--target {t!r}: expected NAME=KIND ARGS")
        if name in targets:
            parser.error(f"--target {t!r}: the name {name!r} is given twice")
        try:
            fidelity.sim_router(t, args.slo_ttft)  # a bad target fails here, not after the others ran
        except ValueError as exc:
            parser.error(f"--target {t!r}: {exc}")
        except SystemExit:
            parser.error(f"--target {t!r}: its arguments are not `pylb serve`'s (the error above)")
        targets[name] = spec
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    if args.slo_ttft <= 0:
        parser.error(f"--slo-ttft {args.slo_ttft}: expected a positive number of seconds")
    if args.replicas < 1:
        parser.error(f"--replicas {args.replicas}: expected at least 1")
    if len({f"{x:g}" for x in args.rate_scales}) != len(args.rate_scales):
        parser.error(f"--rate-scales: each scale once (got {','.join(f'{x:g}' for x in args.rate_scales)})")
    try:
        workloads.load(with_seed(args.workload, seeds[0]))
    except ValueError as exc:
        parser.error(f"--workload {args.workload!r}: {exc}")
    if args.json and not Path(args.json).parent.is_dir():
        parser.error(f"--json {args.json!r}: no directory {str(Path(args.json).parent)!r}")
    result = screen(args.workload, targets, args.slo_ttft, args.rate_scales, seeds, args.slos, args.profile, args.replicas)
    command = "python bench/peers/sim_screen.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    print(f"# {command}\n# mean over seeds {args.seeds}, profile {args.profile}, {args.replicas} replicas")
    print(table(result, args.slos))
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "profile": args.profile, "seeds": seeds, "result": result}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
