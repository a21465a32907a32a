"""What a new user sees first: `pylb --version`, and `pylb serve`'s start-up line."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import pylb
from proxy_support import fake_fleet

PYLB = [sys.executable, "-P", "-m", "pylb.cli"]
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_version_is_the_package_metadata() -> None:
    run = subprocess.run([*PYLB, "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"pylb {version('pylb')}" == f"pylb {pylb.__version__}"
    if PYPROJECT.exists():  # the one place the version is written
        declared = re.search(r'(?m)^version = "([^"]+)"', PYPROJECT.read_text(encoding="utf-8"))
        assert declared and declared.group(1) == pylb.__version__


@pytest.mark.parametrize("replicas, expected", [(1, "1 backend)"), (2, "2 backends)")])
async def test_serve_start_up_line_counts_backends(replicas: int, expected: str) -> None:
    async with fake_fleet(replicas) as fleet:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}
        backends = [arg for s in fleet for arg in ("--backend", s.url)]
        proc = await asyncio.create_subprocess_exec(
            *PYLB, "serve", "--port", "0", "--policy", "round-robin", *backends,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert proc.stderr is not None
        line = ""
        try:
            while "pylb serving on" not in line:
                raw = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert raw, "pylb serve exited before its start-up line"
                line = raw.decode()
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 30)
        assert line.rstrip().endswith(f"(policy round-robin, {expected}"), line
