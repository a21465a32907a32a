"""The `pylb` command. Each subcommand lives beside the code it drives and registers itself
here through two functions: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import sys

from pylb import __version__

# name -> (module, one-line help). Modules are imported only when their subcommand runs.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("pylb.sim.simulate_cli", "replay a trace through simulated vLLM replicas and report per policy"),
    "sim-replicas": ("pylb.sim.replicas_cli", "start fake vLLM replicas (real HTTP, simulated engine)"),
    "calibrate": ("pylb.sim.calibrate", "measure an idle vLLM replica and write a simulator profile for it"),
    "replay": ("pylb.workload.replay_cli", "replay a trace against any OpenAI-compatible endpoint"),
    "serve": ("pylb.proxy.serve_cli", "serve: the KV-cache-aware load balancer in front of vLLM replicas"),
    "epp": ("pylb.epp.epp_cli", "Envoy's endpoint picker (ext_proc, Gateway API Inference Extension): pylb's router behind Envoy"),
    "demo": ("pylb.demo", "pylb in front of a fake vLLM fleet: dualmap against round-robin, side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pylb", description="KV-cache-aware load balancer for vLLM replicas")
    parser.add_argument("--version", action="version", version=f"pylb {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
