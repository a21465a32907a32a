"""Micro-benchmarks of pylb's native core.

How to read the numbers: every row is the median of several repeats on this (shared, noisy)
machine, so compare rows of the same run, not runs of different days; the "vs" column is the
ratio against the baseline named in the row, measured in the same run. Quality numbers (ring
spread) are printed beside speed where they matter.

Run:  .venv/bin/python bench/bench_core.py [--quick] [--json bench/results/core.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pylb import native

try:
    import xxhash
except ImportError:  # pragma: no cover - the test extras install it; its comparison rows are skipped without it
    xxhash = None


def timed(fn: Callable[[], Any], repeats: int, min_time: float = 0.0) -> float:
    """Median wall time of one call of fn over `repeats` runs (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def per_call(fn: Callable[[], Any], calls: int, repeats: int) -> float:
    """Median time per call when fn is called `calls` times in a row."""

    def loop() -> None:
        for _ in range(calls):
            fn()

    return timed(loop, repeats) / calls


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, group: str, name: str, value: float, unit: str, vs: str = "", ratio: float | None = None) -> None:
        self.rows.append({"group": group, "name": name, "value": value, "unit": unit, "baseline": vs, "ratio": ratio})

    def print(self) -> None:
        print(f"{'group':<11} {'benchmark':<62} {'value':>12} {'unit':<10} {'vs baseline':>22}")
        print("-" * 122)
        for r in self.rows:
            ratio = f"{r['ratio']:.2f}x {r['baseline']}" if r["ratio"] is not None else ""
            print(f"{r['group']:<11} {r['name']:<62} {r['value']:>12.4g} {r['unit']:<10} {ratio:>22}")


def bench_hashing(t: Table, quick: bool) -> None:
    """Chained hashing against its two limits: one-shot XXH3 over the whole buffer (the fastest
    build of it available here) and the same chaining written as a Python loop."""
    rng = np.random.default_rng(0)
    size = (4 if quick else 32) << 20
    data = rng.bytes(size)
    reps = 3 if quick else 7
    oneshot = timed(lambda: native.xxh3_64(data), reps)
    t.add("hashing", f"one-shot XXH3 over {size >> 20} MiB (pylb, xxhash.h)", size / oneshot / 1e9, "GB/s")
    limit = oneshot
    if xxhash is not None:
        py_oneshot = timed(lambda: xxhash.xxh3_64_intdigest(data), reps)
        t.add("hashing", "one-shot XXH3 (python-xxhash's SIMD build)", size / py_oneshot / 1e9, "GB/s")
        limit = min(oneshot, py_oneshot)
    # Many prompts, as the router and simulator hash them: 2-60 kB each.
    prompts, total = [], 0
    while total < size:
        prompts.append(data[total : total + int(rng.integers(2_000, 60_000))])
        total += len(prompts[-1])
    for block in (64, 512):
        single = timed(lambda: native.block_hashes(data, block), reps)
        batch = timed(lambda: native.block_hashes_batch(prompts, block), reps)
        python_loop = None
        if xxhash is not None:
            small = data[: (1 << 20)]

            def python_chain() -> None:
                prev = 0
                h = xxhash.xxh3_64_intdigest
                for start in range(0, len(small) - block + 1, block):
                    prev = h(small[start : start + block], seed=prev)

            python_loop = timed(python_chain, 3) / len(small) * size
            t.add("hashing", f"chained {block} B blocks, Python loop (python-xxhash)", size / python_loop / 1e9, "GB/s")
        t.add("hashing", f"chained {block} B blocks, one prompt (block_hashes)", size / single / 1e9, "GB/s",
              "of one-shot", limit / single)
        if python_loop:
            t.add("hashing", "  same, speed-up over the Python loop", python_loop / single, "x")
        t.add("hashing", f"chained {block} B blocks, {len(prompts)} prompts (block_hashes_batch)", size / batch / 1e9,
              "GB/s", "of one-shot", limit / batch)
        if python_loop:
            t.add("hashing", "  same, speed-up over the Python loop", python_loop / batch, "x")


def bench_ring(t: Table, quick: bool) -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**63, size=1_000_000 if not quick else 200_000, dtype=np.uint64)
    for n in (8, 64):
        names = [f"http://10.0.0.{i}:8000" for i in range(n)]
        ring = native.DualRing(names)
        few = keys[:20_000].tolist()

        def single() -> None:
            cand = ring.candidates
            for k in few:
                cand(k)

        single_t = timed(single, 3) / len(few)
        t.add("ring", f"candidates(key), {n} replicas, one call each", 1 / single_t / 1e6, "M/s")
        batch_t = timed(lambda: ring.candidates_batch(keys), 5)
        t.add("ring", f"candidates_batch, {n} replicas, {len(keys)} keys", len(keys) / batch_t / 1e6, "M/s",
              "single", single_t / (batch_t / len(keys)))
        a, b = ring.candidates_batch(keys)
        share_a = np.bincount(a, minlength=n).max() / (len(keys) / n)
        share_b = np.bincount(b, minlength=n).max() / (len(keys) / n)
        t.add("ring", f"busiest replica / fair share (a, b), {n} replicas", max(share_a, share_b), "ratio")
    names = [f"http://10.0.0.{i}:8000" for i in range(64)]
    build = timed(lambda: native.DualRing(names), 5)
    t.add("ring", "build DualRing, 64 replicas x 256 vnodes", build * 1e3, "ms")


def bench_mirror(t: Table, quick: bool) -> None:
    rng = np.random.default_rng(2)
    prompt = rng.integers(0, 2**63, size=256, dtype=np.uint64)
    for n in (8, 16, 64):
        mirror = native.CacheMirror(n, 100_000)
        # Fill every replica with unrelated blocks, and two of them with the prompt's prefix.
        for r in range(n):
            mirror.insert(r, rng.integers(0, 2**63, size=20_000, dtype=np.uint64))
        mirror.insert(0, prompt)
        mirror.insert(1, prompt[:128])
        lat = per_call(lambda: mirror.match(prompt), 2_000 if not quick else 300, 5)
        t.add("mirror", f"match 256-block prompt, {n} replicas (2 warm)", lat * 1e6, "us")
    mirror = native.CacheMirror(16, 100_000)
    for r in range(16):
        mirror.insert(r, prompt)
    lat = per_call(lambda: mirror.match(prompt), 2_000 if not quick else 300, 5)
    t.add("mirror", "match 256-block prompt, 16 replicas (all warm, worst case)", lat * 1e6, "us")
    ins = per_call(lambda: mirror.insert(3, prompt), 2_000 if not quick else 300, 5)
    t.add("mirror", "insert 256-block prompt (already cached, refresh LRU)", ins * 1e6, "us")


def bench_similarity(t: Table, quick: bool) -> None:
    from bench_similarity import numpy_topk, timed_pairs  # bench/ is sys.path[0] when run as a script

    rng = np.random.default_rng(3)
    b, n, d, k = 64, (100_000 if not quick else 20_000), 384, 10
    queries = rng.standard_normal((b, d), dtype=np.float32)
    keys = rng.standard_normal((n, d), dtype=np.float32)

    reps = 3 if quick else 5
    # alternately, so that both sides of each pair see the same load on a shared machine
    t_np, t_native, ratios = timed_pairs(lambda: numpy_topk(queries, keys, k), lambda: native.topk_similarity(queries, keys, k), reps)
    idx, sim = native.topk_similarity(queries, keys, k)
    ref_idx, ref_sim = numpy_topk(queries, keys, k)
    assert np.allclose(sim, ref_sim, atol=1e-5), "native similarities disagree with numpy"
    t.add("similarity", f"numpy normalise+matmul+argpartition B={b} N={n} D={d} k={k}", t_np * 1e3, "ms")
    t.add("similarity", "topk_similarity CPU, same shapes", t_native * 1e3, "ms", "numpy time", statistics.median(ratios))
    if native.cuda_available():
        import cupy as cp

        q_d, k_d = cp.asarray(queries), cp.asarray(keys)

        def gpu() -> None:
            native.topk_similarity(q_d, k_d, k)
            cp.cuda.Stream.null.synchronize()

        t_gpu = timed(gpu, reps)
        t.add("similarity", "topk_similarity CUDA (CuPy arrays), same shapes", t_gpu * 1e3, "ms", "CPU/GPU", t_native / t_gpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (smoke run)")
    parser.add_argument("--json", default="bench/results/core.json", help="where to write the results as JSON")
    parser.add_argument("--only", choices=["hashing", "ring", "mirror", "similarity"], action="append")
    args = parser.parse_args(argv)
    table = Table()
    load_start = os.getloadavg()
    print(f"load average (1/5/15 min) at the start: {' '.join(f'{x:.2f}' for x in load_start)}", file=sys.stderr, flush=True)
    for name, fn in (("hashing", bench_hashing), ("ring", bench_ring), ("mirror", bench_mirror), ("similarity", bench_similarity)):
        if args.only and name not in args.only:
            continue
        print(f"running {name} ...", file=sys.stderr, flush=True)
        fn(table, args.quick)
    table.print()
    load_end = os.getloadavg()
    print(f"load average (1/5/15 min): {' '.join(f'{x:.2f}' for x in load_start)} at the start, "
          f"{' '.join(f'{x:.2f}' for x in load_end)} at the end; {os.cpu_count()} CPUs")
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load_average": {"start": load_start, "end": load_end},
                "rows": table.rows,
            }, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
