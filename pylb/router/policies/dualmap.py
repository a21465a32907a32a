"""dualmap (the default): two candidate replicas per prompt, the better cached one unless it
would break the SLO, and hotspot migration. DualMap, arXiv 2602.06502 (ICLR 2026).

Design
------
1. Prefix key (`pylb.router.prefix.PrefixKeyer`): the chained hash at a key-block boundary
   (64 tokens, up to 8192 tokens deep; 512-token blocks left prompts shorter than one block
   with a key of their own, so conversations and prefix groups did not keep their candidates:
   `prefix.py`), at an adaptive depth: one key block deeper while the prefix holds a hot share of
   the last 200 requests (DualMap's hot-prefix expansion), so a universal system prompt does not
   send everything to two replicas while a conversation's turns keep one key. The paper's share
   is 6.12 %; pylb's default (option `hot_share`, "fleet") is at least 1/N, one replica's fair
   share: on a small fleet a prefix group with 12 % of the traffic is no hotspot, and deepening
   its key put the group prompt below step 3's floor, so every new conversation of the group was
   a tie and each replica ended up holding every group prompt in a cache that fits a few (on two
   real vLLM replicas and in the simulator: hit 64 % against 79 % for sglang's cache_aware).
2. Candidates: (a, b) = `pylb.native.DualRing.candidates(key)`, the owners on two independent
   consistent-hash rings (256 virtual nodes per replica), a != b with >= 2 replicas. Distinct
   prefixes spread by the power of two choices; one prefix always has the same two replicas.
3. Affinity: prefer the candidate whose cache (the core's mirror) holds the longer leading match
   of the prompt; on a tie, the one with less prefill backlog (queued plus un-prefilled tokens
   times its per-token time), then fewer requests owed, then ring 0's; when neither holds
   anything of the prompt above the floor (a new prefix: nothing to keep warm), the fleet's
   replica with the least prefill work placed on it in the last 60 s (option `tie_window_s`),
   then the least backlog (option `tie`, default "fleet"; "ring" keeps the choice to the two
   candidates, the paper's rule), and the better-loaded candidate becomes its alternate. The
   window chooses only among the replicas that would start the request about as soon as the
   least backlogged one (backlog within the request's own prefill time of the least; option
   `tie_near`): at low load that is every replica, under load the window no longer sends a new
   prefix behind a queue another replica does not have (on two real vLLM replicas replaying
   Mooncake's conversations: 11.0 % within a 0.5 s SLO against 6.5 % without; BENCHMARKS.md). The
   window spreads new prefix groups by the work they brought, as preble-e2's window and sglang's
   smallest-tree fallback do: at low load every backlog reads 0 and the old rule's next key
   (requests owed) placed groups unevenly. The window is one router's own; several pylb
   instances in front of one fleet would each place a new group by their own history and split
   it, so it is used only while this router placed at least 60 % of the prompt tokens the
   replicas' own counters (`vllm:prefix_cache_queries_total`) show over at least 2 s of scrapes;
   otherwise, and before that evidence, a tie goes by backlog, requests owed, then ring order,
   which every instance computes alike. The
   prefix's later requests find it through step 6. Measured in the regime matrix (BENCHMARKS.md):
   the power of two choices leaves more imbalance than the fleet's least-loaded replica on
   traffic with little reuse (Azure, the new prefixes of Mooncake). (The
   request's own cost is the same on both at a tie; comparing full predicted TTFTs would let
   noise in the learned per-token times of two idle replicas decide, and at low load send every
   tie to whichever replica happened to measure fastest.) Matches
   are compared above the *hot floor*: the (depth - 1) key blocks above the key's own block are
   by construction a hot prefix shared by many groups (a universal system prompt) and are on
   most replicas, so holding only them says nothing about the group; without the floor, the first
   replica to see a universal system prompt would beat every empty candidate and take all traffic
   at low load (measured on Mooncake in a pure-cache run: BENCHMARKS.md). A hot prefix
   rarely ends on a key-block boundary (a system prompt of any length), so the floor also covers
   the part of the key's own block that the hot prefix's other groups share: the shortest common
   prefix seen between two requests with different keys under the same hot prefix (remembered
   for the last 1024 hot prefixes; two requests of which one extends the other are one
   conversation whose key went deeper as it grew, not two groups, and are not compared: on a
   fast tool-agent loop, the loop itself is a hot prefix, and comparing its steps raised the
   floor to the whole previous step, so the step that holds it lost its affinity, measured in
   the regime matrix). Without that, the replica that served a new system prompt
   first holds a few blocks more of every later prompt than the others, and steps 3 and 6 send
   it all of them until it is hot (seen at start-up: every request on one replica for seconds).
   A match shorter than one key block counts as none (option `whole_key_block`), unless it is
   the whole prompt: a prefix every request starts with that ends inside the first key block
   (Mooncake's system prompt, scaled to the CPU profiles, is 2 of the key block's 4 router
   blocks) gives every prompt a key of its own, so it is never hot and never under the floor,
   yet the first replicas to cache it held more of every later prompt than the empty ones. With
   the SLO switch and migration off, 2,779 of 3,000 placements were affinity ones (8.2 %
   within the SLO at 77 qps on Mooncake x CPU x 32, against 96.5 % with the rule); with them on,
   they undid the placements at a cost (88.9 % against 96.0 %; BENCHMARKS.md, "Matches shorter
   than a key block").
   A prompt the better candidate holds only weakly, at most half of it counting the hot prefix
   and a queued turn (option `weak_share`, 0.5: Preble's exploit test, cached > missed), gains
   less from its holder than a queue there costs it: it goes to the fleet's replica with the
   least backlog plus its own uncached prefill (Preble's explore, with the backlog for its
   window), if that one predicts it within slo_ttft / 2 (step 4's budget: in overload a weak
   match still saves work, and the holder keeps it). A long prompt that shares only its
   group's prefix with earlier ones (a new session of the long workload: 192 of ~750 tokens)
   otherwise went to the group's holder; with 32 replicas a group's new sessions piled onto
   one replica (long x CPU x 32 at the best other policy's capacity: 79 % within the SLO
   against preble-e2's 90 %, and 90 % with the rule; BENCHMARKS.md, "A weakly held prompt").
4. SLO switch: if the preferred candidate's predicted TTFT (queued + un-prefilled + own uncached
   tokens, times the learned per-token time) exceeds slo_ttft / 2, take the other candidate,
   but only when its predicted TTFT is within slo_ttft / 2 ("rescue", pylb's default). The
   paper takes the other whenever it is faster ("paper"): near capacity both candidates are
   usually over the budget, and moving a request to a replica where it misses the SLO anyway
   throws away its cached prefix and adds its whole prompt to a saturated fleet's work; near
   capacity on Mooncake the rescue rule meets the SLO for clearly more requests (BENCHMARKS.md).
5. The other candidate is the request's `alternate`: the core migrates still-queued requests to
   it when their replica turns hot (predicted TTFT > SLO, or oldest queued wait >= 3 s), cheapest
   first, while the move lowers the predicted TTFT (`migrates = True`); when the alternate is as
   hot, to a neighbour, the replica where the request's predicted TTFT is lowest
   (`migrates_to_neighbours`, option `neighbours`). Targets that hold at least as much of the
   prompt as the hot replica are tried first; a move to one that holds less (it adds prompt work
   to the fleet) is made only where the request's predicted TTFT stays within slo_ttft / 2, step
   4's rescue budget (option `migrate_to`, default "spare"; DualMap's rule, "any", takes any
   target within the SLO). Near capacity, a move off the cache adds a whole prompt's prefill to
   a saturated fleet, and a conversation's or tool loop's next requests follow it (step 6); a
   move into spare room is still made. Measured over the regime matrix and at fixed rates
   (BENCHMARKS.md, "Migration adds work only where there is room"): capacity +3 to +14 % in 10
   of 38 cells (agent x 910B x 8: 0.97 -> 1.10x the best other policy), -4 to -20 % in 5 (long x
   910B x 32, where every policy's share is nearly flat in the load: -0.5 points at fixed rates).
   The core tells the policy of each move (`on_migrate`). A moved new prefix (placed by step 3's
   tie) is counted in step 3's window on its target from then on, as its cache, so its group's
   home, will be there; a request placed for its cache stays counted on its group's home, since
   the window spreads groups by the work each brings home (option `migrated_window`; moving both
   lost agent x CPU x 8, 92.6 -> 87.8 % at 0.9x its best other policy's capacity: the hot
   replica looked lighter and took new loops; BENCHMARKS.md, "A migrated new prefix").
6. Follow the cache (pylb; option `follow_cache`): when a replica off the two rings holds a
   longer match above the hot floor than both candidates (a conversation that an earlier spill
   or migration moved there), it replaces the worse-matched candidate, so the next turn goes where
   its prefix is rather than back to the ring owners, which hold less of it. A turn whose
   previous turn is still queued (the mirror learns a prefix only at dispatch) follows it too:
   DualMap remembers where each queued prompt waits (by its last block's chained hash, until it
   is dispatched), and a prompt that extends a queued one counts it as held there. Without
   that, under load a fast tool-agent loop's next step arrives while the previous one waits in
   the router's queue, matches nothing, and is placed as a new prefix, away from its cache
   (measured in the regime matrix, agent workload on 910B: hit 83 % -> 92 %). A queued turn
   that migration moved is remembered where it went.
7. Spill (pylb; option `spill`, off by default): when both candidates predict a TTFT over the
   SLO, the request goes to the fleet's replica with the lowest predicted TTFT, if that one
   predicts it within the SLO (the admission-time twin of step 5's neighbours).
   Measured (BENCHMARKS.md, "DualMap ablations"), on the DualMap paper's profile (Ascend 910B,
   where a 5 s SLO is tight against prefill times): neighbours raise dualmap's capacity above
   min-ttft's; spill alone helps, but with neighbours it adds nothing and on the compute-bound
   H100 profile it costs a sweep step, so it is off. Follow-the-cache is neutral on capacity
   and adds hit rate on 910B.
8. Overload (pylb; option `overload`): when both candidates predict the request over the SLO,
   "share" (the default) places it by the rules above, which spread a queue no replica can serve
   within the SLO over both, so every request waits. "protect" sends it to the candidate with
   the longer backlog if that backlog (queued plus un-prefilled prefill, its wait alone) has been
   over the SLO at every placement that saw it for at least `overload_wait_s` (3 s): in sustained
   overload the hopeless go to the replica that is already hopeless, and the other keeps a queue
   within the SLO for the requests that can still meet it (the uneven split by which sglang's
   router won short SLOs in overload on two real vLLM replicas). Its backlog, not the request's
   predicted TTFT, and the 3 s persistence are what keep it off below capacity: a rule on the
   predictions alone (tried before) crossed the SLO for moments below capacity and lost there.
   Migration (step 5) still moves a sink's queued requests to the other while it predicts them
   within the SLO. Off by default: on two real vLLM replicas with a 0.5 s SLO it raised the share
   within the SLO in overload (29-34 % against 18-23 %, level with sglang's router) but at ~2/3
   load cost 6 points, since a short SLO's backlog stays over it for seconds there too; the
   simulator's fixed-rate screen did not show that loss (BENCHMARKS.md, "Overload: protect one
   replica"). With `overload_draining=release` a candidate whose backlog (in seconds at its
   learned per-token time) is lower than at the last time it was a candidate at least
   `overload_wait_s` before (draining) takes no more of the hopeless, so a sink left by a burst
   below capacity drains under the rules above; its over-SLO clock keeps running, so it is a
   sink again as soon as its backlog rises. Only with `overload=protect` and a wait above 0.
   Not kept either: on the real pair, level with told-SLO pylb at ~2/3 load within 0.5 s at
   protect's cost in the tail, hit rate and hotspot, and below it in overload (BENCHMARKS.md,
   "Releasing a draining sink").
Rings are rebuilt only in `on_membership`; adding one of N replicas moves about 1/N of the keys
on each ring. Per request: one key_if_recorded (and one key_for in on_choice), one candidates
lookup, one mirror match.

Options (`RouterOptions.extra`, or `pylb simulate --policy dualmap:key=value`), for ablations:
    migration  (bool, default true)   hotspot migration on/off
    slo_switch (str, default rescue)  step 4: "rescue", "paper" (the paper's rule), "balance"
                                      (rescue, or a 2x imbalance) or "off" (always the better-cached
                                      candidate)
    key_depth  (int, default 0)       0 = adaptive key; d >= 1 = key fixed at depth d
    neighbours (bool, default true)   step 5: migrate to a neighbour when the alternate is hot
    migrate_to (str, default spare)   step 5's targets: "any"; "holders" (only a replica where
                                      the request computes no more prompt tokens than on the hot
                                      one, i.e. one holding at least as much of it); "spare"
                                      (holders first; a move that adds prompt work to the fleet
                                      only to a replica where its predicted TTFT stays within
                                      slo_ttft / 2, step 4's rescue budget: near capacity a move
                                      off the cache adds a whole prompt's prefill to a saturated
                                      fleet, and an agent loop's next steps follow it);
                                      "bounded" (spare, and a move that adds work at most doubles
                                      the prompt tokens the request computes; measured mixed:
                                      agent x 910B gains, long x 910B x 8 loses, BENCHMARKS.md
                                      "Not done")
    follow_cache (bool, default true) step 6 on/off
    spill      (str, default off)     step 7: "fleet" or "off"
    tie        (str, default fleet)   step 3, a prompt neither candidate holds: "fleet" or "ring";
                                      "cost" / "fleet-cost": the same pools, but a tie goes to the
                                      least backlog plus the request's own uncached prefill (at
                                      one per-token time for all), so a replica holding the hot
                                      prefix below the floor wins while its backlog is smaller
                                      than the prefill it saves
    tie_holders (bool, default false) step 3's tie when both candidates hold the same match above
                                      the floor and no replica holds more (a system prompt or group
                                      prompt every replica has by now): the pool is every replica
                                      holding as much, not the two candidates, as Preble spreads a
                                      prefix over its equal-longest holders by load. In the regime
                                      matrix (8 and 32 replicas; on 2 the holders are the
                                      candidates): 8 cells gain 3-17 %, 6 lose 4-14 % (long x 910B
                                      x 32: 0.86), 11 level. Mixed, so off (BENCHMARKS.md)
    tie_window_s (float, default 60)  step 3's tie: > 0 compares first the prefill work (uncached
                                      tokens) placed on each replica in that many seconds, then
                                      the backlog: new prefix groups are spread by the work they
                                      brought, as preble-e2's window and sglang's smallest-tree
                                      fallback do, not by an instantaneous backlog that is 0 on
                                      every replica at low load
    migrated_window (str, default new) step 5's moves in step 3's window: "new" (a new prefix's
                                      prefill is counted where it moved, a cached request's stays
                                      on its group's home), "move" (every move) or "stay" (none)
    whole_key_block (bool, default true) step 3: a match shorter than one key block (and not the
                                      whole prompt) counts as none, as the keyer cannot tell a
                                      shared fragment of the first key block from a group prefix
    weak_share (float, default 0.5)   step 3: a prompt the better candidate holds at most this
                                      share of goes to the fleet's replica with the least backlog
                                      plus its own uncached prefill, if that one predicts it within
                                      slo_ttft / 2 (0: off, every held match is an affinity)
    tie_near   (bool, default true)   step 3's window compares only the replicas whose backlog is
                                      within the request's own prefill time (its uncached tokens
                                      at that replica's per-token time) of the least backlog: at
                                      low load every replica qualifies and the window decides as
                                      before; under load it no longer sends a new prefix behind a
                                      queue that another replica does not have
    hot_share  (str, default fleet)   step 1's expansion share: "paper" (6.12 %) or "fleet": at
                                      least 1/N, one replica's fair share of the traffic (on a
                                      small fleet a prefix with 12 % of the traffic is no hotspot,
                                      and deepening its key spreads its group over every replica)
    overload   (str, default share)   step 8: "share" or "protect"
    overload_wait_s (float, default 3) step 8: how long a candidate's backlog must stay over the
                                      SLO before it takes the hopeless
    overload_draining (str, default keep) step 8: "keep" or "release": a candidate whose backlog
                                      is lower than at its last sample overload_wait_s or more
                                      ago takes no more hopeless (overload=protect only)
    balance_ratio (float, default 2)  slo_switch="balance" (step 4's rescue, and also switch when
                                      the other candidate's predicted TTFT x ratio < the preferred
                                      one's, at any SLO): measured mixed, so not the default
Parameters from the paper: SLO/2 switch threshold, 200-request window, 6.12 % expansion share,
3 s hotspot wait; 64-token key blocks and 256 virtual nodes are pylb's defaults.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pylb import native
from pylb.fields import at_least, one_of, setting

from ..interface import ReplicaId, RouterOptions, RoutingRequest
from ..policy import Choice, Policy, ReplicaState, RouterView
from ..prefix import PrefixKeyer
from ..registry import register
from .preble_e2 import WindowLoad


SLO_SWITCH_RULES = ("rescue", "paper", "off", "balance")
"""Values of the `slo_switch` option."""

SPILL_RULES = ("off", "fleet")
"""Values of the `spill` option."""

RESCUE_SLO_SHARE = 0.5
"""Step 4's budget, as a share of slo_ttft (the paper's SLO / 2); step 5's `spare` and `bounded`
rules hold a move that adds prompt work to the same budget."""

MIGRATION_RULES: dict[str, tuple[tuple[float, ...], float]] = {
    "any": ((math.inf,), 1.0),
    "holders": ((1.0,), 1.0),
    "spare": ((1.0, math.inf), RESCUE_SLO_SHARE),
    "bounded": ((1.0, 2.0), RESCUE_SLO_SHARE),
}
"""Option migrate_to -> (migration_work_limits, migration_added_work_slo_share), the policy's
migration rule as `pylb.router.core` reads it."""

MIGRATED_WINDOW_RULES = ("new", "move", "stay")
"""Values of the `migrated_window` option."""

WEAK_SHARE = 0.5
"""Step 3: a candidate holding at most this share of the prompt holds it weakly (Preble's exploit
test, cached > missed, is the same share)."""

HOT_TAILS_KEPT = 1024
"""Hot prefixes whose shared tail (step 3's floor) DualMap remembers; the oldest is forgotten."""

ALONE_SHARE = 0.6
"""Step 3's window is used while this router placed at least this share of the prompt tokens the
replicas were asked for (one of two pylb instances places about half)."""

ALONE_EVIDENCE_S = 2.0
"""... judged over at least this many seconds of scrapes (before: not alone)."""

QUEUED_KEPT = 8192
"""Queued prompts step 6 remembers (entries leave at dispatch; past this, the oldest is forgotten)."""


def _alternate(pick: int, a: int, b: int, view: RouterView) -> int:
    """The request's other candidate (step 5's first migration target): of a and b, the one it
    is not on; placed off both rings (step 3's fleet tie), the one with less backlog."""
    if pick in (a, b):
        return b if pick == a else a
    return a if _backlog(view.replicas[a]) <= _backlog(view.replicas[b]) else b


def _backlog(s: ReplicaState) -> float:
    """Seconds of prefill queued and in flight on a replica (the wait part of predicted TTFT)."""
    return (s.queued_tokens + s.unprefilled_tokens) * s.prefill_seconds_per_token


@register("dualmap")
class DualMap(Policy):
    """DualMap's dual-mapping scheduler (see the module docstring)."""

    migrates = True
    @dataclass(frozen=True)
    class Options:
        """DualMap's options (see the module docstring)."""

        migration: bool = setting(True, "hotspot migration on/off")
        slo_switch: str = setting("rescue", "step 4: rescue, paper (the paper's rule), balance (rescue, or the other candidate balance_ratio x faster) or off", check=one_of(*SLO_SWITCH_RULES))
        key_depth: int = setting(0, "0 = adaptive prefix key; d >= 1 = key fixed at depth d", check=at_least(0))
        neighbours: bool = setting(True, "step 5: migrate to a neighbour when the alternate is hot")
        migrate_to: str = setting("spare", "step 5's targets: any (the alternate or a neighbour), holders (only where the request computes no more prompt tokens than on the hot replica), spare (holders first, then any other where the predicted TTFT is within slo_ttft / 2) or bounded (spare, where a move computes at most twice the prompt tokens)", check=one_of(*MIGRATION_RULES))
        follow_cache: bool = setting(True, "step 6 on/off")
        spill: str = setting("off", "step 7: fleet or off", check=one_of(*SPILL_RULES))
        balance_ratio: float = setting(2.0, "slo_switch=balance: also switch when the other candidate's predicted TTFT x this < the preferred one's", check=at_least(1))
        hot_share: str = setting("fleet", "step 1's expansion share: paper (6.12 % of the window) or fleet (at least one replica's fair share, 1/N of the window)", check=one_of("paper", "fleet"))
        tie_window_s: float = setting(60.0, "step 3's tie: > 0 compares the prefill work placed on each replica in the last tie_window_s seconds first (0: off)", check=at_least(0))
        tie: str = setting("fleet", "step 3's tie when neither candidate holds the prompt: ring (the less loaded candidate) or fleet (the fleet's least loaded replica)", check=one_of("ring", "fleet", "cost", "fleet-cost"))
        tie_holders: bool = setting(False, "step 3's tie when both candidates hold the same match, the longest any replica holds: among every replica holding as much (fleet ties only)")
        tie_near: bool = setting(True, "step 3's window compares only the replicas whose backlog is within the request's own prefill time of the least backlog")
        whole_key_block: bool = setting(True, "step 3: a match shorter than one key block, and not the whole prompt, counts as none")
        weak_share: float = setting(WEAK_SHARE, "step 3: a prompt its better candidate holds at most this share of goes to the fleet's cheapest replica (backlog plus its own prefill) when that one predicts it within slo_ttft / 2 (0: off)", check=at_least(0))
        overload: str = setting("share", "both candidates over the SLO: share (the rules above) or protect (the one whose backlog has been over the SLO for at least overload_wait_s takes it, so the other stays within the SLO)", check=one_of("share", "protect"))
        overload_draining: str = setting("keep", "overload=protect: a candidate whose backlog is lower than at its last sample at least overload_wait_s old (draining): keep (still takes the hopeless) or release (it does not)", check=one_of("keep", "release"))
        overload_wait_s: float = setting(3.0, "overload=protect: how long a candidate's backlog must have been over the SLO at every placement that saw it before it takes the hopeless", check=at_least(0))
        migrated_window: str = setting("new", "step 5's moves in step 3's window: new (a new prefix's prefill moves with it), move (every move's) or stay (none)", check=one_of(*MIGRATED_WINDOW_RULES))

    def __init__(self, options: RouterOptions) -> None:
        super().__init__(options)
        self.migrates = bool(self.option("migration"))  # type: ignore[misc]  # per-instance ablation
        self.migrates_to_neighbours = bool(self.option("neighbours"))  # type: ignore[misc]
        self.migration_work_limits, self.migration_added_work_slo_share = MIGRATION_RULES[str(self.option("migrate_to"))]  # type: ignore[misc]
        self.slo_switch = str(self.option("slo_switch"))
        self.follow_cache = bool(self.option("follow_cache"))
        self.spill = str(self.option("spill")) == "fleet"
        self.tie_fleet = str(self.option("tie")) in ("fleet", "fleet-cost")
        self.tie_cost = str(self.option("tie")) in ("cost", "fleet-cost")
        self.balance_ratio = float(self.option("balance_ratio"))
        window = float(self.option("tie_window_s"))
        self.placed = WindowLoad(window) if window > 0 else None
        self.tie_near = bool(self.option("tie_near"))
        self.tie_holders = bool(self.option("tie_holders"))
        self.whole_key_block = bool(self.option("whole_key_block"))
        self.weak_share = float(self.option("weak_share"))
        self.tokens_per_block = options.tokens_per_block
        self.migrated_window = str(self.option("migrated_window"))
        # step 3's window is used only while this router's own requests are most of the fleet's
        # work: (time, prompt tokens) it placed, and per replica (scrape time, prompt tokens the
        # engine was asked for) in the window
        self._own: deque[tuple[float, int]] = deque()
        self._engine: dict[ReplicaId, deque[tuple[float, int]]] = {}
        self._is_alone = False  # `_alone`'s verdict at the last new scrape (read by `choose`)
        self.slo = options.slo_ttft
        self.protect = str(self.option("overload")) == "protect"
        self.overload_wait_s = float(self.option("overload_wait_s"))
        self.release_draining = str(self.option("overload_draining")) == "release"
        # replica -> (time, backlog) each time it was a candidate, back to the last one at least overload_wait_s old
        self._backlog_history: dict[ReplicaId, deque[tuple[float, float]]] = {}
        self._over_slo_since: dict[ReplicaId, float] = {}  # replica -> since when every placement saw its backlog over the SLO
        self.key_depth = int(self.option("key_depth"))
        self.hot_share_fleet = str(self.option("hot_share")) == "fleet"
        self.keyer = PrefixKeyer(options, fixed_depth=self.key_depth)
        self.ring: native.DualRing | None = None
        self.switch_budget = options.slo_ttft * RESCUE_SLO_SHARE
        self.blocks_per_key = options.blocks_per_key_block
        # hot prefix (its boundary hash) -> (key, block hashes) of its last request, and the
        # shortest common prefix seen between two of its requests with different keys (or None)
        self._hot_tails: dict[int, tuple[int, np.ndarray, int | None]] = {}
        # prompts placed and not yet dispatched: last block hash -> (replica, request id), and
        # request id -> that hash
        self._queued: dict[int, tuple[int, str]] = {}
        self._queued_last: dict[str, int] = {}
        # request id -> (time, prefill tokens, a new prefix) step 3's window recorded for it, until it is dispatched
        self._placed_at: dict[str, tuple[float, int, bool]] = {}

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """Rebuild both rings over the new replicas (off the request path)."""
        self.ring = native.DualRing(list(replicas)) if replicas else None
        if self.hot_share_fleet and not self.key_depth and replicas:
            self._fit_hot_share(len(replicas))
        self._queued.clear()  # replica indices change with the membership
        self._over_slo_since = {name: t for name, t in self._over_slo_since.items() if name in replicas}
        self._backlog_history = {name: seen for name, seen in self._backlog_history.items() if name in replicas}
        if self.placed is not None:
            self.placed.keep(replicas)
        for name in [n for n in self._engine if n not in set(replicas)]:
            del self._engine[name]
        self._queued_last.clear()

    def _fit_hot_share(self, n: int) -> None:
        """`hot_share=fleet`: a prefix is hot (its key goes one block deeper) only when it holds
        more than one replica's fair share of the traffic, 1/N, and never less than the paper's
        share; the shrink share keeps the paper's ratio to it, and min_samples shrinks with it
        (`PrefixKeyer`), so a fresh router still expands a universal prefix after 2 requests and
        does not send its first requests all to the replica that cached it first. The window
        restarts when the share changes (a membership change)."""
        d = native.PREFIX_KEY_DEFAULTS
        expand = max(float(d["expand_share"]), 1.0 / n)
        if expand != self.keyer.table.expand_share:
            shrink = expand * float(d["shrink_share"]) / float(d["expand_share"])
            self.keyer = PrefixKeyer(self.options, fixed_depth=0, expand_share=expand, shrink_share=shrink)

    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Better-cached candidate, unless its predicted TTFT > slo/2 (then the other, if it is
        within slo/2); with `spill=fleet`, the fleet's fastest replica when both candidates would
        miss the SLO. A replica off the rings holding more of the prompt stands in for the
        worse-matched candidate (`follow_cache`)."""
        assert self.ring is not None, "on_membership must come before choose"
        key, depth, pending = self.keyer.peek(request)
        a, b = self.ring.candidates(key)
        if a == b:
            return Choice(a, branch="affinity", note=(pending, None))
        cached = view.cached_blocks(request)
        if self.whole_key_block:
            cached = self._from_one_key_block(cached, len(request.block_hashes))
        floor, tail = self._hot_floor(request, key, depth)
        ca, cb = max(0, int(cached[a]) - floor), max(0, int(cached[b]) - floor)
        if self.follow_cache:
            c = int(np.argmax(cached))
            cc = max(0, int(cached[c]) - floor)
            p, held = self._queued_prefix(request, floor + max(ca, cb, cc))
            if p is not None and p < len(view.replicas):  # an earlier turn still queued there
                c, cc = p, held - floor
            if cc > max(ca, cb):  # held off the rings (spilled or migrated there): replaces the worse candidate
                if ca <= cb:
                    a, ca = c, cc
                else:
                    b, cb = c, cc
        ta, tb = view.predicted_ttft(request, a), view.predicted_ttft(request, b)
        faster = a if ta <= tb else b
        if ca != cb and (floor + max(ca, cb)) * self.tokens_per_block <= self.weak_share * request.prompt_tokens:
            # held weakly (the hot prefix and a queued turn counted): placed by cost where there is room
            pick = self._cheapest(range(len(view.replicas)), request, view, a, b)
            if view.predicted_ttft(request, pick) <= self.switch_budget:
                return Choice(pick, _alternate(pick, a, b, view), branch="load", note=(pending, tail))
        if ca == cb:
            pool: Sequence[int] = (a, b)
            if self.tie_fleet and ca == 0:
                pool = range(len(view.replicas))
            elif self.tie_fleet and self.tie_holders and int(np.max(cached)) - floor <= ca:
                # both hold the longest match anyone holds: every replica holding as much is as good
                pool = [i for i in range(len(view.replicas)) if int(cached[i]) - floor >= ca]
            pick = self._least_loaded(pool, request, view, a, b)
            branch = "load"
        else:
            pick, branch = (a if ca > cb else b), "affinity"
            t_pick, t_other = (ta, tb) if pick == a else (tb, ta)
            budget = self.switch_budget
            if self.slo_switch == "paper" and t_pick > budget and t_other < t_pick:
                pick, branch = faster, "slo-switch"
            elif self.slo_switch in ("rescue", "balance") and t_pick > budget and t_other <= budget:
                pick, branch = (b if pick == a else a), "slo-switch"
            elif self.slo_switch == "balance" and t_other * self.balance_ratio < t_pick:
                pick, branch = (b if pick == a else a), "slo-switch"
        if self.protect:
            now = view.now
            backlog = {i: _backlog(view.replicas[i]) for i in (a, b)}
            for i in (a, b):
                name = view.replicas[i].name
                if backlog[i] <= self.slo:
                    self._over_slo_since.pop(name, None)
                else:
                    self._over_slo_since.setdefault(name, now)
                if self.release_draining:
                    seen = self._backlog_history.setdefault(name, deque())
                    seen.append((now, backlog[i]))
                    while len(seen) > 1 and seen[1][0] <= now - self.overload_wait_s:
                        seen.popleft()
            if min(ta, tb) > self.slo:
                slow = a if backlog[a] >= backlog[b] else b
                since = self._over_slo_since.get(view.replicas[slow].name, now)
                history = self._backlog_history.get(view.replicas[slow].name)
                draining = self.release_draining and history is not None and backlog[slow] < history[0][1]
                if now - since >= self.overload_wait_s and not draining:
                    return Choice(slow, b if slow == a else a, branch="load", note=(pending, tail))
        if self.spill and min(ta, tb) > self.slo:
            best = min(range(len(view.replicas)), key=lambda i: (view.predicted_ttft(request, i), i))
            if view.predicted_ttft(request, best) <= self.slo:
                return Choice(best, pick, branch="spill", note=(pending, tail))
        return Choice(pick, _alternate(pick, a, b, view), branch=branch, note=(pending, tail))

    def _from_one_key_block(self, cached: np.ndarray, prompt_blocks: int) -> np.ndarray:
        """Per replica, its match (router blocks) counted only from one whole key block, or the
        whole prompt when that is shorter (step 3, `whole_key_block`); shorter matches read 0."""
        return np.where(cached >= min(prompt_blocks, self.blocks_per_key), cached, 0)

    def _least_loaded(self, pool: Sequence[int], request: RoutingRequest, view: RouterView, a: int, b: int) -> int:
        """Step 3's tie rule over `pool`: the least prefill placed in the window among the
        replicas near the least backlog (`tie_near`), then the least backlog, requests owed,
        the candidates before others and `a` before `b` (or by cost with `tie=cost`)."""
        if self.tie_cost:
            return self._cheapest(pool, request, view, a, b)
        if self.placed is not None and self._is_alone:
            placed = self.placed
            if self.tie_near:  # the window decides among the replicas that would start it about as soon
                backlog = {i: _backlog(view.replicas[i]) for i in pool}
                least = min(backlog.values())
                pool = [i for i in pool if backlog[i] <= least + view.uncached_tokens(request, i) * view.replicas[i].prefill_seconds_per_token]
            return min(pool, key=lambda i: (placed.get(view.replicas[i].name), _backlog(view.replicas[i]), view.replicas[i].load, i not in (a, b), i != a))
        return min(pool, key=lambda i: (_backlog(view.replicas[i]), view.replicas[i].load, i not in (a, b), i != a))

    def _cheapest(self, pool: Sequence[int], request: RoutingRequest, view: RouterView, a: int, b: int) -> int:
        """The replica of `pool` with the least backlog plus the request's own uncached prefill
        there, both at the pool's mean per-token time; then requests owed, the candidates before
        others and `a` before `b` (`tie=cost` and step 3's weakly held prompts)."""
        t = sum(view.replicas[i].prefill_seconds_per_token for i in pool) / len(pool)
        cost = {i: _backlog(view.replicas[i]) + view.uncached_tokens(request, i) * t for i in pool}
        return min(pool, key=lambda i: (cost[i], view.replicas[i].load, i not in (a, b), i != a))

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """Count the request in the adaptive key's window, remember its hot-prefix tail and,
        until it is dispatched, where it is queued (once per placement, never for a retry)."""
        pending, tail = choice.note
        self.keyer.record(pending)
        if self.placed is not None:
            now = view.now
            self.placed.expire(now)
            cost = view.uncached_tokens(request, choice.replica)
            self.placed.add(view.replicas[choice.replica].name, now, cost)
            self._placed_at[request.request_id] = (now, cost, choice.branch == "load")
            if len(self._placed_at) > QUEUED_KEPT:
                del self._placed_at[next(iter(self._placed_at))]
            self._own.append((now, request.prompt_tokens))
            while self._own and self._own[0][0] < now - 2 * self.placed.window:
                self._own.popleft()
            if any([self._note_scrape(r, now) for r in view.replicas]):  # a new scrape: judge again
                self._is_alone = self._alone(view)
        if self.follow_cache and len(request.block_hashes):
            last = int(request.block_hashes[-1])
            self._queued.pop(last, None)
            self._queued[last] = (int(choice.replica), request.request_id)
            self._queued_last[request.request_id] = last
            if len(self._queued) > QUEUED_KEPT:
                del self._queued[next(iter(self._queued))]
            if len(self._queued_last) > QUEUED_KEPT:
                del self._queued_last[next(iter(self._queued_last))]
        if tail is not None:
            parent, entry = tail
            self._hot_tails.pop(parent, None)
            self._hot_tails[parent] = entry
            if len(self._hot_tails) > HOT_TAILS_KEPT:
                del self._hot_tails[next(iter(self._hot_tails))]

    def on_migrate(self, request: RoutingRequest, source: int, target: int, view: RouterView) -> None:
        """Hotspot migration moved the queued request: step 6 finds it waiting on the target, and
        step 3's window counts its prefill there from the time it was placed when it was a new
        prefix (`migrated_window`, step 5)."""
        placed = self._placed_at.get(request.request_id)
        if self.placed is not None and placed is not None and (self.migrated_window == "move" or (self.migrated_window == "new" and placed[2])):
            at, cost, new = placed  # new: placed by step 3's tie
            new_cost = view.uncached_tokens(request, target)
            self.placed.move(view.replicas[source].name, view.replicas[target].name, at, cost, new_cost)
            self._placed_at[request.request_id] = (at, new_cost, new)
        last = self._queued_last.get(request.request_id)
        if last is not None and last in self._queued:
            self._queued[last] = (int(target), request.request_id)

    def on_dispatch(self, request: RoutingRequest, replica: int, view: RouterView) -> None:
        """The request left its queue: the mirror holds its prefix from now on."""
        self._placed_at.pop(request.request_id, None)
        last = self._queued_last.pop(request.request_id, None)
        if last is not None:
            self._queued.pop(last, None)

    def _note_scrape(self, replica: ReplicaState, now: float) -> bool:
        """Remember the replica's `vllm:prefix_cache_queries_total` (prompt tokens it was asked
        to prefill, from every client) at each new scrape, for `_alone`; True for a new one."""
        m, at = replica.metrics, replica.metrics_at
        if m is None or at is None or self.placed is None:
            return False
        seen = self._engine.setdefault(replica.name, deque())
        new = not seen or seen[-1][0] != at
        if new:
            seen.append((at, m.prefix_cache_queries))
        while len(seen) > 1 and seen[1][0] <= now - self.placed.window:
            seen.popleft()
        return new

    def _alone(self, view: RouterView) -> bool:
        """Whether this router placed most of the prompt tokens the fleet was asked for in the
        window (at least `ALONE_SHARE` of them, counted in the replicas' own tokens), judged from
        the replicas' counters. Several pylb instances in front of one fleet each place a share
        of it; their placement windows would differ, so they break ties by backlog and ring order
        instead, which they compute alike. Without `ALONE_EVIDENCE_S` of scrapes yet: not alone.
        Judged in `on_choice` when a new scrape arrived (O(window) then), not per request."""
        engine, start, end = 0, math.inf, -math.inf
        for seen in self._engine.values():
            if len(seen) > 1:
                engine += max(0, seen[-1][1] - seen[0][1])
                start, end = min(start, seen[0][0]), max(end, seen[-1][0])
        if engine <= 0 or end - start < ALONE_EVIDENCE_S:
            return False
        own = sum(tokens for at, tokens in self._own if start < at <= end)  # placed over the same span
        return own * view.token_ratio >= ALONE_SHARE * engine

    def _queued_prefix(self, request: RoutingRequest, longer_than: int) -> tuple[int | None, int]:
        """(replica, blocks) of the longest prefix of the prompt, longer than `longer_than`
        blocks, that is a whole queued request's prompt (step 6's queued turn); (None, 0) if none."""
        if not self._queued:
            return None, 0
        hashes = request.block_hashes
        for k in range(len(hashes) - 1, longer_than - 1, -1):  # the prompt's own last block too
            hit = self._queued.get(int(hashes[k]))
            if hit is not None and hit[1] != request.request_id:  # (not itself, asked again)
                return hit[0], k + 1
        return None, 0

    def _hot_floor(self, request: RoutingRequest, key: int, depth: int) -> tuple[int, tuple | None]:
        """Router blocks at the start of the prompt that a hot prefix shared by many groups covers
        (step 3): the (depth - 1) key blocks above the key's own block, and the part of the key's
        own block that other groups under the same hot prefix share too, measured as the shortest
        common prefix of two requests with different keys under it. Pure: returns the floor and
        the entry that `on_choice` remembers for this request (None when there is no hot prefix)."""
        floor = max(0, depth - 1) * self.blocks_per_key
        if floor == 0:
            return 0, None
        hashes = request.block_hashes
        parent = int(hashes[floor - 1])  # the hot prefix: the key at depth - 1
        seen = self._hot_tails.get(parent)
        shared = None
        if seen is not None:
            last_key, last_hashes, shared = seen
            if last_key != key:  # another group: what the two share is the hot prefix's
                n = min(len(hashes), len(last_hashes))
                same = hashes[:n] == last_hashes[:n]  # chained hashes: equal up to the first difference
                if not same.all():  # (one prompt extending the other is one conversation, its key deeper now)
                    common = int(same.argmin())
                    shared = common if shared is None else min(shared, common)
        return (floor if shared is None else max(floor, shared)), (parent, (key, hashes, shared))
