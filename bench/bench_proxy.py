"""Benchmark of pylb's live proxy: added latency and streaming throughput.

How to read it
--------------
Three processes on this machine: an *instant* fake backend (a minimal HTTP/1.1 server on
uvloop that answers every request at once, written here so that its own cost is as small as
possible), `pylb serve` in front of it (uvloop, default settings except `--policy` (round-robin
by default here, so that the numbers are the proxy's own cost), `--server-workers` and the access
log, off unless `--access-log`), and the client (aiohttp on uvloop, keep-alive).

1. Added latency. The same client sends the same small `/v1/completions` request (non-streamed)
   directly to the backend and through pylb, `--requests` times each, one at a time
   (concurrency 1) and with 16 requests in flight (concurrency 16). Reported: P50/P99 latency
   of each path and the difference (pylb's added latency). Target: <= 0.3 ms added at P50 one at a
   time, <= 3 ms at concurrency 16. For scale, on this machine the Rust vllm-router adds
   0.17-0.20 ms at P50 one at a time and about 2 ms at concurrency 16.
2. Streaming throughput. `--streams` concurrent streamed requests, each answered with
   `--events` SSE events written one by one by the backend (one write per event, yielding to its
   loop between events, as a replica emits tokens); the client counts SSE events received per
   second of wall time, directly and through pylb (and, to show how much they were coalesced on
   the way, how many socket reads the client needed). Target: >= 50,000 chunks/s through pylb.
   The direct figure is the ceiling the client and backend allow on the same cores. Because a
   saturated stream coalesces many events per socket read, a second, *paced* measurement has
   `--paced-streams` streams each send one event every `--pace` seconds, so pylb reads and
   writes (nearly) one event at a time; pylb's CPU time per forwarded event, from /proc, gives
   the rate one pylb process sustains when every event is its own chunk.

All three processes share this machine's cores, so through-pylb numbers include pylb's CPU
competing with the client and backend; the direct run has one process fewer, and other work on
the machine slows pylb's path more than the direct one: the load average (1/5/15 min) is printed
at the start and the end and kept in the JSON. Results go to stdout and bench/results/proxy.json.

    .venv/bin/python bench/bench_proxy.py                 # full run (~15 s)
    .venv/bin/python bench/bench_proxy.py --quick         # smoke run (a few seconds)
    .venv/bin/python bench/bench_proxy.py --workers 2     # pylb with 2 worker processes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench_support import free_port, stop_processes, wait_ready

REPO = Path(__file__).resolve().parents[1]

# ---- the instant backend -------------------------------------------------------------------------

_JSON_BODY = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "text": " tok", "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 8, "completion_tokens": 1, "total_tokens": 9},
    }
).encode()
_EVENT = b'data: {"id":"cmpl-bench","object":"text_completion","created":0,"model":"bench","choices":[{"index":0,"text":" tok"}]}\n\n'
_EVENT_CHUNK = b"%x\r\n%s\r\n" % (len(_EVENT), _EVENT)
_DONE = b"data: [DONE]\n\n"
_DONE_CHUNK = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_DONE), _DONE)


class _Backend(asyncio.Protocol):
    """HTTP/1.1 keep-alive server: GET /health, GET /metrics, POST anything -> instant answer.
    A POST body containing `"stream": true` gets `events=N` SSE events (N from the body's
    "max_tokens"), one write per event."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end].decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v)
            if len(self.buf) < head_end + 4 + length:
                return
            body = self.buf[head_end + 4 : head_end + 4 + length]
            self.buf = self.buf[head_end + 4 + length :]
            method, path = head.split(" ", 2)[:2]
            self.answer(method, path, body)

    def answer(self, method: str, path: str, body: bytes) -> None:
        if method == "GET" and path == "/metrics":
            page = b'vllm:num_requests_running{engine="0",model_name="bench"} 0.0\nvllm:num_requests_waiting{engine="0",model_name="bench"} 0.0\n'
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (len(page), page))
        elif method == "GET":
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        elif b'"stream": true' in body or b'"stream":true' in body:
            payload = json.loads(body)
            n = payload.get("max_tokens", 16)
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n")
            asyncio.get_running_loop().create_task(self.stream(n, payload.get("pace_s", 0.0)))
        else:
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(_JSON_BODY), _JSON_BODY))

    async def stream(self, n: int, pace: float) -> None:
        loop = asyncio.get_running_loop()
        t = loop.time()
        for _ in range(n):
            if self.t.is_closing():
                return
            self.t.write(_EVENT_CHUNK)
            if pace:
                t += pace
                await asyncio.sleep(max(0.0, t - loop.time()))
            else:
                await asyncio.sleep(0)
        self.t.write(_DONE_CHUNK)


def backend_main(port: int) -> None:
    """Run the instant backend on 127.0.0.1:port until killed."""
    import uvloop

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_Backend, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# ---- the client ----------------------------------------------------------------------------------


async def latency(url: str, n: int, concurrency: int) -> list[float]:
    """Per-request latencies (s) of n non-streamed completions with `concurrency` in flight."""
    import aiohttp

    body = json.dumps({"model": "bench", "prompt": "The quick brown fox jumps over the lazy dog. " * 4, "max_tokens": 1}).encode()
    headers = {"Content-Type": "application/json"}
    out: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as s:
        for _ in range(min(200, n)):  # warm-up: connections, caches
            async with s.post(url + "/v1/completions", data=body, headers=headers) as r:
                await r.read()
        remaining = n

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                async with s.post(url + "/v1/completions", data=body, headers=headers) as r:
                    await r.read()
                    assert r.status == 200, r.status
                out.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


async def streaming(url: str, streams: int, events: int, rounds: int, pace: float = 0.0) -> tuple[float, int, float]:
    """(SSE events per second, events received, client reads per second) of `streams`
    concurrent streams x `rounds`; with `pace`, the backend sends one event per `pace` seconds
    per stream."""
    import aiohttp

    body = json.dumps({"model": "bench", "prompt": "hello " * 16, "max_tokens": events, "stream": True, "pace_s": pace}).encode()
    headers = {"Content-Type": "application/json"}
    total = 0
    connector = aiohttp.TCPConnector(limit=streams)
    async with aiohttp.ClientSession(connector=connector) as s:

        reads = 0

        async def one() -> int:
            nonlocal reads
            count = 0
            async with s.post(url + "/v1/completions", data=body, headers=headers) as r:
                assert r.status == 200, r.status
                async for chunk in r.content.iter_any():
                    count += chunk.count(b"data:")
                    reads += 1
            assert count == events + 1, count  # every event arrived, and [DONE]
            return count - 1

        await asyncio.gather(*(one() for _ in range(streams)))  # warm-up
        reads = 0
        t0 = time.perf_counter()
        for _ in range(rounds):
            total += sum(await asyncio.gather(*(one() for _ in range(streams))))
        dt = time.perf_counter() - t0
    return total / dt, total, reads / dt


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    """The q-quantile (0..1) of xs, nearest rank."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=5000, help="requests per latency measurement")
    ap.add_argument("--streams", type=int, default=16, help="concurrent streams")
    ap.add_argument("--events", type=int, default=2000, help="SSE events per stream")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of concurrent streams")
    ap.add_argument("--paced-streams", type=int, default=64, help="streams of the paced measurement")
    ap.add_argument("--paced-events", type=int, default=1500, help="events per paced stream")
    ap.add_argument("--pace", type=float, default=0.002, help="seconds between events of a paced stream")
    ap.add_argument("--workers", type=int, default=1, help="pylb worker processes (SO_REUSEPORT)")
    ap.add_argument("--policy", default="round-robin", help="pylb routing policy")
    ap.add_argument("--access-log", action="store_true", help="keep pylb's access log on (to /dev/null)")
    ap.add_argument("--quick", action="store_true", help="small run (smoke test)")
    ap.add_argument("--backend-only", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.backend_only is not None:
        backend_main(args.backend_only)
        return 0
    if args.quick:
        args.requests, args.events, args.rounds, args.paced_events = 300, 200, 1, 200

    import uvloop

    bport, pport = free_port(), free_port()
    backend = subprocess.Popen([sys.executable, __file__, "--backend-only", str(bport)])
    env = dict(os.environ)
    cmd = [
        sys.executable, "-P", "-m", "pylb.cli", "serve", "--backend", f"http://127.0.0.1:{bport}", "--port", str(pport),
        "--policy", args.policy, "--server-workers", str(args.workers), "--log-level", "warning",
    ]  # fmt: skip
    if not args.access_log:
        cmd.append("--no-logging-access-log")
    proxy = None
    try:
        direct_url, pylb_url = f"http://127.0.0.1:{bport}", f"http://127.0.0.1:{pport}"
        uvloop.run(wait_ready(direct_url + "/health"))
        proxy = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        uvloop.run(wait_ready(pylb_url + "/ready"))
        results: dict[str, object] = {"workers": args.workers, "policy": args.policy, "access_log": args.access_log, "cpus": os.cpu_count()}
        results["load_average_start"] = os.getloadavg()
        print(f"pylb bench: {os.cpu_count()} CPUs, pylb workers={args.workers}, policy={args.policy}, access log {'on' if args.access_log else 'off'}; "
              f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        print(f"{'measurement':<34}{'direct':>12}{'via pylb':>12}{'added':>12}")
        for conc in (1, 16):
            d = uvloop.run(latency(direct_url, args.requests, conc))
            p = uvloop.run(latency(pylb_url, args.requests, conc))
            for q, name in ((0.5, "P50"), (0.99, "P99")):
                dv, pv = pct(d, q) * 1e3, pct(p, q) * 1e3
                results[f"c{conc}_{name.lower()}_ms"] = {"direct": dv, "pylb": pv, "added": pv - dv}
                print(f"{'latency ' + name + ' c=' + str(conc) + ' (ms)':<34}{dv:>12.3f}{pv:>12.3f}{pv - dv:>12.3f}")
            if conc == 1:
                results["c1_mean_added_ms"] = (statistics.mean(p) - statistics.mean(d)) * 1e3
        d_rate, _, d_reads = uvloop.run(streaming(direct_url, args.streams, args.events, args.rounds))
        p_rate, n, p_reads = uvloop.run(streaming(pylb_url, args.streams, args.events, args.rounds))
        results["stream_events_per_s"] = {"direct": d_rate, "pylb": p_rate, "events": n}
        results["stream_client_reads_per_s"] = {"direct": d_reads, "pylb": p_reads}
        print(f"{'streamed SSE events/s':<34}{d_rate:>12,.0f}{p_rate:>12,.0f}")
        print(f"{'  (client socket reads/s)':<34}{d_reads:>12,.0f}{p_reads:>12,.0f}")
        # paced: events arrive one by one, so pylb forwards (nearly) one event per read and write;
        # pylb's CPU time per forwarded event gives the rate one pylb process can sustain
        cpu0 = _cpu_seconds(proxy.pid)
        rate, n, reads = uvloop.run(streaming(pylb_url, args.paced_streams, args.paced_events, 1, pace=args.pace))
        cpu = _cpu_seconds(proxy.pid) - cpu0
        per_event_us = cpu / n * 1e6 if n else float("nan")
        capacity = n / cpu if cpu > 0 else float("nan")
        results["paced"] = {"streams": args.paced_streams, "pace_s": args.pace, "events_per_s": rate, "client_reads_per_s": reads,
                            "pylb_cpu_us_per_event": per_event_us, "pylb_events_per_cpu_s": capacity}
        print(f"paced: {args.paced_streams} streams x 1 event per {args.pace * 1e3:g} ms: {rate:,.0f} events/s in "
              f"{reads:,.0f} client reads/s; pylb CPU {per_event_us:.1f} us/event = {capacity:,.0f} events per CPU-second")
        results["load_average_end"] = os.getloadavg()
        print(f"load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        out = REPO / "bench" / "results"
        out.mkdir(parents=True, exist_ok=True)
        (out / "proxy.json").write_text(json.dumps(results, indent=2))
    finally:
        stop_processes([backend, proxy])  # the proxy first, as before
    return 0


if __name__ == "__main__":
    sys.exit(main())
