"""Batched cosine top-k: the CPU core against a float64 numpy reference, the order rule (similarity
descending, ties by smaller index), zero and NaN vectors, input checks; and, where a CUDA device and
CuPy exist, the CUDA twin against the CPU twin and numpy (tests marked `cuda`, skipped elsewhere)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pylb import native

TILE = 4096  # kDefaultTileKeys in csrc/include/pylb/similarity.hpp
NEAR_TIE = 1e-6  # indices may differ from the reference only between keys this close in similarity
SIM_ATOL = 1e-5


def reference_similarities(q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact-ish cosine matrix in float64; a zero vector has similarity 0."""
    q64, x64 = q.astype(np.float64), x.astype(np.float64)
    nq, nx = np.linalg.norm(q64, axis=1), np.linalg.norm(x64, axis=1)
    iq = np.divide(1.0, nq, out=np.zeros_like(nq), where=nq > 0)
    ix = np.divide(1.0, nx, out=np.zeros_like(nx), where=nx > 0)
    return (q64 * iq[:, None]) @ (x64 * ix[:, None]).T


def reference_topk(q: np.ndarray, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = reference_similarities(q, x)
    k = min(k, x.shape[0])
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]  # stable: ties by smaller index
    return order, np.take_along_axis(s, order, 1)


def assert_ordered(index: np.ndarray, sim: np.ndarray) -> None:
    """Each row: similarities non-increasing, equal similarities by ascending index, no repeats."""
    for row_i, row_s in zip(index, sim):
        assert len(set(row_i.tolist())) == len(row_i)
        s = np.where(np.isnan(row_s), -np.inf, row_s)
        assert (s[:-1] >= s[1:]).all()
        tied = s[:-1] == s[1:]
        assert (row_i[:-1][tied] < row_i[1:][tied]).all()


def assert_matches_reference(q: np.ndarray, x: np.ndarray, k: int, index: np.ndarray, sim: np.ndarray) -> None:
    ref_i, ref_s = reference_topk(q, x, k)
    full = reference_similarities(q, x)
    assert index.shape == sim.shape == ref_i.shape
    assert index.dtype == np.int64 and sim.dtype == np.float32
    np.testing.assert_allclose(sim, ref_s, rtol=0, atol=SIM_ATOL)
    # Indices equal the reference's, except where the chosen key is a near-tie of the reference's.
    differs = index != ref_i
    if differs.any():
        chosen = np.take_along_axis(full, index, 1)
        assert (np.abs(chosen - ref_s)[differs] < NEAR_TIE).all()
    assert_ordered(index, sim)


def random_data(B: int, N: int, D: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((B, D), dtype=np.float32), rng.standard_normal((N, D), dtype=np.float32)


# ---- CPU: agreement with numpy ---------------------------------------------------------------------

SHAPES = [
    # (B, N, D, k)
    (3, 100, 8, 5),  # N < tile
    (5, 2 * TILE + 37, 33, 7),  # N not a multiple of the tile, several tiles
    (4, TILE, 16, 10),  # N == tile
    (2, TILE + 1, 5, 3),  # one key in the last tile
    (6, 500, 24, 1),  # k = 1
    (3, 50, 12, 50),  # k = N
    (1, 1000, 64, 20),  # B = 1
    (300, 700, 16, 4),  # B above the 256-query block
    (7, 300, 1, 6),  # D = 1: similarities are +-1, many exact ties
    (2, 3000, 384, 100),  # the embedding width pylb is tuned for
]


@pytest.mark.parametrize(("B", "N", "D", "k"), SHAPES)
def test_matches_numpy(B: int, N: int, D: int, k: int) -> None:
    q, x = random_data(B, N, D, seed=B * 1000 + N)
    index, sim = native.topk_similarity(q, x, k)
    assert_matches_reference(q, x, k, index, sim)


def test_k_above_n_returns_n_columns() -> None:
    q, x = random_data(3, 20, 8)
    index, sim = native.topk_similarity(q, x, 50)
    assert index.shape == sim.shape == (3, 20)
    assert_matches_reference(q, x, 20, index, sim)
    assert sorted(index[0].tolist()) == list(range(20))


def test_empty_inputs() -> None:
    q, x = random_data(0, 10, 4)
    index, sim = native.topk_similarity(q, x, 3)
    assert index.shape == sim.shape == (0, 3)
    q, x = random_data(2, 0, 4)
    index, sim = native.topk_similarity(q, x, 3)
    assert index.shape == sim.shape == (2, 0)


def test_zero_width_vectors_are_zero_vectors() -> None:
    index, sim = native.topk_similarity(np.zeros((2, 0), np.float32), np.zeros((5, 0), np.float32), 3)
    assert index.tolist() == [[0, 1, 2]] * 2
    assert sim.tolist() == [[0.0, 0.0, 0.0]] * 2


@settings(max_examples=60, deadline=None)
@given(
    B=st.integers(1, 6),
    N=st.integers(1, 60),
    D=st.integers(1, 6),
    k=st.integers(1, 70),
    seed=st.integers(0, 2**32 - 1),
)
def test_small_integer_vectors_many_ties(B: int, N: int, D: int, k: int, seed: int) -> None:
    # Small integer coordinates: many exact and near-exact ties, zero vectors, opposite vectors.
    rng = np.random.default_rng(seed)
    q = rng.integers(-2, 3, size=(B, D)).astype(np.float32)
    x = rng.integers(-2, 3, size=(N, D)).astype(np.float32)
    index, sim = native.topk_similarity(q, x, k)
    assert_matches_reference(q, x, k, index, sim)


# ---- CPU: the order rule, zero vectors, NaN --------------------------------------------------------


def test_ties_go_to_the_smaller_index() -> None:
    # Keys 2, 7 and 11 point the same way as the query (scaled by powers of two, so their computed
    # cosines are bit-identical); the rest point elsewhere.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 16)).astype(np.float32)
    base = rng.standard_normal(16).astype(np.float32)
    x[7], x[2], x[11] = base, 4 * base, 0.5 * base
    index, sim = native.topk_similarity(base[None, :], x, 4)
    assert index[0, :3].tolist() == [2, 7, 11]
    assert sim[0, 0] == sim[0, 1] == sim[0, 2]
    np.testing.assert_allclose(sim[0, :3], 1.0, atol=1e-6)


def test_ties_across_tiles() -> None:
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3 * TILE, 8)).astype(np.float32)
    q = rng.standard_normal((2, 8)).astype(np.float32)
    for i in (2 * TILE + 5, 5, TILE + 5):
        x[i] = q[0]
    index, sim = native.topk_similarity(q, x, 3)
    assert index[0].tolist() == [5, TILE + 5, 2 * TILE + 5]
    assert sim[0, 0] == sim[0, 1] == sim[0, 2]


def test_duplicate_keys_everywhere() -> None:
    # Every key appears three times: results list each triple in index order.
    rng = np.random.default_rng(7)
    base = rng.standard_normal((30, 10)).astype(np.float32)
    x = np.concatenate([base, base, base])  # key i, i + 30, i + 60 equal
    q = rng.standard_normal((4, 10)).astype(np.float32)
    index, sim = native.topk_similarity(q, x, 9)
    assert_ordered(index, sim)
    for row in index:
        for t in range(0, 9, 3):
            i = row[t]
            assert row[t : t + 3].tolist() == [i, i + 30, i + 60]


def test_zero_vectors_have_similarity_zero() -> None:
    x = np.array([[-1, 0], [0, 0], [1, 0], [0, 0], [0, 1]], np.float32)
    q = np.array([[1, 0], [0, 0]], np.float32)
    index, sim = native.topk_similarity(q, x, 5)
    # Query 0: key 2 (1), then the zero keys 1 and 3 tie with key 4 at 0 (by index), then key 0 (-1).
    assert index[0].tolist() == [2, 1, 3, 4, 0]
    assert sim[0].tolist() == [1.0, 0.0, 0.0, 0.0, -1.0]
    # A zero query: everything 0, so the first k keys in index order.
    assert index[1].tolist() == [0, 1, 2, 3, 4]
    assert sim[1].tolist() == [0.0] * 5


def test_nan_and_inf_rank_last() -> None:
    x = np.array([[1, 0], [np.nan, 1], [0.5, 0.5], [np.inf, 0], [-1, 0]], np.float32)
    q = np.array([[1, 0], [np.nan, 0]], np.float32)
    index, sim = native.topk_similarity(q, x, 5)
    # Query 0: the finite keys by similarity, then the NaN (key 1) and infinite (key 3) ones.
    assert index[0].tolist() == [0, 2, 4, 1, 3]
    assert np.isnan(sim[0, 3:]).all() and not np.isnan(sim[0, :3]).any()
    # A NaN query: every similarity NaN, keys in index order.
    assert index[1].tolist() == [0, 1, 2, 3, 4]
    assert np.isnan(sim[1]).all()
    # With k below the count of finite keys, NaN keys never displace them.
    index, _ = native.topk_similarity(q[:1], x, 2)
    assert index[0].tolist() == [0, 2]


def test_deterministic_and_independent_of_layout() -> None:
    q, x = random_data(9, 5000, 40, seed=3)
    first = native.topk_similarity(q, x, 12)
    second = native.topk_similarity(q, x, 12)
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # Non-contiguous and Fortran-ordered inputs are copied to C order: same answer.
    wide = np.zeros((9, 80), np.float32)
    wide[:, ::2] = q
    fortran = np.asfortranarray(x)
    third = native.topk_similarity(wide[:, ::2], fortran, 12)
    np.testing.assert_array_equal(first[0], third[0])
    np.testing.assert_array_equal(first[1], third[1])


def test_threads_release_the_gil_and_agree() -> None:
    q, x = random_data(16, 20000, 32, seed=4)
    expected = native.topk_similarity(q, x, 5)
    results: list[tuple[np.ndarray, np.ndarray]] = []

    def work() -> None:
        results.append(native.topk_similarity(q, x, 5))

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    for index, sim in results:
        np.testing.assert_array_equal(index, expected[0])
        np.testing.assert_array_equal(sim, expected[1])


def test_cpu_binding_matches_wrapper() -> None:
    q, x = random_data(4, 300, 16)
    a = native.topk_similarity(q, x, 6, device="cpu")
    b = native.topk_similarity_cpu(q, x, 6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# ---- CPU: bad inputs -------------------------------------------------------------------------------

GOOD_Q = np.ones((2, 4), np.float32)
GOOD_X = np.ones((5, 4), np.float32)


@pytest.mark.parametrize(
    ("queries", "keys", "match"),
    [
        (GOOD_Q.astype(np.float64), GOOD_X, "queries must have dtype float32, got float64"),
        (GOOD_Q, GOOD_X.astype(np.float16), "keys must have dtype float32, got float16"),
        (GOOD_Q.astype(np.int32), GOOD_X, "queries must have dtype float32, got int32"),
        (GOOD_Q.astype(">f4"), GOOD_X, "queries must have dtype float32, got >f4"),
        ([[1.0, 2.0, 3.0, 4.0]], GOOD_X, "queries must have dtype float32, got float64"),
    ],
)
def test_rejects_other_dtypes(queries: object, keys: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        native.topk_similarity(queries, keys, 2)


def test_rejects_non_arrays() -> None:
    with pytest.raises(TypeError, match="queries must have dtype float32, got object"):
        native.topk_similarity_cpu(object(), GOOD_X, 2)


@pytest.mark.parametrize(
    ("queries", "keys", "match"),
    [
        (np.ones(4, np.float32), GOOD_X, r"queries must be 2-D \[rows, D\], got shape \(4,\)"),
        (GOOD_Q, np.ones((5, 4, 1), np.float32), r"keys must be 2-D \[rows, D\], got shape \(5, 4, 1\)"),
        (GOOD_Q, np.ones((5, 3), np.float32), r"got queries shape \(2, 4\) and keys shape \(5, 3\)"),
    ],
)
def test_rejects_bad_shapes(queries: np.ndarray, keys: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        native.topk_similarity(queries, keys, 2)


@pytest.mark.parametrize("k", [0, -1, -(2**40)])
def test_rejects_k_below_one(k: int) -> None:
    with pytest.raises(ValueError, match=f"k must be >= 1, got {k}"):
        native.topk_similarity(GOOD_Q, GOOD_X, k)
    with pytest.raises(ValueError, match="k must be >= 1"):
        native.topk_similarity_cpu(GOOD_Q, GOOD_X, k)


@pytest.mark.parametrize("k", [1.5, True, "3", None])
def test_rejects_non_integer_k(k: object) -> None:
    with pytest.raises(TypeError, match="k must be an int|integer"):
        native.topk_similarity(GOOD_Q, GOOD_X, k)  # type: ignore[arg-type]


def test_numpy_integer_k_is_accepted() -> None:
    index, _ = native.topk_similarity(GOOD_Q, GOOD_X, np.int64(3))
    assert index.shape == (2, 3)


def test_rejects_unknown_device() -> None:
    with pytest.raises(ValueError, match="device must be one of"):
        native.topk_similarity(GOOD_Q, GOOD_X, 2, device="gpu")


class FakeCudaArray:
    """Looks like a CUDA array to the dispatcher; never dereferenced in these tests."""

    def __init__(self, shape: tuple[int, ...], typestr: str = "<f4") -> None:
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (0, False), "version": 3}


def test_cuda_requests_fail_clearly_without_cuda() -> None:
    if native.cuda_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="built without CUDA|no CUDA device"):
        native.topk_similarity(GOOD_Q, GOOD_X, 2, device="cuda")
    with pytest.raises(RuntimeError, match="built without CUDA|no CUDA device"):
        native.topk_similarity(FakeCudaArray((2, 4)), FakeCudaArray((5, 4)), 2)
    with pytest.raises(RuntimeError, match="built without CUDA|CUDA"):
        native._core._topk_similarity_cuda_ptr(1, 1, 2, 5, 4, 2, 1, 1, 0, -1)


def test_cuda_and_host_inputs_do_not_mix() -> None:
    with pytest.raises(TypeError, match="both be host arrays or both CUDA arrays"):
        native.topk_similarity(FakeCudaArray((2, 4)), GOOD_X, 2)
    with pytest.raises(ValueError, match="device='cpu' but the inputs are CUDA arrays"):
        native.topk_similarity(FakeCudaArray((2, 4)), FakeCudaArray((5, 4)), 2, device="cpu")


def test_cuda_flags_are_booleans() -> None:
    assert isinstance(native.built_with_cuda(), bool)
    assert isinstance(native.cuda_available(), bool)
    assert native.built_with_cuda() or not native.cuda_available()


# ---- CUDA twin (skipped without a device and CuPy) -------------------------------------------------


@pytest.fixture
def cp() -> Any:  # the cupy module
    if not native.cuda_available():
        pytest.skip("pylb built without CUDA or no CUDA device")
    return pytest.importorskip("cupy")


CUDA_SHAPES = [
    *SHAPES,
    (64, 100_000, 384, 10),  # the benchmark shape
    (3, 10_000, 16, 3000),  # k above the 2048-score chunk: chunks pass everything through
    (2, 5000, 8, 2048),  # k equal to the chunk
]


@pytest.mark.cuda
@pytest.mark.parametrize(("B", "N", "D", "k"), CUDA_SHAPES)
def test_cuda_matches_cpu_twin_and_numpy(cp: Any, B: int, N: int, D: int, k: int) -> None:
    q, x = random_data(B, N, D, seed=B * 1000 + N)
    gi, gs = native.topk_similarity(cp.asarray(q), cp.asarray(x), k)
    assert isinstance(gi, cp.ndarray) and isinstance(gs, cp.ndarray)
    gi, gs = cp.asnumpy(gi), cp.asnumpy(gs)
    assert_matches_reference(q, x, k, gi, gs)
    ci, cs = native.topk_similarity(q, x, k, device="cpu")
    np.testing.assert_allclose(gs, cs, rtol=0, atol=SIM_ATOL)
    differs = gi != ci
    if differs.any():  # only near-ties may come out in another order
        full = reference_similarities(q, x)
        gap = np.abs(np.take_along_axis(full, gi, 1) - np.take_along_axis(full, ci, 1))
        assert (gap[differs] < NEAR_TIE).all()


@pytest.mark.cuda
def test_cuda_numpy_in_numpy_out(cp: Any) -> None:
    q, x = random_data(5, 3000, 32)
    gi, gs = native.topk_similarity(q, x, 7, device="cuda")
    assert isinstance(gi, np.ndarray) and isinstance(gs, np.ndarray)
    assert_matches_reference(q, x, 7, gi, gs)


@pytest.mark.cuda
def test_cuda_exact_cases_match_cpu_exactly(cp: Any) -> None:
    # Zero vectors, NaN, infinities and exact duplicates: the order rule is the same rank key on
    # both twins, so these come out identical.
    x = np.array([[-1, 0], [0, 0], [1, 0], [0, 0], [0, 1], [np.nan, 1], [np.inf, 0], [2, 0]], np.float32)
    q = np.array([[1, 0], [0, 0], [np.nan, 0]], np.float32)
    for k in (1, 3, 8):
        ci, cs = native.topk_similarity(q, x, k, device="cpu")
        gi, gs = native.topk_similarity(q, x, k, device="cuda")
        np.testing.assert_array_equal(gi, ci)
        np.testing.assert_array_equal(gs, cs)  # NaN == NaN for assert_array_equal


@pytest.mark.cuda
def test_cuda_ties_and_duplicates(cp: Any) -> None:
    rng = np.random.default_rng(7)
    base = rng.standard_normal((30, 10)).astype(np.float32)
    x = np.concatenate([base, base, base])
    q = rng.standard_normal((4, 10)).astype(np.float32)
    gi, gs = native.topk_similarity(cp.asarray(q), cp.asarray(x), 9)
    assert_ordered(cp.asnumpy(gi), cp.asnumpy(gs))


@pytest.mark.cuda
def test_cuda_strided_input_stream_and_errors(cp: Any) -> None:
    q, x = random_data(6, 4000, 24, seed=9)
    wide = cp.zeros((6, 48), cp.float32)
    wide[:, ::2] = cp.asarray(q)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        gi, gs = native.topk_similarity(wide[:, ::2], cp.asarray(x), 5)
    stream.synchronize()
    assert_matches_reference(q, x, 5, cp.asnumpy(gi), cp.asnumpy(gs))
    with pytest.raises(TypeError, match="queries must have dtype float32, got float64"):
        native.topk_similarity(cp.asarray(q, dtype=cp.float64), cp.asarray(x), 5)
    with pytest.raises(ValueError, match="same D"):
        native.topk_similarity(cp.asarray(q), cp.asarray(x[:, :5]), 5)
    with pytest.raises(ValueError, match="2-D"):
        native.topk_similarity(cp.asarray(q[0]), cp.asarray(x), 5)
