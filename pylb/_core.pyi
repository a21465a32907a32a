"""Type stubs for pylb._core, the C++ core. Import it only through pylb.native."""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

_Prompt = bytes | bytearray | memoryview | npt.NDArray[np.uint8] | npt.NDArray[np.uint32]

# ---- block hashing ------------------------------------------------------------------------------
def block_hashes(data: _Prompt, block_size: int, seed: int = 0) -> npt.NDArray[np.uint64]: ...
def block_hashes_batch(prompts: Sequence[_Prompt], block_size: int, seed: int = 0) -> list[npt.NDArray[np.uint64]]: ...
def xxh3_64(data: _Prompt, seed: int = 0) -> int: ...
