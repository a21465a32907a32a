"""One entry point from a trace path or a synthetic spec to a workload.

Design
------
`load_trace(path)` picks the loader by file extension: `.jsonl` is a Mooncake trace
(`pylb.workload.mooncake.load_mooncake`, imported only when needed) and `.csv` is an Azure LLM
inference trace (`pylb.workload.azure.load_azure`); any other extension is a ValueError.

`load_workload(spec)` also accepts synthetic specs, as the CLIs take them in `--trace`:

    synthetic:multi-turn
    synthetic:zipf:requests=500,zipf_s=0.8,seed=3

The part after the second colon sets the generator's keyword arguments (`key=value`, comma
separated); each value is converted to the type of that parameter's default, so the defaults
and the set of valid keys are written once, in the generators' signatures
(`pylb.workload.synthetic`).

`describe_workload(spec)` is how results name the workload they came from:
`{"name": ..., "sha256": ...}`, the trace path relative to the current directory (commands run
from the repository root, so `../shared/traces/x.jsonl`, never one machine's absolute path) and
the SHA-256 of the file's bytes, so that a reader can tell whether their copy is the same; a
synthetic spec is its own name (its generator is deterministic) and has no hash.
"""

from __future__ import annotations

import hashlib
import inspect
import os
from pathlib import Path

from .synthetic import GENERATORS
from .types import WorkloadRequest

SYNTHETIC_PREFIX = "synthetic:"


def load_trace(path: str | os.PathLike[str], limit: int | None = None) -> list[WorkloadRequest]:
    """Load a trace file by its extension (`.jsonl` Mooncake, `.csv` Azure), in arrival order.

    `limit` keeps the first `limit` requests. Raises ValueError for an unknown extension or a
    malformed file, FileNotFoundError for a missing one.
    """
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        from .mooncake import load_mooncake  # written separately; imported only when used

        return load_mooncake(path, limit=limit)
    if suffix == ".csv":
        from .azure import load_azure

        return load_azure(path, limit=limit)
    raise ValueError(f"{path}: unknown trace format {suffix or '(no extension)'!r}: expected .jsonl (Mooncake) or .csv (Azure)")


def parse_synthetic(spec: str) -> tuple[str, dict[str, int | float]]:
    """Split `synthetic:NAME[:k=v,...]` into the generator name and its typed keyword arguments.

    Raises ValueError naming the bad part (unknown generator, unknown key, bad value).
    """
    if not spec.startswith(SYNTHETIC_PREFIX):
        raise ValueError(f"{spec!r} is not a synthetic spec (synthetic:NAME[:key=value,...])")
    name, _, params = spec[len(SYNTHETIC_PREFIX) :].partition(":")
    if name not in GENERATORS:
        raise ValueError(f"unknown synthetic workload {name!r}: expected one of {', '.join(sorted(GENERATORS))}")
    defaults = {
        p.name: p.default
        for p in inspect.signature(GENERATORS[name]).parameters.values()
        if p.default is not inspect.Parameter.empty
    }
    kwargs: dict[str, int | float] = {}
    for item in filter(None, (x.strip() for x in params.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"synthetic:{name}: expected key=value, got {item!r}")
        if key not in defaults:
            raise ValueError(f"synthetic:{name}: unknown parameter {key!r}: expected one of {', '.join(defaults)}")
        kind = type(defaults[key])
        try:
            kwargs[key] = kind(value.strip())
        except ValueError:
            raise ValueError(f"synthetic:{name}: parameter {key} must be {kind.__name__}, got {value.strip()!r}") from None
    return name, kwargs


def load_workload(spec: str | os.PathLike[str], limit: int | None = None) -> list[WorkloadRequest]:
    """A workload from a trace path or a `synthetic:NAME[:k=v,...]` spec, in arrival order.

    `limit` keeps the first `limit` requests. Raises ValueError (bad spec, bad parameter value,
    malformed file) or FileNotFoundError.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if isinstance(spec, str) and spec.startswith(SYNTHETIC_PREFIX):
        name, kwargs = parse_synthetic(spec)
        try:
            requests = GENERATORS[name](**kwargs)
        except ValueError as exc:
            raise ValueError(f"synthetic:{name}: {exc}") from None
        return requests if limit is None else requests[:limit]
    return load_trace(spec, limit=limit)


def describe_workload(spec: str | os.PathLike[str]) -> dict[str, str | None]:
    """`{"name": ..., "sha256": ...}` of a trace path or synthetic spec, for results files.

    A path is named relative to the current directory (a relative path as given, normalised) with
    the hex SHA-256 of its bytes; a `synthetic:` spec is named as written, with `sha256` None.
    Raises FileNotFoundError for a missing file.
    """
    if isinstance(spec, str) and spec.startswith(SYNTHETIC_PREFIX):
        return {"name": spec, "sha256": None}
    digest = hashlib.sha256()
    with open(spec, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return {"name": os.path.relpath(spec), "sha256": digest.hexdigest()}


__all__ = ["SYNTHETIC_PREFIX", "describe_workload", "load_trace", "load_workload", "parse_synthetic"]
