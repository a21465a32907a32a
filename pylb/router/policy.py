"""The policy contract: how a routing policy sees the fleet and what it answers.

Design (DESIGN.md §4, STYLE.md 1-2)
-----------------------------------
A policy is a small synchronous object with no I/O that answers one question: *which replica
should this request go to?* Everything else -- per-replica queues, dispatch budgets, in-flight
accounting, the cache mirror, the TTFT model, hotspot migration, membership -- belongs to the
router core (`pylb.router.core`), which is the one writer of per-replica state. Policies only
*read* that state through a read-only `RouterView` (never the core itself) and keep whatever
private state their algorithm needs (a ring, a prefix tree, a counter).

Call sequence, made by the router core (never by drivers):

    policy.on_membership(replicas)            before the first choose, and on every change (the
                                              only place a policy syncs its rings and tables)
    policy.advance(now)                       before every choose: time-driven upkeep (expire a
                                              window, evict a tree); idempotent for one `now`
    policy.choose(request, view) -> Choice    pure: reads, decides, changes nothing
    policy.on_choice(request, choice, view)   the core queued the request where `choice` says:
                                              the policy records it (a key window, a tree)
    policy.on_migrate(request, h, i, view)    the core moved the still-queued request from
                                              replica h's queue to replica i's (hotspot migration)
    policy.on_dispatch(request, i, view)      when the core actually sends it to replica i
    policy.on_complete(request_id, i, view)   when it finished or failed on replica i

`choose` runs once per placement (submission, and re-placement when its replica left) followed
by `on_choice`; a retried request (`Router.retry`) gets a `choose` without `on_choice`, because
the policy has counted it already, so a retry is never counted twice.

`Choice.replica` is where the request is queued. `Choice.alternate`, when a policy names one, is
the request's second candidate: the core may migrate the still-queued request there when its
replica turns hot (DualMap) or retry there. `Choice.branch` says why (metrics label).
"""

from __future__ import annotations

import dataclasses
import math
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from pylb.fields import SettingError, check_value, default_of, field_types

from .interface import ReplicaId, ReplicaState, RouterOptions, RouterView, RoutingRequest

__all__ = ["BRANCHES", "Choice", "Policy", "PolicyOptionError", "ReplicaState", "RouterView", "peek_choice"]

T = TypeVar("T")

BRANCHES = ("affinity", "slo-switch", "spill", "load", "migration", "retry", "fallback")
"""Decision branches, as counted in `pylb_decisions_total{branch}`."""


@dataclass(frozen=True, slots=True)
class Choice:
    """A policy's answer: queue on `replica` (an index into `view.replicas`).

    `alternate` is the request's other candidate (for migration and retries), or None.
    `branch` names the reason, one of `BRANCHES`. `note` is the policy's own, for its
    `on_choice` (what `choose` computed and `on_choice` records, e.g. the prefix key); the core
    never reads it.
    """

    replica: int
    alternate: int | None = None
    branch: str = "affinity"
    note: Any = None


def peek_choice(rng: random.Random, items: Sequence[T]) -> T:
    """What `rng.choice(items)` would give, without advancing `rng`.

    For a pure `choose` that breaks ties at random: it peeks, and its `on_choice` then draws
    `rng.choice(range(len(items)))`, which advances the generator exactly as the peeked draw
    would have, so the sequence of draws is the one a single `rng.choice` per placement makes."""
    state = rng.getstate()
    try:
        return rng.choice(items)
    finally:
        rng.setstate(state)


class PolicyOptionError(ValueError):
    """A policy-specific option is unknown or has a bad value; the message names both."""


class Policy(ABC):
    """Base class of routing policies. Subclasses set `name` and implement `choose`.

    A policy is constructed with the router's `RouterOptions` (policy-specific settings come
    from `options.extra`, documented in each policy's module comment) and must be
    deterministic for a given `options.seed` and call sequence.

    A policy that takes settings declares them as a dataclass `Options` of
    `pylb.fields.setting` fields (default, help, check: the way every pylb setting is declared),
    and reads them with `self.option(name)`, which converts and checks the value.
    `option_defaults` (name -> default) is derived from it. The registry checks
    `NAME:key=value,...` policy specs (`pylb simulate --policy`) with the same `check_option`,
    so a bad value is refused when the spec is parsed and again when the policy is built from
    `RouterOptions.extra` (`pylb serve`'s `router.extra`). This is the one way policies take
    options: no policy parses `options.extra` itself.
    """

    name: ClassVar[str]
    migrates: ClassVar[bool] = False
    """Whether the core should migrate this policy's queued requests off hot replicas."""
    migrates_to_neighbours: ClassVar[bool] = True
    """When migrating: whether a request whose alternate cannot take it may move to a neighbour
    (the replica where its predicted TTFT is lowest), not only to its alternate."""
    migration_work_limits: ClassVar[tuple[float, ...]] = (math.inf,)
    """When migrating, tried in turn: under limit L a request may move only to a replica where it
    must compute at most L times the prompt tokens it must compute on the hot one (1: only where at
    least as much of it is cached; inf: anywhere). (1, inf) prefers a replica holding the prefix."""
    migration_added_work_slo_share: ClassVar[float] = 1.0
    """When migrating: a move to a replica where the request computes more prompt tokens than on
    the hot one (work the move adds to the fleet) must predict its TTFT there within this share of
    the SLO (a move that adds none: within the SLO)."""
    Options: ClassVar[type | None] = None
    """The policy's options (read from `RouterOptions.extra`): a dataclass of `setting` fields."""
    option_defaults: ClassVar[dict[str, Any]] = {}
    """Option name -> default, derived from `Options` (never written by hand)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Options" in vars(cls) and cls.Options is not None:
            cls.option_defaults = {f.name: default_of(f) for f in dataclasses.fields(cls.Options)}

    def __init__(self, options: RouterOptions) -> None:
        self.options = options

    @classmethod
    def check_option(cls, key: str, value: object) -> Any:
        """`value` for the declared option `key`: converted to the option's type (text parsed)
        and checked (`pylb.fields.check_value`; numbers must be finite). Raises
        PolicyOptionError naming the policy, the option and the value."""
        policy = getattr(cls, "name", cls.__name__)
        if cls.Options is None or key not in cls.option_defaults:
            known = ", ".join(sorted(cls.option_defaults)) or "none"
            raise PolicyOptionError(f"policy {policy!r} has no option {key!r} (its options: {known})")
        f = next(f for f in dataclasses.fields(cls.Options) if f.name == key)
        try:
            v = check_value(f, field_types(cls.Options)[key], value, from_text=isinstance(value, str), name=key)
        except SettingError as exc:
            raise PolicyOptionError(f"policy {policy!r}: option {key}={value!r}: {exc.reason}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise PolicyOptionError(f"policy {policy!r}: option {key}={value!r}: expected a finite number")
        return v

    def option(self, key: str) -> Any:
        """The value of a declared option: `options.extra[key]` converted and checked
        (`check_option`), or the default. Raises PolicyOptionError for an undeclared key or a
        bad value."""
        if key not in self.options.extra and key in self.option_defaults:
            return self.option_defaults[key]
        return self.check_option(key, self.options.extra.get(key))  # raises for an undeclared key

    def on_membership(self, replicas: Sequence[ReplicaId]) -> None:
        """The live replicas changed (full ordered list); rebuild rings or tables here."""

    def advance(self, now: float) -> None:
        """Bring time-driven private state up to `now` (called before every `choose`; calling it
        twice with the same `now` changes nothing the second time)."""

    @abstractmethod
    def choose(self, request: RoutingRequest, view: RouterView) -> Choice:
        """Pick the replica for `request`, changing nothing (the core may ask again for the same
        request). `view.replicas` is never empty when this is called."""

    def on_choice(self, request: RoutingRequest, choice: Choice, view: RouterView) -> None:
        """The core queued `request` on `choice.replica`, as `choose` answered: record it in the
        policy's private state here (once per placement; not for a retry)."""

    def on_migrate(self, request: RoutingRequest, source: int, target: int, view: RouterView) -> None:
        """The core moved the still-queued `request` from `view.replicas[source]`'s queue to
        `view.replicas[target]`'s (hotspot migration): move what the policy recorded of it in
        `on_choice` (a window's load, where it waits) here."""

    def on_dispatch(self, request: RoutingRequest, replica: int, view: RouterView) -> None:
        """The core sent `request` to `view.replicas[replica]` (update private state here)."""

    def on_complete(self, request_id: str, replica: int, view: RouterView) -> None:
        """The request finished or failed on `view.replicas[replica]`."""
