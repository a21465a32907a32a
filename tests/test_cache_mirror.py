"""Cache mirror: leading-match semantics, LRU order, replica membership, and a Python model."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pylb.native import CacheMirror


class ReferenceMirror:
    """The documented semantics in plain Python: per replica an OrderedDict, most recent last."""

    def __init__(self, num_replicas: int, capacity: int) -> None:
        self.lru: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(num_replicas)]
        self.caps = [capacity] * num_replicas

    def evict_to(self, r: int, cap: int) -> int:
        evicted = 0
        while len(self.lru[r]) > cap:
            self.lru[r].popitem(last=False)
            evicted += 1
        return evicted

    def insert(self, r: int, hashes: list[int]) -> int:
        od, cap, evicted = self.lru[r], self.caps[r], 0
        for h in reversed(hashes[:cap]):  # leading blocks, the first one touched last
            if h in od:
                od.move_to_end(h)
            else:
                evicted += self.evict_to(r, cap - 1)
                od[h] = None
        return evicted

    def remove(self, r: int, hashes: list[int]) -> int:
        removed = 0
        for h in hashes:
            if h in self.lru[r]:
                del self.lru[r][h]
                removed += 1
        return removed

    def clear(self, r: int) -> None:
        self.lru[r].clear()

    def resize(self, r: int, cap: int) -> int:
        self.caps[r] = cap
        return self.evict_to(r, cap)

    def add_replica(self, cap: int) -> int:
        self.lru.append(OrderedDict())
        self.caps.append(cap)
        return len(self.lru) - 1

    def remove_replica(self, r: int) -> None:
        del self.lru[r]
        del self.caps[r]

    def match(self, hashes: list[int]) -> list[int]:
        out = []
        for od in self.lru:
            n = 0
            while n < len(hashes) and hashes[n] in od:
                n += 1
            out.append(n)
        return out

    def blocks(self, r: int) -> list[int]:
        return list(reversed(self.lru[r]))


def assert_same(m: CacheMirror, ref: ReferenceMirror) -> None:
    assert m.num_replicas == len(ref.lru)
    held = set()
    for r in range(m.num_replicas):
        assert m.size(r) == len(ref.lru[r])
        assert m.capacity(r) == ref.caps[r]
        assert m.blocks(r).tolist() == ref.blocks(r)
        held |= set(ref.lru[r])
    assert m.distinct_blocks == len(held)


# Few distinct hashes so that operations collide; 0 and 2**64-1 are ordinary keys.
HASHES = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15])
PROMPTS = st.lists(HASHES, max_size=12)


def operations(max_replica: int):
    r = st.integers(0, max_replica)
    cap = st.integers(0, 10)
    return st.lists(
        st.one_of(
            st.tuples(st.just("insert"), r, PROMPTS),
            st.tuples(st.just("insert"), r, PROMPTS),
            st.tuples(st.just("remove"), r, PROMPTS),
            st.tuples(st.just("match"), PROMPTS),
            st.tuples(st.just("clear"), r),
            st.tuples(st.just("resize"), r, cap),
            st.tuples(st.just("add_replica"), cap),
            st.tuples(st.just("remove_replica"), r),
        ),
        max_size=40,
    )


def run_against_reference(num_replicas: int, capacity: int, ops: list) -> None:
    m, ref = CacheMirror(num_replicas, capacity), ReferenceMirror(num_replicas, capacity)
    for op in ops:
        name, args = op[0], list(op[1:])
        if name in ("insert", "remove", "clear", "resize", "remove_replica"):
            if not ref.lru:
                continue
            args[0] %= len(ref.lru)
        if name == "match":
            got = m.match(np.array(args[0], dtype=np.uint64))
            assert got.dtype == np.int64
            assert got.tolist() == ref.match(args[0])
            continue
        assert getattr(m, name)(*args) == getattr(ref, name)(*args), op
        assert_same(m, ref)


@settings(max_examples=300, deadline=None)
@given(num_replicas=st.integers(0, 4), capacity=st.integers(0, 8), ops=operations(3))
def test_matches_python_model(num_replicas: int, capacity: int, ops: list) -> None:
    run_against_reference(num_replicas, capacity, ops)


@settings(max_examples=60, deadline=None)
@given(num_replicas=st.sampled_from([63, 64, 65, 129]), capacity=st.integers(1, 8), ops=operations(140))
def test_matches_python_model_beyond_64_replicas(num_replicas: int, capacity: int, ops: list) -> None:
    run_against_reference(num_replicas, capacity, ops)


def test_leading_match_stops_at_a_hole() -> None:
    m = CacheMirror(3, 100)
    m.insert(0, [10, 11, 12, 13])
    m.insert(1, [10, 12, 13])  # holds 12 and 13 but not 11
    m.insert(2, [11, 12])  # does not hold the first block
    assert m.match([10, 11, 12, 13]).tolist() == [4, 1, 0]
    assert m.match([10, 11, 12, 13, 14]).tolist() == [4, 1, 0]
    assert m.match([]).tolist() == [0, 0, 0]
    assert m.match([99]).tolist() == [0, 0, 0]


def test_insert_order_keeps_the_head_and_evicts_the_tail() -> None:
    m = CacheMirror(1, 4)
    assert m.insert(0, [1, 2, 3, 4]) == 0
    assert m.blocks(0).tolist() == [1, 2, 3, 4]  # most recently used first: the prompt's head
    assert m.insert(0, [9]) == 1  # evicts 4, the tail, so the prefix [1, 2, 3] still matches
    assert m.blocks(0).tolist() == [9, 1, 2, 3]
    assert m.match([1, 2, 3, 4]).tolist() == [3]
    assert m.insert(0, [1, 2]) == 0  # touching moves them to the front
    assert m.blocks(0).tolist() == [1, 2, 9, 3]
    assert m.insert(0, [5, 6]) == 2
    assert m.blocks(0).tolist() == [5, 6, 1, 2]


def test_insert_longer_than_capacity_keeps_the_leading_blocks() -> None:
    m = CacheMirror(1, 3)
    m.insert(0, [7, 8])
    assert m.insert(0, list(range(100, 110))) == 2
    assert m.blocks(0).tolist() == [100, 101, 102]
    assert m.match(list(range(100, 110))).tolist() == [3]


def test_resize_down_evicts_lru_and_up_keeps_everything() -> None:
    m = CacheMirror(2, 5)
    m.insert(0, [1, 2, 3, 4, 5])
    m.insert(1, [1, 2])
    assert m.resize(0, 2) == 3
    assert m.blocks(0).tolist() == [1, 2]
    assert (m.capacity(0), m.size(0)) == (2, 2)
    assert m.distinct_blocks == 2
    assert m.resize(0, 10) == 0
    m.insert(0, [6, 7, 8])
    assert m.size(0) == 5
    assert m.resize(0, 0) == 5
    assert m.insert(0, [1]) == 0 and m.size(0) == 0  # capacity 0 holds nothing
    assert m.match([1, 2]).tolist() == [0, 2]


def test_remove_and_clear() -> None:
    m = CacheMirror(2, 10)
    m.insert(0, [1, 2, 3])
    m.insert(1, [1, 2, 3])
    assert m.remove(0, [2, 42]) == 1
    assert m.match([1, 2, 3]).tolist() == [1, 3]
    assert not m.contains(0, 2) and m.contains(1, 2) and m.contains(0, 3)
    m.clear(1)
    assert m.size(1) == 0 and m.capacity(1) == 10
    assert m.match([1, 2, 3]).tolist() == [1, 0]
    assert m.distinct_blocks == 2
    m.clear(0)
    assert m.distinct_blocks == 0
    m.insert(0, [3, 4])
    assert m.match([3, 4]).tolist() == [2, 0]


def test_add_and_remove_replicas_shift_indices() -> None:
    m = CacheMirror(0, 8)
    assert m.match([1, 2]).tolist() == []
    for r in range(3):
        assert m.add_replica(8 + r) == r
        m.insert(r, list(range(r + 1)))  # replica r holds a prefix of length r + 1
    assert m.match([0, 1, 2]).tolist() == [1, 2, 3]
    m.remove_replica(1)
    assert m.num_replicas == 2
    assert m.match([0, 1, 2]).tolist() == [1, 3]
    assert [m.capacity(0), m.capacity(1)] == [8, 10]
    assert m.add_replica(0) == 2 and m.size(2) == 0


def test_more_than_64_replicas() -> None:
    m = CacheMirror(64, 4)
    for r in range(64):
        m.insert(r, [1000 + r])
    idx = m.add_replica(4)  # grows the masks to two words
    assert idx == 64
    m.insert(64, [1, 2, 3])
    m.insert(63, [1, 2])
    m.insert(0, [1])
    assert m.match([1, 2, 3]).tolist() == [1] + [0] * 62 + [2, 3]
    for _ in range(70):
        m.add_replica(4)
    m.insert(133, [1, 2, 3, 4])
    assert m.match([1, 2, 3, 4])[[0, 63, 64, 133]].tolist() == [1, 2, 3, 4]
    m.remove_replica(5)  # everything above 5 shifts down across word boundaries
    got = m.match([1, 2, 3, 4])
    assert got[[0, 62, 63, 132]].tolist() == [1, 2, 3, 4] and got.sum() == 10
    for r in [133, *range(131, 63, -1), 2]:
        m.remove_replica(r)  # back to 64 replicas: the masks shrink to one word
    assert m.num_replicas == 64
    assert m.match([1, 2, 3, 4]).tolist() == [1] + [0] * 60 + [2, 3, 4]
    assert m.distinct_blocks == 4 + 62  # 1..4, and 1000 + r of the 62 first replicas left


def test_bad_inputs() -> None:
    m = CacheMirror(2, 4)
    for call in (lambda: m.insert(2, [1]), lambda: m.insert(-1, [1]), lambda: m.remove(5, [1]),
                 lambda: m.clear(2), lambda: m.resize(3, 1), lambda: m.remove_replica(2),
                 lambda: m.size(2), lambda: m.capacity(-1), lambda: m.contains(2, 1), lambda: m.blocks(9)):
        with pytest.raises(IndexError, match="replica"):
            call()
    with pytest.raises(ValueError, match="capacity_blocks"):
        CacheMirror(2, -1)
    with pytest.raises(ValueError, match="num_replicas"):
        CacheMirror(-1, 4)
    with pytest.raises(ValueError, match="capacity"):
        m.resize(0, -1)
    with pytest.raises(ValueError, match="capacity"):
        m.add_replica(-5)
    with pytest.raises(TypeError):
        m.match(np.array([1.0, 2.0]))
    with pytest.raises(TypeError):
        m.insert(0, "abc")
    with pytest.raises(ValueError, match="one-dimensional"):
        m.match(np.zeros((2, 2), dtype=np.uint64))


def test_accepts_integer_arrays_and_sequences() -> None:
    m = CacheMirror(1, 10)
    h = np.array([2**64 - 1, 5, 0], dtype=np.uint64)
    m.insert(0, h)
    assert m.match(h.astype(np.int64)).tolist() == [3]  # -1 is read as 2**64 - 1
    assert m.match([2**64 - 1, 5, 0]).tolist() == [3]
    interleaved = np.full(6, 7, dtype=np.uint64)
    interleaved[::2] = h
    assert m.match(interleaved[::2]).tolist() == [3]  # a strided view is read by its strides
    assert m.match(interleaved).tolist() == [1]
    assert repr(m) == "CacheMirror(num_replicas=1, distinct_blocks=3)"


def test_many_blocks_rehash() -> None:
    m = CacheMirror(3, 50_000)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 2**63, size=256, dtype=np.uint64) for _ in range(150)]
    for i, p in enumerate(prompts):
        m.insert(i % 3, p)
    assert m.distinct_blocks == 150 * 256
    for i, p in enumerate(prompts):
        expected = [0, 0, 0]
        expected[i % 3] = 256
        assert m.match(p).tolist() == expected
    for i, p in enumerate(prompts):
        m.remove(i % 3, p[128:])
    assert m.distinct_blocks == 150 * 128
    assert m.match(prompts[4]).tolist() == [0, 128, 0]
