"""Quality of the semantic cache's hit decision on labelled question pairs.

Design
------
The pairs (tests/data/cache_pairs.tsv: kind, same, a, b) are played as a cache would see them:
every distinct `a` is stored in one partition, then every `b` is looked up; the decision is the
cache's own (`decide`): the nearest entries by cosine similarity, best first, and the first with
similarity >= the threshold that the guards let through (`guards=False`: the threshold alone,
as most semantic caches decide). A hit is correct when the pair is a paraphrase (`same` = 1) and
the entry found is its own `a`; every other hit is a false hit. Reported per policy: paraphrase
hit rate (correct hits / paraphrase pairs), precision (correct hits / hits) and false hits by
kind. Used by bench/cache_quality.py and tests/test_cache_quality.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pylb import native

from . import guards as guard_mod


@dataclass(frozen=True, slots=True)
class Pair:
    kind: str
    same: bool
    a: str
    b: str


def load_pairs(path: str | Path) -> list[Pair]:
    """The pairs of a cache_pairs.tsv file."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        kind, same, a, b = line.split("\t")
        out.append(Pair(kind, same == "1", a, b))
    return out


@dataclass(slots=True)
class Outcome:
    """One policy's result on the pairs."""

    threshold: float
    guards: bool
    paraphrases: int = 0
    correct: int = 0
    hits: int = 0
    false_hits: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.correct / self.paraphrases if self.paraphrases else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.hits if self.hits else 1.0


def decide(query: str, neighbours: list[tuple[str, float]], threshold: float, use_guards: bool) -> str | None:
    """The stored text that answers `query` (neighbours best first), None for a miss."""
    for text, sim in neighbours:
        if sim < threshold:
            return None
        if use_guards and guard_mod.refusal(query, text) is not None:
            continue
        return text
    return None


def evaluate(pairs: list[Pair], a_vectors: np.ndarray, b_vectors: np.ndarray, thresholds: list[float], k: int = 4) -> list[Outcome]:
    """Outcomes for each threshold, with and without guards. `a_vectors[i]`/`b_vectors[i]` are
    the embeddings of pairs[i].a / .b."""
    texts: list[str] = []
    rows: dict[str, int] = {}
    for i, p in enumerate(pairs):
        if p.a not in rows:
            rows[p.a] = len(texts)
            texts.append(p.a)
    keys = np.ascontiguousarray(np.stack([a_vectors[[i for i, p in enumerate(pairs) if p.a == t][0]] for t in texts]), dtype=np.float32)
    idx, sim = native.topk_similarity(np.ascontiguousarray(b_vectors, dtype=np.float32), keys, k)
    out = []
    for use_guards in (False, True):
        for t in thresholds:
            o = Outcome(t, use_guards)
            for p, row_i, row_s in zip(pairs, idx.tolist(), sim.tolist()):
                o.paraphrases += p.same
                found = decide(p.b, [(texts[j], s) for j, s in zip(row_i, row_s)], t, use_guards)
                if found is None:
                    continue
                o.hits += 1
                if p.same and found == p.a:
                    o.correct += 1
                else:
                    o.false_hits[p.kind] = o.false_hits.get(p.kind, 0) + 1
            out.append(o)
    return out
