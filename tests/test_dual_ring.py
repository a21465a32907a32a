"""Dual consistent-hash ring (csrc/src/dual_ring.cpp): format, balance, consistency, independence.

The property tests use 100k (or 200k) random keys per example; their bounds sit many standard
deviations away from what the ring gives (see the design comment in dual_ring.cpp: the share of
a replica has a relative spread of about 2.3 % with 256 vnodes and 4 probes), so they hold
robustly rather than by luck.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings, strategies as st

from pylb.native import DualRing

# The ring format: seeds of the point and key hashes (csrc/include/pylb/dual_ring.hpp).
POINT_SEED = (0x243F6A8885A308D3, 0x13198A2E03707344)
KEY_SEED = (0xA4093822299F31D0, 0x082EFA98EC4E6C89)
U64 = 2**64

# Names: URL-like ones, and arbitrary non-empty text (any code point but lone surrogates).
url_names = st.builds(
    lambda host, port, path: f"http://{host}:{port}{path}",
    st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z0-9-]{1,10}){0,2}", fullmatch=True),
    st.integers(1, 65535),
    st.sampled_from(["", "/", "/v1"]),
)
any_names = st.text(min_size=1, max_size=24)
name = st.one_of(url_names, any_names)
seeds = st.integers(0, 2**32 - 1)


def names_of(n: int) -> st.SearchStrategy[list[str]]:
    return st.lists(name, min_size=n, max_size=n, unique=True)


def random_keys(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, U64, size=n, dtype=np.uint64)


def shares(ring: DualRing, keys: np.ndarray, which: int) -> np.ndarray:
    """Share of each replica on ring `which`, in units of the fair share 1/N."""
    counts = np.bincount(ring.owners_batch(keys, which), minlength=len(ring))
    return counts * len(ring) / len(keys)


# ---- a pure-Python model of the ring: pins the format (positions, remix, probes, b rule) ----


def c_round(x: float) -> int:
    """std::round for x >= 0 (half away from zero; Python's round() goes to even)."""
    whole = math.floor(x)
    return whole + (1 if x - whole >= 0.5 else 0)


class ReferenceRing:
    def __init__(self, names, vnodes=256, weights=None, probes=4):
        w = list(weights) if weights is not None else [1.0] * len(names)
        mean = sum(sorted(w)) / len(w)
        self.counts = [max(1, c_round(vnodes * (wi / mean))) for wi in w]
        self.rings = []
        for r in (0, 1):
            pts = sorted(
                (xxhash.xxh3_64_intdigest(nm.encode() + v.to_bytes(4, "little"), seed=POINT_SEED[r]), nm, v, i)
                for i, nm in enumerate(names)
                for v in range(self.counts[i])
            )
            self.rings.append(([p[0] for p in pts], [p[3] for p in pts]))
        self.n = len(names)
        self.probes = probes

    def point(self, key: int, r: int) -> int:
        pos, _ = self.rings[r]
        best, best_d = 0, None
        for p in range(self.probes):
            q = xxhash.xxh3_64_intdigest(key.to_bytes(8, "little"), seed=KEY_SEED[r] + p)
            i = bisect_left(pos, q)
            i = 0 if i == len(pos) else i
            d = (pos[i] - q) % U64
            if best_d is None or d < best_d:
                best, best_d = i, d
        return best

    def owner(self, key: int, r: int) -> int:
        return self.rings[r][1][self.point(key, r)]

    def candidates(self, key: int) -> tuple[int, int]:
        a = self.owner(key, 0)
        owners = self.rings[1][1]
        j = self.point(key, 1)
        if self.n > 1:
            while owners[j] == a:
                j = (j + 1) % len(owners)
        return a, owners[j]


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    n=st.integers(1, 6),
    vnodes=st.integers(1, 12),
    probes=st.integers(1, 5),
    weighted=st.booleans(),
)
def test_matches_reference_model(data, n, vnodes, probes, weighted):
    names = data.draw(names_of(n))
    weights = data.draw(st.lists(st.floats(0.05, 20.0), min_size=n, max_size=n)) if weighted else None
    keys = data.draw(st.lists(st.integers(0, U64 - 1), min_size=1, max_size=40)) + [0, U64 - 1]
    ring = DualRing(names, vnodes, weights, probes=probes)
    ref = ReferenceRing(names, vnodes, weights, probes)
    assert list(ring.vnode_counts) == ref.counts
    arr = np.array(keys, dtype=np.uint64)
    a, b = ring.candidates_batch(arr)
    for t, key in enumerate(keys):
        assert ring.owner(key, 0) == ref.owner(key, 0)
        assert ring.owner(key, 1) == ref.owner(key, 1)
        assert ring.candidates(key) == ref.candidates(key) == (a[t], b[t])


PINNED_KEYS = (0, 1, 2, 5, 9, 2**32, 2**63, 2**64 - 1, 0x0123456789ABCDEF, 0xDEADBEEFCAFEF00D)
# (owner on ring 0, owner on ring 1, a, b) of each key; keys 5 and 9 exercise the b walk.
PINNED = [
    (0, 9, 0, 9), (6, 5, 6, 5), (6, 9, 6, 9), (2, 2, 2, 7), (1, 1, 1, 5),
    (1, 5, 1, 5), (2, 5, 2, 5), (3, 8, 3, 8), (0, 2, 0, 2), (3, 7, 3, 7),
]  # fmt: skip


def test_pinned_placement():
    # Literal values, so that a change of format (seeds, byte layout, probes, b rule) cannot pass
    # unnoticed even if the reference model were changed along with it.
    ring = DualRing([f"http://10.0.0.{i}:8000" for i in range(1, 11)])
    got = [(ring.owner(k, 0), ring.owner(k, 1), *ring.candidates(k)) for k in PINNED_KEYS]
    assert got == PINNED
    ref = ReferenceRing(list(ring.replica_ids))
    assert [(ref.owner(k, 0), ref.owner(k, 1), *ref.candidates(k)) for k in PINNED_KEYS] == PINNED


# ---- balance, consistency, independence --------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n=st.integers(2, 16), seed=seeds)
def test_no_replica_exceeds_fair_share_by_15_percent(data, n, seed):
    ring = DualRing(data.draw(names_of(n)), vnodes=256)
    keys = random_keys(seed, 100_000)
    for which in (0, 1):
        s = shares(ring, keys, which)
        assert s.max() <= 1.15, (which, s)
        assert s.min() >= 0.85, (which, s)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n=st.integers(2, 16), seed=seeds)
def test_adding_a_replica_moves_about_1_over_n_plus_1_only_onto_it(data, n, seed):
    names = data.draw(names_of(n + 1))
    new = names.pop(data.draw(st.integers(0, n)))
    where = data.draw(st.integers(0, n))  # where the newcomer lands in the list: indices shift
    before = DualRing(names)
    after = DualRing(names[:where] + [new] + names[where:])
    keys = random_keys(seed, 100_000)
    for which in (0, 1):
        old = np.array(before.replica_ids, dtype=object)[before.owners_batch(keys, which)]
        now = np.array(after.replica_ids, dtype=object)[after.owners_batch(keys, which)]
        moved = old != now
        on_new = after.owners_batch(keys, which) == where  # by position: see the removal test
        assert on_new[moved].all()
        assert on_new.sum() == moved.sum()
        fraction = moved.mean() * (n + 1)
        assert 0.75 <= fraction <= 1.25, (which, fraction)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), n=st.integers(2, 16), seed=seeds)
def test_removing_a_replica_moves_only_its_keys(data, n, seed):
    names = data.draw(names_of(n))
    gone = data.draw(st.integers(0, n - 1))
    before = DualRing(names)
    after = DualRing(names[:gone] + names[gone + 1 :])
    keys = random_keys(seed, 100_000)
    for which in (0, 1):
        old = np.array(before.replica_ids, dtype=object)[before.owners_batch(keys, which)]
        now = np.array(after.replica_ids, dtype=object)[after.owners_batch(keys, which)]
        # Compare by position, not `old == names[gone]`: numpy turns a str scalar into a fixed
        # width string and drops trailing NULs, so a name like "\x00" would never compare equal.
        was_gone = before.owners_batch(keys, which) == gone
        assert ((old != now) == was_gone).all()
        fraction = was_gone.mean() * n
        assert 0.75 <= fraction <= 1.25, (which, fraction)


@settings(max_examples=20, deadline=None)
@given(data=st.data(), n=st.integers(2, 16), seed=seeds)
def test_rings_are_independent(data, n, seed):
    ring = DualRing(data.draw(names_of(n)))
    keys = random_keys(seed, 200_000)
    # Raw owners: the pair (ring 0 owner, ring 1 owner) is spread over all N^2 cells, diagonal
    # included (identical or correlated rings would pile keys on the diagonal).
    o0, o1 = ring.owners_batch(keys, 0), ring.owners_batch(keys, 1)
    raw = np.bincount(o0 * n + o1, minlength=n * n) / (len(keys) / n**2)
    assert 0.7 <= raw.min() and raw.max() <= 1.3, raw.reshape(n, n)
    assert 0.85 <= (o0 == o1).mean() * n <= 1.15
    # Candidate pairs: every ordered pair (a, b), a != b, gets about 1 / (N (N - 1)) of the keys.
    a, b = ring.candidates_batch(keys)
    cells = np.bincount(a * n + b, minlength=n * n).reshape(n, n)
    assert (np.diag(cells) == 0).all()
    off = cells[~np.eye(n, dtype=bool)] / (len(keys) / (n * (n - 1)))
    assert 0.7 <= off.min() and off.max() <= 1.3, off


@settings(max_examples=20, deadline=None)
@given(data=st.data(), n=st.integers(2, 8), seed=seeds, heavy=st.integers(0, 7))
def test_weight_two_gets_about_twice_the_share(data, n, seed, heavy):
    heavy %= n
    weights = [1.0] * n
    weights[heavy] = 2.0
    ring = DualRing(data.draw(names_of(n)), weights=weights)
    mean = (n + 1) / n
    assert ring.vnode_counts[heavy] == c_round(256 * 2 / mean)
    keys = random_keys(seed, 100_000)
    for which in (0, 1):
        counts = np.bincount(ring.owners_batch(keys, which), minlength=n)
        others = np.delete(counts, heavy).mean()
        assert 1.7 <= counts[heavy] / others <= 2.3, (which, counts)


# ---- candidates: a != b, single and batch agree, determinism -----------------------------------


@settings(max_examples=30, deadline=None)
@given(data=st.data(), n=st.integers(2, 16), seed=seeds, vnodes=st.sampled_from([1, 2, 16, 256]))
def test_a_differs_from_b_and_single_agrees_with_batch(data, n, seed, vnodes):
    ring = DualRing(data.draw(names_of(n)), vnodes=vnodes)
    keys = random_keys(seed, 5_000)
    a, b = ring.candidates_batch(keys)
    assert a.dtype == np.int32 and b.dtype == np.int32 and a.shape == b.shape == keys.shape
    assert (a != b).all()
    assert ((0 <= a) & (a < n) & (0 <= b) & (b < n)).all()
    o0, o1 = ring.owners_batch(keys, 0), ring.owners_batch(keys, 1)
    assert (a == o0).all()
    assert (b[o1 != o0] == o1[o1 != o0]).all()  # b is ring 1's owner unless that is a
    for t in range(0, len(keys), 50):
        key = int(keys[t])
        assert ring.candidates(key) == (a[t], b[t])
        assert ring.owner(key, 0) == o0[t] and ring.owner(key, 1) == o1[t]
        assert ring.candidates(keys[t]) == (a[t], b[t])  # numpy scalars are accepted too


@settings(max_examples=20, deadline=None)
@given(data=st.data(), n=st.integers(1, 12), seed=seeds, weighted=st.booleans())
def test_deterministic_and_independent_of_list_order(data, n, seed, weighted):
    names = data.draw(names_of(n))
    weights = data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n)) if weighted else None
    keys = random_keys(seed, 20_000)
    r1, r2 = DualRing(names, 64, weights), DualRing(list(names), 64, weights)
    a1, b1 = r1.candidates_batch(keys)
    a2, b2 = r2.candidates_batch(keys)
    assert (a1 == a2).all() and (b1 == b2).all()
    perm = data.draw(st.permutations(range(n)))
    shuffled = DualRing([names[i] for i in perm], 64, None if weights is None else [weights[i] for i in perm])
    a3, b3 = shuffled.candidates_batch(keys)
    ids1, ids3 = np.array(names, dtype=object), np.array(shuffled.replica_ids, dtype=object)
    assert (ids1[a1] == ids3[a3]).all() and (ids1[b1] == ids3[b3]).all()


def test_one_replica():
    ring = DualRing(["only"])
    assert ring.candidates(12345) == (0, 0)
    assert ring.owner(2**64 - 1, 1) == 0
    a, b = ring.candidates_batch(random_keys(1, 1000))
    assert (a == 0).all() and (b == 0).all()
    assert len(ring) == 1


def test_properties_and_immutability():
    ring = DualRing(["a", "b", "c"], vnodes=10, weights=[1, 2, 3], probes=2)
    assert ring.replica_ids == ("a", "b", "c")
    assert len(ring) == 3 and ring.vnodes == 10 and ring.probes == 2
    assert ring.weights == (1.0, 2.0, 3.0)
    assert ring.vnode_counts == (5, 10, 15)
    assert DualRing(["a", "b"]).weights == (1.0, 1.0)
    assert DualRing(["a", "b"]).vnodes == 256 and DualRing(["a", "b"]).probes == 4
    assert "DualRing(3 replicas" in repr(ring)
    with pytest.raises(AttributeError):
        ring.vnodes = 3
    with pytest.raises(AttributeError):
        ring.replica_ids = ("x",)


def test_tiny_weight_still_gets_one_point():
    ring = DualRing(["a", "b", "c"], weights=[1e-9, 1, 1])
    assert ring.vnode_counts[0] == 1
    a, b = ring.candidates_batch(random_keys(2, 10_000))
    assert (a != b).all()


def test_batch_input_forms():
    ring = DualRing([f"r{i}" for i in range(5)])
    keys = random_keys(3, 600)
    a, b = ring.candidates_batch(keys)
    a2, b2 = ring.candidates_batch(keys.reshape(20, 30))
    assert a2.shape == (20, 30) and (a2.ravel() == a).all() and (b2.ravel() == b).all()
    a3, _ = ring.candidates_batch(keys[::3])  # not contiguous
    assert (a3 == a[::3]).all()
    a4, _ = ring.candidates_batch(keys.astype(">u8"))  # big-endian
    assert (a4 == a).all()
    a5, b5 = ring.candidates_batch([int(k) for k in keys[:10]])  # a list of ints
    assert (a5 == a[:10]).all() and (b5 == b[:10]).all()
    e, f = ring.candidates_batch(np.empty(0, dtype=np.uint64))
    assert e.shape == f.shape == (0,)
    assert (ring.owners_batch(keys.reshape(2, 300), 1).ravel() == ring.owners_batch(keys, 1)).all()


def test_batch_runs_in_threads():
    ring = DualRing([f"r{i}" for i in range(16)])
    keys = random_keys(4, 200_000)
    want = ring.candidates_batch(keys)
    got = [None, None]

    def work(slot):
        got[slot] = ring.candidates_batch(keys)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in got:
        assert (a == want[0]).all() and (b == want[1]).all()


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (([],), {}, ValueError, r"replica_ids.*at least one"),
        ((["a", "b", "a"],), {}, ValueError, r"replica_ids.*unique.*'a'.*0 and 2"),
        ((["a", ""],), {}, ValueError, r"replica_ids\[1\].*empty"),
        ((["a", "\ud800"],), {}, ValueError, r"replica_ids\[1\].*UTF-8"),
        ((["a"], 0), {}, ValueError, r"vnodes.*got 0"),
        ((["a"], -5), {}, ValueError, r"vnodes.*got -5"),
        ((["a", "b"], 8, [1.0]), {}, ValueError, r"weights.*2.*got 1"),
        ((["a", "b"], 8, [1.0, 0.0]), {}, ValueError, r"weights\[1\].*got 0"),
        ((["a", "b"], 8, [-1.0, 1.0]), {}, ValueError, r"weights\[0\].*got -1"),
        ((["a", "b"], 8, [1.0, float("nan")]), {}, ValueError, r"weights\[1\].*got nan"),
        ((["a", "b"], 8, [1.0, float("inf")]), {}, ValueError, r"weights\[1\].*got inf"),
        ((["a"],), {"probes": 0}, ValueError, r"probes.*got 0"),
        ((["a"],), {"probes": 65}, ValueError, r"probes.*got 65"),
        ((["a"], 2**26), {}, ValueError, r"vnodes.*points"),
        (("abc",), {}, TypeError, r"replica_ids.*not a single str"),
        ((42,), {}, TypeError, r"replica_ids.*int"),
        (([1, 2],), {}, TypeError, r"replica_ids\[0\].*int"),
        ((["a", b"b"],), {}, TypeError, r"replica_ids\[1\].*bytes"),
        ((["a"], 8, ["x"]), {}, TypeError, r"weights\[0\].*str"),
        ((["a"], 8, 1.0), {}, TypeError, r"weights.*float"),
        ((["a"], "8"), {}, TypeError, r"vnodes"),
        ((["a"], 2.5), {}, TypeError, r"vnodes"),
    ],
)
def test_bad_constructor_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        DualRing(*args, **kwargs)


def test_bad_lookup_arguments():
    ring = DualRing(["a", "b"])
    with pytest.raises(ValueError, match=r"key.*got -1"):
        ring.candidates(-1)
    with pytest.raises(ValueError, match=r"key.*2\*\*64"):
        ring.candidates(2**64)
    with pytest.raises(TypeError, match=r"key.*float"):
        ring.candidates(1.5)
    with pytest.raises(TypeError, match=r"key.*str"):
        ring.owner("1", 0)
    with pytest.raises(ValueError, match=r"ring.*got 2"):
        ring.owner(1, 2)
    with pytest.raises(ValueError, match=r"ring.*got -1"):
        ring.owners_batch(np.zeros(3, dtype=np.uint64), -1)
    with pytest.raises(TypeError, match=r"keys.*dtype int64"):
        ring.candidates_batch(np.zeros(3, dtype=np.int64))
    with pytest.raises(TypeError, match=r"keys.*dtype float64"):
        ring.owners_batch(np.zeros(3), 0)
    with pytest.raises(ValueError, match=r"keys.*\[0, 2\*\*64\)"):
        ring.candidates_batch([1, -1])
    with pytest.raises(TypeError, match=r"keys"):
        ring.candidates_batch("123")
