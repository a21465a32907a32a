"""The replay client against a small OpenAI-compatible streaming server, over real sockets.

The server below speaks the completions and chat streaming protocols (SSE `data: {json}` chunks,
a usage chunk, `data: [DONE]`) with controllable delays, and misbehaves on request: a prompt that
starts with `!500`, `!drop`, `!hang`, `!err`, `!nodone` or `!json` gets a 500, a connection
dropped mid-stream, no answer, an error event in the stream, a stream without `[DONE]`, or a
non-streaming JSON answer.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from pylb.cli import main
from pylb.workload import replay as replay_mod
from pylb.workload.replay import ReplayError, normalize_url, replay
from pylb.workload.types import WorkloadRequest


class FakeOpenAI:
    """A minimal OpenAI-compatible streaming server with a controllable delay."""

    def __init__(self) -> None:
        self.ttft_delay = 0.05
        self.token_delay = 0.0
        self.cached_fraction: float | None = 0.5  # None: usage without prompt_tokens_details
        self.bodies: list[dict[str, Any]] = []
        self.arrivals: list[float] = []
        self.paths: list[str] = []
        self.models_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        return app

    async def models(self, request: web.Request) -> web.Response:
        self.models_calls += 1
        return web.json_response({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.perf_counter())
        self.paths.append(request.path)
        body = await request.json()
        self.bodies.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            return await self._answer(request, body)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        chat = request.path.endswith("/chat/completions")
        text = body["messages"][-1]["content"] if chat else body["prompt"]
        mode = text.split(" ", 1)[0] if text.startswith("!") else "ok"
        if mode == "!500":
            return web.json_response({"error": {"message": "boom", "type": "InternalServerError", "code": 500}}, status=500)
        if mode == "!json":
            return web.json_response({"object": "text_completion", "choices": [{"text": "x"}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        if mode == "!hang":
            await asyncio.sleep(10)  # cancelled when the client goes away (handler_cancellation)
        await asyncio.sleep(self.ttft_delay)

        async def send(obj: Any) -> None:
            await resp.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

        base = {"id": "cmpl-1", "created": 0, "model": body["model"]}
        if chat:
            base["object"] = "chat.completion.chunk"
            await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        else:
            base["object"] = "text_completion"
        n = body["max_tokens"]
        for i in range(n):
            if i and self.token_delay:
                await asyncio.sleep(self.token_delay)
            piece = " tok"
            choice = {"index": 0, "delta": {"content": piece}} if chat else {"index": 0, "text": piece}
            choice["finish_reason"] = "length" if i == n - 1 else None
            await send({**base, "choices": [choice]})
            if i == 0 and mode == "!drop":
                assert request.transport is not None
                request.transport.abort()  # the connection drops mid-stream
                return resp
            if i == 0 and mode == "!err":
                await send({"error": {"object": "error", "message": "engine died", "type": "InternalServerError", "code": 500}})
                await send(b"[DONE]")
                await resp.write_eof()
                return resp
        if body.get("stream_options", {}).get("include_usage"):
            prompt_tokens = len(text.encode()) // 4
            usage: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            if self.cached_fraction is not None:
                usage["prompt_tokens_details"] = {"cached_tokens": int(prompt_tokens * self.cached_fraction)}
            await send({**base, "choices": [], "usage": usage})
        if mode != "!nodone":
            await send(b"[DONE]")
        await resp.write_eof()
        return resp


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeOpenAI, str]]:
    server = FakeOpenAI()
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _text(text: str) -> str:
    return text


def wreq(i: int, arrival: float, text: str = "", output_tokens: int = 4, prompt_tokens: int = 8) -> WorkloadRequest:
    text = text or f" r{i:02d}" * prompt_tokens
    return WorkloadRequest(f"r{i}", arrival, prompt_tokens, output_tokens, partial(_text, text))


# ---- happy path ----------------------------------------------------------------------------------


async def test_sends_at_scaled_times_and_measures(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    server.ttft_delay, server.token_delay = 0.15, 0.02
    reqs = [wreq(i, a, output_tokens=6) for i, a in enumerate([0.0, 0.4, 0.8, 1.2])]
    result = await replay(reqs, url, rate_scale=2.0)
    s = result.summary
    assert (s.requests, s.completed, s.errors, s.not_sent) == (4, 4, 0, 0)
    assert s.model == "fake-model" and server.models_calls == 1
    # Sent at arrival / 2 (loosely: a shared, busy machine).
    offsets = [t - server.arrivals[0] for t in server.arrivals]
    assert offsets == pytest.approx([0.0, 0.2, 0.4, 0.6], abs=0.1)
    assert [r.scheduled_s for r in result.records] == pytest.approx([0.0, 0.2, 0.4, 0.6])
    for r in result.records:
        assert r.ok and r.status == 200 and r.error is None
        assert 0.15 <= r.ttft_s < 0.15 + 0.25
        assert r.output_tokens == 6 and r.content_chunks == 6
        assert r.e2e_s >= r.ttft_s + 5 * 0.02
        assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / 5)
        assert 0.02 <= r.tpot_s < 0.08
        assert r.usage_prompt_tokens == 8 and r.cached_tokens == 4
    assert s.ttft_p50 is not None and 0.15 <= s.ttft_p50 <= s.ttft_p90 <= s.ttft_p99 < 0.4
    assert s.tpot_p50 is not None and s.e2e_p99 is not None and s.e2e_p99 >= s.ttft_p99
    assert s.cached_token_rate == pytest.approx(0.5)
    assert (s.usage_prompt_tokens, s.usage_cached_tokens) == (32, 16)
    assert s.slo_attainment == 1.0
    assert 0.6 < s.wall_s < 2.0
    assert s.request_throughput == pytest.approx(4 / s.wall_s)
    assert s.output_throughput == pytest.approx(24 / s.wall_s)
    table = result.table()
    assert "TTFT" in table and "SLO attainment" in table and "50.0 %" in table


async def test_request_body_completions_and_chat(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    reqs = [wreq(0, 0.0, text="hello world ", output_tokens=3, prompt_tokens=3)]
    await replay(reqs, url + "/v1/", model="m1")
    await replay(reqs, url, model="m2", endpoint="chat", extra_body={"temperature": 0.0})
    assert server.models_calls == 0
    assert server.paths == ["/v1/completions", "/v1/chat/completions"]
    common = {"max_tokens": 3, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    assert server.bodies[0] == {"model": "m1", "prompt": "hello world ", **common}
    assert server.bodies[1] == {
        "model": "m2",
        "messages": [{"role": "user", "content": "hello world "}],
        "temperature": 0.0,
        **common,
    }


async def test_chat_stream_measures_ttft_on_content_not_role_chunk(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    server.cached_fraction = None
    result = await replay([wreq(0, 0.0, output_tokens=1)], url, endpoint="chat")
    (r,) = result.records
    assert r.ok and r.content_chunks == 1 and r.output_tokens == 1 and r.tpot_s is None
    assert r.cached_tokens is None and r.usage_prompt_tokens == 8
    assert result.summary.cached_token_rate is None  # the server reported no cached tokens
    assert result.summary.tpot_p50 is None


# ---- failures ------------------------------------------------------------------------------------


async def test_errors_are_recorded_by_kind(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    modes = ["", "!500 x", "!drop x", "!hang x", "!err x", "!nodone x", "!json x"]
    reqs = [wreq(i, 0.0, text=m) for i, m in enumerate(modes)]
    result = await replay(reqs, url, model="m", timeout_s=0.6, slo_ttft_s=1.0)
    by_id = {r.request_id: r for r in result.records}
    assert by_id["r0"].ok
    assert (by_id["r1"].error, by_id["r1"].status, by_id["r1"].error_detail) == ("http_500", 500, "boom")
    assert by_id["r2"].error == "connection" and by_id["r2"].ttft_s is not None  # dropped after a token
    assert by_id["r3"].error == "timeout" and by_id["r3"].ttft_s is None
    assert by_id["r4"].error == "stream_error" and by_id["r4"].error_detail == "engine died"
    assert by_id["r5"].error == "incomplete"
    assert by_id["r6"].error == "bad_response"
    s = result.summary
    assert s.errors_by_kind == {
        "bad_response": 1, "connection": 1, "http_500": 1, "incomplete": 1, "stream_error": 1, "timeout": 1,
    }  # fmt: skip
    assert (s.requests, s.completed, s.errors) == (7, 1, 6)
    assert s.slo_attainment == pytest.approx(1 / 7)  # errors count as misses
    assert s.wall_s < 3.0  # the hung request was cut at its timeout
    for _ in range(50):  # the server's hung handler is cancelled once the client closes
        if server.in_flight == 0:
            break
        await asyncio.sleep(0.02)
    assert server.in_flight == 0


async def test_connection_refused_is_an_error_not_an_exception() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    result = await replay([wreq(0, 0.0), wreq(1, 0.01)], url, model="m", timeout_s=2)
    assert result.summary.errors_by_kind == {"connection": 2}
    assert result.summary.slo_attainment == 0.0 and result.summary.ttft_p50 is None
    with pytest.raises(ReplayError, match="/v1/models failed"):
        await replay([wreq(0, 0.0)], url, timeout_s=2)


# ---- pacing --------------------------------------------------------------------------------------


async def test_duration_stops_issuing(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    server.ttft_delay = 0.3  # in flight when the duration ends: still waited for
    reqs = [wreq(i, a) for i, a in enumerate([0.0, 0.2, 0.4, 5.0, 6.0])]
    t0 = time.perf_counter()
    result = await replay(reqs, url, model="m", rate_scale=2.0, duration_s=0.25)
    assert time.perf_counter() - t0 < 2.0
    assert [r.request_id for r in result.records] == ["r0", "r1", "r2"]  # scheduled at 0, 0.1, 0.2
    assert all(r.ok for r in result.records)
    assert (result.summary.requests, result.summary.not_sent) == (3, 2)


async def test_concurrency_limit(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    server.ttft_delay = 0.1
    result = await replay([wreq(i, 0.0) for i in range(6)], url, model="m", concurrency_limit=2)
    assert result.summary.completed == 6
    assert server.max_in_flight == 2
    lags = sorted(r.sent_s - r.scheduled_s for r in result.records)
    assert lags[-1] >= 0.2  # the last pair waited for two earlier pairs
    assert result.summary.send_lag_p99 is not None and result.summary.send_lag_p99 >= 0.15


async def test_unsorted_input_is_sent_in_arrival_order(fake: tuple[FakeOpenAI, str]) -> None:
    server, url = fake
    reqs = [wreq(0, 0.2, text="second "), wreq(1, 0.0, text="first ")]
    result = await replay(reqs, url, model="m")
    assert [b["prompt"] for b in server.bodies] == ["first ", "second "]
    assert [r.request_id for r in result.records] == ["r1", "r0"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate_scale": 0.0}, "rate_scale"),
        ({"rate_scale": -1.0}, "rate_scale"),
        ({"duration_s": 0.0}, "duration_s"),
        ({"timeout_s": float("nan")}, "timeout_s"),
        ({"endpoint": "embeddings"}, "endpoint"),
        ({"concurrency_limit": 0}, "concurrency_limit"),
    ],
)
async def test_replay_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        await replay([wreq(0, 0.0)], "http://127.0.0.1:1", model="m", **kwargs)


def test_normalize_url() -> None:
    assert normalize_url("http://h:8000") == "http://h:8000"
    assert normalize_url("http://h:8000/v1/") == "http://h:8000"
    assert normalize_url("https://gw.example/team/v1") == "https://gw.example/team"
    for bad in ["ftp://h", "h:8000", "localhost", "http://", "http://h/?q=1"]:
        with pytest.raises(ValueError):
            normalize_url(bad)


# ---- the CLI -------------------------------------------------------------------------------------


async def test_cli_end_to_end_writes_json(fake: tuple[FakeOpenAI, str], tmp_path: Path) -> None:
    server, url = fake
    out = tmp_path / "replay.json"
    spec = "synthetic:zipf:requests=8,rate=40,prefixes=2,prefix_tokens=16,suffix_tokens=4,output_tokens=3"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pylb.cli", "replay", "--trace", spec, "--url", url, "--rate-scale", "2",
        "--json", str(out), "--no-progress",
        cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, stderr.decode()
    assert "TTFT" in stdout.decode() and "fake-model" in stdout.decode()
    data = json.loads(out.read_text())
    assert data["summary"]["requests"] == 8 and data["summary"]["completed"] == 8
    assert data["summary"]["cached_token_rate"] == pytest.approx(0.5)
    assert data["summary"]["rate_scale"] == 2.0
    assert len(data["requests"]) == 8
    rec = data["requests"][0]
    assert rec["request_id"] == "zipf-0" and rec["ok"] is True and rec["ttft_s"] > 0
    assert rec["prompt_tokens"] == 20 and rec["max_tokens"] == 3 and rec["usage_prompt_tokens"] == 20
    assert all(b["max_tokens"] == 3 and len(b["prompt"]) == 80 for b in server.bodies)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--trace", "MISSING.csv"], "--trace: no such file: 'MISSING.csv'"),
        (["--trace", "synthetic:zipf:bogus=1"], "--trace: synthetic:zipf: unknown parameter 'bogus'"),
        (["--trace", "BAD.csv"], r"--trace: .*BAD\.csv:2: field ContextTokens"),
        (["--trace", "T.parquet"], r"--trace: .*unknown trace format '\.parquet'"),
        (["--trace", "synthetic:zipf", "--json", "no/such/dir/out.json"], "--json: directory does not exist"),
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "BAD.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,lots,2\n")
    (tmp_path / "T.parquet").write_text("")
    assert main(["replay", "--url", "http://127.0.0.1:1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pylb replay: error: argument ")
    import re

    assert re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--rate-scale", "-1"], "--rate-scale: must be a positive number, got '-1'"),
        (["--rate-scale", "fast"], "--rate-scale: expected a number, got 'fast'"),
        (["--url", "ftp://x"], "--url: expected http://HOST[:PORT][/PREFIX], got 'ftp://x'"),
        (["--limit", "-5"], "--limit: must be >= 0, got '-5'"),
        (["--concurrency-limit", "0"], "--concurrency-limit: must be >= 1, got '0'"),
        (["--endpoint", "embeddings"], "--endpoint: invalid choice: 'embeddings'"),
    ],
)  # fmt: skip
def test_cli_bad_flags_exit_2(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["replay", "--trace", "synthetic:zipf", "--url", "http://127.0.0.1:1", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_cli_unreachable_server_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    argv = ["replay", "--trace", "synthetic:zipf:requests=2", "--url", url, "--no-progress", "--timeout", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "/v1/models failed" in err and "Traceback" not in err


def test_library_exports() -> None:
    assert replay_mod.replay is replay
    assert set(replay_mod.__all__) <= set(dir(replay_mod))
