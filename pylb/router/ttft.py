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


class PrefillTimeEstimator:
    """Learns seconds per uncached prompt token from (latency, tokens ahead) observations.

    Args:
        seed_seconds_per_token: the estimate before any observation (> 0).
        learning_rate: weight w of each observation in the decayed sums, 0 < w <= 1.
    """

    __slots__ = ("_seconds", "_tokens", "_rate", "samples")

    def __init__(self, seed_seconds_per_token: float, learning_rate: float = 0.05) -> None:
        if not (seed_seconds_per_token > 0 and math.isfinite(seed_seconds_per_token)):
            raise ValueError(f"seed_seconds_per_token must be a positive number, got {seed_seconds_per_token!r}")
        if not 0 < learning_rate <= 1:
            raise ValueError(f"learning_rate must be in (0, 1], got {learning_rate!r}")
        self._tokens = PRIOR_TOKENS
        self._seconds = seed_seconds_per_token * PRIOR_TOKENS
        self._rate = learning_rate
        self.samples = 0
        """Observations so far."""

    @property
    def seconds_per_token(self) -> float:
        """The current estimate s (seconds per uncached prompt token)."""
        return self._seconds / self._tokens

    def observe(self, latency_s: float, tokens_ahead: int) -> None:
        """Add one observation: `latency_s` from dispatch to first token with `tokens_ahead`
        un-prefilled tokens (the request's own included) on the replica at dispatch.

        Negative or non-finite latencies (clock glitches, a failed request) are ignored.
        """
        if not (latency_s >= 0 and math.isfinite(latency_s)):
            return
        w = self._rate
        self._seconds += w * (latency_s - self._seconds)
        self._tokens += w * (max(1, tokens_ahead) - self._tokens)
        self.samples += 1
