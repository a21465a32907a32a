"""pylb.config: defaults, YAML, environment and flags, precedence, and bad values."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from pylb import config
from pylb.config import FIELDS, ConfigError, RouterSettings, Settings, load_settings
from pylb.router.interface import RouterOptions

REPO = Path(__file__).resolve().parents[1]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    config.add_arguments(p)
    return p.parse_args(argv)


def test_defaults_are_the_dataclass_defaults() -> None:
    s = load_settings(env={})
    assert s == Settings()
    assert s.router.policy == "dualmap"
    assert s.server.port == 8080 and s.server.host == "127.0.0.1"
    assert s.fleet.scrape_interval_s == 0.5 and s.fleet.backends == []
    assert s.upstream.retry_statuses == [502, 503, 504]


def test_every_setting_has_a_flag_an_env_name_and_help() -> None:
    flags = [f.flag for f in FIELDS]
    envs = [f.env for f in FIELDS]
    assert len(set(flags)) == len(flags) and len(set(envs)) == len(envs)
    assert all(f.help for f in FIELDS)
    assert all(e.startswith("PYLB_") for e in envs)
    by_key = {f.key: f for f in FIELDS}
    assert by_key["server.port"].flag == "port" and by_key["server.port"].env == "PYLB_PORT"
    assert by_key["fleet.backends"].flag == "backend" and by_key["fleet.backends"].env == "PYLB_BACKENDS"
    assert by_key["router.policy"].env == "PYLB_POLICY"
    assert by_key["fleet.health_interval_s"].flag == "fleet-health-interval-s"


def test_yaml_env_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "pylb.yaml"
    f.write_text(
        "server: {port: 9000, host: 0.0.0.0}\n"
        "router: {policy: round-robin, extra: {vnodes: 64}}\n"
        "fleet:\n  backends: [http://127.0.0.1:8001, http://127.0.0.1:8002]\n  eject_5xx: 7\n"
        "logging: {access_log: false}\n"
    )
    s = load_settings(env={}, config_path=f)
    assert (s.server.port, s.server.host) == (9000, "0.0.0.0")
    assert s.router.policy == "round-robin" and s.router.extra == {"vnodes": 64}
    assert s.fleet.backends == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert s.fleet.eject_5xx == 7 and s.logging.access_log is False
    env = {"PYLB_BACKENDS": "http://127.0.0.1:9001, http://127.0.0.1:9002", "PYLB_LOGGING_ACCESS_LOG": "yes", "PYLB_ROUTER_EXTRA": '{"a": 1}'}
    s = load_settings(env=env, config_path=f)
    assert s.fleet.backends == ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]
    assert s.logging.access_log is True and s.router.extra == {"a": 1}


def test_precedence_flag_over_env_over_yaml_over_default(tmp_path: Path) -> None:
    f = tmp_path / "pylb.yaml"
    f.write_text("server: {port: 9000}\nfleet: {health_interval_s: 3}\nrouter: {slo_ttft_s: 2}\n")
    env = {"PYLB_CONFIG": str(f), "PYLB_PORT": "9100", "PYLB_FLEET_HEALTH_INTERVAL_S": "4.5"}
    s = config.load_from_args(parse(["--port", "9200"]), env=env)
    assert s.server.port == 9200  # flag > env > yaml
    assert s.fleet.health_interval_s == 4.5  # env > yaml
    assert s.router.slo_ttft_s == 2.0  # yaml > default
    assert s.fleet.healthy_threshold == 2  # default
    s = config.load_from_args(parse([]), env=env)
    assert s.server.port == 9100
    # --config beats PYLB_CONFIG
    g = tmp_path / "other.yaml"
    g.write_text("server: {port: 9300}\n")
    assert config.load_from_args(parse(["--config", str(g)]), env={"PYLB_CONFIG": str(f)}).server.port == 9300


def test_repeatable_and_comma_separated_list_flags() -> None:
    args = parse(["--backend", "http://127.0.0.1:1", "--backend", "http://127.0.0.1:2,http://127.0.0.1:3"])
    s = config.load_from_args(args, env={"PYLB_BACKENDS": "http://127.0.0.1:9"})
    assert s.fleet.backends == ["http://127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3"]


def test_bool_flags() -> None:
    assert config.load_from_args(parse(["--no-logging-access-log"]), env={}).logging.access_log is False
    assert config.load_from_args(parse(["--logging-access-log"]), env={"PYLB_LOGGING_ACCESS_LOG": "off"}).logging.access_log is True


@pytest.mark.parametrize(
    ("flags", "env", "field", "reason"),
    [
        ({"server.port": "70000"}, {}, "server.port", "TCP port"),
        ({"server.port": "eighty"}, {}, "server.port", "expected an integer"),
        ({}, {"PYLB_FLEET_SCRAPE_INTERVAL_S": "-1"}, "fleet.scrape_interval_s", "positive"),
        ({}, {"PYLB_FLEET_SCRAPE_INTERVAL_S": "nan"}, "fleet.scrape_interval_s", "NaN"),
        ({}, {"PYLB_ROUTER_SLO_TTFT_S": "0"}, "router.slo_ttft_s", "positive"),
        ({}, {"PYLB_LOGGING_ACCESS_LOG": "maybe"}, "logging.access_log", "boolean"),
        ({"logging.level": "loud"}, {}, "logging.level", "one of"),
        ({"fleet.backends": ["localhost:8000"]}, {}, "fleet.backends", "http://"),
        ({"fleet.backends": ["http://a:1", "http://a:1"]}, {}, "fleet.backends", "twice"),
        ({"fleet.backends": ["http://a:1/v1"]}, {}, "fleet.backends", "without a path"),
        ({"fleet.backends": ["http://a:99999"]}, {}, "fleet.backends", "not a valid URL"),
        ({"fleet.health_path": "health"}, {}, "fleet.health_path", "starting with /"),
        ({"fleet.healthy_threshold": "0"}, {}, "fleet.healthy_threshold", "at least 1"),
        ({"upstream.retry_statuses": ["404"]}, {}, "upstream.retry_statuses", "5xx"),
        ({"upstream.retry_statuses": ["x"]}, {}, "upstream.retry_statuses", "integers"),
        ({}, {"PYLB_ROUTER_EXTRA": "{not json"}, "router.extra", "JSON object"),
        ({}, {"PYLB_ROUTER_EXTRA": "[1]"}, "router.extra", "mapping"),
        ({"router.queue_order": "lifo"}, {}, "router.queue_order", "one of cheapest, cached, fifo"),
        ({}, {"PYLB_ROUTER_QUEUE_ORDER": "Cheapest"}, "router.queue_order", "one of cheapest, cached, fifo"),
        ({"router.max_unprefilled_tokens": "0"}, {}, "router.max_unprefilled_tokens", "at least 1"),
        ({}, {"PYLB_ROUTER_MAX_UNPREFILLED_REQUESTS": "1.5"}, "router.max_unprefilled_requests", "expected an integer"),
        ({"router.starvation_s": "0"}, {}, "router.starvation_s", "positive"),
        ({}, {"PYLB_ROUTER_HOT_WAIT_S": "inf"}, "router.hot_wait_s", "positive"),
        ({"router.dispatch_interval_s": "-0.1"}, {}, "router.dispatch_interval_s", "positive"),
        ({"router.migration_scan": "0"}, {}, "router.migration_scan", "at least 1"),
        ({}, {"PYLB_ROUTER_PREFILL_LEARNING_RATE": "1.5"}, "router.prefill_learning_rate", "(0, 1]"),
        ({"router.prefill_learning_rate": "0"}, {}, "router.prefill_learning_rate", "(0, 1]"),
        ({"router.prefill_s_per_token": "0"}, {}, "router.prefill_s_per_token", "positive"),
        ({}, {"PYLB_ROUTER_CACHE_CAPACITY_TOKENS": "-1"}, "router.cache_capacity_tokens", "at least 0"),
        # a relation RouterOptions checks: 100 tokens x 4 bytes is not a whole number of 64-byte blocks
        ({"router.key_block_tokens": "100"}, {}, "router.key_block_tokens", "whole number of router blocks"),
        # ... and when only block_chars was set, block_chars is the one named
        ({}, {"PYLB_ROUTER_BLOCK_CHARS": "48"}, "router.block_chars", "whole number of router blocks"),
    ],
)
def test_bad_values_name_field_value_source_and_reason(flags: dict, env: dict, field: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(flags, env=env)
    err = info.value
    assert err.field == field
    assert reason in err.reason
    assert field in str(err) and reason in str(err)
    assert ("flag --" in err.source) if flags else ("environment PYLB_" in err.source)


def test_bad_yaml(tmp_path: Path) -> None:
    f = tmp_path / "pylb.yaml"
    f.write_text("server: {port: 80\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(env={}, config_path=f)
    f.write_text("- a list\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_settings(env={}, config_path=f)
    f.write_text("servre: {port: 80}\n")
    with pytest.raises(ConfigError, match="unknown section") as info:
        load_settings(env={}, config_path=f)
    assert "server" in str(info.value)
    f.write_text("server: {prot: 80}\n")
    with pytest.raises(ConfigError, match="unknown setting") as info:
        load_settings(env={}, config_path=f)
    assert info.value.field == "server.prot" and "port" in str(info.value)
    f.write_text("server: {port: '80'}\n")  # YAML values must have the right type
    with pytest.raises(ConfigError, match="expected an integer") as info:
        load_settings(env={}, config_path=f)
    assert "YAML file" in info.value.source
    f.write_text("fleet: {scrape_interval_s: true}\n")
    with pytest.raises(ConfigError, match="expected a number"):
        load_settings(env={}, config_path=f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(env={}, config_path=tmp_path / "missing.yaml")
    f.write_text("")
    assert load_settings(env={}, config_path=f) == Settings()


def test_to_yaml_round_trips(tmp_path: Path) -> None:
    s = load_settings({"fleet.backends": ["http://127.0.0.1:1"], "router.policy": "round-robin"}, env={})
    f = tmp_path / "out.yaml"
    f.write_text(s.to_yaml())
    assert load_settings(env={}, config_path=f) == s


def test_docs_table_is_current() -> None:
    docs = REPO / "docs" / "serve.md"
    if not docs.exists():
        pytest.skip("docs/serve.md not in this checkout")
    assert config.settings_table_markdown() in docs.read_text(), "regenerate the settings table: python -c 'from pylb.config import settings_table_markdown as t; print(t())'"


def test_router_core_defaults_are_router_options_defaults() -> None:
    rs = RouterSettings()
    core = RouterOptions()
    assert set(config.ROUTER_OPTION_FIELDS.values()) == {f.name for f in dataclasses.fields(RouterOptions)} - {"chars_per_token", "extra"}
    for name, opt in config.ROUTER_OPTION_FIELDS.items():
        assert getattr(rs, name) == getattr(core, opt), name
    assert rs.router_options() == core


def test_router_core_settings_from_yaml_env_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "pylb.yaml"
    f.write_text(
        "router:\n  queue_order: fifo\n  max_unprefilled_tokens: 2048\n  starvation_s: 7\n  key_block_tokens: 256\n"
        "  cache_capacity_tokens: 0\n  prefill_s_per_token: 3.0e-5\n"
    )
    env = {"PYLB_ROUTER_MAX_UNPREFILLED_REQUESTS": "3", "PYLB_ROUTER_HOT_WAIT_S": "1.5", "PYLB_ROUTER_QUEUE_ORDER": "cached"}
    args = parse(["--config", str(f), "--router-dispatch-interval-s", "0.01", "--router-migration-scan", "4", "--router-prefill-learning-rate", "0.5"])
    o = config.load_from_args(args, env=env).router.router_options()
    assert o.queue_order == "cached"  # env > YAML
    assert (o.max_unprefilled_tokens, o.starvation_s, o.key_block_tokens, o.cache_capacity_tokens) == (2048, 7.0, 256, 0)
    assert o.prefill_seconds_per_token == 3e-5
    assert (o.max_unprefilled_requests, o.hot_wait_s) == (3, 1.5)
    assert (o.dispatch_interval, o.migration_scan, o.prefill_learning_rate) == (0.01, 4, 0.5)
    assert (o.slo_ttft, o.seed, o.block_chars, o.chars_per_token) == (5.0, 0, 64, 4)


def test_router_options_errors_name_the_setting() -> None:
    # settings built by hand (not through load_settings) still fail as ConfigError, not ValueError
    with pytest.raises(ConfigError) as info:
        RouterSettings(queue_order="lifo").router_options()
    assert info.value.field == "router.queue_order" and info.value.value == "lifo"
    assert "router.queue_order" in str(info.value) and "'lifo'" in str(info.value) and "cheapest" in str(info.value)
    with pytest.raises(ConfigError) as info:
        RouterSettings(dispatch_interval_s=0.0).router_options()
    assert info.value.field == "router.dispatch_interval_s" and "positive" in info.value.reason
