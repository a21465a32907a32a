"""One way to declare a typed setting (`pylb.fields`), used by RouterOptions, policy options,
pylb serve's settings and `pylb simulate --router-option`; the router never imports the settings layer."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from pylb import config
from pylb.fields import SettingError, at_least, check_fields, convert, parse_assignment, setting
from pylb.router.interface import DEFAULT_BLOCK_CHARS, DEFAULT_SLO_TTFT, RouterOptions
from pylb.sim import simulate_cli


@dataclasses.dataclass
class Sample:
    n: int = setting(3, "a count", check=at_least(1))
    x: float = setting(0.5, "a number")
    on: bool = setting(False, "a switch")

    def __post_init__(self) -> None:
        check_fields(self, "Sample")


def test_convert_parses_text_and_keeps_typed_values_strict() -> None:
    assert convert(int, " 7 ", from_text=True) == 7 and convert(float, 2, from_text=False) == 2.0
    assert convert(bool, "Yes", from_text=True) is True
    with pytest.raises(SettingError, match="expected an integer"):
        convert(int, "7", from_text=False)
    with pytest.raises(SettingError, match="expected an integer"):
        convert(int, True, from_text=False)
    with pytest.raises(SettingError, match="not NaN"):
        convert(float, "nan", from_text=True)


def test_errors_carry_field_value_and_reason() -> None:
    assert Sample(x=1).x == 1.0 and isinstance(Sample(x=1).x, float)
    with pytest.raises(SettingError) as info:
        Sample(n=0)
    assert (info.value.field, info.value.value, info.value.reason) == ("Sample.n", 0, "must be at least 1")
    assert str(info.value) == "Sample.n must be at least 1, got 0"
    assert parse_assignment(Sample, "on=true") == ("on", True)
    with pytest.raises(SettingError, match="NAME one of n, x, on"):
        parse_assignment(Sample, "off=1")


def test_router_options_defaults_are_written_once_and_config_reads_them() -> None:
    rs = config.RouterSettings()
    o = RouterOptions()
    assert (o.slo_ttft, o.block_chars) == (DEFAULT_SLO_TTFT, DEFAULT_BLOCK_CHARS)
    for name, opt in config.ROUTER_OPTION_FIELDS.items():
        theirs = {f.name: f for f in dataclasses.fields(RouterOptions)}[opt]
        mine = {f.name: f for f in dataclasses.fields(config.RouterSettings)}[name]
        assert getattr(rs, name) == getattr(o, opt)
        assert mine.metadata["help"] == theirs.metadata["help"] and mine.metadata["check"] is theirs.metadata["check"]


def test_config_names_the_setting_from_the_error_not_its_message() -> None:
    with pytest.raises(config.ConfigError) as info:
        config.RouterSettings(dispatch_interval_s=-1.0).router_options("flag --router-dispatch-interval-s")
    e = info.value
    assert (e.field, e.value, e.reason) == ("router.dispatch_interval_s", -1.0, "must be a positive number")


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("block_chars=abc", "argument --router-option: block_chars expected an integer, got 'abc'"),
        ("block_chars=2", "argument --router-option: block_chars must be at least 4, got '2'"),
        ("hot_wait_s=-1", "argument --router-option: hot_wait_s must be a positive number, got '-1'"),
        ("queue_order=lifo", "argument --router-option: queue_order must be one of cheapest, cached, fifo, got 'lifo'"),
        ("key_block_tokens=100", "argument --router-option: key_block_tokens must be a whole number of router blocks"),
        ("nope=1", "argument --router-option: expected FIELD=VALUE with FIELD one of block_chars, chars_per_token, "),
        ("seed=3", "argument --router-option: expected FIELD=VALUE with FIELD one of"),
    ],
)
def test_simulate_router_option_errors_name_the_field(item: str, message: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    simulate_cli.add_arguments(parser)
    args = parser.parse_args(["--trace", "synthetic:multi-turn:sessions=2", "--no-progress", "--router-option", item])
    assert simulate_cli.run(args) == 2
    assert message in capsys.readouterr().err


def test_the_router_never_imports_the_settings_layer() -> None:
    code = (
        "import sys, pylb.router.core, pylb.router.request, pylb.router.registry as r; r.names(); "
        "assert 'pylb.config' not in sys.modules, sorted(m for m in sys.modules if m.startswith('pylb'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")
