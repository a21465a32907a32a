"""DualMap (pylb.router.policies.dualmap) and its prefix key (pylb.router.prefix): boundaries,
short keys, the affinity / load / SLO-switch branches, the ablation options, and key deepening
spreading Mooncake-like traffic."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from fake_fleet import FakeFleet, make_request
from policy_fakes import choose
from pylb import native
from pylb.router import registry
from pylb.router.core import CoreRouter
from pylb.router.interface import ReplicaMetrics, RouterOptions, RoutingRequest
from pylb.router.policies.consistent_hash import ConsistentHash
from pylb.router.policies.dualmap import DualMap
from pylb.router.policy import Choice, PolicyOptionError, ReplicaState
from pylb.router.prefix import PrefixKeyer, boundary_hashes, short_key

U64 = np.uint64


KEY_512 = {"key_block_tokens": 512}
"""The key-block size the mechanism tests below are written in: 32 router blocks (512 tokens) per
key block, so their hand-made hash arrays read as whole key blocks (the default is 64 tokens)."""


def rr(rid: str, hashes: Sequence[int], tokens: int | None = None, prompt_hash: int | None = None) -> RoutingRequest:
    h = np.array(hashes, dtype=U64)
    return RoutingRequest(rid, h, tokens if tokens is not None else 16 * len(h), 8, 0.0, prompt_hash=prompt_hash)


# ---- prefix key boundaries -----------------------------------------------------------------------


def test_boundaries_are_the_hashes_at_key_block_ends_plus_the_partial_tail() -> None:
    h = np.arange(1, 101, dtype=U64)  # 100 router blocks, K = 32: 3 full key blocks + 4 blocks
    assert boundary_hashes(h, 32).tolist() == [32, 64, 96, 100]
    assert boundary_hashes(h[:96], 32).tolist() == [32, 64, 96]  # ends on a boundary: no tail
    assert boundary_hashes(h[:40], 32).tolist() == [32, 40]  # one full key block: the tail keys it
    assert boundary_hashes(h[:31], 32).tolist() == []  # shorter than a key block
    assert boundary_hashes(h, 32, max_depth=2).tolist() == [32, 64]  # the cap drops the tail too
    assert boundary_hashes(h, 32, max_depth=4).tolist() == [32, 64, 96, 100]
    assert boundary_hashes(h, 32).flags.c_contiguous


def test_short_keys_are_pure_functions_of_the_prompt() -> None:
    assert short_key(rr("a", [5, 6, 7])) == 7
    assert short_key(rr("b", [], tokens=3, prompt_hash=1234)) == 1234
    k1, k2 = short_key(rr("c", [], tokens=3)), short_key(rr("d", [], tokens=3))
    assert k1 == k2 != short_key(rr("e", [], tokens=4))  # not the request id


def test_keyer_adaptive_and_fixed() -> None:
    o = RouterOptions(**KEY_512)
    fixed = PrefixKeyer(o, fixed_depth=2)
    h = np.arange(1, 101, dtype=U64)
    assert fixed.key(rr("x", h)) == (64, 2)
    assert fixed.key(rr("x", h[:40])) == (40, 2)  # the tail is the second boundary
    assert fixed.key(rr("x", h[:20])) == (20, 0)
    adaptive = PrefixKeyer(o)
    assert adaptive.key(rr("x", h)) == (32, 1)  # a cold table keys at depth 1
    assert adaptive.key(rr("y", h[:10])) == (10, 0)


def test_short_prompts_keep_one_key_per_conversation_with_the_default_key_block() -> None:
    """Default 64-token key blocks (4 router blocks): prompts of 12-20 router blocks (200-320
    tokens) under four hot 128-token group prompts are keyed by their conversation, so its turns
    keep one key (and two candidates) while two conversations of a group get different keys.
    With 512-token blocks the same prompts are shorter than one key block and each turn gets a
    key of its own (the whole prompt): why the default changed (BENCHMARKS.md)."""
    def prompt(conv: int, turn: int) -> np.ndarray:
        group = conv % 4
        return np.array([100 * group + j for j in range(1, 9)] + [1000 * conv + j for j in range(1, 5 + 4 * turn)], dtype=U64)

    for options, one_key in ((RouterOptions(), True), (RouterOptions(**KEY_512), False)):
        keyer = PrefixKeyer(options)
        for i in range(200):  # 50 conversations, 4 turns each, interleaved: every group prompt is hot
            keyer.key(rr(f"w{i}", prompt(i % 50, i // 50)))
        turns = [keyer.key(rr(f"c{t}", prompt(7, t))) for t in range(3)]
        other = keyer.key(rr("o", prompt(11, 0)))  # conversation 11: the same group as 7
        assert (len({k for k, _ in turns}) == 1) is one_key, options.key_block_tokens
        assert other[0] != turns[0][0]
    assert PrefixKeyer(RouterOptions()).max_depth == 128  # the deepest key is 8192 tokens at any size
    assert PrefixKeyer(RouterOptions(**KEY_512)).max_depth == 16


def test_key_deepens_under_a_universal_system_prompt() -> None:
    """Every prompt starts with the same key block; past min_samples it is hot, and keys move to depth 2."""
    o = RouterOptions(**KEY_512)
    keyer = PrefixKeyer(o)
    depths = []
    for i in range(100):
        h = np.concatenate([np.arange(1, 33, dtype=U64), np.arange(1000 * (i + 1), 1000 * (i + 1) + 40, dtype=U64)])
        depths.append(keyer.key(rr(f"r{i}", h))[1])
    assert depths[0] == 1 and depths[-1] == 2
    assert Counter(depths[30:]) == {2: 70}


# ---- the decision ------------------------------------------------------------------------------------


@dataclass
class View:
    """A literal RouterView: cached blocks and predicted TTFT per replica, as given."""

    cached: list[int]
    ttft: list[float]
    queued_tokens: list[int] | None = None
    inflight: list[int] | None = None
    options: RouterOptions = field(default_factory=RouterOptions)
    now: float = 0.0
    token_ratio: float = 1.0

    @property
    def replicas(self) -> list[ReplicaState]:
        n = len(self.cached)
        q, f = self.queued_tokens or [0] * n, self.inflight or [0] * n
        return [ReplicaState(f"r{i}", i, queued_tokens=q[i], inflight_requests=f[i], prefill_seconds_per_token=1e-3) for i in range(n)]

    def cached_blocks(self, request: RoutingRequest) -> np.ndarray:
        return np.array(self.cached, dtype=np.int64)

    def uncached_tokens(self, request: RoutingRequest, replica: int) -> int:
        return max(0, request.prompt_tokens - 16 * self.cached[replica])

    def predicted_ttft(self, request: RoutingRequest, replica: int) -> float:
        return self.ttft[replica]


def two_replica_dualmap(**extra: object) -> tuple[DualMap, int, int, RoutingRequest]:
    """A DualMap over two replicas, a request, and its candidates (a, b) on rings 0 and 1."""
    p = DualMap(RouterOptions(slo_ttft=5.0, extra=dict(extra)))
    p.on_membership(["r0", "r1"])
    req = rr("q", np.arange(1, 80, dtype=U64))
    key = p.keyer.key(req)[0]
    p.keyer = PrefixKeyer(p.options, fixed_depth=1)  # same key again, without touching the window
    a, b = p.ring.candidates(key)  # type: ignore[union-attr]
    assert {a, b} == {0, 1}
    return p, a, b, req


def test_affinity_picks_the_longer_match_within_the_budget() -> None:
    p, a, b, req = two_replica_dualmap()
    cached, ttft = [0, 0], [0.0, 0.0]
    cached[b], ttft[b], ttft[a] = 40, 2.4, 0.1  # b holds more and is slower, but under slo/2 = 2.5
    c = choose(p, req, View(cached, ttft))
    assert (c.replica, c.alternate, c.branch) == (b, a, "affinity")


def four_replica_dualmap(**extra: object) -> tuple[DualMap, int, int, int, RoutingRequest]:
    """A DualMap over four replicas, a request, its candidates (a, b), and a replica c off both rings."""
    p = DualMap(RouterOptions(slo_ttft=5.0, extra=dict(extra)))
    p.on_membership(["r0", "r1", "r2", "r3"])
    p.keyer = PrefixKeyer(p.options, fixed_depth=1)
    req = rr("q", np.arange(1, 80, dtype=U64))
    a, b = p.ring.candidates(p.keyer.key(req)[0])  # type: ignore[union-attr]
    c = min({0, 1, 2, 3} - {a, b})
    return p, a, b, c, req


def test_tie_holders_spreads_a_shared_match_over_every_replica_holding_it() -> None:
    """tie_holders: both candidates hold the same match and no replica holds more, so every
    replica holding as much is as good a home: the least backlogged of them takes it (here c,
    off the rings); a replica holding less is not in the pool; without the option, the two
    candidates only."""
    p, a, b, c, req = four_replica_dualmap(tie_holders=True, tie_window_s=0)
    d = ({0, 1, 2, 3} - {a, b, c}).pop()
    cached, queued = [40] * 4, [500] * 4
    cached[d], queued[c], queued[d] = 10, 100, 0  # d is idle but holds less
    choice = choose(p, req, View(cached, [1.0] * 4, queued))
    assert (choice.replica, choice.branch) == (c, "load") and choice.alternate in (a, b)
    queued[a], queued[b] = 900, 600  # placed off both rings: the alternate is the better-loaded candidate
    assert choose(p, req, View(cached, [1.0] * 4, queued)).alternate == b
    queued[a], queued[b] = 600, 900
    assert choose(p, req, View(cached, [1.0] * 4, queued)).alternate == a
    plain, pa, pb, pc, preq = four_replica_dualmap(tie_window_s=0)
    assert choose(plain, preq, View(cached, [1.0] * 4, queued)).replica in (pa, pb)


def test_follow_cache_takes_a_replica_off_the_rings_that_holds_more() -> None:
    p, a, b, c, req = four_replica_dualmap()
    cached, ttft = [0] * 4, [1.0] * 4
    cached[a], cached[c] = 10, 40  # a spill or migration left the conversation on c
    choice = choose(p, req, View(cached, ttft))
    assert (choice.replica, choice.branch) == (c, "affinity")
    assert choice.alternate == a  # c replaced b, the worse-matched candidate
    off, oa, ob, oc, oreq = four_replica_dualmap(follow_cache=False, weak_share=0)  # (10 of 79 blocks: weakly held)
    cached, ttft = [0] * 4, [1.0] * 4
    cached[oa], cached[oc] = 10, 40
    assert choose(off, oreq, View(cached, ttft)).replica == oa


def test_a_turn_follows_its_previous_turn_while_that_one_is_still_queued() -> None:
    p, a, b, c, first = four_replica_dualmap()
    cached, ttft = [0] * 4, [1.0] * 4
    cached[c] = 40  # an earlier conversation left 40 blocks of this prompt on c
    assert choose(p, first, View(cached, ttft)).replica == c  # choose + on_choice: queued on c
    nxt = rr("q2", np.arange(1, 100, dtype=U64))  # the next turn: the first turn's prompt + more
    empty = [0] * 4  # the mirror learns the first turn only when it is dispatched
    choice = choose(p, nxt, View(empty, ttft))
    assert (choice.replica, choice.branch) == (c, "affinity")
    p.on_dispatch(first, c, View(empty, ttft))  # dispatched: the mirror holds them from now on
    p.on_dispatch(nxt, c, View(empty, ttft))
    assert choose(p, rr("q3", np.arange(1, 100, dtype=U64)), View(empty, ttft)).branch == "load"
    off, _, _, oc, ofirst = four_replica_dualmap(follow_cache=False)
    cached = [0] * 4
    cached[oc] = 40
    assert choose(off, ofirst, View(cached, ttft)).replica != oc
    assert choose(off, rr("q2", np.arange(1, 100, dtype=U64)), View(empty, ttft)).branch == "load"


def test_the_hot_floor_ignores_two_turns_of_one_conversation() -> None:
    p = DualMap(RouterOptions(slo_ttft=5.0, **KEY_512))
    p.on_membership(["r0", "r1"])
    first = rr("t1", np.arange(1, 80, dtype=U64))
    later = rr("t2", np.arange(1, 120, dtype=U64))  # extends t1: the same conversation
    _, entry = p._hot_floor(first, key=11, depth=2)
    p.on_choice(first, Choice(0, 1, note=(None, entry)), View([0, 0], [0.0, 0.0]))
    floor, _ = p._hot_floor(later, key=22, depth=2)  # another key (it went deeper), same parent
    assert floor == 32  # the depth's own floor only: t1's 79 blocks are not a hot prefix's
    other = rr("o1", [*range(1, 40), *range(500, 560)])  # another group: shares 39 blocks
    floor, _ = p._hot_floor(other, key=33, depth=2)
    assert floor == 39


def test_spill_only_when_both_candidates_would_miss_the_slo() -> None:
    p, a, b, c, req = four_replica_dualmap(spill="fleet")
    cached, ttft = [0] * 4, [0.5] * 4
    cached[a], ttft[a], ttft[b], ttft[c] = 40, 6.0, 5.5, 0.2
    choice = choose(p, req, View(cached, ttft))
    assert (choice.replica, choice.alternate, choice.branch) == (c, a, "spill")
    ttft[b] = 4.9  # b would meet the SLO: no spill (and b is over slo/2, so no rescue either)
    assert choose(p, req, View(cached, ttft)).replica == a
    ttft[b] = 5.5
    ttft = [6.0 if i != c else 5.2 for i in range(4)]  # nowhere within the SLO: keep the cache
    assert choose(p, req, View(cached, ttft)).replica == a
    off, oa, ob, oc, oreq = four_replica_dualmap()  # the default: no spill
    cached, ttft = [0] * 4, [0.5] * 4
    cached[oa], ttft[oa], ttft[ob], ttft[oc] = 40, 6.0, 5.5, 0.2
    assert choose(off, oreq, View(cached, ttft)).replica == oa
    with pytest.raises(PolicyOptionError, match="spill='everywhere'"):
        registry.create("dualmap:spill=everywhere", RouterOptions())


def test_overload_protect_sends_the_hopeless_to_the_candidate_hopeless_for_long_enough() -> None:
    p, a, b, req = two_replica_dualmap(overload="protect")  # SLO 5 s, overload_wait_s 3 s
    cached, ttft, queued = [0, 0], [0.0, 0.0], [0, 0]
    cached[a], ttft[a], ttft[b] = 40, 6.0, 9.0  # both over the SLO; a holds the prompt
    queued[a], queued[b] = 5500, 8000  # backlogs 5.5 s and 8 s (1 ms per token): both over the SLO

    def at(now: float) -> Choice:
        return choose(p, req, View(cached, ttft, queued_tokens=queued, now=now))

    assert at(0.0).replica == a  # over the SLO only now: the rules above (affinity)
    assert at(2.9).replica == a
    c = at(3.0)  # b's backlog has been over the SLO for 3 s: it takes the hopeless
    assert (c.replica, c.alternate, c.branch) == (b, a, "load")
    ttft[a] = 4.0  # the request can still meet the SLO on a: not hopeless
    assert at(3.5).replica == a
    ttft[a], queued[b] = 6.0, 4000  # b's backlog fell within the SLO: its clock restarts
    assert at(4.0).replica == a
    queued[b] = 8000  # over again from the next placement that sees it
    assert at(5.0).replica == a and at(7.9).replica == a and at(8.0).replica == b
    share, sa, sb, sreq = two_replica_dualmap()  # the default: share
    cached, ttft, queued = [0, 0], [0.0, 0.0], [0, 0]
    cached[sa], ttft[sa], ttft[sb], queued[sa], queued[sb] = 40, 6.0, 9.0, 5500, 8000
    assert all(choose(share, sreq, View(cached, ttft, queued_tokens=queued, now=t)).replica == sa for t in (0.0, 10.0))
    with pytest.raises(PolicyOptionError, match="overload='drop'"):
        registry.create("dualmap:overload=drop", RouterOptions())


def test_overload_protect_release_lets_a_draining_sink_go() -> None:
    p, a, b, req = two_replica_dualmap(overload="protect", overload_draining="release")  # SLO 5 s, wait 3 s
    cached, ttft, queued = [0, 0], [0.0, 0.0], [0, 0]
    cached[a], ttft[a], ttft[b] = 40, 6.0, 9.0  # hopeless on both; a holds the prompt
    queued[a], queued[b] = 5500, 8000  # b's backlog 8 s, over the SLO from t = 0

    def at(now: float) -> Choice:
        return choose(p, req, View(cached, ttft, queued_tokens=queued, now=now))

    assert at(0.0).replica == a and at(1.5).replica == a
    queued[b] = 9000  # growing: after 3 s over the SLO it takes the hopeless, as with keep
    assert at(3.0).replica == b and at(4.0).replica == b
    queued[b] = 7000  # still over the SLO, but lower than 3 s ago (9 s at t = 3 or 4): draining
    assert at(6.5).replica == a
    keep, ka, kb, kreq = two_replica_dualmap(overload="protect")  # the default, keep: still the sink
    kcached, kttft, kqueued = [0, 0], [0.0, 0.0], [0, 0]
    kcached[ka], kttft[ka], kttft[kb], kqueued[ka], kqueued[kb] = 40, 6.0, 9.0, 5500, 9000
    for t in (0.0, 3.0, 4.0):
        choose(keep, kreq, View(kcached, kttft, queued_tokens=kqueued, now=t))
    kqueued[kb] = 7000
    assert choose(keep, kreq, View(kcached, kttft, queued_tokens=kqueued, now=6.5)).replica == kb
    queued[b] = 7500  # rising again over the last 3 s (7 s at 6.5): a sink once more
    assert at(9.6).replica == b
    p.on_membership(["r0"])  # a replica that leaves takes its history with it
    assert set(p._backlog_history) == {"r0"}
    with pytest.raises(PolicyOptionError, match="overload_draining='drop'"):
        registry.create("dualmap:overload=protect:overload_draining=drop", RouterOptions())


def test_slo_switch_when_the_affine_candidate_would_exceed_half_the_slo() -> None:
    p, a, b, req = two_replica_dualmap()  # the default rule: "rescue"
    cached, ttft = [0, 0], [0.0, 0.0]
    cached[b], ttft[b], ttft[a] = 40, 2.6, 1.0
    c = choose(p, req, View(cached, ttft))
    assert (c.replica, c.alternate, c.branch) == (a, b, "slo-switch")
    ttft[a] = 2.55  # faster, but over slo/2 too: switching would not rescue it; keep the cache
    assert choose(p, req, View(cached, ttft)).branch == "affinity"
    paper, pa, pb, preq = two_replica_dualmap(slo_switch="paper")  # the paper's rule switches anyway
    cached, ttft = [0, 0], [0.0, 0.0]
    cached[pb], ttft[pb], ttft[pa] = 40, 2.6, 2.55
    assert (choose(paper, preq, View(cached, ttft)).replica, choose(paper, preq, View(cached, ttft)).branch) == (pa, "slo-switch")
    ttft[pa] = 3.0  # the other one is slower still: stay
    assert choose(paper, preq, View(cached, ttft)).branch == "affinity"
    off, oa, ob, oreq = two_replica_dualmap(slo_switch="off")  # ablation: never switch
    cached, ttft = [0, 0], [0.0, 0.0]
    cached[ob], ttft[ob], ttft[oa] = 40, 9.0, 0.0
    assert choose(off, oreq, View(cached, ttft)).replica == ob
    with pytest.raises(PolicyOptionError, match="slo_switch='sometimes'"):
        DualMap(RouterOptions(extra={"slo_switch": "sometimes"}))


def test_a_cache_tie_goes_to_the_candidate_with_less_backlog_then_fewer_requests() -> None:
    """Without the placement window (tie_window_s=0), or with equal work placed in it."""
    p, a, b, req = two_replica_dualmap(tie_window_s=0)
    queued, inflight = [0, 0], [0, 0]
    queued[a], queued[b] = 700, 200
    c = choose(p, req, View([32, 32], [0.0, 0.0], queued, inflight))
    assert (c.replica, c.alternate, c.branch) == (b, a, "load")
    # both idle: the one owing fewer requests (decoding ones count), then ring 0's candidate
    inflight[a] = 3
    assert choose(p, req, View([32, 32], [0.9, 0.1], None, inflight)).replica == b
    assert choose(p, req, View([32, 32], [0.9, 0.1])).replica == a  # not noise in the TTFT estimate


def test_tie_cost_counts_the_uncached_part_of_the_prompt() -> None:
    """tie=cost: above the hot floor neither candidate holds more, but one holds the hot prefix
    below it; its own prefill is cheaper there, which outweighs a smaller backlog elsewhere up to
    that saving."""
    p, a, b, req = two_replica_dualmap(tie="cost")
    cached = [0, 0]
    cached[a] = 32  # all of the prompt's first 32 router blocks (16 tokens each): 512 tokens
    queued = [0, 0]
    queued[a] = 400  # less than the 512 tokens it saves
    view = View(cached, [0.0, 0.0], queued)
    view.cached_blocks = lambda request: np.zeros(2, dtype=np.int64)  # type: ignore[method-assign]  # a tie above the floor
    assert choose(p, req, view).replica == a
    queued[a] = 600  # more than it saves: the other candidate
    view2 = View(cached, [0.0, 0.0], queued)
    view2.cached_blocks = lambda request: np.zeros(2, dtype=np.int64)  # type: ignore[method-assign]
    assert choose(p, req, view2).replica == b
    plain, a2, b2, _ = two_replica_dualmap()  # the default compares backlog alone
    view3 = View(cached, [0.0, 0.0], [400 if i == a2 else 0 for i in range(2)])
    view3.cached_blocks = lambda request: np.zeros(2, dtype=np.int64)  # type: ignore[method-assign]
    assert choose(plain, req, view3).replica == b2


def test_hot_share_fleet_needs_a_replicas_fair_share_to_deepen_the_key() -> None:
    """hot_share=fleet (the default): with 2 replicas a prefix holding 25 % of the traffic is not hot (one
    replica carries 50 %), with 16 it is; the paper's share deepens it in both."""
    def depths(policy: DualMap, groups: int) -> Counter[int]:
        out: Counter[int] = Counter()
        for i in range(200):
            g = i % groups
            h = np.concatenate([np.arange(1 + 100 * g, 33 + 100 * g, dtype=U64), np.arange(10_000 * (i + 1), 10_000 * (i + 1) + 40, dtype=U64)])
            out[policy.keyer.key(rr(f"r{i}", h))[1]] += 1
        return out

    for n, deepens in ((2, False), (16, True)):
        fleet = DualMap(RouterOptions(**KEY_512))  # the default hot share
        fleet.on_membership([f"r{i}" for i in range(n)])
        assert fleet.keyer.table.expand_share == pytest.approx(max(0.0612, 1 / n))
        assert (depths(fleet, 4)[2] > 100) is deepens, n
        paper = DualMap(RouterOptions(extra={"hot_share": "paper"}, **KEY_512))
        paper.on_membership([f"r{i}" for i in range(n)])
        assert depths(paper, 4)[2] > 100


def test_a_fresh_router_expands_a_universal_prefix_after_two_requests_at_any_fleet_size() -> None:
    """hot_share=fleet raises the expansion share to 1/N; min_samples shrinks with it, so that while
    the window fills a prefix still expands once two requests hold it (as at the paper's share).
    Before, a fresh 2-replica router keyed its first 10 prompts under a universal system prompt by
    that prompt alone, and the mirror sent them all to the replica that cached it first."""
    for n, samples in ((2, 4), (4, 8), (8, 16), (32, 20)):
        p = DualMap(RouterOptions())
        p.on_membership([f"r{i}" for i in range(n)])
        assert p.keyer.table.min_samples == samples, n
        depths = []
        for i in range(3):  # a universal 8-key-block system prompt, then a question of its own
            h = np.concatenate([np.arange(1, 33, dtype=U64), np.arange(1000 * (i + 1), 1000 * (i + 1) + 8, dtype=U64)])
            depths.append(p.keyer.key(rr(f"r{i}", h))[1])
        assert depths[0] == 1 and depths[2] == 9, (n, depths)  # past the system prompt from the third request


def test_a_tie_goes_where_the_least_work_was_placed_in_the_window() -> None:
    """tie_window_s (default 60 s): new prefix groups are spread by the prefill work placed on
    each replica in the window, before the instantaneous backlog (0 everywhere at low load)."""
    p, a, b, req = two_replica_dualmap()
    p._is_alone = True  # (judged from scrapes: next test)
    idle = View([0, 0], [0.0, 0.0])
    first = choose(p, req, idle)  # (records it: its work, all of its tokens, is placed there)
    other = rr("q2", np.arange(500, 580, dtype=U64))
    assert choose(p, other, idle).replica != first.replica
    late = View([0, 0], [0.0, 0.0], now=61.0)  # a window later the first placement is forgotten
    p.on_choice(other, Choice(first.replica, None, note=(None, None)), late)
    assert p.placed is not None and p.placed.get(f"r{first.replica}") == other.prompt_tokens
    off = DualMap(RouterOptions(extra={"tie_window_s": 0}))
    off.on_membership(["r0", "r1"])
    assert off.placed is None


def test_tie_near_lets_the_window_choose_only_among_replicas_that_would_start_the_request_about_as_soon() -> None:
    """tie_near (on by default): a replica whose backlog exceeds the least backlog by more than the request's own
    prefill is left out of the window's comparison (the window would send the request behind it)."""
    for near in (False, True):
        p, a, b, req = two_replica_dualmap(tie_near=near)
        p._is_alone = True
        assert p.placed is not None
        p.placed.add(f"r{b}", 0.0, 5000)  # b got more work in the window: the window prefers a
        own = req.prompt_tokens  # 1,264 tokens at 1 ms each: 1.26 s of its own prefill
        queued = [0, 0]
        queued[a] = own + 100  # a's backlog is more than that ahead of b's (0)
        assert choose(p, req, View([0, 0], [0.0, 0.0], queued)).replica == (b if near else a)
        queued[a] = own - 100  # within it: the window decides
        assert choose(p, req, View([0, 0], [0.0, 0.0], queued)).replica == a


@dataclass
class ScrapedView(View):
    """A View whose replicas carry a scrape: `queries` prompt tokens asked of each, seen at `now`."""

    queries: list[int] = field(default_factory=list)

    @property
    def replicas(self) -> list[ReplicaState]:
        return [
            ReplicaState(f"r{i}", i, metrics=ReplicaMetrics(0, 0, 0.0, q, 0, 16, 1000), metrics_at=self.now, prefill_seconds_per_token=1e-3)
            for i, q in enumerate(self.queries)
        ]


def test_the_window_is_used_only_while_this_router_places_most_of_the_fleets_work() -> None:
    """Several pylb instances each place a share of the fleet's work; judged from the replicas'
    counters, an instance that placed less than ALONE_SHARE of the prompt tokens over at least
    ALONE_EVIDENCE_S seconds of scrapes breaks ties without its window, as the others do."""
    req = rr("q", np.arange(1, 80, dtype=U64))  # 79 blocks of 16 tokens: 1,264 tokens

    def alone_after(second_scrape: list[int], at: float) -> bool:
        p = DualMap(RouterOptions())
        p.on_membership(["r0", "r1"])
        p.on_choice(req, Choice(0, 1, note=(None, None)), ScrapedView([0, 0], [0.0, 0.0], now=0.0, queries=[0, 0]))
        p.on_choice(req, Choice(0, 1, note=(None, None)), ScrapedView([0, 0], [0.0, 0.0], now=at, queries=second_scrape))
        return p._alone(ScrapedView([0, 0], [0.0, 0.0], now=at, queries=second_scrape))

    assert alone_after([1264, 0], at=3.0)  # the replicas were asked for what this router placed
    assert not alone_after([1264, 1264], at=3.0)  # twice that: another router placed as much
    assert not alone_after([1264, 0], at=1.0)  # too short a span to judge
    assert not DualMap(RouterOptions())._alone(View([0, 0], [0.0, 0.0]))  # no scrapes at all


def test_the_hot_floor_ignores_a_universal_prefix() -> None:
    """Depth-2 key: a candidate holding only the first (hot, universal) key block is no better
    than an empty one; one holding more of the prompt is."""
    p = DualMap(RouterOptions(slo_ttft=5.0, extra={"key_depth": 2}, **KEY_512))
    p.on_membership(["r0", "r1"])
    req = rr("q", np.arange(1, 80, dtype=U64))
    a, b = p.ring.candidates(64)  # type: ignore[union-attr]  # the depth-2 key: boundary h[63] = 64
    cached = [0, 0]
    cached[b] = 32
    assert choose(p, req, View(cached, [0.0, 0.0])).branch == "load"
    cached[b] = 40
    c = choose(p, req, View(cached, [0.0, 0.0]))
    assert (c.replica, c.branch) == (b, "affinity")


def test_a_match_shorter_than_one_key_block_counts_as_none() -> None:
    """A prefix every prompt starts with that ends inside the first key block (4 router blocks
    by default) is no reason to prefer its holder; one whole key block is, and so is a whole
    prompt shorter than a key block. whole_key_block=false counts every block. (weak_share=0:
    4 of the prompt's 79 blocks would otherwise be a weakly held prompt, placed by cost.)"""
    p, a, b, req = two_replica_dualmap(weak_share=0)
    cached = [0, 0]
    cached[b] = 3
    assert choose(p, req, View(cached, [0.0, 0.0])).branch == "load"
    cached[b] = 4
    assert choose(p, req, View(cached, [0.0, 0.0])).branch == "affinity"
    short = rr("s", [1, 2, 3])
    assert choose(p, short, View([3, 0], [0.0, 0.0])).replica == 0
    assert choose(p, short, View([0, 3], [0.0, 0.0])).replica == 1
    p, a, b, req = two_replica_dualmap(whole_key_block=False, weak_share=0)
    cached = [0, 0]
    cached[b] = 1
    c = choose(p, req, View(cached, [0.0, 0.0]))
    assert (c.replica, c.branch) == (b, "affinity")


def test_one_replica_has_no_alternate() -> None:
    p = DualMap(RouterOptions())
    p.on_membership(["only"])
    c = choose(p, rr("q", [1, 2, 3]), View([0], [9.0]))
    assert (c.replica, c.alternate) == (0, None)


def test_ablation_options() -> None:
    assert DualMap(RouterOptions()).migrates is True
    assert DualMap(RouterOptions(extra={"migration": False})).migrates is False
    assert DualMap(RouterOptions(extra={"key_depth": 3})).keyer.fixed_depth == 3
    assert "dualmap:migration=false" not in registry.names()  # ablations are specs, not policies


@pytest.mark.parametrize(
    ("migrate_to", "limits", "share"),
    [(None, (1.0, math.inf), 0.5), ("spare", (1.0, math.inf), 0.5), ("any", (math.inf,), 1.0), ("holders", (1.0,), 1.0), ("bounded", (1.0, 2.0), 0.5)],
)
def test_migrate_to_sets_the_cores_migration_rule(migrate_to: str | None, limits: tuple[float, ...], share: float) -> None:
    """The default is spare: holders first, then a move that adds work only within half the SLO."""
    p = DualMap(RouterOptions(extra={} if migrate_to is None else {"migrate_to": migrate_to}))
    assert (p.migration_work_limits, p.migration_added_work_slo_share) == (limits, share)


def test_migrate_to_refuses_an_unknown_rule_by_name() -> None:
    with pytest.raises(PolicyOptionError, match="migrate_to='nearest'"):
        registry.create("dualmap:migrate_to=nearest", RouterOptions())


# ---- spreading Mooncake-like traffic ------------------------------------------------------------------


def mooncake_like(n: int, seed: int = 0) -> list[RoutingRequest]:
    """Every prompt: the same 512-token system block, then one of 400 conversations (Zipf-ish
    popularity; one holds ~10 % of the traffic), then a unique tail. 11 % have no second full key block."""
    rng = np.random.default_rng(seed)
    system = b"<system>".ljust(2048, b"s")
    weights = 1.0 / np.arange(1, 401) ** 1.1
    weights /= weights.sum()
    out = []
    for i in range(n):
        tail = f"<turn {i}>".encode().ljust(int(rng.integers(64, 2000)), b"t")
        if rng.random() < 0.11:
            text = system + tail[:1000]
        else:
            conv = int(rng.choice(400, p=weights))
            text = system + f"<conv {conv}>".encode().ljust(2048 * int(1 + conv % 3), b"c") + tail
        out.append(make_request(f"m{i}", text, i * 0.05))
    return out


def candidate_spread(policy: DualMap | ConsistentHash, reqs: list[RoutingRequest]) -> Counter[int]:
    placed: Counter[int] = Counter()
    for r in reqs:
        key = policy.keyer.key(r)[0]
        assert policy.ring is not None
        a, b = policy.ring.candidates(key)
        placed[a] += 1
        placed[b] += 1
    return placed


def test_key_deepening_spreads_mooncake_like_traffic() -> None:
    reqs = mooncake_like(2000)
    names = [f"r{i}" for i in range(8)]
    adaptive = DualMap(RouterOptions())
    adaptive.on_membership(names)
    shallow = DualMap(RouterOptions(extra={"key_depth": 1}))
    shallow.on_membership(names)
    spread = candidate_spread(adaptive, reqs)
    stuck = candidate_spread(shallow, reqs)
    assert len(stuck) == 2  # depth 1 = the system prompt: everything on the same two replicas
    assert len(spread) == 8
    hottest_share = max(spread.values()) / (2 * len(reqs))
    assert hottest_share < 0.25, spread  # an even spread would be 1/8 = 0.125
    # the most popular conversation (~10 %) is hot enough to deepen its own key past depth 2
    assert adaptive.keyer.table.expanded_count >= 2


def test_dualmap_keeps_conversations_together_and_balances_in_a_run() -> None:
    reqs = mooncake_like(600)
    router = registry.create("dualmap", RouterOptions(slo_ttft=2.0))
    assert isinstance(router, CoreRouter)
    fleet = FakeFleet(router, [f"r{i}" for i in range(4)], prefill_tps=60_000.0).run(reqs)
    assert not fleet.undispatched
    per_replica = Counter(name for _, _, name in fleet.dispatches)
    assert max(per_replica.values()) / len(reqs) < 0.4  # 4 replicas: 0.25 is even
    hit = sum(u.cached_tokens for u in fleet.completed.values() if u) / sum(r.prompt_tokens for r in reqs)
    rr_fleet = FakeFleet(registry.create("round-robin"), [f"r{i}" for i in range(4)], prefill_tps=60_000.0).run(reqs)
    rr_hit = sum(u.cached_tokens for u in rr_fleet.completed.values() if u) / sum(r.prompt_tokens for r in reqs)
    assert hit > rr_hit
    assert sum(router.decisions.values()) >= len(reqs)


@pytest.mark.parametrize(
    "spec", ["dualmap", "dualmap:migration=false", "dualmap:slo_switch=paper", "dualmap:slo_switch=off", "dualmap:key_depth=2", "dualmap:overload=protect"]
)
def test_ablations_run(spec: str) -> None:
    fleet = FakeFleet(registry.create(spec), ["a", "b", "c"], prefill_tps=20_000.0).run(mooncake_like(200, seed=2))
    assert not fleet.undispatched and not fleet.idle_violations
    router = fleet.router
    assert isinstance(router, CoreRouter)
    if "migration=false" in spec:
        assert router.migrations == 0


def test_native_ring_is_the_candidate_source() -> None:
    p = DualMap(RouterOptions())
    p.on_membership(["a", "b", "c"])
    ring = native.DualRing(["a", "b", "c"])
    for key in (1, 2**40, 12345):
        assert p.ring.candidates(key) == ring.candidates(key)  # type: ignore[union-attr]


def test_keys_spread_the_real_mooncake_trace(mooncake_trace) -> None:  # noqa: ANN001
    """On the Mooncake conversation trace (every prompt starts with the same 512-token block),
    the adaptive key spreads the candidate slots over 8 replicas; a depth-1 key would use two."""
    from pylb.sim.cluster import prepare_workload
    from pylb.workload.mooncake import load_mooncake

    w = prepare_workload(load_mooncake(mooncake_trace, limit=4000), 16)
    reqs = [RoutingRequest(r.request_id, r.router_hashes, r.prompt_tokens, r.output_tokens, r.arrival_s) for r in w]
    names = [f"r{i}" for i in range(8)]
    adaptive, shallow = DualMap(RouterOptions()), DualMap(RouterOptions(extra={"key_depth": 1}))
    adaptive.on_membership(names)
    shallow.on_membership(names)
    spread, stuck = candidate_spread(adaptive, reqs), candidate_spread(shallow, reqs)
    assert len(stuck) == 2
    assert max(spread.values()) / (2 * len(reqs)) < 1.25 / 8, spread
    depths = adaptive.keyer.table.depth_counts()
    assert depths[2:].sum() >= 0.8 * depths.sum()  # keys settle past the universal block


def test_a_turn_follows_its_previous_turn_where_migration_moved_it() -> None:
    """Step 6 remembers where a queued turn waits; when hotspot migration moves it, the next
    turn follows it to its new replica, not to the one it left."""
    p, a, b, c, first = four_replica_dualmap()
    cached, ttft = [0] * 4, [1.0] * 4
    cached[c] = 40
    assert choose(p, first, View(cached, ttft)).replica == c  # queued on c
    d = min({0, 1, 2, 3} - {c})
    p.on_migrate(first, c, d, View(cached, ttft))  # the core moved it to d while it was queued
    nxt = rr("q2", np.arange(1, 100, dtype=U64))
    choice = choose(p, nxt, View([0] * 4, ttft))
    assert (choice.replica, choice.branch) == (d, "affinity")


@pytest.mark.parametrize("rule", ["new", "move", "stay"])
def test_the_window_moves_a_migrated_new_prefix_with_it(rule: str) -> None:
    """Step 3's window counts a new prefix's prefill where hotspot migration moved it (its
    cache, so its group's home, will be there: `migrated_window=new`, the default); a request
    placed for its cache stays counted on its group's home. "move" moves both, "stay" neither."""
    p, a, b, c, req = four_replica_dualmap(migrated_window=rule)
    ttft = [1.0] * 4
    empty = View([0] * 4, ttft)
    new = choose(p, req, empty)
    assert new.branch == "load" and p.placed is not None
    here, there = new.replica, min({0, 1, 2, 3} - {new.replica})
    assert p.placed.get(f"r{here}") == req.prompt_tokens
    p.on_migrate(req, here, there, empty)
    moved = rule in ("new", "move")
    assert (p.placed.get(f"r{here}"), p.placed.get(f"r{there}")) == ((0, req.prompt_tokens) if moved else (req.prompt_tokens, 0))
    p.placed.expire(60.5)  # it leaves the window when it would have where it was first counted
    assert p.placed.get(f"r{here}") == p.placed.get(f"r{there}") == 0
    p.on_dispatch(req, there, empty)
    cached = [0] * 4
    cached[c] = 40  # a turn placed for its cache on c (640 of its 1,264 tokens held there)
    turn = rr("t", np.arange(1, 80, dtype=U64))
    placed = choose(p, turn, View(cached, ttft, now=61.0))
    assert (placed.replica, placed.branch) == (c, "affinity") and p.placed.get(f"r{c}") == 624
    d = min({0, 1, 2, 3} - {c})
    p.on_migrate(turn, c, d, View(cached, ttft, now=61.0))
    assert (p.placed.get(f"r{c}"), p.placed.get(f"r{d}")) == ((0, 1264) if rule == "move" else (624, 0))


def test_a_weakly_held_prompt_goes_where_backlog_plus_its_own_prefill_is_least_if_there_is_room() -> None:
    """A candidate holding at most half of the prompt (weak_share, the hot prefix and a queued
    turn counted) holds it weakly: the prompt goes to the fleet's replica with the least backlog
    plus its own uncached prefill, if that one predicts it within slo_ttft / 2; else as before."""
    p, a, b, c, req = four_replica_dualmap()  # the prompt: 79 blocks of 16 tokens
    d = ({0, 1, 2, 3} - {a, b, c}).pop()
    cached, ttft = [0] * 4, [1.0] * 4
    cached[a] = 39  # under half of it
    queued = [0] * 4
    queued[a] = 700  # 0.7 s of backlog at 1 ms per token: more than the 624 tokens a saves
    queued[b] = queued[c] = 100
    choice = choose(p, req, View(cached, ttft, queued))
    assert (choice.replica, choice.branch) == (d, "load")  # idle d: 0 + 1,264 tokens < 700 + 640
    assert choice.alternate == b  # the better-loaded candidate
    queued[a] = 500  # now a is cheapest: 500 + 640 < 1,264
    assert (choose(p, req, View(cached, ttft, queued)).replica, choose(p, req, View(cached, ttft, queued)).branch) == (a, "load")
    queued[a] = 700
    assert choose(p, req, View(cached, [3.0] * 4, queued)).replica == a  # no room anywhere (> slo / 2): the holder
    cached[a] = 40  # more than half: held, affinity as before
    assert choose(p, req, View(cached, ttft, queued)).branch == "affinity"
    off, oa, *_ = four_replica_dualmap(weak_share=0)
    cached = [0] * 4
    cached[oa] = 39
    assert choose(off, req, View(cached, ttft, queued)).branch == "affinity"
