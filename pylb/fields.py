"""Typed settings: the one way pylb declares a setting, converts a value to its type and checks it.

Design (STYLE.md 6)
-------------------
A setting is a dataclass field declared with `setting(default, help, check=...)`: its type is
the field's annotation, its default and one-line help are written there once, and `check` (one
of the functions below, or any `value -> reason | None`) says which values are allowed. Every
typed value in pylb is declared this way and checked by the same two functions:

    convert(type, value, from_text)   a value as the setting's type (text is parsed: a flag, an
                                      environment variable, a `key=value` policy option)
    check_fields(obj, owner)          each field of a settings dataclass has its type and passes
                                      its check (called from `__post_init__`)

Both raise `SettingError`, which names the field, the value and the reason as attributes, so a
caller that reports the error in its own words (a CLI flag, a YAML key) reads them instead of
parsing a message.

Users: `pylb.router.interface.RouterOptions` (the router core's settings), each policy's
`Options` (`pylb.router.policy.Policy`), `pylb.config` (pylb serve's settings, which take the
router's fields from `RouterOptions`) and `pylb simulate --router-option`. This module imports
nothing of pylb, so the router can use it without importing the settings layer (`pylb.config`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from collections.abc import Callable
from functools import partial
from typing import Any

Check = Callable[[Any], "str | None"]
"""A value check: returns None when the value is fine, else the reason it is not."""


class SettingError(ValueError):
    """A setting has a bad value: `field` is its name (as its owner spells it, e.g.
    "RouterOptions.slo_ttft" or "slo_ttft"), `value` the offending value, `reason` why."""

    def __init__(self, field: str, value: Any, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field} {reason}, got {value!r}")


# ---- checks ----------------------------------------------------------------------------------------


def positive(v: Any) -> str | None:
    """> 0 and finite."""
    return None if v > 0 and math.isfinite(v) else "must be a positive number"


def non_negative(v: Any) -> str | None:
    """>= 0 and finite."""
    return None if v >= 0 and math.isfinite(v) else "must be zero or a positive number"


def at_least(n: float) -> Check:
    """>= n."""

    def check(v: Any) -> str | None:
        return None if v >= n else f"must be at least {n:g}"

    return check


def fraction(v: Any) -> str | None:
    """In (0, 1]."""
    return None if 0 < v <= 1 else "must be in (0, 1] (greater than 0, at most 1)"


def in_range(lo: float, hi: float) -> Check:
    """In [lo, hi]."""

    def check(v: Any) -> str | None:
        return None if lo <= v <= hi else f"must be in [{lo:g}, {hi:g}]"

    return check


def port_number(v: Any) -> str | None:
    """A TCP port, 0 (any free port) to 65535."""
    return None if 0 <= v <= 65535 else "must be a TCP port in 0..65535 (0 picks a free one)"


def one_of(*choices: str) -> Check:
    """One of the given strings."""

    def check(v: Any) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


# ---- declaration -----------------------------------------------------------------------------------


def setting(default: Any, help: str, *, check: Check | None = None, flag: str | None = None, env: str | None = None) -> Any:
    """A dataclass field with its default, help text, optional check and (for `pylb.config`)
    optional short flag / environment variable name."""
    meta = {"help": help, "check": check, "flag": flag, "env": env}
    if isinstance(default, (list, dict)):
        copy: Callable[[], Any] = partial(type(default), default)  # a fresh copy for every instance
        return dataclasses.field(default_factory=copy, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (calling its factory)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    factory: Callable[[], Any] = f.default_factory  # type: ignore[assignment]  # MISSING excluded by the dataclass itself
    return factory()


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> its type (annotations resolved), cached per class."""
    cached = _TYPES.get(cls)
    if cached is None:
        cached = _TYPES[cls] = typing.get_type_hints(cls)
    return cached


_TYPES: dict[type, dict[str, Any]] = {}


# ---- conversion ------------------------------------------------------------------------------------

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def convert(t: Any, value: Any, *, from_text: bool, name: str = "value", item_type: type = str) -> Any:
    """`value` as type `t` (bool, int, float, str, list, dict). Text (`from_text`: flags,
    environment, `key=value` options) is parsed; other values must already have the type (an int
    is accepted for a float). Raises SettingError(name, value, reason)."""

    def bad(reason: str) -> SettingError:
        return SettingError(name, value, reason)

    if t is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("expected a boolean (true/false)")
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise bad("expected an integer")
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            v = float(value)
        elif from_text and isinstance(value, str):
            try:
                v = float(value.strip())
            except ValueError:
                raise bad("expected a number") from None
        else:
            raise bad("expected a number")
        if math.isnan(v):
            raise bad("expected a number, not NaN")
        return v
    if t is str:
        if isinstance(value, str):
            return value.strip() if from_text else value
        raise bad("expected a string")
    if t is list:
        if from_text and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise bad("expected a list")
        items: list[Any] = []
        for item in value:
            if item_type is int:
                if isinstance(item, bool):
                    raise bad(f"expected a list of integers, {item!r} is not one")
                try:
                    items.append(int(item))
                except (TypeError, ValueError):
                    raise bad(f"expected a list of integers, {item!r} is not one") from None
            elif not isinstance(item, str):
                raise bad(f"expected a list of strings, {item!r} is not one")
            else:
                items.append(item)
        return items
    if t is dict:
        if from_text and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise bad(f"expected a JSON object ({exc.msg})") from None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise bad("expected a mapping with string keys")
        return dict(value)
    raise AssertionError(f"unsupported setting type {t!r}")  # pragma: no cover - a bug in a declaration


def check_value(f: dataclasses.Field, t: Any, value: Any, *, from_text: bool, name: str) -> Any:
    """`value` for field `f` (of type `t`): converted, then checked. Raises SettingError(name, ...)."""
    v = convert(t, value, from_text=from_text, name=name)
    check = f.metadata.get("check")
    if check is not None:
        reason = check(v)
        if reason:
            raise SettingError(name, value, reason)
    return v


def check_fields(obj: Any, owner: str = "") -> None:
    """Check every field of the settings dataclass `obj`: its type (an int is accepted for a
    float and stored as one) and its check. `owner` prefixes the field name in errors
    ("RouterOptions" -> "RouterOptions.slo_ttft"). Raises SettingError for the first bad field."""
    types = field_types(type(obj))
    for f in dataclasses.fields(obj):
        t = types[f.name]
        if t not in (bool, int, float, str, list, dict):
            continue
        name = f"{owner}.{f.name}" if owner else f.name
        value = getattr(obj, f.name)
        v = check_value(f, t, value, from_text=False, name=name)
        if v is not value and t is float:
            object.__setattr__(obj, f.name, v)


def parse_assignment(cls: type, item: str) -> tuple[str, Any]:
    """`NAME=VALUE` for a field of the settings dataclass `cls`, the value parsed as text to the
    field's type (and checked). Raises SettingError naming the field, or naming the item when it is
    not NAME=VALUE with a known NAME."""
    key, eq, text = item.partition("=")
    key = key.strip()
    by_name = {f.name: f for f in dataclasses.fields(cls)}
    if not eq or key not in by_name:
        raise SettingError(item, item, f"is not NAME=VALUE with NAME one of {', '.join(by_name)}")
    return key, check_value(by_name[key], field_types(cls)[key], text, from_text=True, name=key)
