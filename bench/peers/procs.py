"""Processes the side-by-side harness starts: replicas (real vLLM or pylb's fake ones) and routers.

Design
------
Everything runs on 127.0.0.1 on ports picked free, as a subprocess in its own process group
(`start_new_session`), with stdout and stderr in a log file of the run's log folder (and its PID
in `pids.txt` there). `Procs`
remembers every process it started and stops them by PID, newest first: SIGTERM to the process,
SIGKILL to its process group after a grace period (vLLM's API server has an engine-core child),
and SIGKILL to what is left of the group in any case. The harness calls `stop_all()` in a
`finally`, so Ctrl-C, SIGTERM and errors leave nothing running.

Replicas:
  vllm  `serve.sh VENV MODEL PORT ARGS` per replica, replica i pinned to core i
        (VLLM_CPU_OMP_THREADS_BIND=i), VLLM_SERVER_DEV_MODE=1 so that
        `POST /reset_prefix_cache` exists; ready when `GET /health` answers 200. In ARGS,
        `{replica}` becomes the replica's index and `{logs}` the run's log folder, so that each
        replica gets its own KV-event endpoint (`--kv-events-config` with
        `"endpoint":"ipc://{logs}/kv-{replica}.sock"`); those endpoints are handed to pylb.
  fake  one `pylb sim-replicas --replicas N --base-port 0 ARGS` (simulated vLLM engines behind
        vLLM's real HTTP API and metric names); it has no cache-reset endpoint, so a fresh cache
        means restarting it (about a second).

Routers (`Target`), each given the replicas' URLs:
  pylb         `python -m pylb.cli serve --host 127.0.0.1 --port P --backend URL ... ARGS`,
               plus `--kv-events-endpoint URL=ENDPOINT` per replica that publishes KV events
               (used only with `--router-cache-state events`); `{model}` in ARGS becomes the
               vLLM model folder (its tokenizer.json, for `--kv-events-tokenizer {model}`)
  sglang       `VENV/bin/python -m sglang_router.launch_router --host 127.0.0.1 --port P
               --worker-urls URL ... --prometheus-host 127.0.0.1 --prometheus-port Q ARGS`
  vllm-router  `VENV/bin/vllm-router` with the same flags as sglang
A router is ready when `GET /v1/models` through it answers 200 (pylb: `GET /ready`, which
also waits for every replica to be seen healthy).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROUTER_KINDS = ("pylb", "sglang", "vllm-router")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartError(RuntimeError):
    """A replica or router did not start; the message has the tail of its log."""


@dataclass
class Procs:
    """The processes one harness run started, with their logs; `stop_all()` stops them by PID."""

    log_dir: Path
    nice: int = 0  # niceness of every process started (negative: higher priority; needs root)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[int, Path] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `argv` in its own process group, output to LOG_DIR/NAME.log (appended)."""
        path = self.log_dir / f"{name}.log"
        if self.nice != os.nice(0):  # `nice -n` adds to the caller's niceness: start at `self.nice` exactly
            argv = ["nice", "-n", str(self.nice - os.nice(0)), *argv]
        with open(path, "ab") as log:
            log.write(f"\n$ {shlex.join(argv)}\n".encode())
            log.flush()
            # cwd: a neutral folder, so `python -m pylb.cli` imports the installed pylb, not a checkout's.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    env=env, cwd=tempfile.gettempdir(), start_new_session=True)  # fmt: skip
        if self.nice:
            # Linux schedules each session (autogroup) fairly against the others whatever the
            # niceness inside it; a new session's priority is its autogroup's niceness.
            with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/autogroup", "w") as fh:
                fh.write(str(self.nice))
        self.started.append(proc)
        self.logs[proc.pid] = path
        with open(self.log_dir / "pids.txt", "a") as fh:  # what was started, for whoever cleans up
            fh.write(f"{proc.pid} {name}\n")
        return proc

    def tail(self, proc: subprocess.Popen[bytes], chars: int = 3000) -> str:
        """The end of a process's log."""
        try:
            return self.logs[proc.pid].read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen[bytes], grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL to the process group after `grace_s`; also reaps leftovers."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is ours: start_new_session made pgid == pid
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        """Stop every process still registered, newest first."""
        for proc in reversed(list(self.started)):
            self.stop(proc)


async def wait_http_ok(url: str, proc: subprocess.Popen[bytes], procs: Procs, timeout_s: float, what: str) -> None:
    """Poll GET `url` until it answers 200; StartError if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            if proc.poll() is not None:
                raise StartError(f"{what} exited with status {proc.returncode}:\n{procs.tail(proc)}")
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise StartError(f"{what} did not answer 200 on {url} within {timeout_s:.0f} s:\n{procs.tail(proc)}")
            await asyncio.sleep(0.25)


# ---- replicas -------------------------------------------------------------------------------------


@dataclass
class VllmConfig:
    """Where real vLLM lives and how each replica is started."""

    venv: str
    model: str
    serve_sh: str
    args: list[str]


class Fleet:
    """N replicas; `urls` after `start()` (and `kv_endpoints`, the ZMQ endpoint of each replica
    that publishes KV events, else empty). `reset_caches()` empties their prefix caches."""

    reset_method = "restart"

    def __init__(self, procs: Procs, n: int) -> None:
        self.procs, self.n, self.urls = procs, n, []
        self.kv_endpoints: list[str] = []
        self._procs: list[subprocess.Popen[bytes]] = []

    async def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the replicas this fleet started."""
        for proc in self._procs:
            self.procs.stop(proc)
        self._procs, self.urls = [], []

    async def reset_caches(self) -> None:
        """Fresh replicas (restart); subclasses may do better."""
        self.stop()
        await self.start()


class VllmFleet(Fleet):
    """Real vLLM replicas started with `serve.sh`; caches emptied with `POST /reset_prefix_cache`
    (or by restarting them when `restart` is set)."""

    def __init__(self, procs: Procs, n: int, config: VllmConfig, *, restart: bool = False, start_timeout_s: float = 600.0) -> None:
        super().__init__(procs, n)
        self.config, self.restart, self.start_timeout_s = config, restart, start_timeout_s
        self.reset_method = "restart" if restart else "endpoint"

    async def start(self) -> None:
        cores = os.cpu_count() or 1
        ports = [free_port() for _ in range(self.n)]
        self.kv_endpoints = []
        for i, port in enumerate(ports):
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=str(i % cores), VLLM_SERVER_DEV_MODE="1")
            args = replica_args(self.config.args, i, self.procs.log_dir)
            argv = ["bash", self.config.serve_sh, self.config.venv, self.config.model, str(port), *args]
            self._procs.append(self.procs.start(f"vllm-{i}", argv, env))
            endpoint = kv_events_endpoint(args)
            if endpoint:
                self.kv_endpoints.append(endpoint)
        self.urls = [f"http://127.0.0.1:{p}" for p in ports]
        for i, (url, proc) in enumerate(zip(self.urls, self._procs)):
            await wait_http_ok(f"{url}/health", proc, self.procs, self.start_timeout_s, f"vLLM replica {i}")

    async def reset_caches(self) -> None:
        if self.restart:
            await super().reset_caches()
            return
        async with aiohttp.ClientSession() as session:
            for url in self.urls:
                async with session.post(f"{url}/reset_prefix_cache", timeout=aiohttp.ClientTimeout(total=30)) as resp:
                    if resp.status != 200:
                        body = (await resp.text())[:500]
                        raise RuntimeError(f"POST {url}/reset_prefix_cache answered {resp.status}: {body}")


def replica_args(args: list[str], index: int, logs: Path) -> list[str]:
    """Replica `index`'s vLLM flags: `{replica}` and `{logs}` replaced in each of `args`."""
    return [a.replace("{replica}", str(index)).replace("{logs}", str(logs)) for a in args]


def kv_events_endpoint(args: list[str]) -> str | None:
    """The endpoint a subscriber connects to for the KV events these vLLM flags publish, or None
    when they publish none. vLLM binds a `tcp://*:PORT` endpoint (connect to 127.0.0.1:PORT) and
    an `ipc://` one (connect to the same path)."""
    for i, a in enumerate(args):
        value = args[i + 1] if a == "--kv-events-config" and i + 1 < len(args) else a.partition("=")[2] if a.startswith("--kv-events-config=") else None
        if value is None:
            continue
        try:
            config = json.loads(value)
        except ValueError as e:
            raise ValueError(f"--vllm-args: --kv-events-config {value!r} is not JSON ({e})") from None
        if not config.get("enable_kv_cache_events") or config.get("publisher", "zmq") != "zmq":
            return None
        endpoint = str(config.get("endpoint", "tcp://*:5557"))
        return endpoint.replace("tcp://*:", "tcp://127.0.0.1:")
    return None


class FakeFleet(Fleet):
    """`pylb sim-replicas`: simulated engines behind vLLM's HTTP API; fresh caches by restarting."""

    def __init__(self, procs: Procs, n: int, args: list[str]) -> None:
        super().__init__(procs, n)
        self.args = args

    async def start(self) -> None:
        argv = [sys.executable, "-m", "pylb.cli", "sim-replicas", "--replicas", str(self.n), "--base-port", "0", *self.args]
        log = self.procs.log_dir / "sim-replicas.log"
        offset = log.stat().st_size if log.exists() else 0  # the log is appended to across restarts
        proc = self.procs.start("sim-replicas", argv)
        self._procs.append(proc)
        deadline = time.monotonic() + 60
        while True:  # it prints "replica i: http://127.0.0.1:PORT ..." per replica
            with open(log, "rb") as fh:
                fh.seek(offset)
                lines = fh.read().decode(errors="replace").splitlines()
            urls = [line.split(": ", 1)[1].split()[0] for line in lines if line.startswith("replica ") and ": http://" in line]
            if len(urls) >= self.n:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise StartError(f"pylb sim-replicas did not start:\n{self.procs.tail(proc)}")
            await asyncio.sleep(0.1)
        self.urls = urls[: self.n]
        for i, url in enumerate(self.urls):
            await wait_http_ok(f"{url}/health", proc, self.procs, 30, f"fake replica {i}")


# ---- routers --------------------------------------------------------------------------------------


@dataclass
class Target:
    """A router and its settings, from a spec `NAME=KIND [ARGS...]` (ARGS split like a shell)."""

    name: str
    kind: str
    args: list[str]

    @classmethod
    def parse(cls, spec: str) -> Target:
        name, eq, rest = spec.partition("=")
        words = shlex.split(rest)
        if not eq or not name.strip() or not words or words[0] not in ROUTER_KINDS:
            raise ValueError(f"--target {spec!r}: expected NAME=KIND [ARGS...] with KIND one of {', '.join(ROUTER_KINDS)}")
        return cls(name.strip(), words[0], words[1:])

    @property
    def spec(self) -> str:
        return f"{self.name}={shlex.join([self.kind, *self.args])}"


@dataclass
class RouterPaths:
    """Where the peer routers are installed (virtual environments)."""

    sglang_venv: str | None
    vllm_router_venv: str | None


def router_argv(target: Target, backends: list[str], port: int, paths: RouterPaths,
                kv_endpoints: list[str] | None = None, model: str = "") -> list[str]:  # fmt: skip
    """The command line that starts `target` on 127.0.0.1:`port` in front of `backends` (for
    pylb: with each backend's KV-event endpoint, if any, and `{model}` in its args replaced)."""
    if target.kind == "pylb":
        argv = [sys.executable, "-m", "pylb.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        for url in backends:
            argv += ["--backend", url]
        for url, endpoint in zip(backends, kv_endpoints or []):
            argv += ["--kv-events-endpoint", f"{url}={endpoint}"]
        return argv + [a.replace("{model}", model) for a in target.args]
    venv = paths.sglang_venv if target.kind == "sglang" else paths.vllm_router_venv
    if not venv:
        flag = "--sglang-venv" if target.kind == "sglang" else "--vllm-router-venv"
        raise ValueError(f"target {target.name!r} needs {flag} (the virtual environment {target.kind} is installed in)")
    head = [f"{venv}/bin/python", "-m", "sglang_router.launch_router"] if target.kind == "sglang" else [f"{venv}/bin/vllm-router"]
    return [*head, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *backends,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()), *target.args]  # fmt: skip


async def start_router(target: Target, fleet: Fleet, procs: Procs, paths: RouterPaths, model: str = "",
                       timeout_s: float = 120.0) -> tuple[str, subprocess.Popen[bytes]]:  # fmt: skip
    """Start a router in front of `fleet` and wait until it is ready; returns its URL and process."""
    port = free_port()
    proc = procs.start(f"router-{target.name}", router_argv(target, fleet.urls, port, paths, fleet.kv_endpoints, model))
    url = f"http://127.0.0.1:{port}"
    ready = f"{url}/ready" if target.kind == "pylb" else f"{url}/v1/models"
    try:
        await wait_http_ok(ready, proc, procs, timeout_s, f"router {target.name}")
    except BaseException:
        procs.stop(proc)
        raise
    return url, proc
