"""examples/pylb.yaml against pylb/config.py: pylb's own loader reads it, it has exactly the
declared sections and settings in declaration order, each at its default (but fleet.backends),
and each setting's comment carries its help text, flag and environment variable. A setting
added, renamed or re-documented in config.py without the example fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from pylb.config import FIELDS, SECTIONS, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "pylb.yaml"

pytestmark = pytest.mark.skipif(not EXAMPLE.exists(), reason="not running from a source checkout")


def comments_above() -> dict[str, str]:
    """'section.name' -> the comment lines right above that setting, joined with single spaces."""
    out: dict[str, str] = {}
    section = ""
    block: list[str] = []
    for line in EXAMPLE.read_text(encoding="utf-8").splitlines():
        if m := re.fullmatch(r"(\w+):\s*", line):
            section, block = m.group(1), []
        elif m := re.fullmatch(r"  # ?(.*)", line):
            block.append(m.group(1))
        elif m := re.fullmatch(r"  (\w+):.*", line):
            out[f"{section}.{m.group(1)}"] = " ".join(" ".join(block).split())
            block = []
        else:
            block = []
    return out


def test_loads_with_pylbs_loader_at_the_defaults() -> None:
    loaded = load_settings(env={}, config_path=EXAMPLE).to_dict()
    defaults = Settings().to_dict()
    assert loaded["fleet"].pop("backends") and not defaults["fleet"].pop("backends")
    assert loaded == defaults


def test_has_every_declared_setting_in_order_and_nothing_else() -> None:
    data = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert list(data) == list(SECTIONS)
    for section in SECTIONS:
        assert list(data[section]) == [f.name for f in FIELDS if f.section == section], section


def test_each_setting_is_commented_with_its_help_flag_and_environment_variable() -> None:
    comments = comments_above()
    assert set(comments) == {f.key for f in FIELDS}
    for f in FIELDS:
        text = comments[f.key]
        assert " ".join(f.help.split()) in text, f"{f.key}: help text differs from pylb/config.py"
        assert f"--{f.flag}" in text and f.env in text, f"{f.key}: flag or environment variable missing"
