"""Router overhead: microseconds of router work per request, per policy, on real prompts.

How to read the numbers: each row replays the first N requests of a trace through one policy's
router (no simulator): submit, poll (dispatch), first token and completion, with every request
finishing before the next arrives, so queues stay short and the numbers are the per-request cost
of the decision path (key, candidates, mirror match and insert, heaps, estimator), not of
queueing. `us/req` is the median over repeats of total time / N on this shared machine;
compare rows of one run.

Run:  .venv/bin/python bench/bench_router.py --trace ../shared/traces/mooncake_conversation_trace.jsonl
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from pylb.router import registry
from pylb.router.interface import RouterOptions, RoutingRequest, Usage
from pylb.sim.cluster import prepare_workload
from pylb.workload.loaders import load_workload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--limit", type=int, default=4000)
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", default="all", help="comma-separated policy specs; NAME#K gives it K-token key blocks (e.g. dualmap#512)")
    args = ap.parse_args(argv)
    work = prepare_workload(load_workload(args.trace, limit=args.limit), 16)
    reqs = [RoutingRequest(w.request_id, w.router_hashes, w.prompt_tokens, w.output_tokens, w.arrival_s, prompt_hash=w.prompt_hash) for w in work]
    names = [f"replica-{i}" for i in range(args.replicas)]
    policies = registry.names() if args.policy == "all" else args.policy.split(",")
    print(f"{len(reqs)} requests, {args.replicas} replicas; mean {sum(len(r.block_hashes) for r in reqs) / len(reqs):.0f} router blocks per prompt")
    print(f"{'policy':18} {'us/req':>8}")
    for policy in policies:
        samples = []
        for _ in range(args.repeats):
            name, _, key_block = policy.partition("#")
            router = registry.create(name, RouterOptions(**({"key_block_tokens": int(key_block)} if key_block else {})))
            router.on_membership(names, 0.0)
            t0 = time.perf_counter()
            for k, r in enumerate(reqs):
                now = float(k)
                router.submit(r, now)
                for d in router.poll(now):
                    router.on_first_token(d.request_id, d.replica, now + 0.1)
                    router.on_complete(d.request_id, d.replica, now + 0.2, Usage(r.prompt_tokens, 1))
            samples.append((time.perf_counter() - t0) / len(reqs) * 1e6)
        print(f"{policy:18} {statistics.median(samples):8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
