"""`pylb serve`: the load balancer in front of vLLM replicas.

    pylb serve --backend URL [--backend URL ...] [--config pylb.yaml] [--host H] [--port P]
               [--policy NAME[:key=value...]] [any other setting as --<section>-<name> VALUE]

`--policy` takes a policy spec as `pylb simulate --policy` does: a registered name, optionally
with the policy's own options (`--policy dualmap:migration=false`). The router core's settings
(dispatch budgets, queue order, migration, the prefill-time estimator, the cache mirror's size)
are `router.*` settings, e.g. `--router-max-unprefilled-tokens 4096`.

Every setting (`pylb.config`) can also come from the YAML file and from PYLB_* environment
variables; precedence is flag > environment > file > default. `pylb serve --print-config` prints
the effective settings as YAML (a starting point for a config file) and exits.

SIGHUP reloads the settings (file, environment, flags) and applies what can change live (the
replica list, health/ejection/scrape settings, upstream timeouts and retries, client limits, API
keys; `ProxyServer.reload`); a reload that is invalid or changes a setting that needs a restart is
rejected as a whole and logged, and pylb goes on with the running settings.

Exit status: 0 after a clean shutdown (SIGINT or SIGTERM: pylb stops accepting, lets in-flight
requests finish for up to `server.shutdown_timeout_s`, and exits); 2 for a bad setting or no
backend (the message names the setting, value and reason: an unknown policy or policy option
is a bad `router.policy`); 1 when the address cannot be bound.

With `server.workers` N > 1, N worker processes serve the same port (SO_REUSEPORT: the kernel
spreads connections). Each runs its own router and fleet; placement is a pure function of the
prompt and the membership, so they agree on where a prefix goes. Whichever worker answers a
/metrics scrape answers for all of them: the workers share a temporary folder (prometheus-client's
PROMETHEUS_MULTIPROC_DIR, removed when pylb exits) where event counters are summed exactly and
state series are merged (`pylb.observability.metrics`, "Several workers").
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from typing import Any

from pylb import config
from pylb.config import ConfigError, Settings

log = logging.getLogger("pylb.serve")

NO_BACKEND_HELP = """\
pylb serve: no backend given. Name the vLLM replicas to balance, for example:
    pylb serve --backend http://127.0.0.1:8001 --backend http://127.0.0.1:8002
or set PYLB_BACKENDS=http://127.0.0.1:8001,http://127.0.0.1:8002, or list them under
fleet.backends in a YAML file given with --config (or find them: --fleet-discovery dns|k8s,
see docs/deploy.md). No vLLM at hand? `pylb sim-replicas
--replicas 4 --base-port 8001` starts simulated ones, and `pylb demo` runs everything locally."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`pylb serve` flags: --config, --print-config, and one flag per setting."""
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as YAML and exit")
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of `pylb serve`."""

    def fixed_port_for_workers(settings: Settings) -> None:
        if settings.server.workers > 1 and settings.server.port == 0:
            raise ConfigError("server.workers", settings.server.workers, "several workers need a fixed port (server.port is 0)")

    settings = config.command_settings(args, "serve", NO_BACKEND_HELP, fixed_port_for_workers)
    if isinstance(settings, int):
        return settings
    try:  # an unknown policy or a bad policy option fails here, before any worker starts
        from pylb.proxy.balancer import create_router

        create_router(settings.router)
    except ConfigError as exc:
        print(f"pylb serve: {exc}", file=sys.stderr)
        return 2
    if settings.server.workers == 1:
        return serve(settings, args=args)
    return _serve_workers(settings, args)


def serve(settings: Settings, reuse_port: bool = False, args: argparse.Namespace | None = None) -> int:
    """Run one proxy until SIGINT/SIGTERM (uvloop when available); on SIGHUP, reload the
    settings from `args` (flags, environment, the YAML file) when given. Returns the exit status."""
    from pylb.observability.logging import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        runner = asyncio.run
    try:
        return int(runner(_serve(settings, reuse_port, args)))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C during shutdown
        return 0


async def _serve(settings: Settings, reuse_port: bool, args: argparse.Namespace | None = None) -> int:
    from pylb.proxy.server import ProxyServer

    try:
        proxy = ProxyServer(settings)
    except ConfigError as exc:
        print(f"pylb serve: {exc}", file=sys.stderr)
        return 2
    try:
        await proxy.start(reuse_port=reuse_port)
    except OSError as exc:
        print(f"pylb serve: cannot listen on {settings.server.host}:{settings.server.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    gc.freeze()  # start-up objects (modules, settings, tables) leave the collector's generations
    n = len(settings.fleet.backends)
    members = f"{n} backend{'' if n == 1 else 's'}" if settings.fleet.discovery == "static" else f"{settings.fleet.discovery} discovery"
    print(f"pylb serving on {proxy.url} (policy {settings.router.policy}, {members})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    if args is not None:

        def on_hup() -> None:
            task = asyncio.create_task(_reload(proxy, args))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
    publisher = asyncio.create_task(_worker_duties(proxy, stop)) if proxy.metrics.workers is not None else None
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        if publisher is not None:
            publisher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await publisher
        await proxy.stop()
        proxy.metrics.publish()  # the final state: its dispatch counters stay in the other workers' sums
    return 0


async def _reload(proxy: Any, args: argparse.Namespace) -> None:
    """SIGHUP: read the settings again and apply them, or keep the running ones and say why."""
    try:
        new = config.load_from_args(args)
        changed = await proxy.reload(new)
    except ConfigError as exc:
        log.error("reload rejected; the running settings stay", extra={"error": str(exc)})
        return
    print(f"pylb reloaded its settings ({', '.join(changed) or 'nothing changed'})", file=sys.stderr, flush=True)


async def _worker_duties(proxy: Any, stop: asyncio.Event) -> None:
    """With several workers, every PUBLISH_INTERVAL_S: publish this worker's state series, and
    stop when the parent is gone (killed without the chance to forward SIGTERM)."""
    from pylb.observability.metrics import PUBLISH_INTERVAL_S

    parent = os.getppid()
    while True:
        try:
            proxy.metrics.publish()
        except Exception:  # a full disk must not stop the worker: log, count, go on
            log.exception("publishing metrics for the other workers failed")
            proxy.metrics.count_background_error("publish_metrics")
        if os.getppid() != parent:
            log.warning("the parent pylb process exited; stopping this worker")
            stop.set()
            return
        await asyncio.sleep(PUBLISH_INTERVAL_S)


def _worker(settings: Settings, index: int, metrics_folder: str, args: argparse.Namespace | None = None) -> None:
    from pylb.observability.metrics import share_with_workers

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards SIGTERM
    share_with_workers(metrics_folder, index)
    sys.exit(serve(settings, reuse_port=True, args=args))


def _serve_workers(settings: Settings, args: argparse.Namespace | None = None) -> int:
    from pylb.observability.metrics import MULTIPROC_ENV

    ctx = multiprocessing.get_context("spawn")
    folder = tempfile.mkdtemp(prefix="pylb-metrics-")
    os.environ[MULTIPROC_ENV] = folder  # read by prometheus-client when each worker imports it
    try:
        return _run_workers(ctx, settings, folder, args)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_workers(ctx: Any, settings: Settings, folder: str, args: argparse.Namespace | None = None) -> int:
    procs = [
        ctx.Process(target=_worker, args=(settings, i, folder, args), name=f"pylb-worker-{i}") for i in range(settings.server.workers)
    ]
    for p in procs:
        p.start()

    def forward(signum: int, frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                p.terminate()

    def forward_hup(signum: int, frame: object) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGHUP)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGHUP, forward_hup)
    codes = []
    for p in procs:
        p.join()
        codes.append(p.exitcode or 0)
    bad = [c for c in codes if c not in (0, -signal.SIGTERM)]
    return bad[0] if bad else 0
