"""Type stubs for pylb._core, the C++ core. Import it only through pylb.native."""

from collections.abc import Sequence
from typing import Any, Literal, SupportsIndex, overload

import numpy as np
import numpy.typing as npt

_Prompt = bytes | bytearray | memoryview | npt.NDArray[np.uint8] | npt.NDArray[np.uint32]

# ---- block hashing ------------------------------------------------------------------------------
def block_hashes(data: _Prompt, block_size: int, seed: int = 0) -> npt.NDArray[np.uint64]:
    """Chained XXH3-64 hashes, one per full block of `data` (bytes, or uint32 token ids with `block_size` in ids);
    element k names the whole prefix up to the end of block k."""
def block_hashes_batch(prompts: Sequence[_Prompt], block_size: int, seed: int = 0) -> list[npt.NDArray[np.uint64]]:
    """`block_hashes` over many prompts in one call (the GIL released); one uint64 array per prompt."""
def engine_none_hash(seed: str = "vllm-none-hash") -> bytes:
    """vLLM's NONE_HASH for sha256_cbor: SHA-256 of the canonical CBOR of the seed string."""
@overload
def engine_block_hashes(token_ids: Any, block_size: int, parent: bytes | None = None, return_hashes: Literal[False] = False) -> npt.NDArray[np.uint64]:
    """vLLM's sha256_cbor block hashes of the full blocks of `token_ids`, as uint64 keys (each hash's last 8 bytes, big-endian)."""
@overload
def engine_block_hashes(token_ids: Any, block_size: int, parent: bytes | None = None, *, return_hashes: Literal[True]) -> tuple[npt.NDArray[np.uint64], bytes]:
    """The keys and the 32-byte hashes concatenated."""
def xxh3_64(data: _Prompt, seed: int = 0) -> int:
    """One-shot XXH3-64 of a whole buffer."""

# ---- dual hash ring ------------------------------------------------------------------------------
class DualRing:
    """Two independent consistent-hash rings over the same replicas (DualMap's candidate pair)."""
    def __init__(
        self,
        replica_ids: Sequence[str],
        vnodes: int = 256,
        weights: Sequence[float] | None = None,
        *,
        probes: int = 4,
    ) -> None: ...
    @property
    def replica_ids(self) -> tuple[str, ...]: ...
    @property
    def vnodes(self) -> int: ...
    @property
    def probes(self) -> int: ...
    @property
    def weights(self) -> tuple[float, ...]: ...
    @property
    def vnode_counts(self) -> tuple[int, ...]: ...
    def __len__(self) -> int: ...
    def candidates(self, key: SupportsIndex) -> tuple[int, int]:
        """(a, b): the key's owners on ring 0 and ring 1 (replica indices); a != b with two or more replicas."""
    def candidates_batch(
        self, keys: npt.NDArray[np.uint64] | Sequence[int]
    ) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
        """`candidates` of many keys at once, as two int32 arrays (the GIL released)."""
    def owner(self, key: SupportsIndex, ring: Literal[0, 1]) -> int:
        """The raw owner of `key` on ring 0 or 1 (before the a != b rule)."""
    def owners_batch(self, keys: npt.NDArray[np.uint64] | Sequence[int], ring: Literal[0, 1]) -> npt.NDArray[np.int32]:
        """`owner` of many keys at once (the GIL released)."""

_Hashes = npt.NDArray[np.uint64] | npt.NDArray[np.int64] | Sequence[int]

# ---- adaptive prefix key ------------------------------------------------------------------------
PREFIX_KEY_DEFAULTS: dict[str, float]
"""PrefixKeyTable's parameter defaults, from the C++ PrefixKeyParams (the one place they are written)."""

class PrefixKeyTable:
    """DualMap's adaptive prefix key: a window of recent requests decides how many key blocks form a key."""
    def __init__(self, window: int = ..., expand_share: float = ..., shrink_share: float = ...,
                 min_samples: int = ..., max_depth: int = ...) -> None: ...
    def key_for(self, boundary_hashes: _Hashes, short_key: int | None = None) -> tuple[int, int]:
        """Record one request in the window and return its key as (key, depth); (short_key, 0) for a prompt
        shorter than one key block."""
    def peek(self, boundary_hashes: _Hashes, short_key: int | None = None) -> tuple[int, int]:
        """The key with the window as it stands, the request itself not counted (what-if queries)."""
    def key_if_recorded(self, boundary_hashes: _Hashes, short_key: int | None = None) -> tuple[int, int]:
        """Exactly what `key_for` would return now, without recording the request (a pure choice)."""
    def count(self, prefix: int) -> int:
        """Requests in the window holding `prefix` (a boundary hash)."""
    def is_expanded(self, prefix: int) -> bool:
        """Whether key walks go past `prefix` now."""
    def depth_counts(self) -> npt.NDArray[np.int64]:
        """Element d: requests in the window whose key had depth d (0..max_depth)."""
    def reset(self) -> None:
        """Forget the window (the parameters are kept)."""
    @property
    def window(self) -> int: ...
    @property
    def expand_share(self) -> float: ...
    @property
    def shrink_share(self) -> float: ...
    @property
    def min_samples(self) -> int: ...
    @property
    def max_depth(self) -> int: ...
    @property
    def fill(self) -> int: ...
    @property
    def expanded_count(self) -> int: ...
    @property
    def tracked_prefixes(self) -> int: ...

# ---- cache mirror -------------------------------------------------------------------------------
class CacheMirror:
    """Per replica, an LRU set of the router blocks the router believes the replica caches."""
    def __init__(self, num_replicas: int, capacity_blocks: int) -> None: ...
    def match(self, hashes: _Hashes) -> npt.NDArray[np.int64]:
        """Per replica, how many leading `hashes` it holds (reads only; recency unchanged)."""
    def insert(self, replica: int, hashes: _Hashes) -> int:
        """Mark the leading hashes most recently used on `replica`; returns the blocks evicted."""
    def remove(self, replica: int, hashes: _Hashes) -> int:
        """Drop `hashes` from `replica`; returns how many it held."""
    def clear(self, replica: int) -> None:
        """Drop every block of `replica` (its capacity is kept)."""
    def resize(self, replica: int, capacity: int) -> int:
        """Set `replica`'s capacity in blocks; returns the blocks evicted to fit."""
    def add_replica(self, capacity: int) -> int:
        """Append an empty replica; returns its index."""
    def remove_replica(self, replica: int) -> None:
        """Remove a replica; the later ones shift down one index."""
    def size(self, replica: int) -> int:
        """Blocks `replica` holds."""
    def capacity(self, replica: int) -> int:
        """Blocks `replica` may hold."""
    def contains(self, replica: int, hash: int) -> bool:
        """Whether `replica` holds block `hash`."""
    def blocks(self, replica: int) -> npt.NDArray[np.uint64]:
        """`replica`'s block hashes, most recently used first."""
    @property
    def num_replicas(self) -> int: ...
    @property
    def distinct_blocks(self) -> int: ...

# ---- batched similarity -------------------------------------------------------------------------
def topk_similarity_cpu(
    queries: npt.ArrayLike, keys: npt.ArrayLike, k: int, keys_unit: bool = False
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """Cosine top-k of float32 queries [B, D] against keys [N, D] on the CPU (see `pylb.native.topk_similarity`)."""
def _topk_similarity_cuda_ptr(
    queries_ptr: int, keys_ptr: int, B: int, N: int, D: int, k: int,
    out_index_ptr: int, out_similarity_ptr: int, stream_ptr: int = 0, device: int = -1,
) -> None:
    """The CUDA top-k on device pointers (built with PYLB_CUDA=ON only); `pylb.native` wraps it."""
def built_with_cuda() -> bool:
    """Whether this build has the CUDA path."""
def cuda_available() -> bool:
    """Whether a CUDA device can be used now."""

# ---- feature-hashing text embedder ------------------------------------------------------------------
def hash_embed(
    texts: Sequence[str], dim: int = 384, ngram_min: int = 3, ngram_max: int = 5, word_weight: float = 1.0, seed: int = 0
) -> npt.NDArray[np.float32]:
    """Feature-hashing embeddings of `texts`: float32 [len(texts), dim], rows L2-normalised (all zero for a text
    without words); character n-grams of each lower-cased word plus the word, signed XXH3 hashing."""
