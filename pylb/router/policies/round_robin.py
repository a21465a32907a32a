"""round-robin: the replicas in turn; the baseline every other policy is measured against.

Design
------
The i-th request chosen goes to replica i mod N (N = live replicas, in the core's index order).
No load or cache information. A membership change keeps the counter, so the rotation continues
over the new list. The request then waits in the core's queue for that replica like any other
(dispatch budgets apply), so the comparison with other policies is about placement alone.
Parameters: none. Source: the textbook policy; DualMap's and KubeAI's round-robin baselines.
"""

from __future__ import annotations

from ..interface import RouterOptions, RoutingRequest
from ..policy import Choice, Policy, RouterView
from ..registry import register


@register("round-robin")
class RoundRobin(Policy):
    """Replica (turn mod N) for each request, in submission order."""

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self._turn = 0

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """The next replica in turn."""
        return Choice(self._turn % len(view.replicas), branch="load")

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """Take the turn."""
        self._turn += 1
