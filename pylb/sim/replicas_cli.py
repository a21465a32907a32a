"""`pylb sim-replicas`: start fake vLLM replicas (real HTTP, simulated engine, real time).

    pylb sim-replicas --replicas N --base-port P [--profile NAME|FILE] [--speed X]
                      [--model-name NAME] [--max-model-len TOKENS] [--output-len TOKENS] [--host ADDR]

Replica i listens on base port + i (every replica on a free port when P is 0) and runs its own
engine (`pylb.sim.server.FakeVllmServer`, see its module docstring for the API it speaks). One
line per replica with its URL goes to stdout once all of them listen; the command then serves
until SIGINT or SIGTERM and exits 0. Invalid flags print a message naming the flag and value and
exit 2; a port that cannot be bound (e.g. already in use) prints which one and exits 1.
Defaults come from `FakeServerConfig`.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from pylb.cli_args import UsageError, port, positive_float, positive_int, run_async

from .profiles import DEFAULT_PROFILE, PROFILES, Profile, ProfileError, load_profile
from .server import BindError, FakeServerConfig, FakeVllmServer, start_replicas

_DEFAULTS = FakeServerConfig()







def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `pylb sim-replicas` on its subparser."""
    parser.add_argument("--replicas", type=positive_int, default=1, metavar="N", help="number of replicas (default 1)")
    parser.add_argument(
        "--base-port",
        type=port,
        required=True,
        metavar="P",
        help="replica i listens on P+i (0: every replica on a free port, printed at start)",
    )
    parser.add_argument(
        "--profile",
        default=DEFAULT_PROFILE,
        metavar="NAME|FILE",
        help=f"hardware profile: one of {', '.join(PROFILES)}, or a YAML file (default {DEFAULT_PROFILE})",
    )
    parser.add_argument(
        "--speed",
        type=positive_float,
        default=_DEFAULTS.speed,
        metavar="X",
        help=f"run the engine X times faster than real time (default {_DEFAULTS.speed:g})",
    )
    parser.add_argument(
        "--model-name", default=_DEFAULTS.model_name, metavar="NAME", help=f"served model name (default {_DEFAULTS.model_name})"
    )
    parser.add_argument(
        "--max-model-len",
        type=positive_int,
        default=_DEFAULTS.max_model_len,
        metavar="TOKENS",
        help="longest prompt + output (default: the profile's whole KV cache)",
    )
    parser.add_argument(
        "--output-len",
        type=positive_int,
        default=_DEFAULTS.output_len,
        metavar="TOKENS",
        help=f"tokens generated before EOS for requests without ignore_eos (default {_DEFAULTS.output_len})",
    )
    parser.add_argument("--host", default=_DEFAULTS.host, metavar="ADDR", help=f"address to bind (default {_DEFAULTS.host})")
    parser.add_argument(
        "--kv-events-port",
        type=port,
        default=_DEFAULTS.kv_events_port,
        metavar="P",
        help="publish vLLM KV-cache events (ZMQ PUB) on tcp://HOST:P+i for replica i (default 0: none)",
    )


def _config(args: argparse.Namespace) -> tuple[Profile, FakeServerConfig]:
    try:
        profile = load_profile(args.profile)
    except ProfileError as exc:
        raise UsageError(f"argument --profile: {exc}") from None
    if args.base_port and args.base_port + args.replicas - 1 > 65535:
        raise UsageError(
            f"argument --base-port: {args.base_port} + {args.replicas} replicas goes past port 65535"
        )
    if not args.model_name:
        raise UsageError("argument --model-name: must not be empty")
    config = FakeServerConfig(
        host=args.host,
        port=args.base_port,
        model_name=args.model_name,
        speed=args.speed,
        max_model_len=args.max_model_len,
        output_len=args.output_len,
        kv_events_port=args.kv_events_port,
    )
    try:
        config.validate(profile)
    except ValueError as exc:
        flag = "--max-model-len" if "max_model_len" in str(exc) else "--speed" if "speed" in str(exc) else "--output-len"
        raise UsageError(f"argument {flag}: {exc}") from None
    return profile, config


async def serve(profile: Profile, count: int, config: FakeServerConfig, stop: asyncio.Event | None = None) -> None:
    """Start the replicas, print their URLs, serve until `stop` is set (or SIGINT/SIGTERM)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        servers: list[FakeVllmServer] = await start_replicas(profile, count, config.port, config)
        try:
            for i, srv in enumerate(servers):
                print(
                    f"replica {i}: {srv.url} (model {config.model_name}, profile {profile.name}, "
                    f"speed {config.speed:g}, max_model_len {srv.max_model_len}"
                    + (f", KV events {srv.kv_events_endpoint}" if srv.kv_events_endpoint else "") + ")",
                    flush=True,
                )
            await stop.wait()
        finally:
            for srv in servers:
                await srv.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)



def run(args: argparse.Namespace) -> int:
    """Run `pylb sim-replicas`; returns the exit status (0 after SIGINT/SIGTERM, 1 bind failure, 2 bad flags)."""
    try:
        profile, config = _config(args)
    except UsageError as exc:
        print(f"pylb sim-replicas: error: {exc}", file=sys.stderr)
        return 2
    try:
        run_async(serve(profile, args.replicas, config))
    except BindError as exc:
        print(f"pylb sim-replicas: error: {exc.strerror}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
