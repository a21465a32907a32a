"""Integration tests of the fake vLLM server (`pylb.sim.server`, `pylb sim-replicas`).

Real sockets on 127.0.0.1: the official `openai` SDK for the OpenAI API (completions and chat,
streaming and not), aiohttp for raw HTTP (errors, disconnects, /metrics), and a subprocess for
the CLI. Profiles here have tiny blocks (4 tokens = 16 bytes of text) and millisecond step costs,
so every test runs in well under a second.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pylb import cli
from pylb.sim.profiles import Profile
from pylb.sim.prom import TTFT_BUCKETS
from pylb.sim.server import GEN_TOKEN_TEXT, FakeServerConfig, FakeVllmServer, render_chat

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "vllm" / "metrics-sample.txt"

# 4-token blocks; 1 ms per step; prefill 10 us/token.
FAST = Profile(
    name="test-fast",
    block_size=4,
    num_blocks=4096,
    max_num_seqs=64,
    max_num_batched_tokens=4096,
    c0=1e-3,
    c_prefill=1e-5,
    c_decode=0.0,
    c_attn=0.0,
)
MODEL = "pylb-sim"
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8  # 360 bytes = 90 tokens = 22 full blocks


def tokens(text: str) -> int:
    return math.ceil(len(text.encode()) / 4)


def expected_hit(prompt_tokens: int, cached_blocks: int, bs: int = FAST.block_size) -> int:
    """Cached tokens of a prompt whose first `cached_blocks` blocks are cached (vLLM keeps the last token)."""
    return min(cached_blocks, (prompt_tokens - 1) // bs) * bs


@pytest.fixture
async def server() -> AsyncIterator[FakeVllmServer]:
    async with FakeVllmServer(FAST, FakeServerConfig(speed=10.0, output_len=8, max_model_len=4096)) as srv:
        yield srv


def client(srv: FakeVllmServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=10)


async def scrape(session: aiohttp.ClientSession, srv: FakeVllmServer) -> dict[str, dict[tuple, float]]:
    """/metrics as {sample name: {sorted label items (minus engine/model_name): value}}."""
    async with session.get(srv.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = {k: v for k, v in s.labels.items() if k not in ("engine", "model_name")}
            out.setdefault(s.name, {})[tuple(sorted(labels.items()))] = s.value
    return out


def value(metrics: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    return metrics[name][tuple(sorted(labels.items()))]


# ---- unit: prompt rendering -------------------------------------------------------------------------


def test_chat_rendering_extends_across_turns() -> None:
    turn1 = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": " tok tok"}, {"role": "user", "content": "more"}]
    r1, r2 = render_chat(turn1), render_chat(turn2)
    assert r2.startswith(r1)
    assert render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) == (
        "<|user|>\na\nb\n<|assistant|>\n"
    )


# ---- OpenAI SDK ----------------------------------------------------------------------------------------


async def test_completions_non_stream_usage_and_cached_tokens(server: FakeVllmServer) -> None:
    async with client(server) as c:
        r1 = await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
        r2 = await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, extra_body={"ignore_eos": True})
    pt = tokens(PROMPT)
    for r in (r1, r2):
        assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
        assert r.choices[0].text == GEN_TOKEN_TEXT * 5
        assert r.choices[0].finish_reason == "length"
        assert r.usage is not None
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (pt, 5, pt + 5)
    assert r1.usage.prompt_tokens_details.cached_tokens == 0
    assert r2.usage.prompt_tokens_details.cached_tokens == expected_hit(pt, len(PROMPT) // 16) == 88


async def test_completions_stream_max_tokens_and_usage(server: FakeVllmServer) -> None:
    async with client(server) as c:
        stream = await c.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = [ch async for ch in stream]
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert texts == [GEN_TOKEN_TEXT] * 12
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:11])
    usage_chunks = [ch for ch in chunks if not ch.choices]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0]
    u = usage_chunks[0].usage
    assert (u.prompt_tokens, u.completion_tokens) == (tokens(PROMPT), 12)
    assert u.prompt_tokens_details.cached_tokens == 0


async def test_stream_without_include_usage_has_no_usage_chunk(server: FakeVllmServer) -> None:
    async with client(server) as c:
        stream = await c.completions.create(model=MODEL, prompt="abcdefgh", max_tokens=3, stream=True)
        chunks = [ch async for ch in stream]
    assert len(chunks) == 3 and all(ch.choices and ch.usage is None for ch in chunks)


async def test_eos_without_ignore_eos(server: FakeVllmServer) -> None:
    """Without ignore_eos the simulated model stops after output_len (8) tokens: finish_reason stop."""
    async with client(server) as c:
        stopped = await c.completions.create(model=MODEL, prompt="abcdefgh", max_tokens=50)
        short = await c.completions.create(model=MODEL, prompt="abcdefgh", max_tokens=3)
        default = await c.completions.create(model=MODEL, prompt="abcdefgh")
        chat = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert (stopped.choices[0].finish_reason, stopped.usage.completion_tokens) == ("stop", 8)
    assert (short.choices[0].finish_reason, short.usage.completion_tokens) == ("length", 3)
    assert default.usage.completion_tokens == 8  # vLLM's completions default max_tokens is 16 > output_len
    assert (chat.choices[0].finish_reason, chat.usage.completion_tokens) == ("stop", 8)


async def test_chat_stream_then_next_turn_hits_cache(server: FakeVllmServer) -> None:
    turn1 = [{"role": "system", "content": "You are a helpful assistant. " * 4}, {"role": "user", "content": "Hello!"}]
    async with client(server) as c:
        stream = await c.chat.completions.create(
            model=MODEL, messages=turn1, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        chunks = [ch async for ch in stream]
        deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
        assert deltas[0].role == "assistant" and deltas[0].content == ""
        reply = "".join(d.content or "" for d in deltas)
        assert reply == GEN_TOKEN_TEXT * 6
        assert chunks[0].object == "chat.completion.chunk" and chunks[0].id.startswith("chatcmpl-")
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        u1 = chunks[-1].usage
        p1 = tokens(render_chat(turn1))
        assert (u1.prompt_tokens, u1.completion_tokens, u1.prompt_tokens_details.cached_tokens) == (p1, 6, 0)

        turn2 = [*turn1, {"role": "assistant", "content": reply}, {"role": "user", "content": "Tell me more."}]
        r2 = await c.chat.completions.create(model=MODEL, messages=turn2, max_tokens=4)
    assert r2.object == "chat.completion"
    assert r2.choices[0].message.role == "assistant" and r2.choices[0].message.content == GEN_TOKEN_TEXT * 4
    assert r2.usage.prompt_tokens == tokens(render_chat(turn2))
    # turn 2 hits the full blocks of turn 1's prompt (the generated tokens are not cached)
    assert r2.usage.prompt_tokens_details.cached_tokens == len(render_chat(turn1)) // 16 * 4 > 0


async def test_token_id_prompt(server: FakeVllmServer) -> None:
    ids = list(range(1000, 1030))
    async with client(server) as c:
        r1 = await c.completions.create(model=MODEL, prompt=ids, max_tokens=2)
        r2 = await c.completions.create(model=MODEL, prompt=[ids], max_tokens=2)
    assert r1.usage.prompt_tokens == r2.usage.prompt_tokens == 30
    assert r2.usage.prompt_tokens_details.cached_tokens == 28


async def test_sdk_errors(server: FakeVllmServer) -> None:
    async with client(server) as c:
        with pytest.raises(openai.NotFoundError) as nf:
            await c.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
        with pytest.raises(openai.BadRequestError) as br:
            await c.completions.create(model=MODEL, prompt="hi", max_tokens=0)
        models = await c.models.list()
    assert "no-such-model" in str(nf.value)
    assert br.value.status_code == 400
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == 4096


# ---- raw HTTP ------------------------------------------------------------------------------------------


async def test_tokenize_answers_like_vllm_with_the_tokens_the_engine_counts(server: FakeVllmServer) -> None:
    """`POST /tokenize` (vLLM's body and answer): one token per 4 bytes, the count a completion reports."""
    text = "tokenize me please, in words of four bytes"
    messages = [{"role": "user", "content": "hi"}]
    async with aiohttp.ClientSession() as s, client(server) as c:
        async with s.post(server.url + "/tokenize", json={"model": MODEL, "prompt": text}) as r:
            assert r.status == 200
            body = await r.json()
        async with s.post(server.url + "/tokenize", json={"prompt": [5, 6, 7]}) as r:
            ids_body = await r.json()
        async with s.post(server.url + "/tokenize", json={"messages": messages}) as r:
            chat_body = await r.json()
        done = await c.completions.create(model=MODEL, prompt=text, max_tokens=1)
    assert set(body) == {"count", "max_model_len", "tokens", "token_strs"}
    assert body["count"] == len(body["tokens"]) == tokens(text) == done.usage.prompt_tokens
    assert body["max_model_len"] == 4096
    packed = b"".join(t.to_bytes(4, "little") for t in body["tokens"])
    assert packed.rstrip(b"\0") == text.encode()  # the ids pack back into the text the engine hashes
    assert ids_body["tokens"] == [5, 6, 7]
    assert chat_body["count"] == tokens(render_chat(messages))


async def test_health_models_and_unknown_path(server: FakeVllmServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(server.url + "/health") as r:
            assert r.status == 200 and await r.read() == b""
        async with s.get(server.url + "/v1/models") as r:
            body = await r.json()
            assert body["object"] == "list" and body["data"][0]["id"] == MODEL
        async with s.get(server.url + "/v1/nope") as r:
            assert r.status == 404
        async with s.get(server.url + "/v1/completions") as r:
            assert r.status == 405


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/v1/completions", b"{not json", 400, "JSON"),
        ("/v1/completions", b"[1, 2]", 400, "object"),
        ("/v1/completions", {"model": MODEL}, 400, "prompt"),
        ("/v1/completions", {"prompt": ""}, 400, "empty"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "maximum context length"),
        ("/v1/completions", {"prompt": "x" * 4 * 4096}, 400, "maximum context length"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt"),
        ("/v1/completions", {"prompt": "x" * (2 << 20)}, 413, "too large"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n must be 1"),
        ("/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream"),
        ("/v1/completions", {"prompt": "hi", "model": "other"}, 404, "does not exist"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 400, "role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "text"),
        ("/tokenize", {"model": MODEL}, 400, "prompt"),
        ("/tokenize", {"prompt": 5}, 400, "prompt"),
        ("/tokenize", {"prompt": "hi", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
        ("/tokenize", {"prompt": "hi", "model": "other"}, 404, "does not exist"),
        ("/tokenize", {"messages": []}, 400, "messages"),
    ],
)
async def test_request_errors(server: FakeVllmServer, path: str, body: object, status: int, needle: str) -> None:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + path, data=io.BytesIO(data), headers={"Content-Type": "application/json"}) as r:
            assert r.status == status
            err = (await r.json())["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status
    assert err["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert needle in err["message"]
    if status == 404:
        assert err["param"] == "model"


async def _running(session: aiohttp.ClientSession, srv: FakeVllmServer, want: float, timeout: float = 2.0) -> dict:
    deadline = time.perf_counter() + timeout
    while True:
        m = await scrape(session, srv)
        if value(m, "vllm:num_requests_running") == want or time.perf_counter() > deadline:
            return m
        await asyncio.sleep(0.01)


async def test_client_disconnect_aborts_stream_and_frees_blocks() -> None:
    # 1 ms per step in real time: 5,000 tokens would take 5 s.
    async with FakeVllmServer(FAST, FakeServerConfig(speed=1.0)) as srv, aiohttp.ClientSession() as s:
        body = {"prompt": PROMPT, "max_tokens": 3000, "stream": True, "ignore_eos": True}
        resp = await s.post(srv.url + "/v1/completions", json=body)
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        line = await resp.content.readline()
        assert line.startswith(b"data: {")
        m = await scrape(s, srv)
        assert value(m, "vllm:num_requests_running") == 1
        assert value(m, "vllm:kv_cache_usage_perc") > 0
        resp.close()  # client goes away mid-stream
        m = await _running(s, srv, 0)
        assert value(m, "vllm:num_requests_running") == 0
        assert value(m, "vllm:kv_cache_usage_perc") == 0
        assert value(m, "vllm:request_success_total", finished_reason="abort") == 1
        assert srv.engine.num_free_blocks == FAST.num_blocks

        # non-streaming: the client gives up while waiting for the whole completion
        with pytest.raises(asyncio.TimeoutError):
            async with asyncio.timeout(0.1) if sys.version_info >= (3, 11) else _timeout(0.1):
                await s.post(srv.url + "/v1/completions", json={**body, "stream": False})
        m = await _running(s, srv, 0)
        assert value(m, "vllm:num_requests_running") == 0
        assert value(m, "vllm:request_success_total", finished_reason="abort") == 2


class _timeout:  # asyncio.timeout for Python 3.10
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def __aenter__(self) -> None:
        self.task = asyncio.current_task()
        self.handle = asyncio.get_running_loop().call_later(self.delay, self.task.cancel)  # type: ignore[union-attr]

    async def __aexit__(self, et: object, exc: object, tb: object) -> None:
        self.handle.cancel()
        if et is asyncio.CancelledError:
            raise asyncio.TimeoutError


async def test_stop_ends_open_streams_quickly() -> None:
    srv = FakeVllmServer(FAST, FakeServerConfig(speed=1.0))
    await srv.start()
    async with aiohttp.ClientSession() as s:
        resp = await s.post(srv.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3000, "stream": True, "ignore_eos": True})
        await resp.content.readline()
        t = time.perf_counter()
        await srv.stop()
        assert time.perf_counter() - t < 1.0
        rest = await resp.content.read()
        assert b"[DONE]" not in rest
        resp.close()


async def test_metrics_counters_and_vllm_names(server: FakeVllmServer) -> None:
    async with client(server) as c:
        for _ in range(3):
            await c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    pt = tokens(PROMPT)
    async with aiohttp.ClientSession() as s:
        m = await scrape(s, server)
        async with s.get(server.url + "/metrics") as r:
            text = await r.text()
    assert value(m, "vllm:prefix_cache_queries_total") == 3 * pt
    assert value(m, "vllm:prefix_cache_hits_total") == 2 * expected_hit(pt, 22)
    assert value(m, "vllm:prompt_tokens_total") == 3 * pt
    assert value(m, "vllm:generation_tokens_total") == 12
    assert value(m, "vllm:num_requests_running") == 0 and value(m, "vllm:num_requests_waiting") == 0
    assert value(m, "vllm:time_to_first_token_seconds_count") == 3
    assert value(m, "vllm:e2e_request_latency_seconds_count") == 3
    assert value(m, "vllm:request_success_total", finished_reason="length") == 3
    info = next(iter(m["vllm:cache_config_info"]))
    assert dict(info)["block_size"] == "4" and dict(info)["num_gpu_blocks"] == "4096"
    assert dict(info)["enable_prefix_caching"] == "True"

    ours = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:cache_config_info",
                 "vllm:time_to_first_token_seconds"):  # fmt: skip
        assert name in ours, name
    ttft_les = [float(s.labels["le"]) for s in ours["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert ttft_les == [*TTFT_BUCKETS, math.inf]
    for fam in ours.values():
        for s in fam.samples:
            if fam.name != "vllm:cache_config_info":
                assert s.labels["engine"] == "0" and s.labels["model_name"] == MODEL, s

    if not SAMPLE.is_file():
        pytest.skip(f"no vLLM metrics sample at {SAMPLE}")
    real = {f.name: f for f in text_string_to_metric_families(SAMPLE.read_text())}
    for name, fam in ours.items():
        assert name in real, f"{name} is not a vLLM metric"
        ref = real[name]
        assert fam.type == ref.type, name
        assert fam.documentation == ref.documentation, name
        ref_labels = {s.name: set(s.labels) for s in ref.samples}
        for s in fam.samples:
            if name == "vllm:cache_config_info":
                assert set(s.labels) <= ref_labels[s.name], s
            else:
                assert set(s.labels) == ref_labels[s.name], s
    ref_les = [float(s.labels["le"]) for s in real["vllm:time_to_first_token_seconds"].samples if s.name.endswith("_bucket")]
    assert ttft_les == ref_les


# ---- timing ------------------------------------------------------------------------------------------


async def _stream_times(srv: FakeVllmServer, prompt: str, max_tokens: int) -> tuple[float, float]:
    """(TTFT, end-to-end) seconds of one streamed completion."""
    async with aiohttp.ClientSession() as s:
        t0 = time.perf_counter()
        async with s.post(srv.url + "/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens, "stream": True, "ignore_eos": True}) as r:
            await r.content.readline()
            ttft = time.perf_counter() - t0
            await r.read()
        return ttft, time.perf_counter() - t0


async def test_speed_divides_step_times() -> None:
    slow_profile = replace(FAST, name="slow", c0=2e-3)  # 50 decode steps: 100 ms at speed 1
    async with FakeVllmServer(slow_profile, FakeServerConfig(speed=1.0)) as slow:
        _, t_slow = await _stream_times(slow, "abcdefgh", 50)
    async with FakeVllmServer(slow_profile, FakeServerConfig(speed=10.0)) as fast:
        _, t_fast = await _stream_times(fast, "abcdefgh", 50)
    assert 0.09 < t_slow < 0.5
    assert t_fast < t_slow / 3


async def test_cached_prompt_has_lower_ttft() -> None:
    prefill_heavy = replace(FAST, name="prefill-heavy", c_prefill=1e-4)  # 1,000-token prompt: 100 ms cold
    prompt = "0123456789abcdef" * 250  # 4,000 bytes = 1,000 tokens
    async with FakeVllmServer(prefill_heavy, FakeServerConfig(speed=1.0)) as srv:
        cold, _ = await _stream_times(srv, prompt, 2)
        warm, _ = await _stream_times(srv, prompt, 2)
    assert cold > 0.09
    assert warm < cold / 3


# ---- CLI ---------------------------------------------------------------------------------------------


def test_cli_starts_replicas_and_exits_on_sigterm(tmp_path: Path) -> None:
    prof = tmp_path / "p.yaml"
    prof.write_text("block_size: 4\nnum_blocks: 256\nmax_num_seqs: 8\nmax_num_batched_tokens: 256\nc0: 0.001\nc_prefill: 0\nc_decode: 0\nc_attn: 0\n")
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "pylb.cli", "sim-replicas", "--replicas", "2", "--base-port", "0", "--profile", str(prof), "--speed", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        urls = []
        for _ in range(2):
            line = proc.stdout.readline()
            assert line.startswith(f"replica {len(urls)}: http://127.0.0.1:"), line + proc.stderr.read()  # type: ignore[union-attr]
            urls.append(line.split()[2])
        for url in urls:
            with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                assert sock.recv(64).startswith(b"HTTP/1.1 200")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--base-port", "8000", "--speed", "-1"], "--speed"),
        (["--base-port", "8000", "--replicas", "0"], "--replicas"),
        (["--base-port", "70000"], "--base-port"),
        (["--base-port", "65535", "--replicas", "2"], "--base-port"),
        (["--base-port", "8000", "--profile", "no-such-profile"], "--profile"),
        (["--base-port", "8000", "--max-model-len", "99999999"], "--max-model-len"),
    ],
)
def test_cli_bad_flags_exit_2(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = cli.main(["sim-replicas", *argv])
    except SystemExit as exc:  # argparse type errors
        rc = exc.code  # type: ignore[assignment]
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and "Traceback" not in err


def test_cli_port_in_use_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        rc = cli.main(["sim-replicas", "--base-port", str(port), "--profile", "dualmap-910b"])
    err = capsys.readouterr().err
    assert rc == 1
    assert f"127.0.0.1:{port}" in err and "in use" in err and "Traceback" not in err


def test_module_imports_without_running_server() -> None:
    """The CLI module exposes the subcommand protocol."""
    from pylb.sim import replicas_cli

    assert callable(replicas_cli.add_arguments) and callable(replicas_cli.run)
    assert os.path.basename(replicas_cli.__file__) == "replicas_cli.py"
