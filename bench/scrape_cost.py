"""What one metrics scrape costs a replica: the whole `/metrics` page against the filtered one.

How to read it
--------------
pylb scrapes every replica every `fleet.scrape_interval_s` (0.5 s). A vLLM API server renders
its whole page (~50 kB, mostly histograms) on the process that also streams tokens to clients;
with `fleet.scrape_filtered` (the default) pylb asks instead for `/metrics/?name[]=...` with the
series it reads (`pylb.fleet.scrape.FILTER_PARAMS`), which prometheus-client's exposition,
mounted there by vLLM, renders alone. This benchmark sends `--scrapes` requests of each kind to
one running replica, one at a time, in `--rounds` alternating rounds, and reads the replica's own
`process_cpu_seconds_total` (prometheus-client's process collector) before and after each round:
the CPU the replica spent per scrape, its wall time at the client, the page size, and that both
pages parse to the same `ReplicaMetrics`. The figure that matters is the ratio in one run; the
CPU counter's resolution is 10 ms, so a round needs a few hundred scrapes.

    ../shared/vllm/serve.sh VENV MODEL 8101 --num-gpu-blocks-override 256 --block-size 32 --dtype float32 &
    .venv/bin/python bench/scrape_cost.py --url http://127.0.0.1:8101 --out bench/results/scrape_cost.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp

from pylb.cli_args import positive_int
from pylb.fleet.scrape import FILTER_PARAMS, filtered_metrics_path, parse_vllm_metrics

CPU_SERIES = re.compile(r"^process_cpu_seconds_total(?:\{[^}]*\})? (\S+)$", re.M)


async def replica_cpu_s(session: aiohttp.ClientSession, url: str) -> float:
    """The replica's process CPU seconds (asked for alone, so the question costs little)."""
    async with session.get(url + filtered_metrics_path("/metrics"), params=[("name[]", "process_cpu_seconds_total")]) as r:
        text = await r.text()
    found = CPU_SERIES.search(text)
    if r.status != 200 or found is None:
        raise SystemExit(f"scrape_cost: {url} has no process_cpu_seconds_total on /metrics/ (HTTP {r.status}); is it a vLLM replica?")
    return float(found.group(1))


async def measure(url: str, scrapes: int, rounds: int) -> dict[str, Any]:
    """Per kind ("whole", "filtered"): CPU ms and wall ms per scrape (mean over rounds), page bytes."""
    kinds = {"whole": ("/metrics", ()), "filtered": (filtered_metrics_path("/metrics"), FILTER_PARAMS)}
    out: dict[str, Any] = {k: {"cpu_ms": [], "wall_ms": [], "bytes": 0} for k in kinds}
    pages: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for _ in range(rounds):
            for kind, (path, params) in kinds.items():
                cpu0, wall0 = await replica_cpu_s(session, url), time.perf_counter()
                for _ in range(scrapes):
                    async with session.get(url + path, params=params) as r:
                        if r.status != 200:
                            raise SystemExit(f"scrape_cost: {url}{path} answered HTTP {r.status}")
                        pages[kind] = await r.text()
                wall = time.perf_counter() - wall0
                cpu = await replica_cpu_s(session, url) - cpu0
                out[kind]["cpu_ms"].append(1000 * cpu / scrapes)
                out[kind]["wall_ms"].append(1000 * wall / scrapes)
                out[kind]["bytes"] = len(pages[kind].encode())
    for kind in kinds:
        out[kind]["cpu_ms_mean"] = sum(out[kind]["cpu_ms"]) / rounds
        out[kind]["wall_ms_mean"] = sum(out[kind]["wall_ms"]) / rounds
    out["same_metrics"] = parse_vllm_metrics(pages["whole"]) == parse_vllm_metrics(pages["filtered"])
    out["cpu_ratio_whole_to_filtered"] = out["whole"]["cpu_ms_mean"] / max(out["filtered"]["cpu_ms_mean"], 1e-9)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="base URL of one running vLLM replica, e.g. http://127.0.0.1:8101")
    p.add_argument("--scrapes", type=positive_int, default=200, help="scrapes per kind per round (default 200)")
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--out", help="also write the result here as JSON")
    args = p.parse_args(argv)
    result = asyncio.run(measure(args.url.rstrip("/"), args.scrapes, args.rounds))
    for kind in ("whole", "filtered"):
        r = result[kind]
        print(f"{kind:8s} {r['bytes']:7d} B   replica CPU {r['cpu_ms_mean']:6.2f} ms/scrape   wall {r['wall_ms_mean']:6.2f} ms")
    print(f"whole / filtered CPU: {result['cpu_ratio_whole_to_filtered']:.1f}x; same ReplicaMetrics: {result['same_metrics']}")
    if args.out:
        doc = {"command": shlex.join(["python", "bench/scrape_cost.py", *(argv if argv is not None else sys.argv[1:])]),
               "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    return 0 if result["same_metrics"] else 1


if __name__ == "__main__":
    sys.exit(main())
