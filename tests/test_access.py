"""Issue 16 §4: client API keys (401 in OpenAI's shape), the client's Authorization forwarded
only when configured, the admin listener, no prompt or key in any log line, and a real
`pylb serve` draining on SIGTERM."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from pylb.config import ConfigError
from pylb.proxy.server import ProxyServer

from proxy_support import free_port_on, running_proxy, scripted, settings


async def test_api_keys_guard_the_api_and_replicas_never_see_them(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# pylb's clients\n{hashlib.sha256(b'file-key').hexdigest()}\n\n")
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], server__api_keys=["k-1"], server__api_keys_file=str(keys_file))) as proxy:
        async with aiohttp.ClientSession() as s:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k-1"}):
                async with s.post(proxy.url + "/v1/completions", json={"prompt": "x"}, headers=headers) as r:
                    assert r.status == 401 and r.headers["WWW-Authenticate"] == "Bearer"
                    err = (await r.json())["error"]
                    assert err["code"] == 401 and err["type"] == "AuthenticationError" and err["message"]
            async with s.get(proxy.url + "/v1/models") as r:
                assert r.status == 401
            async with s.get(proxy.url + "/health") as r:  # operations paths stay open
                assert r.status == 200
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                await bad.completions.create(model="m", prompt="x", max_tokens=1)
        for key in ("k-1", "file-key"):
            async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key=key, max_retries=0) as good:
                assert (await good.completions.create(model="m", prompt="x", max_tokens=1)).choices
        assert len(rep.requests) == 2
        assert all("authorization" not in {k.lower() for k in headers} for headers, _ in rep.requests)


def test_a_keys_file_line_that_is_not_a_digest_is_a_config_error(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("plain-key\n")
    with pytest.raises(ConfigError) as exc:
        ProxyServer(settings(["http://127.0.0.1:1"], server__api_keys_file=str(keys_file)))
    assert exc.value.field == "server.api_keys_file" and "line 1" in str(exc.value)


async def test_admin_listener_takes_metrics_health_and_ready() -> None:
    port = free_port_on(["127.0.0.1"])
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], server__admin_port=port)) as proxy, aiohttp.ClientSession() as s:
        assert proxy.admin_port == port
        for path in ("/metrics", "/health", "/ready"):
            async with s.get(proxy.url + path) as r:
                assert r.status == 404, path
            async with s.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 200, path
        async with s.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as r:
            assert r.status == 200


async def test_logs_never_hold_prompts_or_keys(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_key, prompt = "sk-NEVER-LOGGED", "a very private prompt"
    auth = {"Authorization": f"Bearer {secret_key}"}
    async with scripted(2) as (rep, bad), running_proxy(settings([rep.url, bad.url], logging__access_log=True, server__api_keys=[secret_key])) as proxy:
        bad.mode, bad.status = "status", 500
        async with aiohttp.ClientSession() as s:
            bodies: list[bytes] = [
                json.dumps({"prompt": prompt}).encode(),  # served, or a 500 from the bad replica
                json.dumps({"prompt": prompt, "stream": True}).encode(),
                b'{"prompt": "' + prompt.encode() + b'", ',  # not JSON
                json.dumps({"prompt": prompt, "max_tokens": "many"}).encode(),  # a bad field
                json.dumps({"messages": prompt}).encode(),
            ]
            for body in bodies:
                for path in ("/v1/completions", "/v1/chat/completions"):
                    async with s.post(proxy.url + path, data=body, headers={**auth, "Content-Type": "application/json"}) as r:
                        await r.read()
            async with s.post(proxy.url + "/v1/completions", json={"prompt": prompt}, headers={"Authorization": "Bearer sk-wrong-NEVER-LOGGED"}) as r:
                assert r.status == 401
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + json.dumps(record.__dict__, default=str)
        assert "NEVER-LOGGED" not in text and "private prompt" not in text, record.__dict__


async def test_sigterm_drains_a_real_pylb_serve() -> None:
    """`pylb serve` on SIGTERM: /ready turns 503 first, a stream in flight finishes within
    server.shutdown_timeout_s, and the process exits 0."""
    async with scripted(1) as (rep,):
        rep.events, rep.event_sleep = 20, 0.05  # a 1 s stream
        port = free_port_on(["127.0.0.1"])
        env = {**os.environ, "PYLB_BACKENDS": rep.url}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "pylb.cli", "serve", "--port", str(port), "--policy", "round-robin", "--server-shutdown-timeout-s", "5",
            "--fleet-health-interval-s", "0.1", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as s, aiohttp.ClientSession() as probe:
                for _ in range(300):
                    try:
                        async with probe.get(url + "/ready") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                resp = await s.post(url + "/v1/completions", json={"prompt": "s", "stream": True})
                assert resp.status == 200
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.2)
                async with probe.get(url + "/ready") as r:  # on the connection opened before
                    assert r.status == 503
                text = (await resp.read()).decode()
                assert '"error"' not in text and text.rstrip().endswith("data: [DONE]")
        finally:  # it is draining: give it the time to exit on its own before a second signal
            try:
                _, err = await asyncio.wait_for(proc.communicate(), 10)
            except asyncio.TimeoutError:
                proc.send_signal(signal.SIGTERM)
                _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert time.monotonic() - t0 < 5 + 2


async def test_reload_applies_live_settings_and_rejects_restart_only_ones_as_a_whole() -> None:
    async with scripted(2) as (a, b), running_proxy(settings([a.url])) as proxy:
        assert list(proxy.fleet.healthy) == [a.url]
        with pytest.raises(ConfigError) as exc:
            await proxy.reload(settings([a.url, b.url], server__port=1234))
        assert exc.value.field == "server.port" and list(proxy.fleet.healthy) == [a.url]
        changed = await proxy.reload(settings([a.url, b.url], server__api_keys=["k"], server__body_timeout_s=7.0))
        assert set(changed) == {"fleet.backends", "server.api_keys", "server.body_timeout_s"}
        assert list(proxy.fleet.healthy) == [a.url, b.url] and proxy.settings.server.body_timeout_s == 7.0
        async with aiohttp.ClientSession() as s:
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 401
        await proxy.reload(settings([b.url]))
        assert list(proxy.fleet.healthy) == [b.url]


async def test_sighup_reloads_a_real_pylb_serve(tmp_path: Path) -> None:
    async with scripted(2) as (a, b):
        cfg = tmp_path / "pylb.yaml"
        cfg.write_text(f"fleet:\n  backends: [{a.url}]\n  health_interval_s: 0.1\n")
        port = free_port_on(["127.0.0.1"])
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-P", "-m", "pylb.cli", "serve", "--config", str(cfg), "--port", str(port), "--policy", "round-robin",
            env={k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"

        async def replicas_seen(s: aiohttp.ClientSession) -> set[str]:
            seen = set()
            for i in range(6):
                async with s.post(url + "/v1/completions", json={"prompt": f"x{i}"}) as r:
                    assert r.status == 200
                    seen.add(r.headers["x-pylb-replica"])
            return seen

        try:
            async with aiohttp.ClientSession() as s:
                for _ in range(300):
                    try:
                        async with s.get(url + "/ready") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        pass
                    await asyncio.sleep(0.05)
                assert await replicas_seen(s) == {a.url}
                cfg.write_text(f"fleet:\n  backends: [{a.url}, {b.url}]\n  health_interval_s: 0.1\n")
                proc.send_signal(signal.SIGHUP)
                for _ in range(100):
                    await asyncio.sleep(0.05)
                    if len(await replicas_seen(s)) == 2:
                        break
                assert await replicas_seen(s) == {a.url, b.url}
                cfg.write_text("fleet:\n  backends: [not a url]\n")  # invalid: rejected, pylb goes on
                proc.send_signal(signal.SIGHUP)
                await asyncio.sleep(0.5)
                assert await replicas_seen(s) == {a.url, b.url}
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(proc.communicate(), 30)
        text = err.decode()
        assert proc.returncode == 0, text[-2000:]
        assert "pylb reloaded its settings (fleet.backends)" in text and "reload rejected" in text


# ---- HTTPS towards clients -----------------------------------------------------------------------------


def _peer_certificate(port: int, ca: Path) -> bytes:
    """The DER certificate pylb's listener presents to a new TLS connection."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw_sock, ctx.wrap_socket(raw_sock, server_hostname="127.0.0.1") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


async def test_https_for_clients_with_certificate_reload(tmp_path: Path) -> None:
    import ssl

    from conftest import make_self_signed

    crt, key = make_self_signed(tmp_path, "first")
    crt2, key2 = make_self_signed(tmp_path, "second")
    async with scripted(1) as (rep,), running_proxy(settings([rep.url], server__tls_cert=str(crt), server__tls_key=str(key))) as proxy:
        assert proxy.url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(crt))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trusted)) as s:
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "x"}) as r:
                assert r.status == 200 and r.headers["x-pylb-replica"] == rep.url
            async with s.post(proxy.url + "/v1/completions", json={"prompt": "s", "stream": True}) as r:
                assert r.status == 200 and (await r.read()).rstrip().endswith(b"data: [DONE]")
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="k", max_retries=0, http_client=_httpx_client(crt)) as client:
            assert (await client.completions.create(model="m", prompt="x", max_tokens=1)).choices
        # a plain-HTTP client gets no answer from the TLS listener
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.post(proxy.url.replace("https://", "http://") + "/v1/completions", json={"prompt": "x"}) as r:
                    await r.read()
        first = await asyncio.to_thread(_peer_certificate, proxy.port, crt)
        # a reload with a new pair: new connections get the new certificate
        new = settings([rep.url], server__tls_cert=str(crt2), server__tls_key=str(key2))
        assert set(await proxy.reload(new)) == {"server.tls_cert", "server.tls_key"}
        second = await asyncio.to_thread(_peer_certificate, proxy.port, crt2)
        assert first != second
        # turning TLS off needs a restart: rejected as a whole, the running pair stays
        with pytest.raises(ConfigError) as exc:
            await proxy.reload(settings([rep.url]))
        assert exc.value.field == "server.tls_cert" and "restart" in str(exc.value)
        assert await asyncio.to_thread(_peer_certificate, proxy.port, crt2) == second
    assert len(rep.requests) == 3


def _httpx_client(ca: Path) -> Any:
    """The OpenAI SDK's own HTTP client, trusting `ca`."""
    import ssl

    return openai.DefaultAsyncHttpxClient(verify=ssl.create_default_context(cafile=str(ca)))


def test_a_certificate_without_its_key_is_a_config_error(cert: tuple[Path, Path]) -> None:
    crt, key = cert
    with pytest.raises(ConfigError) as exc:
        ProxyServer(settings(["http://127.0.0.1:1"], server__tls_cert=str(crt)))
    assert exc.value.field == "server.tls_key"
    with pytest.raises(ConfigError) as exc:
        ProxyServer(settings(["http://127.0.0.1:1"], server__tls_cert=str(key), server__tls_key=str(key)))  # a key is no certificate
    assert exc.value.field == "server.tls_cert" and "cannot load" in str(exc.value)
