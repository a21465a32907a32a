"""Policy options of the baselines (chwbl, cache-aware, weighted-score, preble-e2), set the way
`pylb simulate --policy NAME:key=value` sets them: through `registry.create(spec)`.

Each option is shown to change a decision (or, where a decision would need a long setup, the
state it sizes), and bad values to fail with an error that names the policy, option and value,
both from a spec and from `RouterOptions.extra` (how `pylb serve` passes `router.extra`).
"""

from __future__ import annotations

import dataclasses

import pytest
from policy_fakes import FakeView, choose, metrics, replicas, request, text, write

from pylb.router import registry
from pylb.router.core import CoreRouter
from pylb.router.interface import RouterOptions
from pylb.router.policies.cache_aware import CacheAwarePolicy
from pylb.router.policies.chwbl import ChwblPolicy, prefix_key
from pylb.router.policies.preble_e2 import PrebleE2Policy
from pylb.router.policies.weighted_score import WeightedScorePolicy
from pylb.router.policy import Policy, PolicyOptionError

NAMES4 = ["replica-0", "replica-1", "replica-2", "replica-3"]
BASELINES = {"chwbl": ChwblPolicy, "cache-aware": CacheAwarePolicy, "weighted-score": WeightedScorePolicy,
             "preble-e2": PrebleE2Policy}  # fmt: skip


def policy_of(spec: str, **extra: object) -> Policy:
    """The policy inside the router `registry.create(spec)` builds."""
    router = registry.create(spec, RouterOptions(extra=dict(extra)))
    assert isinstance(router, CoreRouter)
    return router.policy


# ---- declarations ----------------------------------------------------------------------------

PUBLISHED = {
    "chwbl": {"replication": 256, "load_factor": 1.25},
    "cache-aware": {"cache_threshold": 0.3, "balance_abs_threshold": 64, "balance_rel_threshold": 1.5,
                    "eviction_interval_secs": 60.0, "max_tree_size": 2**26},
    "weighted-score": {"queue_weight": 2.0, "kv_cache_weight": 2.0, "prefix_weight": 3.0},
    "preble-e2": {"rebalance_ratio": 1.5, "window_s": 180.0},
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_baselines_declare_their_published_parameters(name: str) -> None:
    cls = BASELINES[name]
    assert registry.policy_class(name) is cls
    for key, value in PUBLISHED[name].items():
        assert cls.option_defaults[key] == value and type(cls.option_defaults[key]) is type(value), key


@pytest.mark.parametrize("name", registry.names())
def test_defaults_are_within_their_limits(name: str) -> None:
    cls = registry.policy_class(name)
    assert cls is not None
    assert cls.Options is None or set(cls.option_defaults) == {f.name for f in dataclasses.fields(cls.Options)}
    for key, default in cls.option_defaults.items():
        assert cls.check_option(key, default) == default
        assert cls.check_option(key, str(default).lower()) == default  # the spec's text form


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_policy_modules_document_every_option(name: str) -> None:
    import sys

    cls = BASELINES[name]
    doc = sys.modules[cls.__module__].__doc__ or ""
    for key in cls.option_defaults:
        assert f"`{key}`" in doc, key


def test_options_are_declared_like_every_setting() -> None:
    """Each option is a `pylb.fields.setting`: a default, a help line, and its check."""
    for name in registry.names():
        cls = registry.policy_class(name)
        if cls is None or cls.Options is None:
            continue
        for f in dataclasses.fields(cls.Options):
            assert f.metadata.get("help"), f"{name}: option {f.name} has no help"


# ---- bad values ------------------------------------------------------------------------------

BAD = [
    ("chwbl", "load_factor", "0.9", "must be at least 1"),
    ("chwbl", "replication", "0", "must be at least 1"),
    ("chwbl", "load_factor", "inf", "expected a finite number"),
    ("chwbl", "prefix_blocks", "1.5", "expected an integer"),
    ("cache-aware", "cache_threshold", "1.5", "must be in [0, 1]"),
    ("cache-aware", "balance_abs_threshold", "-1", "must be at least 0"),
    ("cache-aware", "balance_rel_threshold", "0.5", "must be at least 1"),
    ("cache-aware", "eviction_interval_secs", "-60", "must be zero or a positive number"),
    ("cache-aware", "max_tree_size", "lots", "expected an integer"),
    ("cache-aware", "low_match", "random", "must be one of smallest-tree, min-load"),
    ("weighted-score", "queue_weight", "-2", "must be zero or a positive number"),
    ("weighted-score", "kv_cache_weight", "-0.5", "must be zero or a positive number"),
    ("weighted-score", "prefix_weight", "nan", "expected a number, not NaN"),
    ("weighted-score", "prefix_weight", "inf", "must be zero or a positive number"),
    ("weighted-score", "max_prefix_blocks", "0", "must be at least 1"),
    ("weighted-score", "lru_capacity_per_server", "0", "must be at least 1"),
    ("weighted-score", "auto_tune", "maybe", "expected a boolean (true/false)"),
    ("preble-e2", "window_s", "0", "must be a positive number"),
    ("preble-e2", "rebalance_ratio", "0.5", "must be at least 1"),
]


@pytest.mark.parametrize(("name", "key", "value", "expected"), BAD)
def test_bad_values_name_policy_option_and_value(name: str, key: str, value: str, expected: str) -> None:
    message = f"policy {name!r}: option {key}={value!r}: {expected}"
    with pytest.raises(PolicyOptionError) as spec_error:
        registry.create(f"{name}:{key}={value}", RouterOptions())
    assert str(spec_error.value) == message
    assert isinstance(spec_error.value, ValueError)
    # The same check when the value comes in RouterOptions.extra (pylb serve's router.extra).
    with pytest.raises(PolicyOptionError) as extra_error:
        BASELINES[name](RouterOptions(extra={key: value}))
    assert str(extra_error.value) == message


def test_typed_values_in_extra_are_checked_too() -> None:
    with pytest.raises(ValueError, match=r"policy 'chwbl': option load_factor=0.5: must be at least 1"):
        ChwblPolicy(RouterOptions(extra={"load_factor": 0.5}))
    with pytest.raises(ValueError, match=r"policy 'weighted-score': option prefix_weight=-3: must be zero or a positive number"):
        WeightedScorePolicy(RouterOptions(extra={"prefix_weight": -3}))
    with pytest.raises(ValueError, match=r"policy 'cache-aware': option max_tree_size=True: expected an integer"):
        CacheAwarePolicy(RouterOptions(extra={"max_tree_size": True}))
    with pytest.raises(PolicyOptionError, match=r"policy 'preble-e2' has no option 'window'"):
        registry.create("preble-e2:window=10")


# ---- chwbl -----------------------------------------------------------------------------------


def test_chwbl_load_factor_changes_when_the_owner_is_full() -> None:
    def pick(spec: str) -> tuple[str, str]:
        policy = policy_of(spec)
        assert isinstance(policy, ChwblPolicy)
        policy.on_membership(NAMES4)
        assert policy.ring is not None
        req = request(text("conversation", 4))
        order = policy.ring.walk(prefix_key(req, 2))
        by_name = {order[0]: 13, order[1]: 10, order[2]: 10, order[3]: 10}
        choice = choose(policy, req, FakeView(replicas(NAMES4, [by_name[n] for n in NAMES4])))
        return NAMES4[choice.replica], choice.branch

    policy = policy_of("chwbl")
    policy.on_membership(NAMES4)
    assert isinstance(policy, ChwblPolicy) and policy.ring is not None
    owner = policy.ring.walk(prefix_key(request(text("conversation", 4)), 2))[0]
    # 14 > 44 / 4 * 1.25 = 13.75: the owner is over the bound; 14 <= 44 / 4 * 2 = 22 with 2.
    assert pick("chwbl")[0] != owner and pick("chwbl")[1] == "load"
    assert pick("chwbl:load_factor=2") == (owner, "affinity")


def test_chwbl_replication_sizes_the_ring() -> None:
    policy = policy_of("chwbl:replication=8")
    assert isinstance(policy, ChwblPolicy) and policy.replication == 8
    policy.on_membership(NAMES4)
    assert policy.ring is not None and len(policy.ring) == 4 * 8


def test_chwbl_prefix_blocks_sets_the_key_length() -> None:
    a, b = request(text("same", 1) + text("a", 2), "a"), request(text("same", 1) + text("b", 2), "b")
    view = FakeView(replicas([f"replica-{i}" for i in range(16)]))
    one = policy_of("chwbl:prefix_blocks=1")
    one.on_membership([r.name for r in view.replicas])
    assert choose(one, a, view).replica == choose(one, b, view).replica  # one shared block: one key
    two = policy_of("chwbl")
    two.on_membership([r.name for r in view.replicas])
    # With two-block keys the two prompts have different keys (and, for these, different owners).
    assert choose(two, a, view).replica != choose(two, b, view).replica


# ---- cache-aware -----------------------------------------------------------------------------


def _cache_aware(spec: str, names: list[str]) -> tuple[CacheAwarePolicy, FakeView]:
    policy = policy_of(spec)
    assert isinstance(policy, CacheAwarePolicy)
    policy.on_membership(names)
    return policy, FakeView(replicas(names))


@pytest.mark.parametrize(("spec", "expected"), [("cache-aware", (2, "fallback")),
                                                ("cache-aware:cache_threshold=0.25", (0, "affinity"))])  # fmt: skip
def test_cache_aware_cache_threshold(spec: str, expected: tuple[int, str]) -> None:
    policy, view = _cache_aware(spec, NAMES4)
    policy.tree.insert(request(text("sys", 3) + text("a", 7)).block_hashes.tolist(), "replica-0", 0.0)
    policy.tree.insert(request(text("b", 5)).block_hashes.tolist(), "replica-1", 0.0)
    # 3 of 10 blocks match replica-0: 0.3 is not > 0.3, but it is > 0.25.
    choice = choose(policy, request(text("sys", 3) + text("z", 7)), view)
    assert (choice.replica, choice.branch) == expected


@pytest.mark.parametrize(
    ("spec", "loads", "branch"),
    [
        ("cache-aware", [65, 0], "load"),
        ("cache-aware:balance_abs_threshold=65", [65, 0], "affinity"),
        ("cache-aware", [202, 134], "load"),
        ("cache-aware:balance_rel_threshold=1.51", [202, 134], "affinity"),
    ],
)
def test_cache_aware_balance_thresholds(spec: str, loads: list[int], branch: str) -> None:
    policy, view = _cache_aware(spec, ["replica-0", "replica-1"])
    for r, load in zip(view.replicas, loads):
        write(r, inflight_requests=load)
    req = request(text("sys", 8))
    policy.tree.insert(req.block_hashes.tolist(), "replica-0", 0.0)
    assert choose(policy, req, view).branch == branch


@pytest.mark.parametrize(("spec", "size_after"), [
    ("cache-aware", 8),  # 2**26 characters: nothing to evict
    ("cache-aware:max_tree_size=320", 5),  # 320 characters = 5 blocks
    ("cache-aware:max_tree_size=320:eviction_interval_secs=0", 8),  # eviction off
    ("cache-aware:max_tree_size=320:eviction_interval_secs=120", 8),  # not due yet at t = 60
])  # fmt: skip
def test_cache_aware_eviction_options(spec: str, size_after: int) -> None:
    policy, view = _cache_aware(spec, ["replica-0"])
    tiny = request(b"short")
    choose(policy, tiny, view)  # arms the eviction timer at t = 0
    policy.tree.insert(request(text("old", 4)).block_hashes.tolist(), "replica-0", 1.0)
    policy.tree.insert(request(text("new", 4)).block_hashes.tolist(), "replica-0", 2.0)
    view.now = 60.0
    choose(policy, tiny, view)
    assert policy.tree.size("replica-0") == size_after


def test_cache_aware_low_match_option() -> None:
    policy, view = _cache_aware("cache-aware:low_match=min-load", NAMES4)
    for r, load in zip(view.replicas, [3, 1, 0, 2]):
        write(r, inflight_requests=load)
    policy.tree.insert(request(text("c", 9)).block_hashes.tolist(), "replica-1", 0.0)
    policy.tree.insert(request(text("d", 9)).block_hashes.tolist(), "replica-2", 0.0)
    # smallest-tree would pick replica-0 (empty tree); min-load picks replica-2 (load 0).
    assert choose(policy, request(text("new", 4)), view).replica == 2
    policy, view = _cache_aware("cache-aware", NAMES4)
    policy.tree.insert(request(text("c", 9)).block_hashes.tolist(), "replica-1", 0.0)
    policy.tree.insert(request(text("d", 9)).block_hashes.tolist(), "replica-2", 0.0)
    assert choose(policy, request(text("new", 4)), view).replica == 0


# ---- weighted-score --------------------------------------------------------------------------


def _scored(spec: str) -> list[float]:
    """The literal case of test_baseline_policies: queue scores 1, 0.5, 0; KV free 0.5, 0.75, 1;
    prefix 0, 0, 0.5."""
    policy = policy_of(spec)
    assert isinstance(policy, WeightedScorePolicy)
    rs = replicas(["a", "b", "c"])
    write(rs[0], metrics=metrics(waiting=0, kv_usage=0.5))
    write(rs[1], queued_requests=1, metrics=metrics(waiting=1, kv_usage=0.25))
    write(rs[2], queued_requests=4, metrics=metrics(waiting=0, kv_usage=0.0))
    policy.on_membership(["a", "b", "c"])
    req = request(text("p", 4))
    policy.index.add(req.block_hashes[:2].tolist(), "c", 100)
    return policy.scores(req, FakeView(rs))


def test_weighted_score_weights() -> None:
    assert _scored("weighted-score") == [3.0, 2.5, 3.5]
    assert _scored("weighted-score:queue_weight=0") == [1.0, 1.5, 3.5]
    assert _scored("weighted-score:kv_cache_weight=4") == [4.0, 4.0, 5.5]
    assert _scored("weighted-score:prefix_weight=0.5") == [3.0, 2.5, 2.25]
    assert _scored("weighted-score:queue_weight=1:kv_cache_weight=1:prefix_weight=1") == [1.5, 1.25, 1.5]


def test_weighted_score_max_prefix_blocks() -> None:
    req = request(text("long", 6))
    view = FakeView(replicas(["a", "b"]))
    for spec, expected in (("weighted-score", 2 / 6), ("weighted-score:max_prefix_blocks=2", 1.0)):
        policy = policy_of(spec)
        assert isinstance(policy, WeightedScorePolicy)
        policy.index.add(req.block_hashes[:2].tolist(), "a", 100)  # a holds the first 2 blocks
        assert policy.scores(req, view) == [4.0 + 3.0 * expected, 4.0]


def test_weighted_score_lru_capacity_and_auto_tune() -> None:
    rs = replicas(["a"])
    write(rs[0], metrics=metrics(num_gpu_blocks=4))  # autoTune: 4 blocks
    req = request(text("long", 6))
    for spec, held in (("weighted-score", 4), ("weighted-score:auto_tune=false", 6),
                       ("weighted-score:auto_tune=false:lru_capacity_per_server=3", 3)):  # fmt: skip
        policy = policy_of(spec)
        assert isinstance(policy, WeightedScorePolicy)
        choose(policy, req, FakeView(rs))
        assert len(policy.index.lrus["a"]) == held, spec


# ---- preble-e2 -------------------------------------------------------------------------------


def _preble(spec: str, window: dict[str, int], cached_b: int, **options: object) -> tuple[PrebleE2Policy, FakeView]:
    router = registry.create(spec, RouterOptions(**options))  # type: ignore[arg-type]
    assert isinstance(router, CoreRouter)
    policy = router.policy
    assert isinstance(policy, PrebleE2Policy)
    policy.on_membership(["A", "B", "C"])
    for name, load in window.items():
        policy.load.add(name, 0.0, load)
    return policy, FakeView(replicas(["A", "B", "C"]), now=1.0, cached={"A": 0, "B": cached_b, "C": 0})


def test_preble_rebalance_ratio() -> None:
    req = request(text("p", 4), prompt_tokens=64)
    policy, view = _preble("preble-e2", {"A": 80, "B": 121, "C": 90}, cached_b=3)
    assert choose(policy, req, view).replica == 0  # 121 > 1.5 x 80: off B
    policy, view = _preble("preble-e2:rebalance_ratio=2", {"A": 80, "B": 121, "C": 90}, cached_b=3)
    assert choose(policy, req, view).replica == 1  # 121 <= 2 x 80: B keeps it


def test_preble_window_s() -> None:
    for spec, load_at_11 in (("preble-e2", 1000), ("preble-e2:window_s=10", 0)):
        policy, view = _preble(spec, {"A": 1000}, cached_b=0)
        view.now = 11.0
        choose(policy, request(b"tiny", prompt_tokens=0), view)
        assert policy.load.get("A") == load_at_11, spec


def test_preble_chars_per_token() -> None:
    req = request(text("p", 4), prompt_tokens=64)
    # 4 chars per token: B's 3 cached blocks are 48 tokens > 16 missed: exploit B.
    policy, view = _preble("preble-e2", {"A": 0, "B": 0, "C": 0}, cached_b=3)
    assert choose(policy, req, view).branch == "affinity"
    # 8 chars per token (the router-wide RouterOptions.chars_per_token): 3 blocks are 24 tokens < 40 missed: explore.
    policy, view = _preble("preble-e2", {"A": 0, "B": 0, "C": 0}, cached_b=3, chars_per_token=8, key_block_tokens=512)
    assert choose(policy, req, view).branch == "load"
