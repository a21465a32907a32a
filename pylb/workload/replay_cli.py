"""`pylb replay`: replay a trace or a synthetic workload against an OpenAI-compatible endpoint.

Design
------
A thin shell over `pylb.workload.replay.replay`: parse and check the flags, load the workload
(`pylb.workload.loaders.load_workload`: a `.jsonl` Mooncake or `.csv` Azure trace, or
`synthetic:multi-turn` / `synthetic:zipf[:key=value,...]`), run the replay on uvloop when it is
installed, print the summary table on stdout (the progress bar goes to stderr) and write
`--json` if asked. Defaults come from the library (`DEFAULT_SLO_TTFT_S`, `DEFAULT_TIMEOUT_S`).

Exit codes: 0 when the replay ran (request errors are results, reported in the table), 1 when
it could not start (the server could not list its models), 2 for bad input (a message naming
the flag and the value, no traceback), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pylb.cli_args import int_at_least, positive_float, run_async

from .replay import DEFAULT_SLO_TTFT_S, DEFAULT_TIMEOUT_S, ENDPOINT_PATHS, ReplayError, normalize_url





def _url(text: str) -> str:
    try:
        return normalize_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register `pylb replay`'s flags on `parser`."""
    parser.add_argument(
        "--trace", required=True, metavar="PATH|synthetic:NAME[:k=v,...]",
        help="a Mooncake .jsonl or Azure .csv trace, or synthetic:multi-turn / synthetic:zipf "
        "with optional generator parameters, e.g. synthetic:zipf:requests=200,zipf_s=0.8",
    )  # fmt: skip
    parser.add_argument("--url", required=True, type=_url, help="base URL of the endpoint, e.g. http://127.0.0.1:8000")
    parser.add_argument("--rate-scale", type=positive_float, default=1.0, metavar="X",
                        help="arrival-rate multiplier: requests are sent at arrival/X (default 1)")  # fmt: skip
    parser.add_argument("--duration", type=positive_float, metavar="S",
                        help="stop issuing requests after S seconds of scaled time, then wait for those in flight")  # fmt: skip
    parser.add_argument("--limit", type=int_at_least(0), metavar="N", help="replay only the first N requests")
    parser.add_argument("--model", help="model name (default: the first one GET /v1/models lists)")
    parser.add_argument("--endpoint", choices=sorted(ENDPOINT_PATHS), default="completions",
                        help="OpenAI API to call (default completions)")  # fmt: skip
    parser.add_argument("--slo-ttft", type=positive_float, default=DEFAULT_SLO_TTFT_S, metavar="S",
                        help=f"TTFT SLO for the attainment figure (default {DEFAULT_SLO_TTFT_S:g} s)")  # fmt: skip
    parser.add_argument("--concurrency-limit", type=int_at_least(1), metavar="N",
                        help="at most N requests in flight; later ones are sent late (default unlimited)")  # fmt: skip
    parser.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="S",
                        help=f"per-request limit from sending to the end of the stream (default {DEFAULT_TIMEOUT_S:g} s)")  # fmt: skip
    parser.add_argument("--json", metavar="OUT", help="write the summary and per-request records to OUT")
    parser.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def _error(message: str) -> int:
    print(f"pylb replay: error: {message}", file=sys.stderr)
    return 2



def run(args: argparse.Namespace) -> int:
    """Run `pylb replay` with parsed arguments; returns the exit code."""
    from .loaders import SYNTHETIC_PREFIX, load_workload
    from .replay import replay

    if not args.trace.startswith(SYNTHETIC_PREFIX) and not Path(args.trace).is_file():
        return _error(f"argument --trace: no such file: {args.trace!r}")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            return _error(f"argument --json: directory does not exist: {str(parent)!r}")
    try:
        workload = load_workload(args.trace, limit=args.limit)
    except (ValueError, OSError) as exc:
        return _error(f"argument --trace: {exc}")
    if not workload:
        return _error(f"argument --trace: {args.trace!r} holds no requests")
    print(
        f"replaying {len(workload)} requests from {args.trace} to {args.url} at rate scale {args.rate_scale:g}",
        file=sys.stderr,
    )
    try:
        result = run_async(
            replay(
                workload, args.url, rate_scale=args.rate_scale, duration_s=args.duration, model=args.model,
                endpoint=args.endpoint, slo_ttft_s=args.slo_ttft, concurrency_limit=args.concurrency_limit,
                timeout_s=args.timeout, progress=not args.no_progress,
            )  # fmt: skip
        )
    except ReplayError as exc:
        print(f"pylb replay: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pylb replay: interrupted", file=sys.stderr)
        return 130
    print(result.table())
    if args.json:
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(result.to_json(), f, indent=1)
                f.write("\n")
        except OSError as exc:
            print(f"pylb replay: cannot write --json {args.json!r}: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


__all__ = ["add_arguments", "run"]
