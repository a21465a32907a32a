"""Round-robin: the simplest router, and the baseline every other policy is measured against.

Design
------
Each submitted request is dispatched at the next `poll`, to the replicas in turn:
replica = replicas[i mod N] for the i-th dispatched request, in submission order. No queueing
beyond the next poll, no load or cache information. A membership change keeps the turn
counter (so the rotation continues over the new list) and never drops a queued request.
Parameters: none. Source: the textbook policy; DualMap's and KubeAI's round-robin baselines.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from .interface import Dispatch, ReplicaId, Router, RouterOptions, RoutingRequest
from .registry import register


@register("round-robin")
class RoundRobinRouter(Router):
    """Dispatch every request at once, to replica (turn mod N)."""

    def __init__(self, options: RouterOptions | None = None) -> None:
        self.options = options or RouterOptions()
        self._replicas: list[ReplicaId] = []
        self._queue: deque[str] = deque()
        self._turn = 0

    def submit(self, request: RoutingRequest, now: float) -> None:
        """Queue the request for the next poll."""
        self._queue.append(request.request_id)

    def poll(self, now: float) -> list[Dispatch]:
        """Dispatch every queued request, rotating over the replicas (none while there are none)."""
        if not self._replicas or not self._queue:
            return []
        out = []
        n = len(self._replicas)
        while self._queue:
            out.append(Dispatch(self._queue.popleft(), self._replicas[self._turn % n]))
            self._turn += 1
        return out

    def on_membership(self, replicas: Sequence[ReplicaId], now: float) -> None:
        """Rotate over the new list from now on."""
        self._replicas = list(replicas)
