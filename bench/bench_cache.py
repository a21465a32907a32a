"""Semantic cache benchmarks: similarity lookups on the native core, and the cache in the proxy.

How to read it
--------------
1. `lookup` (in-process): one cache lookup = cosine top-k (k=4) of B query embeddings against
   N stored ones of dimension D, for N in --sizes, D in --dims, B in --batches. pylb's
   `native.topk_similarity` (CPU: OpenBLAS GEMM per key tile + heap fold; the GPU twin with
   --cuda) against numpy as a Python semantic cache would do it with its keys kept normalised:
   normalise the queries, one matmul, argpartition, sort the k. Keys are random normal float32
   rows (the cost does not depend on the values). Sides alternate call by call so both see the
   same load; per cell: P50 and P99 latency of one call, lookups per second at P50 (B / P50),
   and the numpy/pylb ratio of P50s (> 1: pylb faster). Each pylb result is checked against
   numpy's (similarities within 1e-4). The `unit` columns time the call the cache makes
   (`keys_unit=True`: its rows are stored unit-length, so the key norms are skipped); the BLAS
   libraries and the kernels they run (threadpoolctl, when installed) are printed first.
2. `proxy` (three processes: an instant backend that answers every completion at once with
   `finish_reason: stop`, `pylb serve` with the cache off and `pylb serve` with the cache on,
   hashing embedder; a client on this machine sends one request at a time): P50/P99 latency
   direct to the backend, through pylb without the cache, through pylb with the cache on for
   *misses* (every prompt new, so every request runs the exact lookup, the similarity lookup in
   its partition -- which grows to --requests entries -- and stores its answer) and for *hits*
   (the same request again: answered by pylb without the backend). Added latency on a miss =
   cache-on miss P50 - cache-off P50 (target <= 1 ms).
3. `join` (pylb serve with the cache on, hashing embedder, in front of one fake vLLM replica,
   `pylb sim-replicas` with the H100 profile at --speed, 32 output tokens): per round a streamed
   request (the leader), then after --delay-s --followers identical streamed requests at once.
   With the cache on they join the leader's stream live; with it off (a second pylb) each is a
   request of its own on the replica. Per side: P50/P99 of the followers' time to their first
   bytes, and of the leader's remaining time when they came (what a follower waited before live
   joins: the leader's whole answer), and the requests the replica served.

The machine is shared: the load average is printed with the results; compare only within one run.

    .venv/bin/python bench/bench_cache.py lookup                       # 10k,100k x 384,768 x 1,16,64
    .venv/bin/python bench/bench_cache.py lookup --sizes 1000000 --dims 384
    .venv/bin/python bench/bench_cache.py lookup --cuda                # also the GPU (PYLB_CUDA=ON build + CuPy)
    .venv/bin/python bench/bench_cache.py proxy
    .venv/bin/python bench/bench_cache.py join
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench_support import free_port, stop_processes, wait_ready

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- lookup ---------------------------------------------------------------------------------------


def numpy_lookup(q: np.ndarray, keys_normalised: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A Python cache's lookup: keys already normalised at store time."""
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    s = qn @ keys_normalised.T
    part = np.argpartition(-s, k - 1, axis=1)[:, :k]
    ps = np.take_along_axis(s, part, 1)
    order = np.argsort(-ps, axis=1, kind="stable")
    return np.take_along_axis(part, order, 1), np.take_along_axis(ps, order, 1)


def blas_info() -> list[dict]:
    """The BLAS libraries loaded in this process (numpy's and pylb's) with their kernel and threads."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [
        {k: i.get(k) for k in ("internal_api", "filepath", "version", "architecture", "num_threads")}
        for i in threadpool_info()
        if i.get("user_api") == "blas"
    ]


def run_lookup(args: argparse.Namespace) -> dict:
    from pylb import native

    rng = np.random.default_rng(0)
    blas = blas_info()
    print("OPENBLAS_CORETYPE=" + os.environ.get("OPENBLAS_CORETYPE", "(unset)"), "OPENBLAS_L2_SIZE=" + os.environ.get("OPENBLAS_L2_SIZE", "(unset)"))
    for i in blas:
        print(f"  {i['filepath']}: {i['internal_api']} {i['version']}, kernel {i['architecture']}, {i['num_threads']} threads")
    cuda = None
    if args.cuda:
        import cupy as cp

        cuda = cp
    rows = []
    print(f"lookup: k={args.k}, load average {load()}")
    print(f"{'N':>8} {'D':>4} {'B':>3} | {'pylb P50':>9} {'P99':>8} {'lookups/s':>10} | {'unit P50':>9} {'P99':>8} | {'numpy P50':>9} {'P99':>8} {'lookups/s':>10} | {'numpy/pylb':>10} {'numpy/unit':>10}"
          + (f" | {'GPU P50':>8} {'P99':>8} {'lookups/s':>10} {'cpu/gpu':>8}" if cuda else ""))  # fmt: skip
    for n in args.sizes:
        for d in args.dims:
            keys = rng.standard_normal((n, d), dtype=np.float32)
            keys /= np.linalg.norm(keys, axis=1, keepdims=True)
            keys_dev = cuda.asarray(keys) if cuda else None
            for b in args.batches:
                q = rng.standard_normal((b, d), dtype=np.float32)
                reps = max(3, min(args.reps, int(args.budget_s / max(1e-6, 2 * n * d * b * 2e-10 + 1e-4))))
                pylb_t, unit_t, numpy_t, gpu_t = [], [], [], []
                _, ps = native.topk_similarity(q, keys, args.k)
                _, ns = numpy_lookup(q, keys, args.k)
                assert np.allclose(ps, ns, atol=1e-4), "pylb and numpy disagree"
                _, us = native.topk_similarity(q, keys, args.k, keys_unit=True)
                assert np.allclose(us, ns, atol=1e-4), "pylb (unit keys) and numpy disagree"
                # each side in its own run of calls: pylb and numpy link two OpenBLAS builds, whose
                # thread pools spin for a while after a call and stall the other's next call
                sides = ((pylb_t, native.topk_similarity, {}), (unit_t, native.topk_similarity, {"keys_unit": True}), (numpy_t, numpy_lookup, {}))
                for calls, fn, kw in sides:
                    fn(q, keys, args.k, **kw)  # warm this side's threads
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        fn(q, keys, args.k, **kw)
                        calls.append(time.perf_counter() - t0)
                for _ in range(reps if cuda else 0):
                    if cuda:
                        qd = cuda.asarray(q)
                        cuda.cuda.Device().synchronize()
                        t4 = time.perf_counter()
                        native.topk_similarity(qd, keys_dev, args.k)
                        cuda.cuda.Device().synchronize()
                        gpu_t.append(time.perf_counter() - t4)
                p50, p99, n50, n99 = pct(pylb_t, 0.5), pct(pylb_t, 0.99), pct(numpy_t, 0.5), pct(numpy_t, 0.99)
                u50, u99 = pct(unit_t, 0.5), pct(unit_t, 0.99)
                row = {"n": n, "d": d, "b": b, "reps": reps, "pylb_p50_ms": p50 * 1e3, "pylb_p99_ms": p99 * 1e3, "pylb_lookups_per_s": b / p50,
                       "numpy_p50_ms": n50 * 1e3, "numpy_p99_ms": n99 * 1e3, "numpy_lookups_per_s": b / n50, "numpy_over_pylb": n50 / p50,
                       "unit_p50_ms": u50 * 1e3, "unit_p99_ms": u99 * 1e3, "numpy_over_unit": n50 / u50}  # fmt: skip
                line = (f"{n:>8} {d:>4} {b:>3} | {p50 * 1e3:>8.3f}m {p99 * 1e3:>7.3f}m {b / p50:>10,.0f} | {u50 * 1e3:>8.3f}m {u99 * 1e3:>7.3f}m | {n50 * 1e3:>8.3f}m {n99 * 1e3:>7.3f}m "
                        f"{b / n50:>10,.0f} | {n50 / p50:>10.2f} {n50 / u50:>10.2f}")  # fmt: skip
                if cuda:
                    g50, g99 = pct(gpu_t, 0.5), pct(gpu_t, 0.99)
                    row.update({"gpu_p50_ms": g50 * 1e3, "gpu_p99_ms": g99 * 1e3, "gpu_lookups_per_s": b / g50, "cpu_over_gpu": p50 / g50})
                    line += f" | {g50 * 1e3:>7.3f}m {g99 * 1e3:>7.3f}m {b / g50:>10,.0f} {p50 / g50:>8.1f}"
                rows.append(row)
                print(line, flush=True)
            del keys, keys_dev
    print(f"load average at the end: {load()}")
    return {"k": args.k, "blas": blas, "rows": rows}


# ---- proxy ----------------------------------------------------------------------------------------


def backend_main(port: int) -> None:
    """bench_proxy's instant backend, answering completions with finish_reason stop (storable)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_proxy
    import uvloop

    body = bench_proxy._JSON_BODY.replace(b'"finish_reason": "length"', b'"finish_reason": "stop"')
    assert body != bench_proxy._JSON_BODY
    bench_proxy._JSON_BODY = body
    bench_proxy.backend_main(port)
    uvloop  # noqa: B018 - imported so a missing uvloop fails here, not in the child


async def _latencies(url: str, prompts: list[str], auth: bool) -> tuple[list[float], set[str]]:
    import aiohttp

    headers = {"Content-Type": "application/json", **({"Authorization": "Bearer bench"} if auth else {})}
    out, seen = [], set()
    async with aiohttp.ClientSession() as s:
        for prompt in prompts:
            body = json.dumps({"model": "bench", "prompt": prompt, "max_tokens": 1, "temperature": 0}).encode()
            t0 = time.perf_counter()
            async with s.post(url + "/v1/completions", data=body, headers=headers) as r:
                await r.read()
                assert r.status == 200, r.status
                seen.add(r.headers.get("x-pylb-cache", "-"))
            out.append(time.perf_counter() - t0)
    return out, seen


def run_proxy(args: argparse.Namespace) -> dict:
    import uvloop

    bport, off_port, on_port = free_port(), free_port(), free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "backend", str(bport)])]
    base = [sys.executable, "-P", "-m", "pylb.cli", "serve", "--backend", f"http://127.0.0.1:{bport}", "--policy", "round-robin",
            "--log-level", "warning", "--no-logging-access-log"]  # fmt: skip
    try:
        uvloop.run(wait_ready(f"http://127.0.0.1:{bport}/health"))
        procs.append(subprocess.Popen([*base, "--port", str(off_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([*base, "--port", str(on_port), "--cache-enabled", "--cache-embedder", "hashing"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        direct, off, on = (f"http://127.0.0.1:{p}" for p in (bport, off_port, on_port))
        uvloop.run(wait_ready(off + "/ready"))
        uvloop.run(wait_ready(on + "/ready"))
        print(f"proxy: {args.requests} requests per measurement, one at a time; load average {load()}")
        n = args.requests
        warm = [f"warm-up prompt {i}: tell me about topic {i}" for i in range(200)]
        for url in (direct, off, on):
            uvloop.run(_latencies(url, warm, auth=True))
        res: dict[str, list[float]] = {"direct": [], "pylb cache off": [], "pylb cache on, miss": [], "pylb cache on, hit": []}
        for part in range(4):  # alternate the measurements in quarters so that each sees the same load
            prompts = [f"What is the meaning of request number {part}-{i} in the benchmark, in one sentence?" for i in range(n // 4)]
            res["direct"] += uvloop.run(_latencies(direct, prompts, auth=True))[0]
            res["pylb cache off"] += uvloop.run(_latencies(off, prompts, auth=True))[0]
            lat, seen = uvloop.run(_latencies(on, prompts, auth=True))
            assert seen == {"miss"}, seen
            res["pylb cache on, miss"] += lat
            lat, seen = uvloop.run(_latencies(on, prompts[:1] * (n // 4), auth=True))
            assert seen == {"hit"}, seen
            res["pylb cache on, hit"] += lat
        out = {}
        print(f"{'path':<24} {'P50 ms':>8} {'P99 ms':>8}")
        for name, xs in res.items():
            out[name] = {"p50_ms": pct(xs, 0.5) * 1e3, "p99_ms": pct(xs, 0.99) * 1e3}
            print(f"{name:<24} {out[name]['p50_ms']:>8.3f} {out[name]['p99_ms']:>8.3f}")
        added = out["pylb cache on, miss"]["p50_ms"] - out["pylb cache off"]["p50_ms"]
        print(f"added by the cache on a miss (P50): {added:.3f} ms; a hit answered in {out['pylb cache on, hit']['p50_ms']:.3f} ms at P50 "
              f"(the backend path through pylb: {out['pylb cache off']['p50_ms']:.3f} ms); load average at the end: {load()}")
        return {"requests": n, "paths": out, "miss_added_p50_ms": added}
    finally:
        stop_processes(procs)


# ---- join -----------------------------------------------------------------------------------------


async def _join_rounds(url: str, rounds: int, followers: int, delay_s: float, tag: str, max_tokens: int) -> dict[str, list[float]]:
    """Per round: a streamed leader, then after `delay_s` `followers` identical streamed requests at
    once; each one's time to its first body bytes, and the leader's time from the followers' start
    to its end."""
    import asyncio

    import aiohttp

    headers = {"Authorization": "Bearer bench"}
    out: dict[str, list[float]] = {"follower_first_s": [], "leader_rest_s": [], "leader_first_s": []}

    async def one(s: aiohttp.ClientSession, body: dict) -> tuple[float, float]:
        t0 = time.perf_counter()
        async with s.post(url + "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200, r.status
            await r.content.readany()
            first = time.perf_counter()
            data = await r.read()
            assert data.rstrip().endswith(b"data: [DONE]") and b'"error"' not in data, "a stream cut short"
            return first - t0, time.perf_counter()

    async with aiohttp.ClientSession() as s:
        for i in range(rounds):
            body = {"model": "pylb-sim", "temperature": 0, "stream": True, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"{tag} round {i}: tell me a short story"}]}  # fmt: skip
            leader = asyncio.create_task(one(s, body))
            await asyncio.sleep(delay_s)
            t_start = time.perf_counter()
            rest = await asyncio.gather(*(one(s, body) for _ in range(followers)))
            lead_first, lead_end = await leader
            out["leader_first_s"].append(lead_first)
            out["leader_rest_s"].append(lead_end - t_start)
            out["follower_first_s"] += [first for first, _ in rest]
    return out


def run_join(args: argparse.Namespace) -> dict:
    import uvloop

    rport, on_port, off_port = free_port(), free_port(), free_port()
    if args.vllm:  # one real vLLM CPU replica (../shared/vllm/serve.sh), serving the model as pylb-sim
        venv, _, model = args.vllm.partition(":")
        serve = REPO.parent / "shared" / "vllm" / "serve.sh"
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RESULTS / "join_vllm.log", "wb") as log:  # the child keeps its own descriptor
            replica = subprocess.Popen(["bash", str(serve), venv, model, str(rport)], env={**os.environ, "MODEL_NAME": "pylb-sim"},
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    else:
        replica = subprocess.Popen([sys.executable, "-P", "-m", "pylb.cli", "sim-replicas", "--base-port", str(rport), "--speed", str(args.speed),
                                    "--output-len", "32"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    procs = [replica]
    base = [sys.executable, "-P", "-m", "pylb.cli", "serve", "--backend", f"http://127.0.0.1:{rport}", "--log-level", "warning",
            "--no-logging-access-log"]  # fmt: skip
    try:
        uvloop.run(wait_ready(f"http://127.0.0.1:{rport}/health", timeout=180.0 if args.vllm else 30.0))
        procs.append(subprocess.Popen([*base, "--port", str(on_port), "--cache-enabled", "--cache-embedder", "hashing"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
        procs.append(subprocess.Popen([*base, "--port", str(off_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        on, off = f"http://127.0.0.1:{on_port}", f"http://127.0.0.1:{off_port}"
        uvloop.run(wait_ready(on + "/ready"))
        uvloop.run(wait_ready(off + "/ready"))
        what = "one real vLLM replica" if args.vllm else f"replica speed {args.speed}"
        print(f"join: {args.rounds} rounds of 1 leader + {args.followers} identical followers {args.delay_s} s later; "
              f"{what}; load average {load()}")  # fmt: skip
        out = {}
        print(f"{'side':<10} {'follower first P50 ms':>22} {'P99 ms':>8} {'leader rest P50 ms':>19} {'leader first P50 ms':>20}")
        for side, url in (("cache on", on), ("cache off", off)):
            r = uvloop.run(_join_rounds(url, args.rounds, args.followers, args.delay_s, side, args.max_tokens))
            out[side] = {k: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3} for k, v in r.items()}
            o = out[side]
            print(f"{side:<10} {o['follower_first_s']['p50_ms']:>22.2f} {o['follower_first_s']['p99_ms']:>8.2f} "
                  f"{o['leader_rest_s']['p50_ms']:>19.1f} {o['leader_first_s']['p50_ms']:>20.2f}")  # fmt: skip
        print(f"load average at the end: {load()}")
        return {"rounds": args.rounds, "followers": args.followers, "delay_s": args.delay_s, "speed": args.speed, "max_tokens": args.max_tokens,
                "vllm": bool(args.vllm), "sides": out}
    finally:
        stop_processes(procs)
        if args.vllm:  # vLLM's engine processes are in the replica's session
            try:
                os.killpg(replica.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    lk = sub.add_parser("lookup")
    lk.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[10_000, 100_000])
    lk.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=[384, 768])
    lk.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    lk.add_argument("--k", type=int, default=4)
    lk.add_argument("--reps", type=int, default=200, help="calls per side and cell at most")
    lk.add_argument("--budget-s", type=float, default=3.0, help="rough seconds per cell (fewer calls for big cells)")
    lk.add_argument("--cuda", action="store_true", help="also time the GPU (keys on the device)")
    px = sub.add_parser("proxy")
    px.add_argument("--requests", type=int, default=2000)
    jn = sub.add_parser("join")
    jn.add_argument("--rounds", type=int, default=20)
    jn.add_argument("--followers", type=int, default=4)
    jn.add_argument("--delay-s", type=float, default=0.2, help="seconds between a leader and its followers")
    jn.add_argument("--speed", type=float, default=0.25, help="the fake replica's engine speed (lower: slower answers)")
    jn.add_argument("--max-tokens", type=int, default=64, help="tokens per answer (a fake replica stops at 32)")
    jn.add_argument("--vllm", metavar="VENV:MODEL", help="a real vLLM CPU replica instead (../shared/vllm/install.sh VENV MODEL)")
    be = sub.add_parser("backend")
    be.add_argument("port", type=int)
    args = ap.parse_args()
    if args.what == "backend":
        backend_main(args.port)
        return 0
    t0 = time.time()
    result = {"lookup": run_lookup, "proxy": run_proxy, "join": run_join}[args.what](args)
    result.update({"command": " ".join(["python", "bench/bench_cache.py", *sys.argv[1:]]), "load_average_end": os.getloadavg(),
                   "cpus": os.cpu_count(), "wall_s": time.time() - t0})  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_gpu" if getattr(args, "cuda", False) else ""
    (RESULTS / f"cache_{args.what}{suffix}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
