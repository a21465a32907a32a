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

The verified policy (`pylb.cache.verified`) learns from labels as requests arrive, so it is
measured on a stream instead (`evaluate_stream`): every distinct text of the pairs (each `a` and
each `b`) arrives once, in a random order per seed, into one partition, as the cache would see
them. A text looks up the texts stored before it; the nearest one with similarity >= the floor
that the guards pass is the candidate. The fixed policy answers with it when its similarity is at
least the threshold; the verified policy exploits or explores. A hit is correct when the two texts
have the same meaning (the same class, where the classes join the texts of paraphrase pairs), and
nothing is stored for it; a miss stores its text, and so does an exploration whose label was
wrong (one whose label was right adds nothing a later text can find by similarity, as in the cache). An exploration's label is the
oracle's (same class or not), as a comparison of the replica's answers would give with answers
that differ exactly when the meanings do; with `verify_share` that share of the hits (either
policy, as in the proxy) also gets its label, and a wrong one drops the entry (a detected false hit). Counted per policy:
lookups (texts arriving with something stored), opportunities (texts whose class was stored
before them: the hits a perfect cache would make), correct and false hits (by the kind of the
pair the two texts come from, "unrelated" when none), explorations, labels and detected false
hits. The verified policy pools the labels of all entries (one model), as the cache does, unless
`pooled=False`; the pool starts empty with each seed, so it learns only from that one pass.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pylb import native

from . import guards as guard_mod
from .verified import ENTRY_SPREAD, Labels, VerifiedPolicy

MODEL = "stream"
"""The one model (so the one pool) of the stream evaluation."""


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


# ---- the sequential stream (threshold policies that learn) ----------------------------------------


@dataclass(slots=True)
class StreamOutcome:
    """One policy's counts over the stream, summed over seeds."""

    policy: str  # "fixed" or "verified"
    threshold: float  # fixed: the threshold; verified: the floor of candidates
    max_error_rate: float = 0.0  # verified: delta
    verify_share: float = 0.0
    seeds: int = 0
    pooled: bool = False  # verified: labels pooled across entries (the cache's way) or per entry only
    spread: float = 0.0  # verified and pooled: ENTRY_SPREAD times this widened the pooled fit
    lookups: int = 0
    opportunities: int = 0
    correct: int = 0
    hits: int = 0
    explorations: int = 0
    labels: int = 0
    detected: int = 0
    false_hits: dict[str, int] = field(default_factory=dict)

    @property
    def false(self) -> int:
        return self.hits - self.correct

    @property
    def hit_rate(self) -> float:
        """Correct hits / opportunities."""
        return self.correct / self.opportunities if self.opportunities else 0.0

    @property
    def precision(self) -> float:
        return self.correct / self.hits if self.hits else 1.0


def _classes(pairs: list[Pair]) -> tuple[list[str], dict[str, int], dict[frozenset[str], str]]:
    """The distinct texts, each text's meaning class (paraphrase pairs joined), the kind of each pair."""
    texts: list[str] = []
    for p in pairs:
        for t in (p.a, p.b):
            if t not in texts:
                texts.append(t)
    parent = {t: t for t in texts}

    def root(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    for p in pairs:
        if p.same:
            parent[root(p.a)] = root(p.b)
    ids: dict[str, int] = {}
    cls = {t: ids.setdefault(root(t), len(ids)) for t in texts}
    kinds = {frozenset((p.a, p.b)): p.kind for p in pairs}
    return texts, cls, kinds


def evaluate_stream(
    pairs: list[Pair], vectors: dict[str, np.ndarray], policy: str, threshold: float, seeds: int = 20,
    max_error_rate: float = 0.01, verify_share: float = 0.0, k: int = 4, pooled: bool = True, spread: float = 1.0,
) -> StreamOutcome:
    """The policy's outcome on `seeds` random orders of the pairs' distinct texts (see the
    module comment). `vectors` maps each text to its unit embedding; `policy` is "fixed" or
    "verified" (then `threshold` is the floor of candidates, and `pooled` whether the learner
    pools the labels of all entries, as the cache does, or learns per entry only; the pooled
    fit is widened into an entry's prior by `spread` times `pylb.cache.verified.ENTRY_SPREAD`)."""
    if policy not in ("fixed", "verified"):
        raise ValueError(f"policy must be fixed or verified, got {policy!r}")
    texts, cls, kinds = _classes(pairs)
    out = StreamOutcome(policy, threshold, max_error_rate if policy == "verified" else 0.0, verify_share, seeds,
                        pooled=pooled and policy == "verified", spread=spread if pooled and policy == "verified" else 0.0)
    for seed in range(seeds):
        rng = random.Random(seed)
        learner = VerifiedPolicy(max_error_rate, random.Random(seed + 10_000), pooled=pooled, spread=spread * ENTRY_SPREAD) if policy == "verified" else None
        order = texts[:]
        rng.shuffle(order)
        stored: list[str] = []
        labels: dict[str, Labels] = {}
        for q in order:
            if not stored:
                stored.append(q)
                continue
            out.lookups += 1
            if any(cls[t] == cls[q] for t in stored):
                out.opportunities += 1
            keys = np.stack([vectors[t] for t in stored])
            sims = keys @ vectors[q]
            candidate: tuple[str, float] | None = None
            for j in np.argsort(-sims)[:k]:
                t, sim = stored[j], float(sims[j])
                if sim < threshold:
                    break
                if guard_mod.refusal(q, t) is None:
                    candidate = (t, sim)
                    break
            if candidate is None:
                stored.append(q)
                continue
            t, sim = candidate
            right = cls[t] == cls[q]
            if learner is not None and not learner.exploit(labels.get(t), sim, MODEL):
                out.explorations += 1
                out.labels += 1
                learner.record(labels.setdefault(t, Labels()), sim, right, MODEL)
                if not right:  # as the cache does: a matching answer is stored for exact matches only
                    stored.append(q)
                continue
            out.hits += 1
            if right:
                out.correct += 1
            else:
                kind = kinds.get(frozenset((q, t)), "unrelated")
                out.false_hits[kind] = out.false_hits.get(kind, 0) + 1
            if verify_share > 0 and rng.random() < verify_share:
                out.labels += 1
                entry = labels.setdefault(t, Labels())
                if learner is not None:
                    learner.record(entry, sim, right, MODEL)
                else:
                    entry.add(sim, right)
                if not right:
                    out.detected += 1
                    stored.remove(t)
    return out
