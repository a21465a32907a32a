"""The one door to pylb's native core (``pylb._core``).

Everything else in pylb imports the C++ core through this module, so the binding surface can
change in one place. Each section below re-exports one area of ``csrc/`` with its docstring.
"""

from __future__ import annotations

from . import _core

# ---- block hashing (csrc/src/block_hash.cpp) ----------------------------------------------------
block_hashes = _core.block_hashes
block_hashes_batch = _core.block_hashes_batch
xxh3_64 = _core.xxh3_64

# ---- dual hash ring (csrc/src/dual_ring.cpp) -----------------------------------------------------
DualRing = _core.DualRing

# ---- adaptive prefix key (csrc/src/prefix_key.cpp) ---------------------------------------------
PrefixKeyTable = _core.PrefixKeyTable

# ---- cache mirror (csrc/src/cache_mirror.cpp) --------------------------------------------------
CacheMirror = _core.CacheMirror

# ---- batched similarity (csrc/src/similarity_cpu.cpp, similarity_cuda.cu) -------------------------
