"""The TTFT model with and without a per-request constant (`router.prefill_intercept`), in the simulator.

    .venv/bin/python bench/ttft_intercept.py                 # the table in BENCHMARKS.md (~1 min)
    .venv/bin/python bench/ttft_intercept.py --rates 0.27    # one rate

The chat workload of the side-by-side harness (8 prefix groups, 96 sessions x 4 turns) on 2
replicas of the CPU profile fitted to the real pair (`cpu-small-llama-fleet`, which has a 300 ms
constant per request on a working replica), dualmap told each router SLO, at each rate scale:
the share within a 0.5 s TTFT and the router's own prediction error (P50 / P90 of |predicted -
observed| TTFT, `CoreRouter.ttft_prediction_error`), through the origin against with the constant.
"""

from __future__ import annotations

import argparse
import sys

from pylb.router import registry
from pylb.router.interface import RouterOptions
from pylb.sim.cluster import prepare_workload, simulate
from pylb.sim.profiles import load_profile
from pylb.sim.report import summarize
from pylb.workload.loaders import load_workload

CHAT = "synthetic:multi-turn:groups=8,sessions=96,turns=4,system_tokens=512,user_tokens=64,answer_tokens=32,rate=4.2,think_time_s=1.5"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="0.27,0.5,0.8", help="rate scales (default 0.27,0.5,0.8: 3.17, 5.87, 9.4 req/s)")
    ap.add_argument("--router-slos", default="5,0.5", help="SLOs the router is told (default 5,0.5)")
    ap.add_argument("--profile", default="cpu-small-llama-fleet")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    work = prepare_workload(load_workload(CHAT), profile.block_size)
    print("| router SLO | rate scale | within 0.5 s, origin -> intercept | prediction error P50 / P90 s, origin -> intercept |")
    print("| --- | --- | --- | --- |")
    for slo in (float(x) for x in args.router_slos.split(",")):
        for rate in (float(x) for x in args.rates.split(",")):
            cells = []
            for intercept in (False, True):
                router = registry.create("dualmap", RouterOptions(slo_ttft=slo, prefill_intercept=intercept))
                m = summarize(simulate(work, profile, 2, router, rate_scale=rate), "dualmap", 0.5)
                err = router.ttft_prediction_error() or (float("nan"), float("nan"))
                cells.append((m.slo_attainment, err))
            (a, ea), (b, eb) = cells
            print(f"| {slo:g} | {rate:g} | {100 * a:.1f} -> {100 * b:.1f} % | {ea[0]:.3f} / {ea[1]:.3f} -> {eb[0]:.3f} / {eb[1]:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
