"""The one door to pylb's native core (``pylb._core``).

Everything else in pylb imports the C++ core through this module, so the binding surface can
change in one place. Each section below re-exports one area of ``csrc/`` with its docstring.
"""

from __future__ import annotations

import operator
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import numpy as np

try:
    from . import _core
except ImportError:
    _here = Path(__file__).parent
    if any((_here / f"_core{suffix}").exists() for suffix in EXTENSION_SUFFIXES):
        raise  # the core is built but cannot load (e.g. a shared library is missing): that error says why
    raise ImportError(
        f"pylb's native core (pylb._core) is not built in {_here}: this is pylb's source folder (or an "
        "install for another Python). Install pylb first: `pip install .` (or `bash .ci/run`, which sets "
        "up .venv), then use the installed package: tests with `.venv/bin/pytest` (or `python -P -m "
        "pytest`, so that the source folder is not first on sys.path), commands with `.venv/bin/pylb`.",
        name="pylb._core",
    ) from None

# ---- block hashing (csrc/src/block_hash.cpp) ----------------------------------------------------
block_hashes = _core.block_hashes
block_hashes_batch = _core.block_hashes_batch
xxh3_64 = _core.xxh3_64

# ---- engine-exact (vLLM sha256_cbor) block hashes (csrc/src/engine_hash.cpp) ------------------------
engine_block_hashes = _core.engine_block_hashes
engine_none_hash = _core.engine_none_hash

# ---- dual hash ring (csrc/src/dual_ring.cpp) -----------------------------------------------------
DualRing = _core.DualRing

# ---- adaptive prefix key (csrc/src/prefix_key.cpp) ---------------------------------------------
PrefixKeyTable = _core.PrefixKeyTable
PREFIX_KEY_DEFAULTS: dict[str, float] = dict(_core.PREFIX_KEY_DEFAULTS)
"""The table's parameter defaults (window, expand_share, shrink_share, min_samples, max_depth),
written once in the C++ core (`PrefixKeyParams`)."""

# ---- cache mirror (csrc/src/cache_mirror.cpp) --------------------------------------------------
CacheMirror = _core.CacheMirror

# ---- batched similarity (csrc/src/similarity_cpu.cpp, similarity_cuda.cu) -------------------------
# Cosine top-k of query embeddings against stored embeddings, for the semantic cache. The CPU path
# is always built; the CUDA path exists when pylb was built with PYLB_CUDA=ON. Both order results
# the same way (similarity descending, ties by smaller key index) and agree up to float rounding.
built_with_cuda = _core.built_with_cuda
cuda_available = _core.cuda_available
topk_similarity_cpu = _core.topk_similarity_cpu

_DEVICES = ("auto", "cpu", "cuda")


def topk_similarity(queries: Any, keys: Any, k: int, device: str = "auto", keys_unit: bool = False) -> tuple[Any, Any]:
    """Indices and cosine similarities of the ``k`` best keys for each query.

    ``queries`` is float32 ``[B, D]``, ``keys`` float32 ``[N, D]``: numpy arrays, or CUDA arrays
    (CuPy, or anything with ``__cuda_array_interface__``) used in place on their device. Returns
    ``(indices, similarities)``: int64 and float32 arrays of shape ``[B, min(k, N)]``, each row by
    similarity descending, ties by smaller key index. numpy in, numpy out; CUDA in, CuPy out.

    - cosine = (q . x) / (|q| |x|); a zero vector (query or key) has similarity 0 to everything.
    - ``k`` >= 1; ``k`` > N returns N columns.
    - A NaN or infinity in a key makes that key's similarities NaN, in a query all of that query's;
      NaN similarities rank after every number (ties among them by index). Finite inputs whose
      squares overflow float32 (|value| > ~1e19) are treated as zero vectors.
    - ``device``: ``"auto"`` runs where the inputs are; ``"cpu"`` needs host arrays; ``"cuda"``
      copies host arrays to the current CUDA device and returns numpy arrays.
    - ``keys_unit``: the caller promises unit-length keys (not checked); the CPU then skips their
      norms and scores plain dot products (the GPU computes the norms anyway).

    Raises ``TypeError`` for a dtype other than float32, ``ValueError`` for a bad shape, a
    D mismatch, ``k`` < 1 or an unknown device, ``RuntimeError`` when CUDA is asked for but pylb
    was built without it, no device is present or CuPy is missing. Non-contiguous host arrays are
    copied to contiguous ones; the GIL is released while computing.
    """
    if device not in _DEVICES:
        raise ValueError(f"device must be one of {_DEVICES}, got {device!r}")
    if isinstance(k, bool):
        raise TypeError("k must be an int, got bool")
    k = operator.index(k)  # TypeError for floats and other non-integers
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    q_on_gpu = hasattr(queries, "__cuda_array_interface__")
    x_on_gpu = hasattr(keys, "__cuda_array_interface__")
    if q_on_gpu != x_on_gpu:
        raise TypeError(
            "queries and keys must both be host arrays or both CUDA arrays, got "
            f"queries on {'cuda' if q_on_gpu else 'host'} and keys on {'cuda' if x_on_gpu else 'host'}"
        )
    if q_on_gpu:
        if device == "cpu":
            raise ValueError("device='cpu' but the inputs are CUDA arrays; copy them to the host first (cupy.asnumpy)")
        return _topk_similarity_cuda(queries, keys, k)
    if device == "cpu" or device == "auto":
        return _core.topk_similarity_cpu(queries, keys, k, keys_unit)
    cp = _require_cuda()
    q = _host_matrix(queries, "queries")
    x = _host_matrix(keys, "keys")
    index, similarity = _topk_similarity_cuda(cp.asarray(q), cp.asarray(x), k)
    return cp.asnumpy(index), cp.asnumpy(similarity)


def _require_cuda() -> Any:
    if not _core.built_with_cuda():
        raise RuntimeError("CUDA similarity asked for, but pylb was built without CUDA; rebuild with PYLB_CUDA=ON")
    if not _core.cuda_available():
        raise RuntimeError("CUDA similarity asked for, but no CUDA device is available (no driver or no GPU)")
    try:
        import cupy
    except ImportError as e:  # pragma: no cover - depends on the machine
        raise RuntimeError("CUDA similarity needs CuPy (pip install cupy-cuda13x, or the build matching your CUDA)") from e
    return cupy


def _host_matrix(a: Any, what: str) -> np.ndarray:
    """The host-side checks of topk_similarity_cpu, for arrays about to be copied to the GPU."""
    arr = np.asarray(a)
    if arr.dtype != np.float32:
        raise TypeError(f"{what} must have dtype float32, got {arr.dtype} (convert explicitly, e.g. {what}.astype(numpy.float32))")
    if arr.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, D], got shape {arr.shape}")
    return np.ascontiguousarray(arr)


def _cuda_matrix(a: Any, what: str, cp: Any) -> Any:
    """A CUDA array checked from its ``__cuda_array_interface__``, as a C-contiguous CuPy array."""
    cai = a.__cuda_array_interface__
    dtype = np.dtype(cai["typestr"])
    if dtype != np.float32:
        raise TypeError(f"{what} must have dtype float32, got {dtype} (convert explicitly, e.g. {what}.astype(cupy.float32))")
    shape = tuple(cai["shape"])
    if len(shape) != 2:
        raise ValueError(f"{what} must be 2-D [rows, D], got shape {shape}")
    arr = cp.asarray(a)  # zero-copy view; honours the producer's stream (CAI v3)
    return arr if arr.flags.c_contiguous else cp.ascontiguousarray(arr)


def _topk_similarity_cuda(queries: Any, keys: Any, k: int) -> tuple[Any, Any]:
    cp = _require_cuda()
    q = _cuda_matrix(queries, "queries", cp)
    x = _cuda_matrix(keys, "keys", cp)
    if q.shape[1] != x.shape[1]:
        raise ValueError(
            f"queries and keys must have the same D (number of columns), got queries shape {q.shape} and keys shape {x.shape}"
        )
    if q.device.id != x.device.id:
        raise ValueError(f"queries and keys must be on the same CUDA device, got {q.device.id} and {x.device.id}")
    (B, D), N = q.shape, x.shape[0]
    cols = min(k, N)
    with cp.cuda.Device(q.device.id):
        index = cp.empty((B, cols), dtype=cp.int64)
        similarity = cp.empty((B, cols), dtype=cp.float32)
        if B > 0 and cols > 0:
            stream = cp.cuda.get_current_stream()
            _core._topk_similarity_cuda_ptr(
                q.data.ptr, x.data.ptr, B, N, D, cols, index.data.ptr, similarity.data.ptr, stream.ptr, q.device.id
            )
    return index, similarity

# ---- feature-hashing text embedder (csrc/src/text_embed.cpp) --------------------------------------
# The semantic cache's built-in `hashing` embedder: character n-grams of each lower-cased word and
# the word itself, signed XXH3 feature hashing, L2-normalised rows.
hash_embed = _core.hash_embed
