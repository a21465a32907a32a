"""The verified threshold policy (`pylb.cache.verified`) and the cache's verification of hits.

The learner on its own (few labels explore, many correct labels exploit, wrong labels stop the
hits; the model's pooled labels decide for an entry without its own, and its own wrong labels
overrule them), the answer comparison, the proxy's two label sources with real sockets (an exploration
answers with the replica's answer and labels the candidate; a served hit re-run on an idle
replica that answers differently drops its entry; a hung re-run is cancelled when pylb stops),
and the settings' checks."""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from aiohttp import web

from pylb.cache.embedders import HashingEmbedder
from pylb.cache.quality import evaluate_stream, load_pairs
from pylb.cache.verified import BIN, ENTRY_SPREAD, MAX_POOLED, PRIOR_COV, PRIOR_FIT, PRIOR_MEAN, Labels, Pool, VerifiedPolicy, answer_text, fit_counts, fit_logistic, same_answer
from pylb.config import ConfigError, load_settings

from proxy_support import MODEL, ScriptedReplica, running_proxy, scrape, settings, value, wait_for

SYSTEM = {"role": "system", "content": "be brief"}
Q1 = "What is the capital of France?"
Q2 = "what is the capital of France"  # the same words: similarity ~0.9 with the hashing embedder, every guard passes


# ---- the learner -------------------------------------------------------------------------------------


def labels(*obs: tuple[float, bool, int]) -> Labels:
    """Labels from (similarity, correct, how many) triples."""
    out = Labels()
    for s, c, n in obs:
        for _ in range(n):
            out.add(s, c)
    return out


def test_without_labels_or_with_few_it_explores() -> None:
    p = VerifiedPolicy(0.01)
    assert p.error_bound(None, 0.95) > 0.9
    assert p.exploit_probability(None, 0.95) < 0.012
    for n in (1, 2):
        assert p.exploit_probability(labels((0.95, True, n)), 0.95) < 0.02
    p.rng = random.Random(7)
    explored = sum(not p.exploit(None, 0.95) for _ in range(2000))
    assert explored > 1950  # about 1 % exploited: delta's budget, spent


def test_many_correct_labels_at_s_exploit_at_s_only() -> None:
    p = VerifiedPolicy(0.05)
    learned = labels((0.93, True, 150))
    assert p.exploit_probability(learned, 0.93) == 1.0
    assert p.exploit_probability(learned, 0.96) == 1.0  # more similar than what was labelled: no worse
    assert p.exploit_probability(learned, 0.80) < 0.5  # far below the labels: still unsure
    assert all(p.exploit(learned, 0.93) for _ in range(100))
    # at delta 0.01 the 256 labels kept give a bound near 0.017: exploited more often than not
    strict = VerifiedPolicy(0.01)
    assert 0.5 < strict.exploit_probability(labels((0.93, True, 300)), 0.93) < 1.0


def test_wrong_labels_stop_the_hits() -> None:
    p = VerifiedPolicy(0.05)
    learned = labels((0.93, True, 150))
    bounds = [p.error_bound(learned, 0.93)]
    for _ in range(10):  # each wrong label raises the bound; 10 in 160 (6 %) is over delta
        learned.add(0.93, False)
        bounds.append(p.error_bound(learned, 0.93))
    assert bounds == sorted(bounds) and bounds[0] < 0.05 < bounds[-1]
    assert p.exploit_probability(learned, 0.93) < 0.5
    bad = labels((0.95, False, 5))
    assert p.error_bound(bad, 0.95) > 0.9 and p.exploit_probability(bad, 0.95) < 0.06
    assert bad.wrong == 5


def test_the_fit_is_finite_and_sane_for_zero_to_two_labels() -> None:
    assert PRIOR_FIT.p_correct(0.9) == pytest.approx(0.5)
    for obs in ([], [(0.9, 1.0)], [(0.9, 0.0)], [(0.9, 1.0), (0.91, 1.0)], [(0.9, 1.0), (0.9, 0.0)]):
        s = np.array([o[0] for o in obs])
        y = np.array([o[1] for o in obs])
        f = fit_logistic(s, y)
        assert np.all(np.isfinite(f.mean)) and np.all(np.isfinite(f.cov)) and np.all(np.linalg.eigvalsh(f.cov) > 0)
        assert 0.0 < f.error_bound(0.95) < 1.0
    # separable data far from the prior: the maximum likelihood estimate would diverge, the MAP does not
    f = fit_logistic(np.array([0.5] * 20 + [0.99] * 20), np.array([0.0] * 20 + [1.0] * 20))
    assert np.all(np.isfinite(f.mean)) and 0.5 < f.threshold() < 0.99
    assert fit_logistic(np.array([0.99] * 20), np.zeros(20)).threshold() > 0.99  # all wrong: P(correct) = 1/2 only above the labels, or never
    labelled = labels((0.9, True, 300))
    assert len(labelled) == 256  # bounded: the oldest go


# ---- the pool: labels shared by the entries of a model ---------------------------------------------


def teach(p: VerifiedPolicy, model: str, s: float, correct: int, wrong: int = 0, entries: int = 50) -> list[Labels]:
    """`correct` and `wrong` labels at `s`, recorded on `entries` other entries of `model` (round robin)."""
    others = [Labels() for _ in range(entries)]
    for i, c in enumerate([True] * correct + [False] * wrong):
        p.record(others[i % entries], s, c, model)
    return others


def test_an_entry_without_labels_exploits_once_the_pool_says_s_is_safe() -> None:
    p = VerifiedPolicy(0.05)
    assert p.exploit_probability(None, 0.95, "m") < 0.06  # an empty pool: the wide prior, as without one
    teach(p, "m", 0.95, 300)
    assert p.exploit_probability(None, 0.95, "m") == 1.0
    assert p.exploit_probability(Labels(), 0.97, "m") == 1.0  # an entry whose labels were all dropped: the same
    assert p.exploit_probability(None, 0.80, "m") < 0.5  # far below what the pool saw: still unsure
    assert p.exploit_probability(None, 0.95, "other") < 0.06  # another model's pool is its own
    assert p.exploit_probability(None, 0.95) < 0.06  # no model: the entry's own labels only
    # an unlabelled entry is not the pool: its spread keeps it more careful than the pooled curve itself
    assert p.error_bound(None, 0.95, "m") > p.pools["m"].fit().error_bound(0.95)
    strict = VerifiedPolicy(0.01)
    teach(strict, "m", 0.95, 300)
    assert 0.2 < strict.exploit_probability(None, 0.95, "m") < 1.0  # 300 labels: not yet enough for delta 0.01
    teach(strict, "m", 0.95, MAX_POOLED)
    assert strict.exploit_probability(None, 0.95, "m") == 1.0
    unpooled = VerifiedPolicy(0.05, pooled=False)
    teach(unpooled, "m", 0.95, 300)
    assert not unpooled.pools and unpooled.exploit_probability(None, 0.95, "m") < 0.06


def test_wrong_pooled_labels_stop_it() -> None:
    p = VerifiedPolicy(0.05)
    teach(p, "m", 0.95, 270, wrong=30)  # 10 % wrong at 0.95 in the model's traffic
    assert p.exploit_probability(None, 0.95, "m") < 0.5
    assert p.exploit_probability(None, 0.99, "m") < 0.5
    later = VerifiedPolicy(0.05)
    teach(later, "m", 0.95, 300)
    assert later.exploit_probability(None, 0.95, "m") == 1.0
    bounds = [later.error_bound(None, 0.95, "m")]
    for _ in range(3):
        teach(later, "m", 0.95, 0, wrong=10)  # wrong labels arrive: the bound rises with each batch
        bounds.append(later.error_bound(None, 0.95, "m"))
    assert bounds == sorted(bounds) and bounds[-1] > 0.1
    assert later.exploit_probability(None, 0.95, "m") < 0.5


def test_an_entrys_own_wrong_labels_stop_it_even_when_the_pool_says_safe() -> None:
    p = VerifiedPolicy(0.05)
    teach(p, "m", 0.95, 1000)
    stale = Labels()
    assert p.exploit_probability(stale, 0.95, "m") == 1.0
    for _ in range(3):
        p.record(stale, 0.95, False, "m")
    assert stale.wrong == 3 and len(p.pools["m"]) == 1003
    assert p.exploit_probability(None, 0.95, "m") == 1.0  # the pool: 3 wrong in 1003, still safe for the others
    assert p.exploit_probability(stale, 0.95, "m") < 0.5  # this entry: stopped
    assert p.exploit_probability(stale, 0.99, "m") < 0.5
    # and its own correct labels move it the other way, from a pool that is unsure
    q = VerifiedPolicy(0.05)
    teach(q, "m", 0.95, 50, wrong=10)
    good = Labels()
    before = q.error_bound(good, 0.95, "m")
    for _ in range(100):
        q.record(good, 0.95, True, "m")
    assert q.error_bound(good, 0.95, "m") < before / 2 < q.error_bound(None, 0.95, "m")


def test_an_entry_is_not_counted_twice_and_fits_are_cached() -> None:
    p = VerifiedPolicy(0.05)
    only = Labels()
    for _ in range(150):
        p.record(only, 0.93, True, "m")  # the pool holds this entry's labels alone
    # left out of its own prior: the pool adds nothing to what the entry's own labels say
    own = fit_logistic(np.full(150, 0.93), np.ones(150), PRIOR_MEAN, PRIOR_COV + ENTRY_SPREAD)
    assert np.allclose(p.fit(only, "m").mean, own.mean) and np.allclose(p.fit(only, "m").cov, own.cov)
    twice = fit_logistic(np.full(300, 0.93), np.ones(300), PRIOR_MEAN, PRIOR_COV + ENTRY_SPREAD)
    assert p.error_bound(only, 0.93, "m") > 1.5 * twice.error_bound(0.93)
    pool = p.pools["m"]
    assert pool.fit() is pool.fit() and only.fit(pool, p.spread) is only.fit(pool, p.spread)  # no refit without a new label
    fit = only.fit(pool, p.spread)
    teach(p, "m", 0.93, 1)
    assert only.fit(pool, p.spread) is not fit  # the pool changed: refitted
    # bounded: the oldest pooled labels go, and their bins with them
    big = Pool()
    for i in range(MAX_POOLED + 10):
        big.add(0.5 if i < 10 else 0.9, i >= 10)
    assert len(big) == MAX_POOLED and int(big.total.sum()) == MAX_POOLED and int(big.correct.sum()) == MAX_POOLED
    assert big.total[round(0.5 / BIN)] == 0
    # the binned fit is the fit of the labels (to the bins' resolution)
    s = np.array([0.8, 0.85, 0.9, 0.9, 0.95])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0])
    binned = Pool()
    for si, yi in zip(s, y):
        binned.add(float(si), bool(yi))
    assert np.allclose(binned.fit().mean, fit_logistic(s, y).mean, atol=1e-6)
    assert fit_counts(np.zeros(len(binned.total), np.int64), np.zeros(len(binned.total), np.int64)) is PRIOR_FIT


def test_max_error_rate_is_checked() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_error_rate"):
            VerifiedPolicy(bad)


# ---- comparing answers ---------------------------------------------------------------------------


def chat_json(text: str, finish: str = "stop") -> bytes:
    return json.dumps({"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}]}).encode()


def chat_sse(text: str) -> bytes:
    out = b""
    for w in text.split(" "):
        out += b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": w + " "}, "finish_reason": None}]}).encode() + b"\n\n"
    out += b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}).encode() + b"\n\n"
    return out + b'data: {"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}\n\ndata: [DONE]\n\n'


def test_answer_text_and_comparison() -> None:
    assert answer_text(chat_json("Paris  is\nthe capital."), False) == "Paris is the capital."
    assert answer_text(chat_sse("Paris is the capital."), True) == "Paris is the capital."
    completions = json.dumps({"choices": [{"index": 1, "text": " b"}, {"index": 0, "text": "a "}]}).encode()
    assert answer_text(completions, False) == "a b"
    assert same_answer(chat_json("Paris is the capital."), False, chat_sse("Paris is  the capital."), True) is True
    assert same_answer(chat_json("Paris."), False, chat_json("Lyon."), False) is False
    assert answer_text(b"not json", False) is None and answer_text(b'{"error": {}}', False) is None
    assert same_answer(b"[1]", False, chat_json("x"), False) is None


# ---- the sequential evaluation (bench/cache_quality.py's second table) -----------------------------


def test_the_stream_evaluation_counts_what_each_policy_did() -> None:
    pairs = load_pairs(Path(__file__).parent / "data" / "cache_pairs.tsv")
    texts = sorted({t for p in pairs for t in (p.a, p.b)})
    vectors = dict(zip(texts, HashingEmbedder(384).embed_now(texts)))
    fixed = evaluate_stream(pairs, vectors, "fixed", 0.85, seeds=4)
    verified = evaluate_stream(pairs, vectors, "verified", 0.85, seeds=4, max_error_rate=0.05, verify_share=1.0)
    assert fixed.explorations == fixed.labels == 0 and fixed.hits > 0 and fixed.lookups == verified.lookups == 4 * (len(texts) - 1)
    assert verified.explorations > 0 and verified.labels == verified.explorations + verified.hits
    assert verified.hits < fixed.hits and verified.false <= fixed.false  # it only turns the fixed policy's candidates into explorations
    assert verified.detected == verified.false  # every hit re-run: every false one found
    for o in (fixed, verified):  # the guards run first under both
        assert not {k: v for k, v in o.false_hits.items() if k in ("opposite", "number", "entity")}
    with pytest.raises(ValueError, match="policy"):
        evaluate_stream(pairs, vectors, "learned", 0.85)


# ---- the proxy ---------------------------------------------------------------------------------------


class AnswerReplica(ScriptedReplica):
    """A replica that answers each chat query (the last user message) with its text in
    `answers` (default `default`), finished with `stop`, as JSON or SSE; queries in `hang` get
    no answer (the handler sleeps)."""

    def __init__(self) -> None:
        super().__init__(model=MODEL)
        self.answers: dict[str, str] = {}
        self.default = "Paris is the capital of France."
        self.hang: set[str] = set()
        self.asked: list[str] = []

    async def _answer(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        query = payload["messages"][-1]["content"]
        self.asked.append(query)
        if query in self.hang:
            await asyncio.sleep(3600)
        text = self.answers.get(query, self.default)
        if payload.get("stream"):
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(chat_sse(text))
            await resp.write_eof()
            return resp
        body = json.loads(chat_json(text))
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        return web.json_response(body)


class Coin:
    """A stand-in for random.Random whose draws are always `x` (0.0: exploit and verify; 0.9999: explore)."""

    def __init__(self, x: float) -> None:
        self.x = x

    def random(self) -> float:
        return self.x


def force(proxy: Any, x: float) -> None:
    proxy.cache.rng = Coin(x)
    if proxy.cache.verified is not None:
        proxy.cache.verified.rng = proxy.cache.rng


def verified_settings(backends: list[str], **overrides: Any) -> Any:
    return settings(backends, cache__enabled=True, cache__threshold=0.6, cache__batch_window_ms=1.0, cache__threshold_policy="verified", **overrides)


async def ask(c: openai.AsyncOpenAI, query: str, stream: bool = False) -> tuple[str, str]:
    """(x-pylb-cache, answer text) of a chat request."""
    msgs = [SYSTEM, {"role": "user", "content": query}]
    raw = await c.chat.completions.with_raw_response.create(model=MODEL, messages=msgs, temperature=0, max_tokens=16)
    return raw.headers["x-pylb-cache"], raw.parse().choices[0].message.content or ""


class Fleet:
    def __init__(self, n: int) -> None:
        self.reps = [AnswerReplica() for _ in range(n)]

    async def __aenter__(self) -> list[AnswerReplica]:
        for r in self.reps:
            await r.start()
        return self.reps

    async def __aexit__(self, *exc: object) -> None:
        for r in self.reps:
            await r.stop()


def client(proxy: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="alice", max_retries=0, timeout=10)


async def test_an_exploration_answers_with_the_replica_and_labels_the_candidate() -> None:
    async with Fleet(1) as (rep,), running_proxy(verified_settings([rep.url])) as proxy, client(proxy) as c:
        await wait_for(lambda: bool(proxy.balancer.idle_replicas()), what="the replica healthy")
        assert await ask(c, Q1) == ("miss", rep.default)
        await wait_for(lambda: proxy.cache.store.searchable() == 1, what="the answer stored and embedded")
        (entry,) = proxy.cache.store._exact.values()
        force(proxy, 0.9999)  # explore
        q2, q3 = "What is the capital city of France?", "What is the capital of France please?"  # 0.93 and 0.89 to Q1, no guard objects
        assert await ask(c, q2) == ("miss", rep.default)  # the replica answered (the same answer: a correct label)
        rep.answers[q3] = "Lyon."
        assert await ask(c, q3) == ("miss", "Lyon.")  # a different answer: a wrong label
        assert rep.asked == [Q1, q2, q3]
        await wait_for(lambda: len(proxy.cache.store) == 3 and proxy.cache.store.searchable() == 2, what="the explorations' answers stored")
        # q2's answer matched: stored for exact matches only, so q3 found the labelled entry again
        assert entry.labels is not None and [c for _, c in entry.labels.observations] == [True, False]
        assert len(proxy.cache.verified.pools[MODEL]) == 2  # counted in the model's pool too
        assert all(0.6 <= s < 1.0 for s, _ in entry.labels.observations)
        assert (await ask(c, q2)) == ("hit", rep.default)  # exact
        assert not entry.removed  # an exploration's wrong label teaches; it does not drop the entry
        force(proxy, 0.0)  # exploit: the entry answers from the cache
        assert await ask(c, "What is the capital of France ?") == ("hit", rep.default)
        m = await scrape(proxy)
        assert value(m, "pylb_cache_verified_decisions_total", model=MODEL, decision="explore") == 2
        assert value(m, "pylb_cache_verified_decisions_total", model=MODEL, decision="exploit") == 1
        assert value(m, "pylb_cache_labels_total", model=MODEL, source="explore", label="correct") == 1
        assert value(m, "pylb_cache_labels_total", model=MODEL, source="explore", label="wrong") == 1
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="miss") == 3
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_exact") == 1


async def test_a_hit_re_run_on_an_idle_replica_that_disagrees_drops_the_entry() -> None:
    async with Fleet(2) as reps, running_proxy(verified_settings([r.url for r in reps], cache__verify_share=1.0)) as proxy, client(proxy) as c:
        await wait_for(lambda: len(proxy.balancer.idle_replicas()) == 2, what="the replicas healthy")
        assert await ask(c, Q1) == ("miss", reps[0].default)
        await wait_for(lambda: proxy.cache.store.searchable() == 1, what="the answer stored and embedded")
        (entry,) = proxy.cache.store._exact.values()
        force(proxy, 0.0)  # exploit, and verify every hit
        # agreeing re-run: a correct label, the entry stays
        assert await ask(c, Q2) == ("hit", reps[0].default)
        await wait_for(lambda: entry.labels is not None and len(entry.labels) == 1, what="the re-run compared")
        assert not entry.removed
        # a disagreeing re-run: the entry is dropped and counted
        for r in reps:
            r.answers["what is the capital of France ?"] = "Lyon."
        assert await ask(c, "what is the capital of France ?") == ("hit", reps[0].default)  # the user got the hit at once
        await wait_for(lambda: entry.removed, what="the entry dropped")
        assert [c for _, c in entry.labels.observations] == [True, False]
        assert sum(r.asked.count(Q2) for r in reps) == 1 and sum(r.asked.count("what is the capital of France ?") for r in reps) == 1
        m = await scrape(proxy)
        assert value(m, "pylb_cache_detected_false_hits_total", model=MODEL) == 1
        assert value(m, "pylb_cache_labels_total", model=MODEL, source="verify", label="correct") == 1
        assert value(m, "pylb_cache_labels_total", model=MODEL, source="verify", label="wrong") == 1
        assert value(m, "pylb_cache_requests_total", model=MODEL, result="hit_semantic") == 2
        assert value(m, "pylb_cache_verifications_in_flight") == 0
        assert (await ask(c, Q2))[0] == "miss"  # the dropped entry answers no more


async def test_no_idle_replica_no_re_run_and_a_hung_re_run_is_cancelled_at_stop() -> None:
    async with Fleet(1) as (rep,):
        proxy_cm = running_proxy(settings([rep.url], cache__enabled=True, cache__threshold=0.6, cache__verify_share=1.0, server__shutdown_timeout_s=0.5))
        proxy = await proxy_cm.__aenter__()
        stopped = False
        try:
            async with client(proxy) as c:
                await wait_for(lambda: bool(proxy.balancer.idle_replicas()), what="the replica healthy")
                assert await ask(c, Q1) == ("miss", rep.default)  # the fixed policy: verification works with it too
                await wait_for(lambda: proxy.cache.store.searchable() == 1, what="the answer stored and embedded")
                force(proxy, 0.0)
                rep.hang.add("busy")
                busy = asyncio.ensure_future(ask(c, "busy"))
                await wait_for(lambda: not proxy.balancer.idle_replicas(), what="the replica busy")
                assert (await ask(c, Q2))[0] == "hit"
                await wait_for(lambda: not proxy.cache._verifying, what="the re-run skipped")
                m = await scrape(proxy)
                assert value(m, "pylb_cache_verify_skipped_total", reason="no idle replica") == 1
                busy.cancel()
                await wait_for(lambda: bool(proxy.balancer.idle_replicas()), what="the replica idle again")
                rep.hang.add("what is the capital of France ?")
                assert (await ask(c, "what is the capital of France ?"))[0] == "hit"
                await wait_for(lambda: "what is the capital of France ?" in rep.asked, what="the re-run sent")
                assert len(proxy.cache._verifying) == 1
                t0 = time.monotonic()
                await proxy_cm.__aexit__(None, None, None)
                stopped = True
                assert time.monotonic() - t0 < 3.0
                assert not proxy.cache._verifying
        finally:
            if not stopped:
                await proxy_cm.__aexit__(None, None, None)


# ---- settings ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, bad, reason",
    [
        ("cache.threshold_policy", "learned", "one of fixed, verified"),
        ("cache.max_error_rate", "0", "(0, 1]"),
        ("cache.max_error_rate", "1.5", "(0, 1]"),
        ("cache.verify_share", "-0.1", "[0, 1]"),
        ("cache.verify_share", "2", "[0, 1]"),
        ("cache.verify_max_inflight", "0", "[1, 64]"),
        ("cache.verified_floor", "1.2", "[0, 1]"),
    ],
)
def test_bad_settings_name_the_field(field: str, bad: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({field: bad}, env={})
    assert info.value.field == field and reason in str(info.value), str(info.value)
    assert bad in str(info.value)


def test_defaults_keep_todays_behaviour() -> None:
    s = load_settings({}, env={}).cache
    assert (s.threshold_policy, s.max_error_rate, s.verify_share, s.verified_floor) == ("fixed", 0.01, 0.0, 0.0)
