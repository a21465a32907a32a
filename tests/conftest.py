"""Shared fixtures. Helper modules (fake_fleet, policy_fakes, proxy_support) hold the fakes that
tests import; fixtures that several test modules use live here."""

from __future__ import annotations

import os
import shutil
import subprocess
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


def make_self_signed(folder: Path, name: str = "cert") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files NAME.pem and NAME.key in
    `folder`), made with the openssl CLI; skips the test when openssl is not installed."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    key, crt = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return crt, key


@pytest.fixture
def cert(tmp_path: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files of a self-signed certificate for 127.0.0.1."""
    return make_self_signed(tmp_path)
