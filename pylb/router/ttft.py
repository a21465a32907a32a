"""Online estimate of a replica's per-token prefill time, for predicting TTFT.

Design (DESIGN.md §4)
---------------------
The router predicts the TTFT a request would get on replica i as

    predicted_ttft(i) = (queued_i + unprefilled_i + uncached_i(request)) x s_i

where queued_i are the uncached prompt tokens waiting in the router's queue for i,
unprefilled_i those dispatched to i whose first token has not come back yet, uncached_i the
request's own prompt tokens that i's cache (as the mirror sees it) does not hold, and s_i the
seconds one such token costs: the replica's *per-token prefill time*, learned here.

Observations. When request r is dispatched to i, the core records the tokens ahead of it,
a = unprefilled_i (before r) + uncached_i(r); when r's first token arrives, the engine-side
latency d = first_token - dispatch is an observation of a x s_i. (The router-side queue wait is
not in d: the predictor charges it through queued_i with the same s_i.) Chunked prefill works
through the engine's prefill backlog first-come first-served, so d grows linearly with a; decode
steps interleaved with prefill and a full KV cache only raise the slope, and the slope is what
the predictor needs.

Estimator: the ratio of exponentially decayed sums (a weighted least-squares fit of d = a x s
through the origin, each observation weighted 1/a, which keeps one huge prompt from dominating):

    D <- (1 - w) D + w d        A <- (1 - w) A + w a        s = D / A

seeded with D = s0 x A0, A = A0 (A0 = `PRIOR_TOKENS`), so that the first estimate is the seed
s0 (`RouterOptions.prefill_seconds_per_token`) and the seed's weight decays as (1 - w)^k after k
observations (w = `RouterOptions.prefill_learning_rate`, 0.05: ~5 % left after 60). An
observation with a = 0 (a fully cached prompt) counts as one token, so it still adds its latency.
Per replica and fleet-wide. The core keeps one estimator per replica and one over every
observation in the fleet, and gives a replica with n observations of its own

    s_i = (n x own_i + N0 x fleet) / (n + N0)        N0 = `SHRINK_SAMPLES`

so a replica that has served nothing yet (it just joined, or no policy picked it) is predicted
at the fleet's rate rather than at the seed, which would make it look slower (or faster) than
every busy replica and keep it out of (or flood it with) the traffic.

Option `prefill_intercept` (off by default): fit d = c + a x s instead, with the same weights and
decay (two more decayed means, of 1/a and of d/a, and the 2x2 normal equations), and predict
c + (queued + unprefilled + uncached) x s. On a real vLLM the request path outside the engine
(tokenizing, the API server's hop to the engine core and back) costs a roughly constant time per
request that grows when the replica is busy (174-365 ms per request measured on a loaded CPU
replica, BENCHMARKS.md "Inside the engines"); through the origin that constant inflates the
per-token slope, so a long queue is over-predicted and a short one under-predicted. The fit falls
back to the origin when the observations do not determine an intercept (all a alike) or give a
negative one.

Option `prefill_decoding` (off by default): also fit a cost u per request *decoding* on the
replica at dispatch (k = requests past their first token and not yet complete, the router's own
count, so it never lags a scrape): d = [c +] a x s + k x u, predicted as [c +] (queued +
unprefilled + uncached) x s + k_now x u. A real engine runs each prefill chunk in a step beside
one decode token of every running request, and on a CPU vLLM the API server streams every
running request's tokens on the same core, so a replica with a full batch is slow to start a new
request whatever its queue; through the origin that cost is spread over the tokens ahead. The fit
keeps every coefficient >= 0: when the full fit is not (or the features cannot be told apart, e.g.
nothing ever decoding), the best fit that drops the decoding term or the constant is used, and
failing that the fit through the origin. Measured on pylb's own observations of a real CPU vLLM
pair (`bench/ttft_model.py`, BENCHMARKS.md "Pricing the running batch").

Sources: the linear prefill-time model of DualMap's SLO-aware routing (arXiv 2602.06502) and of
Preble; the decayed ratio estimator is the standard EWMA of rate = time / work.
"""

from __future__ import annotations

import math

import numpy as np

PRIOR_TOKENS = 2048.0
"""Tokens of evidence the seed stands for (a small prompt: the seed is soon outweighed)."""

SHRINK_SAMPLES = 16.0
"""Observations at which a replica's own estimate and the fleet's weigh the same."""


def _shrunk(n: int, own: float, fleet: float) -> float:
    """A replica's value with `n` observations of its own, shrunk towards the fleet's."""
    return (n * own + SHRINK_SAMPLES * fleet) / (n + SHRINK_SAMPLES)


def blended(own: PrefillTimeEstimator, fleet: PrefillTimeEstimator) -> float:
    """A replica's per-token time: its own estimate shrunk towards the fleet's by sample count."""
    if own.samples == 0:
        return fleet.seconds_per_token
    return _shrunk(own.samples, own.seconds_per_token, fleet.seconds_per_token)


def blended_intercept(own: PrefillTimeEstimator, fleet: PrefillTimeEstimator) -> float:
    """A replica's per-request constant, shrunk towards the fleet's as `blended` does."""
    return _shrunk(own.samples, own.intercept_seconds, fleet.intercept_seconds)


def blended_decoding(own: PrefillTimeEstimator, fleet: PrefillTimeEstimator) -> float:
    """A replica's seconds per decoding request, shrunk towards the fleet's as `blended` does."""
    return _shrunk(own.samples, own.seconds_per_decoding, fleet.seconds_per_decoding)


def _solve(m: list[list[float]], b: list[float]) -> list[float] | None:
    """x with m x = b for a small symmetric positive semi-definite m, or None when m is near
    singular (its correlation matrix's determinant under 1e-3: the data cannot tell the
    features apart). Solved on the correlation-scaled system."""
    gram, rhs = np.asarray(m, dtype=float), np.asarray(b, dtype=float)
    diag = np.diag(gram)
    if np.any(diag <= 0):
        return None
    scale = np.sqrt(diag)
    corr = gram / np.outer(scale, scale)
    if abs(np.linalg.det(corr)) < 1e-3:
        return None
    return [float(v) for v in np.linalg.solve(corr, rhs / scale) / scale]


class PrefillTimeEstimator:
    """Learns seconds per uncached prompt token from (latency, tokens ahead) observations.

    Args:
        seed_seconds_per_token: the estimate before any observation (> 0).
        learning_rate: weight w of each observation in the decayed sums, 0 < w <= 1.
        affine: also fit a per-request constant (`intercept_seconds`).
        decoding: also fit a cost per request decoding on the replica (`seconds_per_decoding`).
    """

    __slots__ = ("_seconds", "_tokens", "_rate", "samples", "_affine", "_inv_tokens", "_latency_per_token", "_fit",
                 "_decoding", "_dec", "_dec_per_token", "_dec_sq_per_token", "_dec_latency_per_token")  # fmt: skip

    def __init__(self, seed_seconds_per_token: float, learning_rate: float = 0.05, affine: bool = False, decoding: bool = False) -> None:
        if not (seed_seconds_per_token > 0 and math.isfinite(seed_seconds_per_token)):
            raise ValueError(f"seed_seconds_per_token must be a positive number, got {seed_seconds_per_token!r}")
        if not 0 < learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate!r}")
        self._tokens = PRIOR_TOKENS
        self._seconds = seed_seconds_per_token * PRIOR_TOKENS
        self._rate = learning_rate
        self.samples = 0
        """Observations so far."""
        self._affine = affine
        # with `affine`: decayed means of 1/a and d/a (the prior's one observation: a = A0, d = s0 A0)
        self._inv_tokens = 1.0 / PRIOR_TOKENS
        self._latency_per_token = seed_seconds_per_token
        # with `decoding`: decayed means of k, k/a, k^2/a and k d/a (the prior's k is 0)
        self._decoding = decoding
        self._dec = self._dec_per_token = self._dec_sq_per_token = self._dec_latency_per_token = 0.0
        self._fit = (seed_seconds_per_token, 0.0, 0.0)  # (slope, intercept, per decoding request)

    @property
    def seconds_per_token(self) -> float:
        """The current estimate s (seconds per uncached prompt token)."""
        return self._fit[0] if self._affine or self._decoding else self._seconds / self._tokens

    @property
    def intercept_seconds(self) -> float:
        """The fitted per-request constant c (0 unless `affine`)."""
        return self._fit[1]

    @property
    def seconds_per_decoding(self) -> float:
        """The fitted cost u per request decoding on the replica at dispatch (0 unless `decoding`)."""
        return self._fit[2]

    def _refit(self) -> None:
        """The weighted least-squares fit (weights 1/a) over the model's features: (1, a) with
        `affine`, (a, k) with `decoding`, (1, a, k) with both; every coefficient >= 0. The full
        fit when it is feasible, else the best feasible fit that drops one feature (a is always
        kept), else the fit through the origin."""
        inv, a, q, d = self._inv_tokens, self._tokens, self._latency_per_token, self._seconds
        k, k_inv, kk_inv, kd_inv = self._dec, self._dec_per_token, self._dec_sq_per_token, self._dec_latency_per_token
        # moments E[w x_i x_j] and E[w x_i d], features "c" = 1, "a", "k"
        gram: dict[tuple[str, str], float] = {}
        for (f, g), v in ((("c", "c"), inv), (("c", "a"), 1.0), (("c", "k"), k_inv), (("a", "a"), a), (("a", "k"), k), (("k", "k"), kk_inv)):
            gram[f, g] = gram[g, f] = v
        rhs = {"c": q, "a": d, "k": kd_inv}
        full = tuple(f for f, on in (("c", self._affine), ("a", True), ("k", self._decoding)) if on)
        subsets = [full] + [tuple(f for f in full if f != drop) for drop in full if drop != "a"]
        best: tuple[float, dict[str, float]] | None = None
        for feats in subsets:
            x = _solve([[gram[f, g] for g in feats] for f in feats], [rhs[f] for f in feats])
            if x is None or min(x) < 0 or x[feats.index("a")] <= 0:
                continue
            gain = sum(xi * rhs[f] for xi, f in zip(x, feats))  # minus the weighted squared error, up to a constant
            if best is None or gain > best[0]:
                best = (gain, dict(zip(feats, x)))
            if feats == full:
                break
        if best is None:
            self._fit = (d / a, 0.0, 0.0)
        else:
            fit = best[1]
            self._fit = (fit["a"], fit.get("c", 0.0), fit.get("k", 0.0))

    def observe(self, latency_s: float, tokens_ahead: int, decoding: int = 0) -> None:
        """Add one observation: `latency_s` from dispatch to first token with `tokens_ahead`
        un-prefilled tokens (the request's own included) and `decoding` requests past their
        first token on the replica at dispatch.

        Negative or non-finite latencies (clock glitches, a failed request) are ignored.
        """
        if not (latency_s >= 0 and math.isfinite(latency_s)):
            return
        w = self._rate
        a = max(1, tokens_ahead)
        self._seconds += w * (latency_s - self._seconds)
        self._tokens += w * (a - self._tokens)
        self.samples += 1
        if self._affine or self._decoding:
            self._inv_tokens += w * (1.0 / a - self._inv_tokens)
            self._latency_per_token += w * (latency_s / a - self._latency_per_token)
        if self._decoding:
            k = max(0, decoding)
            self._dec += w * (k - self._dec)
            self._dec_per_token += w * (k / a - self._dec_per_token)
            self._dec_sq_per_token += w * (k * k / a - self._dec_sq_per_token)
            self._dec_latency_per_token += w * (k * latency_s / a - self._dec_latency_per_token)
        if self._affine or self._decoding:
            self._refit()
