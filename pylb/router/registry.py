"""Routers by name: the one place the CLI, the simulator and the proxy look policies up.

A policy module registers its router factory with the `register(name)` decorator; `get(name)`
returns the factory and `names()` lists every registered name. A factory is any callable that
takes a `RouterOptions` and returns a `Router` (a `Router` subclass whose `__init__` takes the
options is the usual form). Names are kebab-case.

The built-in policy modules are listed in `BUILTIN_MODULES` and imported on the first lookup,
so registering a new policy is one new module plus one line here.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import TypeVar

from .interface import Router, RouterOptions

RouterFactory = Callable[[RouterOptions], Router]
F = TypeVar("F", bound=RouterFactory)

BUILTIN_MODULES: tuple[str, ...] = ("pylb.router.round_robin",)
"""Modules whose import registers the built-in policies."""

_NAME = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_registry: dict[str, RouterFactory] = {}
_loaded = False


class UnknownPolicyError(KeyError):
    """No policy is registered under that name; the message lists the known names."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the sentence readable
        return str(self.args[0]) if self.args else ""


def register(name: str) -> Callable[[F], F]:
    """Class/function decorator: register a router factory under the kebab-case `name`."""
    if not _NAME.match(name):
        raise ValueError(f"policy name {name!r} must be kebab-case (lowercase letters, digits and dashes)")

    def decorator(factory: F) -> F:
        existing = _registry.get(name)
        if existing is not None and existing is not factory:
            raise ValueError(f"policy {name!r} is already registered by {existing!r}")
        _registry[name] = factory
        return factory

    return decorator


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def get(name: str) -> RouterFactory:
    """The factory registered under `name`; raises UnknownPolicyError listing the known names."""
    _load_builtins()
    try:
        return _registry[name]
    except KeyError:
        raise UnknownPolicyError(f"unknown policy {name!r}: expected one of {', '.join(names())}") from None


def names() -> list[str]:
    """All registered policy names, sorted."""
    _load_builtins()
    return sorted(_registry)


def create(name: str, options: RouterOptions | None = None) -> Router:
    """A fresh router of policy `name` (shorthand for `get(name)(options or RouterOptions())`)."""
    return get(name)(options if options is not None else RouterOptions())
