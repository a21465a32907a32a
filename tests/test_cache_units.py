"""The semantic cache's parts on their own: partition keys, guards, the store (exact, similarity,
TTL, LRU), the hashing embedder and the micro-batcher."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from multidict import CIMultiDict

from pylb import native
from pylb.cache import guards
from pylb.cache.batcher import LookupBatcher
from pylb.cache.cache import finished_with_stop
from pylb.cache.embedders import HashingEmbedder
from pylb.cache.keys import CachePlan, TenantKeys, plan_request
from pylb.cache.store import Answer, CacheStore, Entry

AUTH = CIMultiDict({"Authorization": "Bearer alice"})
TENANTS = TenantKeys(secret=b"k" * 32)


def chat(query: str, **fields: object) -> dict:
    body = {"model": "m", "temperature": 0, "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": query}]}
    body.update(fields)
    return body


def plan(body: dict, headers: CIMultiDict = AUTH, kind: str = "chat") -> CachePlan:
    p = plan_request(kind, body, headers, TENANTS)
    assert isinstance(p, CachePlan), p
    return p


# ---- keys -------------------------------------------------------------------------------------------


def test_partition_masks_only_the_last_user_message() -> None:
    a, b = plan(chat("what is a cat?")), plan(chat("what's a cat"))
    assert a.partition == b.partition and a.exact_key != b.exact_key
    assert a.query == "what is a cat?"
    assert plan(chat("what is a cat?")).exact_key == a.exact_key


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"max_tokens": 5},
        {"top_p": 0.5},
        {"seed": 3},
        {"stop": ["\n"]},
        {"stream": True},
        {"messages": [{"role": "system", "content": "be verbose"}, {"role": "user", "content": "what is a cat?"}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "what is a cat?"}]},
    ],
)
def test_any_other_difference_is_another_partition(change: dict) -> None:
    assert plan(chat("what is a cat?", **change)).partition != plan(chat("what is a cat?")).partition


def test_tenants_are_partitions_and_no_tenant_no_cache() -> None:
    bob = CIMultiDict({"Authorization": "Bearer bob"})
    assert plan(chat("q"), bob).partition != plan(chat("q")).partition
    assert plan_request("chat", chat("q"), CIMultiDict(), TENANTS) == "no tenant (Authorization header missing)"
    by_header = TenantKeys("X-Tenant", secret=b"k" * 32)
    assert isinstance(plan_request("chat", chat("q"), CIMultiDict({"X-Tenant": "t1"}), by_header), CachePlan)
    assert isinstance(plan_request("chat", chat("q"), AUTH, by_header), str)  # the configured header, not Authorization


@pytest.mark.parametrize(
    "body, reason",
    [
        ({"temperature": 0.7}, "temperature is not 0"),
        ({"temperature": None}, "temperature is not 0"),
        ({"n": 2}, "n is not 1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "the request has tools"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "a message is not text only"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "the last message is not the user's text"),
    ],
)
def test_refused_requests(body: dict, reason: str) -> None:
    assert plan_request("chat", chat("q", **body), AUTH, TENANTS) == reason


def test_missing_temperature_is_sampling_and_opt_in_lifts_it() -> None:
    body = chat("q")
    del body["temperature"]
    assert plan_request("chat", body, AUTH, TENANTS) == "temperature is not 0"
    assert isinstance(plan_request("chat", body, AUTH, TENANTS, frozenset({"m"})), CachePlan)
    assert plan_request("chat", {**body, "n": 2}, AUTH, TENANTS, frozenset({"m"})) == "n is not 1"


def test_cache_control() -> None:
    p = plan(chat("q"), CIMultiDict({"Authorization": "a", "Cache-Control": "no-cache"}))
    assert not p.lookup and p.store
    assert plan_request("chat", chat("q"), CIMultiDict({"Authorization": "a", "Cache-Control": "no-store"}), TENANTS) == "Cache-Control: no-store"


def test_completions_prompt_is_the_query() -> None:
    a = plan({"model": "m", "prompt": "one", "temperature": 0}, kind="completions")
    b = plan({"model": "m", "prompt": "two", "temperature": 0}, kind="completions")
    assert a.partition == b.partition and a.query == "one"
    assert plan_request("completions", {"model": "m", "prompt": [1, 2], "temperature": 0}, AUTH, TENANTS) == "the prompt is not one string"


# ---- guards -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "a, b, guard",
    [
        ("How do I enable logging in nginx?", "How do I disable logging in nginx?", "antonym"),
        ("Is Python a compiled language?", "Is Python not a compiled language?", "negation"),
        ("Why doesn't my code compile?", "Why does my code compile?", "negation"),
        ("Convert 5 miles to km", "Convert 50 miles to km", "numbers"),
        ("What are three uses of salt?", "What are four uses of salt?", "numbers"),
        ("What does the function parse_args do?", "What does the function parse_argv do?", "identifiers"),
        ("How do I call os.path.join on Windows?", "How do I call os.path.split on Windows?", "identifiers"),
        ("What is the capital of France?", "What is the capital of Spain?", "entities"),
        ("Who wrote Pride and Prejudice?", "When was Pride and Prejudice written?", "question"),
        ('What does "hello" mean?', 'What does "goodbye" mean?', "entities"),
    ],
)
def test_guards_refuse(a: str, b: str, guard: str) -> None:
    assert guards.refusal(a, b) == guard
    assert guards.refusal(b, a) == guard


@pytest.mark.parametrize(
    "a, b",
    [
        ("How do I reverse a list in Python?", "What is the way to reverse a Python list?"),
        ("What is the capital of France?", "Which city is the capital of France?"),
        ("Convert 5 miles to km", "convert five miles into kilometers"),
        ("How can I learn to cook quickly?", "What is the fastest way to learn cooking?"),
    ],
)
def test_guards_pass_paraphrases(a: str, b: str) -> None:
    assert guards.refusal(a, b) is None


# ---- hashing embedder -------------------------------------------------------------------------------


def test_hash_embed_rows_are_unit_and_paraphrases_are_closer() -> None:
    x = native.hash_embed(["How do I reverse a list in Python?", "how to reverse a python list", "best pizza in Naples", ""], 384)
    assert x.shape == (4, 384) and x.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0, rtol=1e-5)
    assert not x[3].any()
    assert float(x[0] @ x[1]) > float(x[0] @ x[2]) + 0.2
    assert np.array_equal(native.hash_embed(["Same Words"], 64), native.hash_embed(["same, words!"], 64))  # case and punctuation
    with pytest.raises(ValueError, match="dim"):
        native.hash_embed(["x"], 4)


# ---- store ------------------------------------------------------------------------------------------


def entry(p: CachePlan, now: float, ttl: float = 100.0, body: bytes = b"{}") -> Entry:
    return Entry(str(p.exact_key.hex()), p.partition, p.exact_key, p.query, p.model, p.tenant, Answer(body, "application/json", False), None, now, now + ttl)


def test_store_exact_similarity_ttl_and_lru() -> None:
    emb = HashingEmbedder(64)
    store = CacheStore(ttl_s=100, max_entries=3, max_bytes=10**6, device="cpu")
    plans = [plan(chat(q)) for q in ("alpha beta", "gamma delta", "epsilon zeta", "eta theta")]
    vecs = emb.embed_now([p.query for p in plans])
    for i, p in enumerate(plans[:3]):
        store.put(entry(p, now=float(i)), vecs[i])
    assert store.get_exact(plans[0].exact_key, 5.0) is not None  # touched: plans[1] is now the oldest use
    store.put(entry(plans[3], now=5.0), vecs[3])
    assert store.get_exact(plans[1].exact_key, 5.0) is None and len(store) == 3
    found = store.search(plans[0].partition, vecs[[2]], k=2, now=6.0)[0]
    assert found[0][0].query == "epsilon zeta" and found[0][1] == pytest.approx(1.0, abs=1e-5)
    assert store.partition_size(plans[0].partition) == 3
    assert store.get_exact(plans[0].exact_key, 200.0) is None  # expired
    assert store.expire(200.0) == 2 and len(store) == 0 and store.partition_size(plans[0].partition) == 0


def test_store_byte_bound_and_rows_stay_consistent() -> None:
    store = CacheStore(ttl_s=100, max_entries=100, max_bytes=2000, device="cpu")
    emb = HashingEmbedder(32)
    plans = [plan(chat(f"question number {i} about topic {i}")) for i in range(20)]
    vecs = emb.embed_now([p.query for p in plans])
    for i, p in enumerate(plans):
        store.put(entry(p, now=0.0, body=b"x" * 500), vecs[i])
    assert store.stats()["m"][1] <= 2000 and len(store) == 3
    for i in range(17, 20):  # the newest three remain, each found by its own vector
        hits = store.search(plans[i].partition, vecs[[i]], k=1, now=0.0)[0]
        assert hits[0][0].query == plans[i].query


def test_finished_with_stop() -> None:
    assert finished_with_stop(b'{"choices":[{"finish_reason":"stop"}]}', False) is None
    assert finished_with_stop(b'{"choices":[{"finish_reason":"length"}]}', False) == "finish_reason ['length']"
    stream = b'data: {"choices":[{"index":0,"finish_reason":null}]}\n\ndata: {"choices":[{"index":0,"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    assert finished_with_stop(stream, True) is None
    assert finished_with_stop(stream[: stream.rfind(b"data: [DONE]")], True) == "stream did not end with [DONE]"
    assert finished_with_stop(b'data: {"error": {"message": "x"}}\n\ndata: [DONE]\n\n', True) == "error event in the stream"


# ---- batcher ----------------------------------------------------------------------------------------


class CountingEmbedder(HashingEmbedder):
    def __init__(self) -> None:
        super().__init__(64)
        self.calls: list[int] = []

    async def embed(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return self.embed_now(texts)


async def test_batcher_one_embed_call_per_window() -> None:
    emb = CountingEmbedder()
    store = CacheStore(ttl_s=100, max_entries=100, max_bytes=10**6, device="cpu")
    p = plan(chat("alpha beta"))
    store.put(entry(p, 0.0), emb.embed_now(["alpha beta"])[0])
    sizes: list[int] = []
    b = LookupBatcher(emb, store, window_s=0.005, max_batch=64, clock=lambda: 1.0, on_batch=sizes.append)
    results = await asyncio.gather(*(b.lookup(p.partition, q) for q in ("alpha beta", "alpha gamma", "zeta")))
    assert emb.calls == [3] and sizes == [3]
    assert results[0][1][0][1] == pytest.approx(1.0, abs=1e-5) and results[2][1][0][1] < 0.5
    b.max_batch = 2
    await asyncio.gather(*(b.lookup(p.partition, q) for q in ("a b", "c d", "e f")))
    assert emb.calls[1:] == [2, 1]


def test_entity_guard_ignores_case_of_a_shared_word() -> None:
    assert guards.refusal("How do I reverse a list in Python?", "how to reverse a list in python") is None
    assert guards.refusal("Who founded Microsoft?", "who founded apple") == "entities"


def test_store_cuda_device_fails_clearly_without_a_gpu() -> None:
    from pylb.cache.store import cuda_usable

    if cuda_usable():
        pytest.skip("a CUDA device is present")
    with pytest.raises(RuntimeError, match="cache.device is cuda"):
        CacheStore(ttl_s=1, max_entries=1, max_bytes=1024, device="cuda")
    assert not CacheStore(ttl_s=1, max_entries=1, max_bytes=1024, device="auto").cuda


@pytest.mark.cuda
def test_store_on_cuda_finds_what_the_cpu_store_finds() -> None:
    from pylb.cache.store import cuda_usable

    if not cuda_usable():
        pytest.skip("pylb built without CUDA, no CUDA device, or no CuPy")
    emb = HashingEmbedder(128)
    plans = [plan(chat(f"question {i} about subject number {i * 7}")) for i in range(300)]
    vecs = emb.embed_now([p.query for p in plans])
    stores = [CacheStore(ttl_s=100, max_entries=1000, max_bytes=10**7, device=d) for d in ("cpu", "cuda")]
    for s in stores:
        for i, p in enumerate(plans):
            s.put(entry(p, 0.0), vecs[i])
        s.remove(s.get_exact(plans[5].exact_key, 0.0))  # a hole: rows move, the device copy is refreshed
    found = [s.search(plans[0].partition, vecs[:32], k=3, now=1.0) for s in stores]
    assert [[e.query for e, _ in row] for row in found[0]] == [[e.query for e, _ in row] for row in found[1]]


def test_store_entry_found_exactly_at_once_and_by_similarity_once_it_has_its_vector() -> None:
    emb = HashingEmbedder(64)
    store = CacheStore(ttl_s=100, max_entries=10, max_bytes=10**6, device="cpu")
    p = plan(chat("alpha beta gamma"))
    e = entry(p, 0.0)
    store.put(e, None)
    assert store.get_exact(p.exact_key, 1.0) is e and store.searchable() == 0
    store.set_vector(e, emb.embed_now([p.query])[0])
    assert store.search(p.partition, emb.embed_now(["alpha beta gamma"]), k=1, now=1.0)[0][0][0] is e
    store.remove(e)
    store.set_vector(e, emb.embed_now([p.query])[0])  # dropped meanwhile: nothing happens
    assert store.searchable() == 0 and len(store) == 0


# ---- the native lookup the store makes ----------------------------------------------------------


@pytest.mark.parametrize("b", [1, 3, 4, 5, 64])  # the sgemv path (B <= 4) and the GEMM path
def test_topk_with_unit_keys_matches_numpy(b: int) -> None:
    rng = np.random.default_rng(b)
    keys = rng.standard_normal((5000, 48), dtype=np.float32)
    keys /= np.linalg.norm(keys, axis=1, keepdims=True)
    q = rng.standard_normal((b, 48), dtype=np.float32)
    s = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ keys.T
    want = np.argsort(-s, axis=1, kind="stable")[:, :5]
    for unit in (False, True):
        idx, sim = native.topk_similarity(q, keys, 5, keys_unit=unit)
        assert (idx == want).all()
        assert np.allclose(sim, np.take_along_axis(s, want, 1), atol=1e-5)
    # keys_unit is a promise, not a check: keys twice as long score twice the cosine
    _, sim2 = native.topk_similarity(q, 2 * keys, 5, keys_unit=True)
    assert np.allclose(sim2, 2 * np.take_along_axis(s, want, 1), atol=1e-5)


def test_store_keeps_unit_rows() -> None:
    st = CacheStore(ttl_s=60, max_entries=10, max_bytes=1 << 20, device="cpu")
    e = entry(plan(chat("a question")), 0.0)
    st.put(e, np.array([3.0, 4.0], np.float32))
    [[(found, sim)]] = st.search(e.partition, np.array([[0.6, 0.8]], np.float32), 1, 0.0)
    assert found is e and sim == pytest.approx(1.0)
