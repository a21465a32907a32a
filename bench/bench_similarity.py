"""Batched cosine top-k: pylb's CPU (and CUDA, when available) against numpy, in one process.

How to read it: numpy and pylb's CPU path run alternately, --reps pairs after one warm-up each,
so that both sides of a pair see the same load on a shared machine; each line is the median
wall time of its side, and `ratio` is the median of the pairs' pylb/numpy ratios (the target is
<= 2.0 on the CPU), with the lowest and highest pair ratio beside it: a wide range means the
machine's load moved the figure. numpy's reference is what a Python
semantic cache would do: normalise keys and queries, one matmul, argpartition then sort the k.
`check` compares pylb's result with numpy's: similarities within 1e-5, indices equal except at
near-ties (|difference| < 1e-6). Keys are random normal float32, not real embeddings. The load
average is printed before and after: on a shared machine both sides slow down with it, and the
ratio with them (BENCHMARKS.md gives figures at several loads).

    python bench/bench_similarity.py                 # B=64, N=100000, D=384, k=10
    python bench/bench_similarity.py --cuda          # also the GPU (needs PYLB_CUDA=ON + CuPy)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

from pylb import native


def numpy_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = qn @ xn.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(ps, order, 1)


def loadavg() -> str:
    """The machine's load average (1, 5 and 15 minutes), as printed beside every result."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timed_pairs(base: Callable[[], object], other: Callable[[], object], reps: int) -> tuple[float, float, list[float]]:
    """Median times of `base` and `other` called alternately `reps` times each (after one warm-up
    call of each), and the `reps` ratios other/base of each pair."""
    base()
    other()
    pairs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        base()
        t1 = time.perf_counter()
        other()
        t2 = time.perf_counter()
        pairs.append((t1 - t0, t2 - t1))
    ratios = [o / b for b, o in pairs]
    return statistics.median(b for b, _ in pairs), statistics.median(o for _, o in pairs), ratios


def check(name: str, got: tuple, ref: tuple) -> str:
    gi, gs = (np.asarray(a) for a in got)
    ri, rs = ref
    err = float(np.abs(gs - rs).max())
    bad = (gi != ri) & (np.abs(gs - rs) >= 1e-6)
    ok = err < 1e-5 and not bad.any()
    return f"{name}: max |sim diff| {err:.1e}, index mismatches outside near-ties {int(bad.sum())} -> {'OK' if ok else 'FAIL'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-B", type=int, default=64)
    ap.add_argument("-N", type=int, default=100_000)
    ap.add_argument("-D", type=int, default=384)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cuda", action="store_true", help="also time the CUDA kernels")
    a = ap.parse_args()

    rng = np.random.default_rng(0)
    q = rng.standard_normal((a.B, a.D), dtype=np.float32)
    x = rng.standard_normal((a.N, a.D), dtype=np.float32)
    print(f"B={a.B} N={a.N} D={a.D} k={a.k}, {a.reps} alternating pairs; {os.cpu_count()} CPUs; {loadavg()}")

    ref = numpy_topk(q, x, a.k)
    t_np, t_cpu, ratios = timed_pairs(lambda: numpy_topk(q, x, a.k), lambda: native.topk_similarity(q, x, a.k, device="cpu"), a.reps)
    print(f"numpy (normalise + matmul + argpartition + sort): {t_np * 1e3:8.2f} ms")
    print(
        f"pylb cpu:                                         {t_cpu * 1e3:8.2f} ms   ratio {statistics.median(ratios):.2f} "
        f"(pairs {min(ratios):.2f}-{max(ratios):.2f})"
    )
    print(check("pylb cpu vs numpy", native.topk_similarity(q, x, a.k, device="cpu"), ref))
    print(f"after the CPU runs: {loadavg()}")

    if a.cuda:
        import cupy as cp

        qd, xd = cp.asarray(q), cp.asarray(x)

        def gpu() -> None:
            native.topk_similarity(qd, xd, a.k)
            cp.cuda.get_current_stream().synchronize()

        t_gpu = timed(gpu, max(a.reps, 20))
        print(f"pylb cuda (CuPy in, CuPy out, synchronised):      {t_gpu * 1e3:8.2f} ms   vs pylb cpu x{t_cpu / t_gpu:.1f}")
        t_gpu_np = timed(lambda: native.topk_similarity(q, x, a.k, device="cuda"), a.reps)
        print(f"pylb cuda (numpy in/out, incl. copies):           {t_gpu_np * 1e3:8.2f} ms")
        print(check("pylb cuda vs numpy", native.topk_similarity(qd, xd, a.k), ref))


if __name__ == "__main__":
    main()
