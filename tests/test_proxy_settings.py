"""`pylb serve`'s router settings reach the router core: policy specs, `RouterOptions` from YAML,
environment and flags, and clean errors for bad values (real sockets, fake vLLM replicas)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest

from pylb import cli, config
from pylb.config import ConfigError, RouterSettings, Settings
from pylb.proxy.balancer import create_router
from pylb.proxy.server import ProxyServer
from pylb.router.core import CoreRouter
from pylb.router.interface import RouterOptions

from proxy_support import MODEL, fake_fleet, running_proxy, settings

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def serve_settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    """The settings `pylb serve ARGV` would run with (its own parser), under `env`."""
    args = cli.build_parser().parse_args(["serve", *argv])
    return config.load_from_args(args, env=env or {})


async def post(url: str, body: dict) -> tuple[int, str]:
    async with aiohttp.ClientSession() as s, s.post(url + "/v1/completions", json=body) as r:
        await r.read()
        return r.status, r.headers.get("x-pylb-replica", "")


async def test_settings_from_yaml_env_and_flags_reach_the_core(tmp_path: Path) -> None:
    async with fake_fleet(2) as fleet:
        cfg = tmp_path / "pylb.yaml"
        cfg.write_text(
            "router:\n  policy: least-load\n  queue_order: fifo\n  max_unprefilled_tokens: 4096\n  hot_wait_s: 2.5\n"
            "  cache_capacity_tokens: 65536\n  key_block_tokens: 256\n"
        )
        env = {"PYLB_ROUTER_MAX_UNPREFILLED_REQUESTS": "4", "PYLB_ROUTER_STARVATION_S": "12", "PYLB_ROUTER_PREFILL_S_PER_TOKEN": "2e-5"}
        argv = ["--config", str(cfg), "--port", "0", "--no-logging-access-log", "--fleet-health-interval-s", "0.05"]
        argv += ["--router-dispatch-interval-s", "0.02", "--router-migration-scan", "8", "--router-prefill-learning-rate", "0.2"]
        argv += ["--router-queue-order", "cached", "--router-slo-ttft-s", "3", "--router-seed", "7"]
        for f in fleet:
            argv += ["--backend", f.url]
        s = serve_settings(argv, env)
        async with running_proxy(s) as proxy:
            router = proxy.router
            assert isinstance(router, CoreRouter)
            o = router.options
            assert o.queue_order == "cached"  # the flag beat the YAML file
            assert (o.max_unprefilled_tokens, o.hot_wait_s, o.cache_capacity_tokens, o.key_block_tokens) == (4096, 2.5, 65536, 256)
            assert (o.max_unprefilled_requests, o.starvation_s, o.prefill_seconds_per_token) == (4, 12.0, 2e-5)
            assert (o.dispatch_interval, o.migration_scan, o.prefill_learning_rate) == (0.02, 8, 0.2)
            assert (o.slo_ttft, o.seed) == (3.0, 7)
            assert router.policy.options is o
            status, replica = await post(proxy.url, {"model": MODEL, "prompt": PROMPT, "max_tokens": 2})
            assert status == 200 and replica in {f.url for f in fleet}


async def test_defaults_are_router_options_defaults() -> None:
    async with fake_fleet(1) as fleet, running_proxy(settings([fleet[0].url], router__policy="dualmap")) as proxy:
        assert isinstance(proxy.router, CoreRouter)
        o = proxy.router.options
        assert o == RouterOptions()


async def test_policy_spec_in_serve() -> None:
    async with fake_fleet(2) as fleet:
        argv = ["--policy", "dualmap:migration=false", "--port", "0", "--no-logging-access-log", "--fleet-health-interval-s", "0.05"]
        for f in fleet:
            argv += ["--backend", f.url]
        s = serve_settings(argv)
        assert s.router.policy == "dualmap:migration=false"
        async with running_proxy(s) as proxy:
            router = proxy.router
            assert isinstance(router, CoreRouter)
            assert router.options.extra == {"migration": False}
            assert router.policy.name == "dualmap" and router.policy.migrates is False
            for i in range(3):
                status, replica = await post(proxy.url, {"model": MODEL, "prompt": PROMPT + str(i), "max_tokens": 2})
                assert status == 200 and replica in {f.url for f in fleet}
    # a spec option wins over the same key in router.extra; other extra keys stay
    r = create_router(RouterSettings(policy="dualmap:migration=false", extra={"migration": True, "key_depth": 2}))
    assert r.options.extra == {"migration": False, "key_depth": 2}  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("policy", "words"),
    [
        ("no-such-policy", ["unknown policy", "dualmap", "round-robin"]),
        ("dualmap:no_such_option=1", ["no option 'no_such_option'", "migration"]),
        ("dualmap:migration=maybe", ["migration", "maybe"]),
        ("dualmap:migration", ["key=value"]),
        ("round-robin:vnodes=3", ["no option 'vnodes'"]),
    ],
)
def test_bad_policy_specs_are_config_errors(policy: str, words: list[str]) -> None:
    s = settings(["http://127.0.0.1:1"], router__policy=policy)
    with pytest.raises(ConfigError) as info:
        ProxyServer(s)
    assert info.value.field == "router.policy" and info.value.value == policy
    assert all(w in str(info.value) for w in words), str(info.value)


def test_a_bad_value_in_router_extra_names_router_extra() -> None:
    with pytest.raises(ConfigError) as info:
        create_router(RouterSettings(extra={"slo_switch": "sometimes"}))
    assert info.value.field == "router.extra" and "slo_switch" in str(info.value)


def test_router_options_errors_from_hand_built_settings() -> None:
    # Settings built without load_settings: RouterOptions' ValueError still becomes a ConfigError
    with pytest.raises(ConfigError) as info:
        ProxyServer(Settings(router=RouterSettings(queue_order="lifo")))
    assert info.value.field == "router.queue_order" and "'lifo'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        ProxyServer(Settings(router=RouterSettings(key_block_tokens=100)))
    assert info.value.field == "router.key_block_tokens" and "block_chars" in str(info.value)


def test_serve_exits_2_naming_the_setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("PYLB_"):
            monkeypatch.delenv(k)
    backend = ["--backend", "http://127.0.0.1:1"]
    assert cli.main(["serve", *backend, "--router-queue-order", "lifo"]) == 2
    err = capsys.readouterr().err
    assert "router.queue_order" in err and "'lifo'" in err and "cheapest, cached, fifo" in err and "Traceback" not in err
    assert cli.main(["serve", *backend, "--policy", "dualmap:bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "router.policy" in err and "'dualmap:bogus=1'" in err and "migration" in err and "Traceback" not in err
    monkeypatch.setenv("PYLB_ROUTER_KEY_BLOCK_TOKENS", "100")
    assert cli.main(["serve", *backend]) == 2
    err = capsys.readouterr().err
    assert "router.key_block_tokens" in err and "PYLB_ROUTER_KEY_BLOCK_TOKENS" in err and "Traceback" not in err
    monkeypatch.delenv("PYLB_ROUTER_KEY_BLOCK_TOKENS")
    assert cli.main(["serve", *backend, "--router-extra", '{"slo_switch": "sometimes"}']) == 2
    assert "router.extra" in capsys.readouterr().err
    # a spec is a setting like any other: --print-config shows it
    assert cli.main(["serve", *backend, "--policy", "dualmap:migration=false", "--print-config"]) == 0
    assert "policy: dualmap:migration=false" in capsys.readouterr().out
