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

Sources: the linear prefill-time model of DualMap's SLO-aware routing (arXiv 2602.06502) and of
Preble; the decayed ratio estimator is the standard EWMA of rate = time / work.
"""

from __future__ import annotations

import math

PRIOR_TOKENS = 2048.0
"""Tokens of evidence the seed stands for (a small prompt: the seed is soon outweighed)."""

SHRINK_SAMPLES = 16.0
"""Observations at which a replica's own estimate and the fleet's weigh the same."""


def blended(own: PrefillTimeEstimator, fleet: PrefillTimeEstimator) -> float:
    """A replica's per-token time: its own estimate shrunk towards the fleet's by sample count."""
    n = own.samples
    if n == 0:
        return fleet.seconds_per_token
    return (n * own.seconds_per_token + SHRINK_SAMPLES * fleet.seconds_per_token) / (n + SHRINK_SAMPLES)


def blended_intercept(own: PrefillTimeEstimator, fleet: PrefillTimeEstimator) -> float:
    """A replica's per-request constant, shrunk towards the fleet's as `blended` does."""
    n = own.samples
    return (n * own.intercept_seconds + SHRINK_SAMPLES * fleet.intercept_seconds) / (n + SHRINK_SAMPLES)


class PrefillTimeEstimator:
    """Learns seconds per uncached prompt token from (latency, tokens ahead) observations.

    Args:
        seed_seconds_per_token: the estimate before any observation (> 0).
        learning_rate: weight w of each observation in the decayed sums, 0 < w <= 1.
    """

    __slots__ = ("_seconds", "_tokens", "_rate", "samples", "_affine", "_inv_tokens", "_latency_per_token", "_fit")

    def __init__(self, seed_seconds_per_token: float, learning_rate: float = 0.05, affine: bool = False) -> None:
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
        self._fit = (seed_seconds_per_token, 0.0)  # (slope, intercept)

    @property
    def seconds_per_token(self) -> float:
        """The current estimate s (seconds per uncached prompt token)."""
        return self._fit[0] if self._affine else self._seconds / self._tokens

    @property
    def intercept_seconds(self) -> float:
        """The fitted per-request constant c (0 unless `affine`)."""
        return self._fit[1]

    def _refit(self) -> None:
        """Solve the weighted normal equations c E[1/a] + s = E[d/a], c + s E[a] = E[d]."""
        inv, a, q, d = self._inv_tokens, self._tokens, self._latency_per_token, self._seconds
        det = inv * a - 1.0  # >= 0 (Jensen), 0 when every a was the same
        if det > 1e-3:
            s = (inv * d - q) / det
            c = (q * a - d) / det
            if s > 0 and c >= 0:
                self._fit = (s, c)
                return
        self._fit = (d / a, 0.0)

    def observe(self, latency_s: float, tokens_ahead: int) -> None:
        """Add one observation: `latency_s` from dispatch to first token with `tokens_ahead`
        un-prefilled tokens (the request's own included) on the replica at dispatch.

        Negative or non-finite latencies (clock glitches, a failed request) are ignored.
        """
        if not (latency_s >= 0 and math.isfinite(latency_s)):
            return
        w = self._rate
        a = max(1, tokens_ahead)
        self._seconds += w * (latency_s - self._seconds)
        self._tokens += w * (a - self._tokens)
        self.samples += 1
        if self._affine:
            self._inv_tokens += w * (1.0 / a - self._inv_tokens)
            self._latency_per_token += w * (latency_s / a - self._latency_per_token)
            self._refit()
