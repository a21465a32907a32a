"""least-load: the replica that owes the fewest requests (queued in the router plus in flight).

Design
------
replica = argmin_i (queued_requests_i + inflight_requests_i), ties to the lowest index. The
counts are the core's own, updated at submit and dispatch time (not scraped), so a burst of
arrivals spreads at once instead of piling onto the replica that looked idle at the last scrape.
No cache information. Parameters: none. Source: the classic least-outstanding-requests balancer
(Envoy LEAST_REQUEST without sampling; DualMap's load-balancing baseline).
"""

from __future__ import annotations

from ..interface import RoutingRequest
from ..policy import Choice, Policy, RouterView
from ..registry import register


@register("least-load")
class LeastLoad(Policy):
    """Fewest queued plus in-flight requests."""

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """The least loaded replica (lowest index on ties)."""
        reps = view.replicas
        best = min(range(len(reps)), key=lambda i: (reps[i].load, i))
        return Choice(best, branch="load")
