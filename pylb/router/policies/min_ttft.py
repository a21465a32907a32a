"""min-ttft: the replica with the lowest predicted TTFT, over all replicas.

Design
------
replica = argmin_i predicted_ttft(r, i) = (queued_tokens_i + unprefilled_tokens_i +
uncached_i(r)) x s_i, where uncached_i(r) comes from the cache mirror's leading-prefix match and
s_i is the core's learned per-token prefill time (`pylb.router.ttft`). Ties go to the replica with
more of the prompt cached, then to the one owing fewer requests, then to the lowest index. The runner-up is named as the alternate
(for retries; the policy does not migrate). It weighs cache and load in one number, greedily,
for each request alone: it is the "global greedy" scheduler DualMap compares against, and the
upper bound of what the TTFT model can do without affinity (it spreads one prefix group over every
replica whose queue is shorter than the group's cache saving).
Parameters: none (uses RouterOptions' estimator seed and mirror size). Source: Preble's and DualMap's
load-and-cache cost models.
"""

from __future__ import annotations

from ..interface import RoutingRequest
from ..policy import Choice, Policy, RouterView
from ..registry import register


@register("min-ttft")
class MinTTFT(Policy):
    """Lowest predicted TTFT over all replicas."""

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """argmin of predicted TTFT (more cached, then lower index, on ties); runner-up as alternate."""
        cached = view.cached_blocks(request)
        reps = view.replicas
        ranked = sorted(range(len(view.replicas)), key=lambda i: (view.predicted_ttft(request, i), -int(cached[i]), reps[i].load, i))
        return Choice(ranked[0], ranked[1] if len(ranked) > 1 else None, branch="load")
