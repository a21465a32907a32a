"""dualmap (the default): two candidate replicas per prompt, the better cached one unless it
would break the SLO, and hotspot migration. DualMap, arXiv 2602.06502 (ICLR 2026).

Design
------
1. Prefix key (`pylb.router.prefix.PrefixKeyer`): the chained hash at a key-block boundary
   (512 tokens), at an adaptive depth: one key block deeper while the prefix holds >= 6.12 % of
   the last 200 requests (DualMap's hot-prefix expansion), so a universal system prompt does not
   send everything to two replicas while a conversation's turns keep one key.
2. Candidates: (a, b) = `pylb.native.DualRing.candidates(key)`, the owners on two independent
   consistent-hash rings (256 virtual nodes per replica), a != b with >= 2 replicas. Distinct
   prefixes spread by the power of two choices; one prefix always has the same two replicas.
3. Affinity: prefer the candidate whose cache (the core's mirror) holds the longer leading match
   of the prompt; on a tie (e.g. a new prefix), the one with the lower predicted TTFT.
4. SLO switch: if the preferred candidate's predicted TTFT (queued + un-prefilled + own uncached
   tokens, times the learned per-token time) exceeds slo_ttft / 2, take the candidate with the
   lower predicted TTFT instead.
5. The other candidate is the request's `alternate`: the core migrates still-queued requests to
   it when their replica turns hot (predicted TTFT > SLO, or oldest queued wait >= 3 s), cheapest
   first, while the move lowers the predicted TTFT (`migrates = True`).
Rings are rebuilt only in `on_membership`; adding one of N replicas moves about 1/N of the keys
on each ring. Per request: one key_for, one candidates lookup, one mirror match.

Options (`RouterOptions.extra`, or `pylb simulate --policy dualmap:key=value`), for ablations:
    migration  (bool, default true)   hotspot migration on/off
    slo_switch (bool, default true)   step 4 on/off (always the better-cached candidate)
    key_depth  (int, default 0)       0 = adaptive key; d >= 1 = key fixed at depth d
Parameters from the paper: SLO/2 switch threshold, 200-request window, 6.12 % expansion share,
3 s hotspot wait; 512-token key blocks and 256 virtual nodes are pylb's defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

from pylb import native

from ..interface import ReplicaId, RouterOptions, RoutingRequest
from ..policy import Choice, Policy, RouterView
from ..prefix import PrefixKeyer
from ..registry import register


@register("dualmap")
class DualMap(Policy):
    """DualMap's dual-mapping scheduler (see the module docstring)."""

    migrates = True
    option_defaults = {"migration": True, "slo_switch": True, "key_depth": 0}

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.migrates = bool(self.option("migration"))  # type: ignore[misc]  # per-instance ablation
        self.slo_switch = bool(self.option("slo_switch"))
        self.keyer = PrefixKeyer(options, fixed_depth=self.option("key_depth"))
        self.ring: native.DualRing | None = None
        self.switch_budget = options.slo_ttft / 2

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Rebuild both rings over the new replicas (off the request path)."""
        self.ring = native.DualRing(list(replicas)) if replicas else None

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Better-cached candidate, unless its predicted TTFT > slo/2 (then the faster one)."""
        assert self.ring is not None, "on_membership must come before choose"
        key, _ = self.keyer.key(request)
        a, b = self.ring.candidates(key)
        if a == b:
            return Choice(a, branch="affinity")
        cached = view.cached_blocks(request)
        ca, cb = int(cached[a]), int(cached[b])
        ta, tb = view.predicted_ttft(request, a), view.predicted_ttft(request, b)
        faster = a if ta <= tb else b
        if ca == cb:
            pick, branch = faster, "load"
        else:
            pick, branch = (a if ca > cb else b), "affinity"
            t_pick, t_other = (ta, tb) if pick == a else (tb, ta)
            if self.slo_switch and t_pick > self.switch_budget and t_other < t_pick:
                pick, branch = faster, "slo-switch"
        return Choice(pick, b if pick == a else a, branch=branch)
