"""Chained block hashing: exact agreement with python-xxhash, and the prefix property."""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from pylb import native


def reference_chain(data: bytes, block_size: int, seed: int = 0) -> list[int]:
    """The documented chaining, written with python-xxhash: h_i = XXH3(block_i, seed=h_{i-1})."""
    hashes, prev = [], seed
    for start in range(0, len(data) - block_size + 1, block_size):
        prev = xxhash.xxh3_64_intdigest(data[start : start + block_size], seed=prev)
        hashes.append(prev)
    return hashes


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=2000),
    block_size=st.integers(min_value=1, max_value=300),
    seed=st.integers(min_value=0, max_value=2**64 - 1),
)
def test_matches_python_xxhash(data: bytes, block_size: int, seed: int) -> None:
    got = native.block_hashes(data, block_size, seed=seed)
    assert got.dtype == np.uint64
    assert got.tolist() == reference_chain(data, block_size, seed)


def test_partial_trailing_block_gets_no_hash() -> None:
    assert len(native.block_hashes(b"x" * 63, 64)) == 0
    assert len(native.block_hashes(b"x" * 64, 64)) == 1
    assert len(native.block_hashes(b"x" * 191, 64)) == 2
    assert len(native.block_hashes(b"", 64)) == 0


def test_hash_names_whole_prefix() -> None:
    a = b"A" * 64 + b"B" * 64 + b"C" * 64
    b = b"A" * 64 + b"B" * 64 + b"D" * 64
    c = b"Z" * 64 + b"B" * 64 + b"C" * 64
    ha, hb, hc = (native.block_hashes(x, 64) for x in (a, b, c))
    assert ha[:2].tolist() == hb[:2].tolist() and ha[2] != hb[2]
    # Same second block after a different first block: chaining makes every hash differ.
    assert all(x != y for x, y in zip(ha.tolist(), hc.tolist()))


def test_seed_changes_every_hash() -> None:
    data = bytes(range(256))
    assert not set(native.block_hashes(data, 64, seed=0).tolist()) & set(native.block_hashes(data, 64, seed=1).tolist())


def test_token_ids_count_blocks_in_tokens() -> None:
    tokens = np.arange(1000, dtype=np.uint32)
    got = native.block_hashes(tokens, 16)
    assert len(got) == 1000 // 16
    # Token ids are hashed as their little-endian uint32 bytes.
    assert got.tolist() == reference_chain(tokens.astype("<u4").tobytes(), 64)


def test_accepts_bytearray_and_memoryview() -> None:
    data = bytes(range(200))
    want = native.block_hashes(data, 32).tolist()
    assert native.block_hashes(bytearray(data), 32).tolist() == want
    assert native.block_hashes(memoryview(data), 32).tolist() == want
    assert native.block_hashes(np.frombuffer(data, dtype=np.uint8), 32).tolist() == want


def test_batch_equals_single_calls() -> None:
    rng = np.random.default_rng(1)
    prompts: list[bytes | np.ndarray] = [rng.bytes(int(n)) for n in rng.integers(0, 5000, size=50)]
    prompts.append(np.arange(300, dtype=np.uint32))
    batch = native.block_hashes_batch(prompts, 64, seed=5)
    assert len(batch) == len(prompts)
    for prompt, hashes in zip(prompts, batch):
        # block_size counts bytes for bytes and tokens for token-id arrays, as in the single form.
        assert hashes.tolist() == native.block_hashes(prompt, 64, seed=5).tolist()
    assert len(batch[-1]) == 300 // 64
    assert native.block_hashes_batch([], 64) == []


def test_one_shot_matches_python_xxhash() -> None:
    data = bytes(range(256)) * 100
    assert native.xxh3_64(data, seed=9) == xxhash.xxh3_64_intdigest(data, seed=9)


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_block_size_names_it(bad: int) -> None:
    with pytest.raises(ValueError, match="block_size"):
        native.block_hashes(b"abc", bad)
    with pytest.raises(ValueError, match="block_size"):
        native.block_hashes_batch([b"abc"], bad)


def test_bad_data_types_are_rejected_clearly() -> None:
    with pytest.raises(TypeError, match="encode"):
        native.block_hashes("text", 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="data"):
        native.block_hashes(12345, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="format"):
        native.block_hashes(np.zeros(10, dtype=np.float64), 4)
    with pytest.raises(ValueError, match="one-dimensional"):
        native.block_hashes(np.zeros((2, 2), dtype=np.uint32), 1)
    with pytest.raises(ValueError, match="contiguous"):
        native.block_hashes(np.arange(20, dtype=np.uint32)[::2], 2)
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        native.block_hashes_batch([b"ok", "not bytes"], 4)
