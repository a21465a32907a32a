"""`.ci/run`'s system check: it looks for the files CMakeLists.txt looks for (xxhash.h, used header-only,
cblas.h and libopenblas, openssl/sha.h and libcrypto), where CMake looks for them, so that a machine that has them is not sent
to apt (which needs root and network). Checked on made-up file trees through CI_SYSROOT."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CI_RUN = REPO / ".ci" / "run"
LIB_PACKAGES = {"libxxhash-dev", "libopenblas-dev", "libssl-dev"}
OPENSSL = ("/usr/include/openssl/sha.h", "/usr/lib/libcrypto.so")  # Debian: libcrypto under the multiarch folder too

pytestmark = pytest.mark.skipif(not CI_RUN.exists(), reason="not running from a source checkout")


def missing(sysroot: Path, cmake_prefix_path: str | None = None) -> set[str]:
    """The Debian packages `.ci/run --missing` would install, for headers and libraries under `sysroot`."""
    env = {k: v for k, v in os.environ.items() if k != "CMAKE_PREFIX_PATH"}
    env.update(CI_SYSROOT=str(sysroot), PYTHON=sys.executable)
    if cmake_prefix_path is not None:
        env["CMAKE_PREFIX_PATH"] = cmake_prefix_path
    run = subprocess.run(["bash", str(CI_RUN), "--missing"], capture_output=True, text=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    return set(run.stdout.split()) & LIB_PACKAGES


def touch(root: Path, *paths: str) -> None:
    for p in paths:
        f = root / p.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"")


@pytest.fixture
def multiarch() -> str:
    triplet = sysconfig.get_config_var("MULTIARCH")
    if not triplet:
        pytest.skip("this Python has no Debian multiarch triplet")
    return str(triplet)


def test_debian_layout_needs_nothing(tmp_path: Path, multiarch: str) -> None:
    # Debian 12's libxxhash-dev and libopenblas-pthread-dev: no /usr/include/cblas.h at all.
    touch(
        tmp_path,
        "/usr/include/xxhash.h",
        f"/usr/lib/{multiarch}/libxxhash.so",
        f"/usr/include/{multiarch}/openblas-pthread/cblas.h",
        f"/usr/lib/{multiarch}/libopenblas.so",
        "/usr/include/openssl/sha.h",
        f"/usr/lib/{multiarch}/libcrypto.so",
    )
    assert missing(tmp_path) == set()


def test_empty_machine_needs_all(tmp_path: Path) -> None:
    assert missing(tmp_path) == LIB_PACKAGES


def test_header_without_library_is_missing(tmp_path: Path, multiarch: str) -> None:
    touch(tmp_path, "/usr/include/xxhash.h", f"/usr/lib/{multiarch}/libxxhash.a", f"/usr/include/{multiarch}/cblas.h", *OPENSSL)
    assert missing(tmp_path) == {"libopenblas-dev"}
    touch(tmp_path, f"/usr/lib/{multiarch}/libopenblas.so")
    (tmp_path / "usr/lib/libcrypto.so").unlink()
    assert missing(tmp_path) == {"libssl-dev"}


def test_xxhash_header_alone_is_enough(tmp_path: Path, multiarch: str) -> None:
    # xxHash is compiled header-only (XXH_INLINE_ALL): no libxxhash is linked, so none is looked for.
    touch(tmp_path, "/usr/include/xxhash.h", f"/usr/include/{multiarch}/cblas.h", f"/usr/lib/{multiarch}/libopenblas.so", *OPENSSL)
    assert missing(tmp_path) == set()


def test_cblas_only_under_an_unsearched_folder_is_missing(tmp_path: Path, multiarch: str) -> None:
    # CMake looks in include/, include/openblas and include/openblas-pthread, not elsewhere.
    touch(tmp_path, f"/usr/include/{multiarch}/openblas-openmp/cblas.h", f"/usr/lib/{multiarch}/libopenblas.so")
    assert "libopenblas-dev" in missing(tmp_path)


def test_cmake_prefix_path_is_searched(tmp_path: Path) -> None:
    touch(tmp_path, "/opt/xx/include/xxhash.h", "/opt/xx/lib/libxxhash.so", "/opt/ob/include/openblas/cblas.h", "/opt/ob/lib/libopenblas.so",
          "/opt/ssl/include/openssl/sha.h", "/opt/ssl/lib/libcrypto.so")
    assert missing(tmp_path, cmake_prefix_path="/opt/xx:/opt/ob:/opt/ssl") == set()
    assert missing(tmp_path) == LIB_PACKAGES
