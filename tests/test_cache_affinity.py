"""Near-miss routing: a cache miss whose nearest neighbour scores at least `cache.near_threshold`
goes to the replica that answered that neighbour (`RoutingRequest.affinity_hint`), when that
replica is a member and not hot; otherwise the policy's choice stands.

The core's rule on literal cases, then end to end: real sockets, fake vLLM replicas, round-robin
(which would alternate replicas without the hint)."""

from __future__ import annotations

from typing import Any

import openai

from policy_fakes import core, req
from proxy_support import MODEL, fake_fleet, running_proxy, scrape, settings, value, wait_for

# ---- the core's rule -------------------------------------------------------------------------------


def test_the_core_honours_a_hint_to_a_member_that_is_not_hot() -> None:
    r = core(3)
    q = req("0/a")
    q.affinity_hint = "r2"
    r.submit(q, 0.0)
    e = r._entries["0/a"]
    assert (e.replica, e.alternate) == (2, 0)  # the policy's choice becomes the alternate
    assert r.hints["honoured"] == 1
    [d] = r.poll(0.0)
    assert d.replica == "r2" and d.branch == "affinity"


def test_the_core_ignores_unknown_same_and_hot_hints() -> None:
    r = core(2, prefill_seconds_per_token=1e-3, slo_ttft=1.0, max_unprefilled_requests=1)
    unknown = req("0/unknown")
    unknown.affinity_hint = "http://gone:1"
    same = req("0/same")
    same.affinity_hint = "r0"
    r.submit(unknown, 0.0)
    r.submit(same, 0.0)
    assert [r._entries[i].replica for i in ("0/unknown", "0/same")] == [0, 0]
    # r1 turns hot: 3000 tokens queued behind a request in flight at 1 ms per token > 1 s SLO
    r.submit(req("1/busy", tokens=10), 0.0)
    r.poll(0.0)
    r.submit(req("1/big", tokens=3000), 0.0)
    assert r.replica_ttft(1) > 1.0
    hot = req("0/hot")
    hot.affinity_hint = "r1"
    r.submit(hot, 0.0)
    assert r._entries["0/hot"].replica == 0
    assert dict(r.hints) == {"unknown": 1, "same": 1, "hot": 1}


# ---- end to end ------------------------------------------------------------------------------------

BASE = "Explain how the quicksort algorithm partitions an array around its pivot"
VARIANTS = [BASE + suffix for suffix in (", briefly", " in detail", ", with an example", " for a beginner")]


async def ask(c: openai.AsyncOpenAI, query: str) -> tuple[str, str]:
    """(x-pylb-cache, x-pylb-replica) of a chat request."""
    raw = await c.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": query}], temperature=0, max_tokens=16
    )
    return raw.headers["x-pylb-cache"], raw.headers["x-pylb-replica"]


async def replicas_of_near_misses(near: float) -> tuple[str, list[str], Any]:
    async with fake_fleet(2) as fleet:
        s = settings([f.url for f in fleet], cache__enabled=True, cache__threshold=0.999, cache__near_threshold=near, cache__batch_window_ms=0.0)
        async with running_proxy(s) as proxy:
            c = openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="alice", max_retries=0, timeout=10)
            async with c:
                result, first = await ask(c, BASE)
                assert result == "miss"
                await wait_for(lambda: proxy.cache.store.searchable() == 1, what="the first answer stored with its vector")
                seen = []
                for v in VARIANTS:
                    result, replica = await ask(c, v)
                    assert result == "miss"  # below the hit threshold: answered by a replica
                    seen.append(replica)
            return first, seen, await scrape(proxy)


async def test_near_misses_go_to_the_replica_that_answered_their_neighbour() -> None:
    first, seen, m = await replicas_of_near_misses(0.5)
    assert seen == [first] * len(VARIANTS)
    assert value(m, "pylb_cache_near_misses_total", model=MODEL) == len(VARIANTS)


async def test_without_near_threshold_the_policy_decides() -> None:
    first, seen, m = await replicas_of_near_misses(0.0)
    assert set(seen) != {first}  # round-robin alternates
    assert not m.get("pylb_cache_near_misses_total")
