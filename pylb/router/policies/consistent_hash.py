"""consistent-hash: one hash ring on the prompt's prefix key (DualMap's cache-affinity baseline).

Design
------
replica = owner of key(r) on ring 0 of a `pylb.native.DualRing` (256 virtual nodes per replica,
multi-probe; built once per membership change in `on_membership`, never on the request path).
key(r) is the same prefix key DualMap uses (`pylb.router.prefix.PrefixKeyer`: the chained hash
at a 512-token key-block boundary, adaptive depth from DualMap's hot-prefix table), so the two
differ only in having one candidate instead of two, and no SLO switch or migration: every request
of a prefix group lands on the same replica, which maximises cache reuse and builds hotspots.
Parameters (options): `key_depth` (int, default 0 = adaptive; d >= 1 fixes the key depth).
Sources: Karger et al. consistent hashing; DualMap (arXiv 2602.06502) "cache affinity" baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pylb import native
from pylb.fields import at_least, setting

from ..interface import ReplicaId, RouterOptions, RoutingRequest
from ..policy import Choice, Policy, RouterView
from ..prefix import PrefixKeyer
from ..registry import register


@register("consistent-hash")
class ConsistentHash(Policy):
    """Owner of the prefix key on one consistent-hash ring."""

    @dataclass(frozen=True)
    class Options:
        """The prefix key's depth."""

        key_depth: int = setting(0, "0 = adaptive prefix key; d >= 1 = key fixed at depth d", check=at_least(0))

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.keyer = PrefixKeyer(options, fixed_depth=self.option("key_depth"))
        self.ring: native.DualRing | None = None

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Rebuild the ring over the new replicas (off the request path)."""
        self.ring = native.DualRing(list(replicas)) if replicas else None

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """The ring-0 owner of the request's prefix key."""
        assert self.ring is not None, "on_membership must come before choose"
        key, _, pending = self.keyer.peek(request)
        return Choice(self.ring.owner(key, 0), branch="affinity", note=pending)

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """Count the request in the adaptive key's window."""
        self.keyer.record(choice.note)
