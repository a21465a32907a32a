"""`pylb epp`: pylb as Envoy's external processor, the endpoint picker of the Gateway API
Inference Extension (docs/deploy.md, "Behind Envoy: `pylb epp`").

    pylb epp --backend URL [--backend URL ...] [--config pylb.yaml] [--epp-grpc-port 9002]
             [--epp-metrics-port 9090] [any setting of `pylb serve` as --<section>-<name> VALUE]

The settings are `pylb serve`'s (`pylb.config`: file, PYLB_* environment, flags), with the `epp`
section for the listeners; the router, fleet, discovery and logging settings mean the same.
`server.host` is the address both listeners bind; `server.port`, `server.workers` and the
`upstream` section do not apply (Envoy forwards the requests). Replicas must be named by IP
address (Envoy's original-destination cluster connects to the `ip:port` pylb names): k8s and dns
discovery give addresses.

Exit status: 0 after SIGINT/SIGTERM, 2 for a bad setting (named, with its value and reason), 1
when a port cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pylb import config
from pylb.config import ConfigError, Settings

NO_BACKEND_HELP = """\
pylb epp: no backend given. Name the vLLM replicas by IP address, for example:
    pylb epp --backend http://10.0.0.5:8000 --backend http://10.0.0.6:8000
or find them: --fleet-discovery k8s --discovery-k8s-service vllm (see docs/deploy.md)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`pylb epp` flags: --config, --print-config, and one flag per setting."""
    parser.add_argument("--print-config", action="store_true", help="print the effective settings as YAML and exit")
    config.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Entry point of `pylb epp`."""

    def one_process(settings: Settings) -> None:
        if settings.server.workers > 1:
            raise ConfigError("server.workers", settings.server.workers, "pylb epp runs one process (run more pods behind Envoy instead)")

    settings = config.command_settings(args, "epp", NO_BACKEND_HELP, one_process)
    if isinstance(settings, int):
        return settings
    try:
        import grpc  # noqa: F401 - the optional extra's presence
        import envoy.service.ext_proc.v3  # noqa: F401
    except ImportError as exc:
        print(f"pylb epp: {exc.name} is not installed: pip install 'pylb[epp]'", file=sys.stderr)
        return 2
    from pylb.observability.logging import configure_logging

    configure_logging(settings.logging.level, settings.logging.format)
    try:
        # grpc.aio runs on asyncio's own loop (its uvloop support is experimental)
        return asyncio.run(_serve(settings))
    except KeyboardInterrupt:  # pragma: no cover - a second Ctrl-C during shutdown
        return 0


async def _serve(settings: Settings) -> int:
    from .server import EppServer

    try:
        epp = EppServer(settings)
    except ConfigError as exc:
        print(f"pylb epp: {exc}", file=sys.stderr)
        return 2
    try:
        await epp.start()
    except OSError as exc:
        print(f"pylb epp: cannot listen on {settings.server.host}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    n = len(settings.fleet.backends)
    members = f"{n} backend{'' if n == 1 else 's'}" if settings.fleet.discovery == "static" else f"{settings.fleet.discovery} discovery"
    print(
        f"pylb epp: ext_proc on {epp.grpc_target}, metrics on {epp.metrics_url} (policy {settings.router.policy}, {members})",
        file=sys.stderr,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await epp.stop()
    return 0
