"""Helpers the benchmark scripts share: a free loopback port, waiting for a server to answer 200, the URLs of a `pylb sim-replicas` process, and a `pylb serve` in front of them."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller's server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Poll `url` until it answers 200; RuntimeError after `timeout` seconds."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(interval)
    raise RuntimeError(f"{url} did not become ready within {timeout:g} s")


def _drain(stream: Iterable[str]) -> None:
    for _ in stream:
        pass


def read_replica_urls(proc: subprocess.Popen, n: int) -> list[str]:
    """The base URLs a `pylb sim-replicas` process prints as its replicas come up (its stdout
    must be a text pipe); raises RuntimeError if it exits before `n` are up. The rest of its
    output is then read and dropped by a daemon thread: a pipe nobody reads fills after some
    64 KB of log lines and then blocks the replicas on their next one (seen in a long soak: every
    replica stopped answering, pylb answered 503; and in slow-paced stream runs)."""
    urls: list[str] = []
    stdout = proc.stdout
    assert stdout is not None
    while len(urls) < n:
        line = stdout.readline()
        if not line:
            raise RuntimeError("sim-replicas exited")
        urls += [w.rstrip(",") for w in line.split() if w.startswith("http://")]
    threading.Thread(target=_drain, args=(stdout,), daemon=True).start()
    return urls


def stop_processes(procs: list[subprocess.Popen | None]) -> None:
    """Terminate a bench's child processes, last started first (each killed after 10 s); None
    entries (not started) are skipped."""
    for p in reversed(procs):
        if p is None:
            continue
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def start_pylb(urls: list[str], *extra: str) -> tuple[subprocess.Popen, str]:
    """A `pylb serve --policy round-robin` process in front of `urls` on a free loopback port
    (output discarded), once its /ready answers 200; returns it and its base URL."""
    port = free_port()
    backends = [a for u in urls for a in ("--backend", u)]
    cmd = [sys.executable, "-P", "-m", "pylb.cli", "serve", *backends, "--port", str(port), "--policy", "round-robin", "--no-logging-access-log", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(url + "/ready", timeout=60.0, interval=0.2))
    except BaseException:
        proc.terminate()
        proc.wait(30)
        raise
    return proc, url
