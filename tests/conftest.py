"""Shared fixtures. Helper modules (fake_fleet, policy_fakes, proxy_support) hold the fakes that
tests import; fixtures that several test modules use live here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

MOONCAKE = "mooncake_conversation_trace.jsonl"


def find_traces_dir() -> Path | None:
    """../shared/traces beside the repository (CI's layout), shared/traces inside it, or
    $PYLB_TRACES: the first that holds the Mooncake trace, or None."""
    root = Path(__file__).resolve().parents[1]
    for d in (root.parent / "shared" / "traces", root / "shared" / "traces", os.environ.get("PYLB_TRACES")):
        if d and (Path(d) / MOONCAKE).is_file():
            return Path(d)
    return None


@pytest.fixture(scope="session")
def mooncake_trace() -> Path:
    """The Mooncake conversation trace file; skips the test when it is not found."""
    d = find_traces_dir()
    if d is None:
        pytest.skip("Mooncake trace not found (../shared/traces beside the repository, or $PYLB_TRACES)")
    return d / MOONCAKE
