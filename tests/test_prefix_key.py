"""Adaptive prefix key (DualMap's hot-prefix table): deepening, shrinking, hysteresis, edges."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pylb.native import DualRing, PrefixKeyTable

MASK64 = (1 << 64) - 1


def chain(ids: list[int]) -> np.ndarray:
    """Chained 64-bit hashes of a sequence of block ids: element d-1 names the prefix ids[:d]."""
    out, prev = [], 0x9E3779B97F4A7C15
    for block_id in ids:
        z = (prev ^ (block_id * 0xBF58476D1CE4E5B9)) & MASK64  # splitmix64-style mixing
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        prev = z ^ (z >> 31)
        out.append(prev)
    return np.array(out, dtype=np.uint64)


def universal_first_block_stream(n: int, seed: int, hot_share: float = 0.0) -> list[np.ndarray]:
    """Every request shares block 0; block 1 comes from a pool of 500 (or, for a `hot_share` of
    the requests, is the hot value -1); block 2 is random."""
    rng = random.Random(seed)
    stream = []
    for _ in range(n):
        second = -1 if rng.random() < hot_share else rng.randrange(500)
        stream.append(chain([7, second, rng.randrange(1 << 40)]))
    return stream


def bucket_shares(keys: list[int], buckets: int) -> np.ndarray:
    """Share of the candidate slots each of `buckets` replicas gets when the keys are placed by
    a DualRing (both candidates of every key counted)."""
    ring = DualRing([f"replica-{i}" for i in range(buckets)])
    a, b = ring.candidates_batch(np.array(keys, dtype=np.uint64))
    counts = np.bincount(np.concatenate([a, b]), minlength=buckets)
    return counts / counts.sum()


def test_defaults_and_properties() -> None:
    t = PrefixKeyTable()
    assert (t.window, t.expand_share, t.shrink_share, t.min_samples, t.max_depth) == (200, 0.0612, 0.02, 20, 16)
    assert (t.fill, t.expanded_count, t.tracked_prefixes) == (0, 0, 0)
    assert t.depth_counts().tolist() == [0] * 17
    assert "window=200" in repr(t)


def test_universal_first_block_deepens_to_depth_2_and_spreads() -> None:
    t = PrefixKeyTable()
    stream = universal_first_block_stream(1000, seed=1)
    results = [t.key_for(h) for h in stream]
    depths = [d for _, d in results]
    # Shares are judged against at least min_samples (20) requests: the first request alone is
    # 5 %, not hot, and keyed by the universal block; from the second on, block 0 holds 2 of 20
    # and more, so every key is at least 2 deep (a hard min_samples gate kept the first 19 on
    # the universal block, i.e. on the same two candidates); with the window full no
    # second-level prefix (1 in 500) is hot, so keys stay at depth 2.
    assert depths[0] == 1 and results[0][0] == int(stream[0][0])
    assert min(depths[1:]) >= 2
    assert set(depths[200:]) == {2}
    assert t.is_expanded(int(stream[0][0]))
    assert t.depth_counts()[2] == 200

    keys = [k for k, _ in results[200:]]
    assert all(k == int(h[1]) for k, h in zip(keys, stream[200:]))  # the key at depth 2 is b[1]
    assert len(set(keys)) > 300  # 800 draws from a pool of 500
    shares = bucket_shares(keys, 8)
    assert shares.min() > 0.08 and shares.max() < 0.18, shares
    assert (shares > 0).all()  # every replica is a candidate for some of it
    # Keyed on the first block alone, all of this traffic would have the same two candidates.
    first_block = bucket_shares([int(h[0]) for h in stream], 8)
    assert (first_block > 0).sum() == 2 and first_block.max() == 0.5


def test_hot_second_level_prefix_goes_one_deeper() -> None:
    t = PrefixKeyTable()
    stream = universal_first_block_stream(1000, seed=2, hot_share=0.3)
    hot = int(chain([7, -1])[1])
    for h in stream[:400]:
        t.key_for(h)
    assert t.is_expanded(hot)
    hot_depths, other_depths = [], []
    for h in stream[400:]:
        key, depth = t.key_for(h)
        assert key == int(h[depth - 1])
        (hot_depths if int(h[1]) == hot else other_depths).append(depth)
    assert len(hot_depths) > 150
    assert set(hot_depths) == {3}
    assert set(other_depths) == {2}
    # The hot prefix's requests now spread by their third block instead of piling on one key.
    assert t.count(hot) == pytest.approx(60, abs=25)


def test_hot_prefix_shrinks_once_below_shrink_share() -> None:
    t = PrefixKeyTable()
    hot = int(chain([7, -1])[1])
    for h in universal_first_block_stream(400, seed=3, hot_share=0.5):
        t.key_for(h)
    assert t.is_expanded(hot)
    # The hot prefix disappears from the stream: its count drains as the window turns over; it
    # stays expanded while its share is >= 2 % (4 of 200) and shrinks below that.
    cold = universal_first_block_stream(300, seed=4)
    seen_shrink_at = None
    for i, h in enumerate(cold):
        t.key_for(h)
        share = t.count(hot) / t.fill
        if seen_shrink_at is None and not t.is_expanded(hot):
            seen_shrink_at = i
            assert share < t.shrink_share
        if seen_shrink_at is None:
            assert share >= t.shrink_share
    assert seen_shrink_at is not None
    assert t.count(hot) == 0
    assert t.peek(chain([7, -1, 5])) == (hot, 2)


def test_hysteresis_keeps_the_state_between_thresholds() -> None:
    # Window 100: expand at >= 10 %, shrink below 5 %. A prefix at 7 % keeps whatever state it had.
    # (One request in `every` holds it, from the start of the stream: about 7 % for 14, 20 % for 5.)
    def stream_with(every: int, n: int) -> list[np.ndarray]:
        return [chain([1, 2, i]) if i % every == every - 1 else chain([1, 1000 + i, i]) for i in range(n)]

    mid = int(chain([1, 2])[1])
    t = PrefixKeyTable(window=100, expand_share=0.10, shrink_share=0.05, min_samples=10)
    for h in stream_with(14, 300):  # never reached 10 %: not expanded
        t.key_for(h)
    assert not t.is_expanded(mid)
    assert t.peek(chain([1, 2, 3]))[1] == 2

    t = PrefixKeyTable(window=100, expand_share=0.10, shrink_share=0.05, min_samples=10)
    for h in stream_with(5, 200):  # 20 %: expanded
        t.key_for(h)
    assert t.is_expanded(mid)
    for h in stream_with(14, 300):  # drops to 7 %: still expanded
        t.key_for(h)
        assert t.is_expanded(mid)
    assert t.count(mid) == 7
    assert t.peek(chain([1, 2, 3]))[1] == 3


def test_min_samples_floors_the_share_while_the_window_fills() -> None:
    t = PrefixKeyTable(window=200, min_samples=50)
    h = chain([1, 2, 3])
    depths = [t.key_for(h)[1] for _ in range(60)]
    # shares count against 50 requests until 50 are in: 6.12 % of 50 is 3.06, so the 4th expands
    assert depths[:3] == [1] * 3
    assert depths[3:] == [3] * 57  # every prefix holds them all: as deep as the prompt allows
    assert t.expanded_count >= 2
    # a prefix seen once never expands on that alone, however empty the window
    t = PrefixKeyTable(window=200, min_samples=20)
    assert [t.key_for(chain([9, i, 3]))[1] for i in range(30)] == [1] + [2] * 29  # [9] twice: hot
    assert not any(t.is_expanded(int(chain([9, i])[1])) for i in range(30))


def test_max_depth_caps_the_key() -> None:
    t = PrefixKeyTable(min_samples=1, max_depth=3)
    h = chain(list(range(10)))
    for _ in range(5):
        key, depth = t.key_for(h)
    assert (key, depth) == (int(h[2]), 3)
    assert t.tracked_prefixes == 3  # only depths 1..max_depth are counted
    assert PrefixKeyTable(min_samples=1, max_depth=1).key_for(h) == (int(h[0]), 1)


def test_key_never_deeper_than_the_prompt() -> None:
    t = PrefixKeyTable(min_samples=1)
    for _ in range(10):
        assert t.key_for(chain([1, 2])) == (int(chain([1, 2])[1]), 2)
    assert t.key_for(chain([1])) == (int(chain([1])[0]), 1)


def test_short_prompts_take_a_slot_but_count_nothing() -> None:
    t = PrefixKeyTable(window=10, min_samples=1, expand_share=0.5, shrink_share=0.5)
    assert t.key_for([], short_key=123) == (123, 0)
    assert t.key_for(np.array([], dtype=np.uint64), short_key=2**64 - 1) == (2**64 - 1, 0)
    assert (t.fill, t.tracked_prefixes) == (2, 0)
    assert t.depth_counts()[0] == 2
    h = chain([5, 6])
    assert t.key_for(h, short_key=99) == (int(h[0]), 1)  # 1 of 3 < 50 %: short_key ignored
    for _ in range(7):
        t.key_for([], short_key=1)
    assert t.fill == 10 and t.count(int(h[0])) == 1
    for _ in range(3):  # evicts the two first short prompts, then the one with blocks
        t.key_for([], short_key=1)
    assert (t.fill, t.count(int(h[0])), t.tracked_prefixes) == (10, 0, 0)
    assert t.depth_counts().tolist()[:2] == [10, 0]
    with pytest.raises(ValueError, match="short_key"):
        t.key_for([])
    with pytest.raises(ValueError, match="short_key"):
        t.peek([])


def test_peek_does_not_record() -> None:
    t = PrefixKeyTable(min_samples=1)
    h = chain([1, 2, 3])
    assert t.peek(h) == (int(h[0]), 1)
    assert t.fill == 0
    t.key_for(h)
    assert t.peek(h) == (int(h[2]), 3)
    assert t.fill == 1 and t.count(int(h[0])) == 1


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("window,min_samples,max_depth", [(8, 2, 4), (25, 5, 6), (200, 20, 16)])
def test_key_if_recorded_is_exactly_what_key_for_returns(seed: int, window: int, min_samples: int, max_depth: int) -> None:
    # A stream with a few hot prefixes of several depths, so that windows fill and evict, prefixes
    # cross both thresholds both ways and entries are counted down to zero.
    rng = random.Random(seed)
    t = PrefixKeyTable(window=window, expand_share=0.2, shrink_share=0.1, min_samples=min_samples, max_depth=max_depth)
    depths = Counter()
    for _ in range(3000):
        trunk = rng.choice([[1], [1, 2], [1, 2, 3], [4], [4, 5], [rng.randrange(10, 10**6)]])
        ids = trunk + [rng.randrange(10**6, 10**9) for _ in range(rng.randrange(0, 4))]
        h = chain(ids)
        short = rng.randrange(1, 2**63) if not len(h) else None
        fill, expanded = t.fill, t.expanded_count
        predicted = t.key_if_recorded(h, short)
        assert (t.fill, t.expanded_count) == (fill, expanded)  # it changed nothing
        got = t.key_for(h, short)
        assert predicted == got
        depths[got[1]] += 1
    assert len(depths) >= 3  # the stream did deepen keys


def test_accepts_sequences_and_integer_arrays() -> None:
    t = PrefixKeyTable(min_samples=1)
    h = chain([1, 2])
    assert t.key_for([int(x) for x in h]) == t.peek(h)
    assert t.key_for(h.astype(np.int64)) == t.peek(h)
    assert t.key_for(h[::-1][::-1].copy()) == t.peek(h)
    assert t.key_for(np.concatenate([h, h])[::2])[1] in (1, 2)  # non-contiguous input is copied
    with pytest.raises(TypeError):
        t.key_for(np.array([1.5]))
    with pytest.raises(TypeError):
        t.key_for("abc")
    with pytest.raises(ValueError, match="one-dimensional"):
        t.key_for(np.zeros((2, 2), dtype=np.uint64))


def test_reset_forgets_the_window() -> None:
    t = PrefixKeyTable(min_samples=1)
    for _ in range(5):
        t.key_for(chain([1, 2]))
    t.reset()
    assert (t.fill, t.expanded_count, t.tracked_prefixes) == (0, 0, 0)
    assert t.depth_counts().sum() == 0
    assert t.key_for(chain([1, 2]))[1] == 2  # min_samples=1: the single request holds 100 %


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"window": 0}, "window"),
        ({"window": -3}, "window"),
        ({"expand_share": 0.0}, "expand_share"),
        ({"expand_share": 1.5}, "expand_share"),
        ({"expand_share": float("nan")}, "expand_share"),
        ({"shrink_share": 0.0}, "shrink_share"),
        ({"shrink_share": 0.1}, "shrink_share"),  # above expand_share
        ({"min_samples": 0}, "min_samples"),
        ({"max_depth": 0}, "max_depth"),
        ({"window": 1 << 22, "max_depth": 16}, "window \\* max_depth"),
    ],
)
def test_bad_parameters(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        PrefixKeyTable(**kwargs)


def test_expand_equals_shrink_is_allowed() -> None:
    t = PrefixKeyTable(expand_share=0.5, shrink_share=0.5, min_samples=1)
    assert t.key_for(chain([1, 2]))[1] == 2


def test_counts_match_a_python_model_under_random_streams() -> None:
    rng = random.Random(5)
    window, max_depth = 30, 4
    t = PrefixKeyTable(window=window, expand_share=0.2, shrink_share=0.1, min_samples=5, max_depth=max_depth)
    recent: list[list[int]] = []
    for _ in range(2000):
        ids = [rng.randrange(3) for _ in range(rng.randrange(0, 7))]
        h = chain(ids)
        key, depth = t.key_for(h, short_key=42)
        recent = (recent + [[int(x) for x in h[:max_depth]]])[-window:]
        counts = Counter(p for r in recent for p in r)
        assert t.fill == len(recent)
        assert t.tracked_prefixes == len(counts)
        for p, c in counts.items():
            assert t.count(p) == c
        assert (key, depth) == ((42, 0) if len(h) == 0 else (int(h[depth - 1]), depth))
        # The walk stopped at depth d: every prefix above it is expanded (share >= shrink at least)
        # and the one at d is not, unless the prompt or max_depth ended the walk.
        for d in range(1, depth):
            assert counts[int(h[d - 1])] / len(recent) >= 0.1
        if 0 < depth < min(len(h), max_depth) and len(recent) >= 5:
            assert not t.is_expanded(int(h[depth - 1]))
            assert counts[int(h[depth - 1])] / len(recent) < 0.2


def test_mooncake_trace_keys_leave_the_universal_block(mooncake_trace: Path) -> None:
    with open(mooncake_trace) as f:
        trace = [json.loads(line) for line in f]
    # hash_ids are prefix ids of 512-token blocks (the key block size); the last one is partial.
    t = PrefixKeyTable()
    keys, depths, full_blocks = [], [], []
    for r in trace:
        full = r["hash_ids"][: r["input_length"] // 512]
        key, depth = t.key_for(np.array(full, dtype=np.uint64), short_key=r["hash_ids"][-1])
        keys.append(key)
        depths.append(depth)
        full_blocks.append(len(full))
    # Block 0 is universal, so once min_samples requests are in, every request with a second full
    # block is keyed by it; no 2-block prefix is hot, so none goes deeper.
    steady = [(d, n) for d, n in zip(depths[200:], full_blocks[200:])]
    assert {d for d, n in steady if n >= 2} == {2}
    assert len(set(keys)) > 5000
    assert bucket_shares([k for k, (d, n) in zip(keys[200:], steady) if n >= 2], 16).max() < 0.1
    # A request whose only full key block is the universal one can only be keyed by it (11 % of
    # this trace). Passing the trailing partial block's hash as a last boundary (all of hash_ids)
    # keys those by their tail as well, and every key has depth 2.
    t = PrefixKeyTable()
    tail_keyed = [t.key_for(np.array(r["hash_ids"], dtype=np.uint64)) for r in trace]
    assert {d for _, d in tail_keyed[200:]} == {2}
    assert bucket_shares([k for k, _ in tail_keyed[200:]], 16).max() < 0.1
