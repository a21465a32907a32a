"""Routers by name: the one place the CLI, the simulator and the proxy look policies up.

A policy module registers itself with the `register(name)` decorator, on either of:

  * a `pylb.router.policy.Policy` subclass (the usual form): `get(name)` then returns a factory
    that builds a `pylb.router.core.CoreRouter` around a fresh instance of it, so every policy
    runs behind the same queues, budgets, mirror, TTFT model and migration;
  * any callable taking a `RouterOptions` and returning a `Router` (a whole router written by
    hand, e.g. for tests).

`names()` lists every registered name (kebab-case). The built-in policy modules are listed in
`BUILTIN_MODULES` and imported on the first lookup, so adding a policy is one new module plus
one line here.

Policy specs. `create` and `parse_spec` also accept `NAME:key=value:key=value`, which sets the
policy's declared options (`Policy.Options`) for that router only, e.g.
`dualmap:migration=false` or `dualmap:key_depth=2`. This is how ablations run side by side
(`pylb simulate --policy dualmap,dualmap:migration=false`) without being registered as
policies of their own, so `--policy all` stays the list of real policies.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from .interface import Router, RouterOptions
from .policy import Policy, PolicyOptionError

RouterFactory = Callable[[RouterOptions], Router]
F = TypeVar("F")

BUILTIN_MODULES: tuple[str, ...] = (
    "pylb.router.policies.round_robin",
    "pylb.router.policies.least_load",
    "pylb.router.policies.consistent_hash",
    "pylb.router.policies.min_ttft",
    "pylb.router.policies.dualmap",
    "pylb.router.policies.chwbl",
    "pylb.router.policies.cache_aware",
    "pylb.router.policies.weighted_score",
    "pylb.router.policies.preble_e2",
)
"""Modules whose import registers the built-in policies."""

_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_registry: dict[str, object] = {}
_loaded = False


class UnknownPolicyError(KeyError):
    """No policy is registered under that name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""


class PolicyRouterFactory:
    """The factory `get` returns for a registered `Policy` subclass: `CoreRouter(policy(options))`."""

    def __init__(self, policy: type[Policy]) -> None:
        self.policy = policy

    def __call__(self, options: RouterOptions) -> Router:
        from .core import CoreRouter  # core imports policy modules' contract only; keep import order simple

        return CoreRouter(self.policy(options), options)

    def __repr__(self) -> str:
        return f"PolicyRouterFactory({self.policy.__module__}.{self.policy.__qualname__})"


def _is_policy(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, Policy)


def register(name: str) -> Callable[[F], F]:
    """Class/function decorator: register a Policy subclass or a router factory under `name`."""
    if not _NAME.match(name):
        raise ValueError(f"policy name {name!r} must be kebab-case (lowercase letters, digits and dashes)")

    def decorator(obj: F) -> F:
        existing = _registry.get(name)
        if existing is not None and existing is not obj:
            raise ValueError(f"policy {name!r} is already registered by {existing!r}")
        if _is_policy(obj) and "name" not in vars(obj):
            obj.name = name  # type: ignore[attr-defined]
        _registry[name] = obj
        return obj

    return decorator


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def _lookup(name: str) -> object:
    _load_builtins()
    try:
        return _registry[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown policy {name!r}: expected one of {', '.join(names())}") from None


def get(name: str) -> RouterFactory:
    """The router factory registered under `name`; raises UnknownPolicyError listing the known names."""
    obj = _lookup(name)
    if _is_policy(obj):
        return PolicyRouterFactory(obj)  # type: ignore[arg-type]
    return obj  # type: ignore[return-value]


def policy_class(name: str) -> type[Policy] | None:
    """The Policy subclass registered under `name`, or None for a plain router factory."""
    obj = _lookup(name)
    return obj if _is_policy(obj) else None  # type: ignore[return-value]


def names() -> list[str]:
    """All registered policy names, sorted."""
    _load_builtins()
    return sorted(_registry)


@dataclass(frozen=True)
class PolicySpec:
    """A policy name with option overrides, parsed from `NAME[:key=value...]`."""

    name: str
    options: dict[str, object] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """The canonical spec text (what reports print): name, then key=value in the given order."""
        parts = [self.name] + [f"{k}={_fmt(v)}" for k, v in self.options.items()]
        return ":".join(parts)


def _fmt(v: object) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def parse_spec(spec: str) -> PolicySpec:
    """Parse and check `NAME[:key=value...]`: the name must be registered and every key one of
    its declared options (values are converted to the option's type and checked against its
    limits by `Policy.check_option`, the check the policy makes again when it is built).

    Raises UnknownPolicyError for the name, PolicyOptionError for an option.
    """
    name, *pairs = [p.strip() for p in spec.strip().split(":")]
    cls = policy_class(name)
    opts: dict[str, object] = {}
    for pair in pairs:
        key, eq, value = pair.partition("=")
        key = key.strip()
        if not eq or not key:
            raise PolicyOptionError(f"policy {name!r}: option {pair!r} must be key=value")
        if cls is None:
            raise PolicyOptionError(f"policy {name!r} has no option {key!r} (its options: none)")
        opts[key] = cls.check_option(key, value.strip())
    return PolicySpec(name, opts)


def create(spec: str, options: RouterOptions | None = None) -> Router:
    """A fresh router for the policy name or spec (`NAME[:key=value...]`, see `parse_spec`)."""
    ps = parse_spec(spec)
    opts = options if options is not None else RouterOptions()
    if ps.options:
        opts = dataclasses.replace(opts, extra={**opts.extra, **ps.options})
    return get(ps.name)(opts)
