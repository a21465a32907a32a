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

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .interface import ReplicaId, ReplicaState, RouterOptions, RouterView, RoutingRequest

__all__ = ["BRANCHES", "Choice", "OptionLimits", "Policy", "PolicyOptionError", "ReplicaState", "RouterView", "coerce_option", "peek_choice"]

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


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce_option(policy: str, key: str, value: object, default: object) -> object:
    """`value` converted to the type of `default` (strings from the command line are parsed:
    booleans as true/false/yes/no/on/off/1/0). Raises PolicyOptionError naming policy, key, value."""

    def bad(why: str) -> PolicyOptionError:
        return PolicyOptionError(f"policy {policy!r}: option {key}={value!r}: {why}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise bad("expected an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad("expected an integer") from None
    if isinstance(default, float):
        if isinstance(value, bool):
            raise bad("expected a number")
        try:
            v = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise bad("expected a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise bad("expected a finite number")
        return v
    return str(value)


@dataclass(frozen=True, slots=True)
class OptionLimits:
    """The values a policy option allows (`Policy.option_limits`): a numeric range (`min`,
    `max`, inclusive unless `min_open`) or, for a string option, a fixed set of `choices`."""

    min: float | None = None
    max: float | None = None
    min_open: bool = False
    choices: tuple[str, ...] = ()

    def describe(self, value: object) -> str:
        """What is expected, e.g. "a number >= 1", "an integer >= 0", "a number in [0, 1]"."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        kind = "an integer" if isinstance(value, int) else "a number"
        lo = "(" if self.min_open else "["
        if self.min is not None and self.max is not None:
            return f"{kind} in {lo}{self.min:g}, {self.max:g}]"
        if self.min is not None:
            return f"{kind} {'>' if self.min_open else '>='} {self.min:g}"
        if self.max is not None:
            return f"{kind} <= {self.max:g}"
        return kind

    def allows(self, value: object) -> bool:
        """Whether `value` (already of the option's type) is within the limits."""
        if self.choices:
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return True  # limits apply to numbers and choices only
        if self.min is not None and (value < self.min or (self.min_open and value == self.min)):
            return False
        return self.max is None or value <= self.max


class Policy(ABC):
    """Base class of routing policies. Subclasses set `name` and implement `choose`.

    A policy is constructed with the router's `RouterOptions` (policy-specific settings come
    from `options.extra`, documented in each policy's module comment) and must be
    deterministic for a given `options.seed` and call sequence.

    A policy that takes settings declares them in `option_defaults` (name -> default; the
    default's type is the option's type), optionally bounds them in `option_limits`, and reads
    them with `self.option(name)`, which converts and checks the value. The registry checks
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
    option_defaults: ClassVar[dict[str, bool | int | float | str]] = {}
    """Policy-specific options read from `RouterOptions.extra`, with their defaults."""
    option_limits: ClassVar[dict[str, OptionLimits]] = {}
    """Allowed values of (some of) the declared options; an option without limits takes any
    value of its type."""

    def __init__(self, options: RouterOptions) -> None:
        self.options = options

    @classmethod
    def check_option(cls, key: str, value: object) -> Any:
        """`value` for the declared option `key`, converted to its default's type and checked
        against its limits. Raises PolicyOptionError naming the policy, the option and the value."""
        policy = getattr(cls, "name", cls.__name__)
        if key not in cls.option_defaults:
            known = ", ".join(sorted(cls.option_defaults)) or "none"
            raise PolicyOptionError(f"policy {policy!r} has no option {key!r} (its options: {known})")
        v = coerce_option(policy, key, value, cls.option_defaults[key])
        limits = cls.option_limits.get(key)
        if limits is not None and not limits.allows(v):
            raise PolicyOptionError(f"policy {policy!r}: option {key}={value!r}: expected {limits.describe(v)}")
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

    def on_dispatch(self, request: RoutingRequest, replica: int, view: RouterView) -> None:
        """The core sent `request` to `view.replicas[replica]` (update private state here)."""

    def on_complete(self, request_id: str, replica: int, view: RouterView) -> None:
        """The request finished or failed on `view.replicas[replica]`."""
