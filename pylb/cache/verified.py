"""Verified per-entry thresholds: learn online when a cached neighbour may answer, under an error bound.

Design
------
The fixed policy lets a neighbour answer when its similarity s to the query is at least one
threshold for the whole model. vCache (Schroeder et al., "vCache: Verified Semantic Prompt
Caching", arXiv 2502.03771) observes that the similarity at which a cached answer stops being the
right one differs from entry to entry, and learns it per entry, online, under a user-set bound
delta on the error rate. This module implements that idea from the paper's description (its code
is not used):

  labels      every entry keeps its last `MAX_OBSERVATIONS` labels (s, correct): a query at
              similarity s was answered by a replica, and its answer was (or was not) the
              entry's answer (`same_answer`: the assistant text, whitespace collapsed). Labels
              come from explorations (the candidate hit went to a replica instead) and
              verifications (a served hit re-run on an idle replica); `pylb.cache.cache` makes both.
  model       P(correct | s) = sigmoid(a + b * u), u = (s - CENTER) * SCALE, per entry: the
              maximum a posteriori fit (Newton's method, numpy) under a Gaussian prior
              N(PRIOR_MEAN, PRIOR_COV), with its uncertainty from the Laplace approximation (the
              inverse Hessian at the optimum). The prior keeps 0-2 labels sane: with none the fit
              is the prior, and labels that are all correct (separable data, where the plain
              maximum likelihood estimate runs off to infinity) give a finite fit whose bound
              tightens only as labels accumulate.
  bound       at the query's s, a one-sided upper confidence bound on the error,
              e_ub = 1 - sigmoid(eta - Z * sd(eta)), eta = a + b * u, sd(eta) from the Laplace
              covariance (Z = 1.645: 95 %).
  decision    exploit (answer from the cache) with probability min(1, delta / e_ub), otherwise
              explore. An exploration is never wrong (the replica answers), so among the
              decisions at s the expected error rate is at most delta whenever e_ub bounds the
              error: the paper's way of spending the error budget. With no labels e_ub is about
              0.96 near s = 0.95, so about one unlabelled candidate in a hundred is exploited at
              delta = 0.01. Certainty costs labels, as it must (zero errors in n trials bound
              the error rate near 3/n): an entry needs about 100 correct labels at one
              similarity before it is exploited every time at delta = 0.05; at delta = 0.01 the
              256 labels it keeps at most give e_ub ~ 0.017, so it is exploited about 3 times in
              5. Each wrong label near s raises the bound.

Conservative by construction: `pylb.cache.cache` asks this policy only about a neighbour that is
already a candidate of the fixed policy -- similarity at least the model's threshold (or the
lower `cache.verified_floor`, when set), and passed by every guard of `pylb.cache.guards` -- so by
default it never exploits where the fixed threshold would not; it only turns candidate hits into
explorations until their entry has earned its labels.
"""

from __future__ import annotations

import json
import math
import random
from collections import deque
from dataclasses import dataclass

import numpy as np

Z = 1.645
"""One-sided normal quantile of the error bound's confidence (95 %)."""

MAX_OBSERVATIONS = 256
"""Labels kept per entry (the oldest go first)."""

CENTER, SCALE = 0.9, 10.0
"""The model's feature u = (s - CENTER) * SCALE: similarities near the usual thresholds map to
small numbers, so the two parameters are of one scale and Newton's steps well conditioned."""

PRIOR_MEAN = np.array([0.0, 1.0])
"""Prior of (a, b): even odds at s = 0.9, rising with similarity (logit +1 per 0.1)."""

PRIOR_COV = np.diag([4.0, 4.0])
"""Prior covariance of (a, b): wide, so that the labels decide."""


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


PRIOR_FIT = Fit(PRIOR_MEAN, PRIOR_COV)
"""The fit of an entry without labels."""


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def fit_logistic(s: np.ndarray, y: np.ndarray, prior_mean: np.ndarray = PRIOR_MEAN, prior_cov: np.ndarray = PRIOR_COV, iterations: int = 30) -> Fit:
    """The maximum a posteriori fit of P(y = 1 | s) = sigmoid(a + b * u) to labels `y` (0/1) at
    similarities `s`, under the Gaussian prior, with its Laplace covariance."""
    x = np.stack([np.ones(len(s)), (np.asarray(s, float) - CENTER) * SCALE], axis=1)
    y = np.asarray(y, float)
    prior_prec = np.linalg.inv(prior_cov)
    theta = prior_mean.astype(float).copy()
    hess = prior_prec
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x @ theta)))
        grad = x.T @ (y - p) - prior_prec @ (theta - prior_mean)
        hess = (x * (p * (1 - p))[:, None]).T @ x + prior_prec
        step = np.linalg.solve(hess, grad)
        theta = theta + step
        if float(np.abs(step).max()) < 1e-8:
            break
    p = 1.0 / (1.0 + np.exp(-(x @ theta)))
    hess = (x * (p * (1 - p))[:, None]).T @ x + prior_prec
    return Fit(theta, np.linalg.inv(hess))


class Labels:
    """One entry's labels (a bounded list of (similarity, correct)) and their fit, refitted on
    the first use after a label arrived."""

    __slots__ = ("observations", "_fit")

    def __init__(self) -> None:
        self.observations: deque[tuple[float, bool]] = deque(maxlen=MAX_OBSERVATIONS)
        self._fit: Fit | None = PRIOR_FIT

    def add(self, similarity: float, correct: bool) -> None:
        """Record one label."""
        self.observations.append((float(similarity), bool(correct)))
        self._fit = None

    @property
    def wrong(self) -> int:
        """Labels that said the entry's answer was not the right one."""
        return sum(1 for _, c in self.observations if not c)

    def fit(self) -> Fit:
        """The current fit (the prior's when there are no labels)."""
        if self._fit is None:
            s = np.array([o[0] for o in self.observations])
            y = np.array([o[1] for o in self.observations], float)
            self._fit = fit_logistic(s, y)
        return self._fit

    def __len__(self) -> int:
        return len(self.observations)


class VerifiedPolicy:
    """The decision rule under the error bound `max_error_rate` (delta; see the module comment).
    `rng` draws the exploit/explore coin (seed it for reproducible runs)."""

    def __init__(self, max_error_rate: float, rng: random.Random | None = None, z: float = Z) -> None:
        if not 0 < max_error_rate <= 1:
            raise ValueError(f"max_error_rate must be in (0, 1], got {max_error_rate!r}")
        self.max_error_rate = max_error_rate
        self.rng = rng or random.Random()
        self.z = z

    def error_bound(self, labels: Labels | None, similarity: float) -> float:
        """The upper confidence bound on the error of answering at `similarity` from the entry
        with `labels` (None: no labels yet)."""
        fit = labels.fit() if labels is not None else PRIOR_FIT
        return fit.error_bound(similarity, self.z)

    def exploit_probability(self, labels: Labels | None, similarity: float) -> float:
        """min(1, delta / e_ub): how often a candidate at `similarity` is answered from the cache."""
        bound = self.error_bound(labels, similarity)
        return 1.0 if bound <= self.max_error_rate else self.max_error_rate / bound

    def exploit(self, labels: Labels | None, similarity: float) -> bool:
        """Decide one candidate: True to answer from the cache, False to explore."""
        return self.rng.random() < self.exploit_probability(labels, similarity)


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
            for line in body.split(b"\n"):
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    continue
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
