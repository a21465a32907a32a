"""Verified thresholds: learn online when a cached neighbour may answer, under an error bound.

Design
------
The fixed policy lets a neighbour answer when its similarity s to the query is at least one
threshold for the whole model. vCache (Schroeder et al., "vCache: Verified Semantic Prompt
Caching", arXiv 2502.03771) observes that the similarity at which a cached answer stops being the
right one differs from entry to entry, and learns it per entry, online, under a user-set bound
delta on the error rate. This module implements that idea from the paper's description (its code
is not used), with one addition: the labels of all of a model's entries are pooled, so that an
entry asked once is judged by what the model's other entries taught.

  labels      every entry keeps its last `MAX_OBSERVATIONS` labels (s, correct): a query at
              similarity s was answered by a replica, and its answer was (or was not) the
              entry's answer (`same_answer`: the assistant text, whitespace collapsed). Labels
              come from explorations (the candidate hit went to a replica instead) and
              verifications (a served hit re-run on an idle replica); `pylb.cache.cache` makes both.
  curve       P(correct | s) = sigmoid(a + b * u), u = (s - CENTER) * SCALE: the maximum a
              posteriori fit (Newton's method, numpy) under a Gaussian prior, with its
              uncertainty from the Laplace approximation (the inverse Hessian at the optimum).
  pool        every label is also counted in its model's `Pool` (the model as the cache's
              thresholds are kept: all partitions and tenants of a model share it; what is shared
              is one curve, no query text and no answer): the model's last `MAX_POOLED` labels,
              held as counts per similarity bin of width `BIN` (so a label costs O(1) and a
              refit costs the occupied bins, not the labels). The pooled fit is the curve of the
              model's entries taken together, under the wide prior N(PRIOR_MEAN, PRIOR_COV); it
              is refitted on the first decision after a label arrived, from the previous optimum
              (a few Newton steps).
  entry       an entry's curve is its own fit under the prior N(pool mean, pool covariance +
              ENTRY_SPREAD): the pooled curve, widened by how far one entry's curve may lie from
              the model's (a constant, chosen, not estimated: when entries are asked once, the
              spread between entries cannot be told from the labels' own noise). The pooled fit
              used there leaves the entry's own labels out (their bins subtracted), so that they
              are not counted twice. An entry without labels gets that prior as its curve; each of
              its own labels moves it away from the pooled curve, and a few wrong ones near s
              stop it even where the pool says s is safe. Both fits are cached until a label
              changes them; a decision refits at most the pool and the one candidate entry, never
              a loop over entries.
  bound       at the query's s, a one-sided upper confidence bound on the entry's error,
              e_ub = 1 - sigmoid(eta - Z * sd(eta)), eta = a + b * u, sd(eta) from the entry's
              covariance (Z = 1.645: 95 %).
  decision    exploit (answer from the cache) with probability min(1, delta / e_ub), otherwise
              explore. An exploration is never wrong (the replica answers), so among the
              decisions at s the expected error rate is at most delta whenever e_ub bounds the
              error: the paper's way of spending the error budget.

What the bound is over. For an entry with many labels of its own, e_ub bounds that entry's error,
as in the paper. For an entry with few or none, it is a statement about the model's entries: if
the pool's labels are a fair sample of how the model's entries fare at s, and one entry's curve
lies within ENTRY_SPREAD of the model's, then the error of answering from such an entry at s is
below e_ub with 95 % confidence, so delta holds over the model's decisions at s, not for each
entry on its own. An entry unlike its model's others (an answer that goes stale at a higher s
than most) may be wrong more often than delta until its own labels say so; an exploration or a
verification of it gives that label. The pool learns across entries, so it learns what the
embedder's similarity means for this model's traffic; it cannot learn what it never saw labelled.

Certainty costs labels, as it must (zero errors in n trials bound the error rate near 3/n): with
no labels at all the bound is about 0.97 near s = 0.95, so about one candidate in a hundred is
exploited at delta = 0.01. For an unlabelled entry at s = 0.95 the pooled labels there, all
correct and from any entries, give e_ub ~ 0.08 at 100, 0.045 at 200 (exploited every time at
delta = 0.05), 0.011 at 1,000, 0.003 at the 4,096 kept (the spread keeps it there; the pooled
curve alone would say 0.001). Each wrong label near s, in the pool or the entry, raises the bound.
A decision whose fits are cached costs ~40 us; after a new label, refitting the pool and the
candidate ~0.3 ms (a 4,096-label pool; numpy, this machine).
With `pooled=False` the pool is not kept and the prior is N(PRIOR_MEAN, PRIOR_COV) for every
entry: the per-entry learner of the paper (bench/cache_quality.py compares the two).

Conservative by construction: `pylb.cache.cache` asks this policy only about a neighbour that is
already a candidate of the fixed policy -- similarity at least the model's threshold (or the
lower `cache.verified_floor`, when set), and passed by every guard of `pylb.cache.guards` -- so by
default it never exploits where the fixed threshold would not.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np

from .store import sse_payloads

Z = 1.645
"""One-sided normal quantile of the error bound's confidence (95 %)."""

MAX_OBSERVATIONS = 256
"""Labels kept per entry (the oldest go first)."""

MAX_POOLED = 4096
"""Labels kept per model in its pool (the oldest go first)."""

BIN = 0.001
"""The pool's similarity resolution: its labels are counted per bin of this width, at the bin's centre."""

CENTER, SCALE = 0.9, 10.0
"""The model's feature u = (s - CENTER) * SCALE: similarities near the usual thresholds map to
small numbers, so the two parameters are of one scale and Newton's steps well conditioned."""

PRIOR_MEAN = np.array([0.0, 1.0])
"""Prior of (a, b) before any label: even odds at s = 0.9, rising with similarity (logit +1 per 0.1)."""

PRIOR_COV = np.diag([4.0, 4.0])
"""Prior covariance of (a, b) before any label: wide, so that the labels decide."""

ENTRY_SPREAD = np.diag([1.0, 0.25])
"""How far one entry's (a, b) may lie from its model's pooled fit (a covariance added to the
pool's): a standard deviation of 1 in the logit at s = 0.9, of 0.5 in the slope. Chosen, not
estimated (see the module comment)."""

_NBINS = int(round(1.0 / BIN)) + 1
_CENTRES = np.arange(_NBINS) * BIN


@dataclass(frozen=True, slots=True)
class Fit:
    """A fitted P(correct | s) = sigmoid(a + b * u): `mean` = (a, b), `cov` their covariance."""

    mean: np.ndarray
    cov: np.ndarray

    def error_bound(self, s: float, z: float = Z) -> float:
        """The upper confidence bound on P(wrong | s) (see the module comment)."""
        x = np.array([1.0, (s - CENTER) * SCALE])
        eta = float(x @ self.mean)
        sd = math.sqrt(max(0.0, float(x @ self.cov @ x)))
        return 1.0 - _sigmoid(eta - z * sd)

    def p_correct(self, s: float) -> float:
        """The point estimate of P(correct | s)."""
        return _sigmoid(float(self.mean[0] + self.mean[1] * (s - CENTER) * SCALE))

    def threshold(self, p: float = 0.5) -> float:
        """The similarity where the point estimate of P(correct) is `p` (inf when the fitted slope is not positive)."""
        a, b = float(self.mean[0]), float(self.mean[1])
        if b <= 0:
            return math.inf
        return CENTER + (math.log(p / (1 - p)) - a) / b / SCALE

    def widened(self, spread: np.ndarray) -> Fit:
        """This fit as a prior for one entry: the covariance plus `spread`."""
        return Fit(self.mean, self.cov + spread)


PRIOR_FIT = Fit(PRIOR_MEAN, PRIOR_COV)
"""The fit of no labels at all."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _newton(x: np.ndarray, k: np.ndarray, n: np.ndarray, prior_mean: np.ndarray, prior_cov: np.ndarray, start: np.ndarray | None, iterations: int) -> Fit:
    """The MAP fit of k[i] correct out of n[i] labels at the feature rows x[i], under the Gaussian prior."""
    prior_prec = np.linalg.inv(prior_cov)
    theta = (prior_mean if start is None else start).astype(float).copy()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (k - n * p) - prior_prec @ (theta - prior_mean)
        hess = (x * (n * p * (1 - p))[:, None]).T @ x + prior_prec
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if float(np.abs(step).max()) < 1e-8:
            break
    p = 1.0 / (1.0 + np.exp(-(x @ theta)))
    hess = (x * (n * p * (1 - p))[:, None]).T @ x + prior_prec
    return Fit(theta, np.linalg.inv(hess))


def _features(s: np.ndarray) -> np.ndarray:
    return np.stack([np.ones(len(s)), (np.asarray(s, float) - CENTER) * SCALE], axis=1)


def fit_logistic(s: np.ndarray, y: np.ndarray, prior_mean: np.ndarray = PRIOR_MEAN, prior_cov: np.ndarray = PRIOR_COV, iterations: int = 30) -> Fit:
    """The maximum a posteriori fit of P(y = 1 | s) = sigmoid(a + b * u) to labels `y` (0/1) at
    similarities `s`, under the Gaussian prior, with its Laplace covariance."""
    y = np.asarray(y, float)
    return _newton(_features(np.asarray(s, float)), y, np.ones(len(y)), prior_mean, prior_cov, None, iterations)


def fit_counts(correct: np.ndarray, total: np.ndarray, start: np.ndarray | None = None, iterations: int = 30) -> Fit:
    """The MAP fit (prior N(PRIOR_MEAN, PRIOR_COV)) of binned labels: `correct[i]` of `total[i]`
    labels at similarity i * BIN; from `start` when given (a previous optimum)."""
    occupied = np.flatnonzero(total)
    if len(occupied) == 0:
        return PRIOR_FIT
    return _newton(_features(_CENTRES[occupied]), correct[occupied].astype(float), total[occupied].astype(float), PRIOR_MEAN, PRIOR_COV, start, iterations)


def _bins(similarities: np.ndarray | float) -> np.ndarray:
    """The pool's bin of each similarity (of one, as a 0-d array)."""
    return np.clip(np.rint(np.asarray(similarities, float) / BIN), 0, _NBINS - 1).astype(np.intp)


class Pool:
    """One model's labels (its last `MAX_POOLED`, counted per similarity bin) and their fit,
    refitted on the first use after a label arrived (see the module comment)."""

    __slots__ = ("observations", "correct", "total", "version", "_fit")

    def __init__(self) -> None:
        self.observations: deque[tuple[int, bool]] = deque()
        self.correct = np.zeros(_NBINS, np.int64)
        self.total = np.zeros(_NBINS, np.int64)
        self.version = 0
        self._fit: Fit | None = PRIOR_FIT

    def add(self, similarity: float, correct: bool) -> None:
        """Count one label (the oldest goes when there are `MAX_POOLED`)."""
        if len(self.observations) >= MAX_POOLED:
            i, c = self.observations.popleft()
            self.total[i] -= 1
            self.correct[i] -= c
        i = int(_bins(similarity))
        self.observations.append((i, bool(correct)))
        self.total[i] += 1
        self.correct[i] += bool(correct)
        self.version += 1
        self._fit = None

    def fit(self) -> Fit:
        """The pooled fit of the model's labels (the prior's when there are none)."""
        if self._fit is None:
            self._fit = fit_counts(self.correct, self.total)
        return self._fit

    def fit_without(self, labels: Labels) -> Fit:
        """The pooled fit with `labels` (one entry's, counted here too) left out: their bins
        subtracted (never below zero: those the pool dropped as old are not subtracted twice)."""
        if not len(labels):
            return self.fit()
        bins = _bins(np.array([o[0] for o in labels.observations]))
        own_total = np.bincount(bins, minlength=_NBINS)
        own_correct = np.bincount(bins, weights=np.array([o[1] for o in labels.observations], float), minlength=_NBINS).astype(np.int64)
        total = np.maximum(self.total - own_total, 0)
        correct = np.clip(self.correct - own_correct, 0, total)
        return fit_counts(correct, total, start=self.fit().mean)

    def __len__(self) -> int:
        return len(self.observations)


class Labels:
    """One entry's labels (a bounded list of (similarity, correct)) and their fit, refitted on
    the first use after a label arrived, or after its pool's fit changed."""

    __slots__ = ("observations", "_fit", "_key")

    def __init__(self) -> None:
        self.observations: deque[tuple[float, bool]] = deque(maxlen=MAX_OBSERVATIONS)
        self._fit: Fit | None = None
        self._key: tuple[int, int] | None = None  # (id of the pool, its version) the fit was made under; (0, 0): no pool

    def add(self, similarity: float, correct: bool) -> None:
        """Record one label."""
        self.observations.append((float(similarity), bool(correct)))
        self._fit = None

    @property
    def wrong(self) -> int:
        """Labels that said the entry's answer was not the right one."""
        return sum(1 for _, c in self.observations if not c)

    def fit(self, pool: Pool | None = None, spread: np.ndarray = ENTRY_SPREAD) -> Fit:
        """The entry's fit: under the prior N(PRIOR_MEAN, PRIOR_COV) without a pool, else under
        the pool's fit of the other entries' labels widened by `spread`."""
        key = (0, 0) if pool is None else (id(pool), pool.version)
        if self._fit is None or self._key != key:
            prior = PRIOR_FIT if pool is None else pool.fit_without(self).widened(spread)
            if not self.observations:
                self._fit = prior
            else:
                s = np.array([o[0] for o in self.observations])
                y = np.array([o[1] for o in self.observations], float)
                self._fit = fit_logistic(s, y, prior.mean, prior.cov)
            self._key = key
        return self._fit

    def __len__(self) -> int:
        return len(self.observations)


class VerifiedPolicy:
    """The decision rule under the error bound `max_error_rate` (delta; see the module comment).
    `rng` draws the exploit/explore coin (seed it for reproducible runs); `pooled` keeps a pool
    of labels per model (False: every entry learns from its own labels only); `spread` is the
    covariance that widens the pooled fit into an entry's prior."""

    def __init__(
        self, max_error_rate: float, rng: random.Random | None = None, z: float = Z, pooled: bool = True, spread: np.ndarray = ENTRY_SPREAD
    ) -> None:
        if not 0 < max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be in (0, 1], got {max_error_rate!r}")
        self.max_error_rate = max_error_rate
        self.rng = rng or random.Random()
        self.z = z
        self.pooled = pooled
        self.spread = spread
        self.pools: dict[str, Pool] = {}

    def record(self, labels: Labels, similarity: float, correct: bool, model: str | None = None) -> None:
        """One label for the entry with `labels`, counted in `model`'s pool too (when pooled and a model is given)."""
        labels.add(similarity, correct)
        if self.pooled and model is not None:
            pool = self.pools.get(model)
            if pool is None:
                pool = self.pools[model] = Pool()
            pool.add(similarity, correct)

    def fit(self, labels: Labels | None, model: str | None = None) -> Fit:
        """The fit that decides for the entry with `labels` (None: no labels yet) of `model` (None: no pool)."""
        pool = self.pools.get(model) if self.pooled and model is not None else None
        if labels is not None:
            return labels.fit(pool, self.spread)
        if pool is None:
            return PRIOR_FIT.widened(self.spread) if self.pooled and model is not None else PRIOR_FIT
        return pool.fit().widened(self.spread)

    def error_bound(self, labels: Labels | None, similarity: float, model: str | None = None) -> float:
        """The upper confidence bound on the error of answering at `similarity` from the entry
        with `labels` (None: no labels yet) of `model` (None: no pool, the entry's labels alone)."""
        return self.fit(labels, model).error_bound(similarity, self.z)

    def exploit_probability(self, labels: Labels | None, similarity: float, model: str | None = None) -> float:
        """min(1, delta / e_ub): how often a candidate at `similarity` is answered from the cache."""
        bound = self.error_bound(labels, similarity, model)
        return 1.0 if bound <= self.max_error_rate else self.max_error_rate / bound

    def exploit(self, labels: Labels | None, similarity: float, model: str | None = None) -> bool:
        """Decide one candidate: True to answer from the cache, False to explore."""
        return self.rng.random() < self.exploit_probability(labels, similarity, model)


# ---- comparing answers ---------------------------------------------------------------------------


def answer_text(body: bytes, stream: bool) -> str | None:
    """The assistant text of an OpenAI answer, whitespace collapsed: the choices' message
    content (chat) or text (completions) of a JSON body, or the concatenated deltas of an SSE
    stream, choices in index order. None when the body is not such an answer."""
    parts: dict[int, list[str]] = {}

    def take(choice: object) -> None:
        if not isinstance(choice, dict):
            return
        idx = choice.get("index", 0)
        idx = idx if isinstance(idx, int) else 0
        for holder in (choice.get("message"), choice.get("delta")):
            if isinstance(holder, dict) and isinstance(holder.get("content"), str):
                parts.setdefault(idx, []).append(holder["content"])
        if isinstance(choice.get("text"), str):
            parts.setdefault(idx, []).append(choice["text"])

    try:
        if not stream:
            obj = json.loads(body)
            if not isinstance(obj, dict) or not isinstance(obj.get("choices"), list):
                return None
            for c in obj["choices"]:
                take(c)
        else:
            for data in sse_payloads(body):
                event = json.loads(data)
                if isinstance(event, dict):
                    for c in event.get("choices") or []:
                        take(c)
    except (ValueError, UnicodeDecodeError):
        return None
    return " ".join(" ".join("".join(parts[i]) for i in sorted(parts)).split())


def same_answer(a_body: bytes, a_stream: bool, b_body: bytes, b_stream: bool) -> bool | None:
    """Whether two answers say the same (`answer_text` equal); None when either is not an answer."""
    a, b = answer_text(a_body, a_stream), answer_text(b_body, b_stream)
    if a is None or b is None:
        return None
    return a == b
