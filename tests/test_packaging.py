"""The wheel: `pip wheel .` builds one that installs and imports in a fresh virtual environment,
with the type stubs and py.typed inside. Slow (it compiles the core once more): ~1 minute."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_builds_installs_and_imports_in_a_fresh_venv(tmp_path: Path) -> None:
    if not (REPO / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(dist.glob("pylb-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "pylb/_core.pyi" in names and "pylb/py.typed" in names and "pylb/native.py" in names
    assert any(n.startswith("pylb/_core.") and n.endswith(".so") for n in names)

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", str(wheels[0]), "numpy"],
        capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = (
        "import pylb.native as n, numpy as np;"
        "h = n.block_hashes(b'x' * 128, 64); assert h.dtype == np.uint64 and len(h) == 2;"
        "a, b = n.DualRing(['r0', 'r1', 'r2']).candidates(int(h[0])); assert a != b;"
        "print('ok')"
    )
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
