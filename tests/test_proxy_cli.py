"""`pylb serve` as a command: messages and exit codes, a real run, clean shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest

from pylb import cli
from pylb.config import load_settings

from proxy_support import fake_fleet

PYLB = [sys.executable, "-P", "-m", "pylb.cli", "serve"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}
    e.update(env or {})
    return subprocess.run(PYLB + args, capture_output=True, text=True, timeout=60, env=e)


def test_no_backend_says_how_to_give_one(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith("PYLB_"):
            monkeypatch.delenv(k)
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "--backend" in err and "PYLB_BACKENDS" in err and "pylb demo" in err


def test_bad_values_exit_2_naming_the_setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYLB_CONFIG", raising=False)
    assert cli.main(["serve", "--backend", "http://127.0.0.1:1", "--fleet-health-timeout-s", "-3"]) == 2
    assert "fleet.health_timeout_s" in capsys.readouterr().err
    assert cli.main(["serve", "--backend", "http://127.0.0.1:1", "--policy", "no-such-policy"]) == 2
    err = capsys.readouterr().err
    assert "router.policy" in err and "round-robin" in err
    monkeypatch.setenv("PYLB_PORT", "http")
    assert cli.main(["serve", "--backend", "http://127.0.0.1:1"]) == 2
    assert "PYLB_PORT" in capsys.readouterr().err
    monkeypatch.delenv("PYLB_PORT")
    assert cli.main(["serve", "--backend", "http://127.0.0.1:1", "--server-workers", "2", "--port", "0"]) == 2
    assert "server.workers" in capsys.readouterr().err


def test_print_config_is_loadable_yaml(tmp_path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.delenv("PYLB_CONFIG", raising=False)
    assert cli.main(["serve", "--print-config", "--backend", "http://127.0.0.1:9", "--port", "9999"]) == 0
    f = tmp_path / "pylb.yaml"
    f.write_text(capsys.readouterr().out)
    s = load_settings(env={}, config_path=f)
    assert s.server.port == 9999 and s.fleet.backends == ["http://127.0.0.1:9"]


async def test_serve_runs_and_stops_cleanly_on_sigterm(tmp_path) -> None:  # noqa: ANN001
    async with fake_fleet(2) as fleet:
        port = free_port()
        cfg = tmp_path / "pylb.yaml"
        cfg.write_text(f"fleet:\n  backends: [{fleet[0].url}]\n  health_interval_s: 0.1\nrouter: {{policy: round-robin}}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}
        env["PYLB_PORT"] = str(port)
        proc = await asyncio.create_subprocess_exec(
            *PYLB, "--config", str(cfg), "--backend", fleet[1].url, "--backend", fleet[0].url,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s:
                ready = False

                async def probe() -> None:
                    nonlocal ready
                    try:
                        async with s.get(url + "/ready") as r:
                            ready = r.status == 200
                    except aiohttp.ClientError:
                        pass

                for _ in range(300):
                    await probe()
                    if ready:
                        break
                    await asyncio.sleep(0.05)
                assert ready
                seen = set()
                for _ in range(4):
                    body = {"model": "pylb-sim", "prompt": "hello world", "max_tokens": 2}
                    async with s.post(url + "/v1/completions", json=body, headers={"X-Request-Id": "cli-test"}) as r:
                        assert r.status == 200
                        seen.add(r.headers["x-pylb-replica"])
                        await r.read()
                assert seen == {fleet[0].url, fleet[1].url}  # the flag's list replaced the file's
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        lines = [json.loads(line) for line in err.decode().splitlines() if line.startswith("{")]
        access = [r for r in lines if r["logger"] == "pylb.access"]
        assert len(access) == 4 and all(r["request_id"] == "cli-test" and r["status"] == 200 for r in access)
        assert {"ts", "level", "msg", "replica", "e2e_ms"} <= set(access[0])
        assert any(r["msg"] == "shutting down" for r in lines)


def test_port_in_use_exits_1() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run(["--backend", "http://127.0.0.1:1", "--port", str(port), "--policy", "round-robin", "--fleet-health-timeout-s", "0.2"])
    assert r.returncode == 1 and "cannot listen" in r.stderr
