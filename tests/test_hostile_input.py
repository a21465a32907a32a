"""Issue 16 §2: hostile input. Hypothesis fuzzes the OpenAI request model (completions and chat:
prompts, token ids, content parts, tools, numbers of any size) and the vLLM /metrics parser: a
request is either routed or rejected with a `RequestError` naming a field, a page is either read
or rejected with a `ScrapeError`; nothing else escapes. Raw-socket cases: conflicting
Content-Length and Transfer-Encoding, endless chunked bodies, header floods, long headers and
URLs, invalid UTF-8, Host tricks: each gets a clean 4xx or is closed, and pylb never connects to
an address outside the fleet. (bench/fuzz.py runs the same fuzzers for millions of cases.)"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings as hsettings
from hypothesis import strategies as st

from pylb.fleet.scrape import ScrapeError, parse_vllm_metrics
from pylb.router.request import CHAT, COMPLETIONS, RequestError, build_request, parse_json_body

from proxy_support import raw, running_proxy, scripted, settings

# ---- strategies -------------------------------------------------------------------------------------------

INTS = st.one_of(st.integers(-5, 5), st.integers(-(2**70), 2**70), st.integers(0, 2**32 + 5))
SCALARS = st.one_of(st.none(), st.booleans(), INTS, st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40))
JSONS = st.recursive(SCALARS, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=12)
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=60), JSONS)}),
    st.fixed_dictionaries({"type": st.sampled_from(["image_url", "input_audio", "video_url", "x"]), "image_url": JSONS}),
    JSONS,
)
MESSAGES = st.lists(
    st.one_of(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant", "tool", "x"]), "content": st.one_of(st.text(max_size=80), st.lists(PARTS, max_size=3), JSONS)},
            optional={"tool_calls": JSONS, "name": JSONS},
        ),
        JSONS,
    ),
    max_size=4,
)
PROMPTS = st.one_of(st.text(max_size=200), st.lists(INTS, max_size=30), st.lists(st.text(max_size=30), max_size=4), st.lists(st.lists(INTS, max_size=8), max_size=3), JSONS)
COMMON = {"max_tokens": st.one_of(INTS, JSONS), "n": st.one_of(INTS, JSONS), "priority": st.one_of(INTS, JSONS), "stream": st.one_of(st.booleans(), JSONS),
          "model": JSONS, "max_completion_tokens": st.one_of(INTS, JSONS), "tools": JSONS, "stream_options": JSONS}  # fmt: skip
COMPLETION_BODIES = st.fixed_dictionaries({}, optional={"prompt": PROMPTS, **COMMON})
CHAT_BODIES = st.fixed_dictionaries({}, optional={"messages": st.one_of(MESSAGES, JSONS), **COMMON})


def routed_or_named(kind: str, body: Any) -> None:
    """The invariant: routed, or RequestError naming a field; whatever the body."""
    raw = json.dumps(body, allow_nan=True).encode()
    try:
        build_request(kind, parse_json_body(raw), "r", 0.0)
    except RequestError as exc:
        assert exc.field and exc.message


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(COMPLETION_BODIES)
def test_completions_requests_are_routed_or_rejected_by_field(body: dict[str, Any]) -> None:
    routed_or_named(COMPLETIONS, body)


@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(CHAT_BODIES)
def test_chat_requests_are_routed_or_rejected_by_field(body: dict[str, Any]) -> None:
    routed_or_named(CHAT, body)


@hsettings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_a_body_are_a_named_rejection_or_a_request(raw: bytes) -> None:
    try:
        build_request(COMPLETIONS, parse_json_body(raw), "r", 0.0)
    except RequestError as exc:
        assert exc.field


NAMES = st.sampled_from(["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
                         "vllm:prefix_cache_hits_total", "vllm:cache_config_info", "vllm:other", "x"])  # fmt: skip
VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(["NaN", "+Inf", "-Inf", "1e400", "-0", "x", ""]), INTS.map(str))
LABELS = st.dictionaries(st.sampled_from(["engine", "model_name", "block_size", "num_gpu_blocks"]), st.text(max_size=10), max_size=3)
LINES = st.one_of(
    st.builds(lambda n, lab, v: n + ("{" + ",".join(f'{k}="{json.dumps(x)[1:-1]}"' for k, x in lab.items()) + "}" if lab else "") + " " + v, NAMES, LABELS, VALUES),
    st.text(max_size=60),
)


@hsettings(max_examples=400, deadline=None)
@given(st.lists(LINES, max_size=12))
def test_metrics_pages_are_read_or_rejected(lines: list[str]) -> None:
    try:
        m = parse_vllm_metrics("\n".join(lines) + "\n")
    except ScrapeError:
        return
    assert m.num_requests_running >= 0 or m.num_requests_running < 0  # an int, finite
    assert 0.0 <= m.kv_cache_usage <= 1.0


# ---- raw sockets ------------------------------------------------------------------------------------------------


BODY = b'{"prompt": "hi", "max_tokens": 1}'
CASES: dict[str, bytes] = {
    "CL and TE both": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY),
    "two Content-Lengths": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY),
    "TE not chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n" + BODY,
    "TE obfuscated": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n" + BODY,
    "bad chunk size": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n" + BODY,
    "endless chunked": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1000\r\n" + b"x" * 4096 + b"\r\n",  # repeated below
    "header flood": b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
    "long header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 100_000 + b"\r\n\r\n",
    "long URL": b"GET /v1/" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "invalid UTF-8 body": b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b'{"prompt": "\xff\xfe\xc0"}'.ljust(20),
    "invalid UTF-8 path": b"GET /v1/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "NUL in header": b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "bare LF lines": b"GET /v1/models HTTP/1.1\nHost: x\n\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "not HTTP": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
    "absolute URI": b"GET http://127.0.0.1:1/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "authority form": b"CONNECT 127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n",
    "traversal": b"GET /v1/../metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    "encoded traversal": b"GET /v1/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n",
    "double slash": b"GET //127.0.0.1:1/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("name", list(CASES))
async def test_protocol_abuse_gets_a_clean_4xx_or_a_close_and_never_leaves_the_fleet(name: str) -> None:
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(16)
    trap.setblocking(False)
    trap_port = trap.getsockname()[1]
    data = CASES[name].replace(b"127.0.0.1:1", b"127.0.0.1:%d" % trap_port)
    host_trick = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Forwarded-Host: 127.0.0.1:%d\r\n\r\n" % (trap_port, trap_port)
    try:
        async with scripted(1) as (rep,), running_proxy(settings([rep.url], server__body_timeout_s=1.0, server__max_body_bytes=65536)) as proxy:
            if name == "endless chunked":
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(data)
                answer = b""
                try:
                    for _ in range(200):  # 800 KB offered against a 64 KB limit
                        writer.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
                        await writer.drain()
                    answer = await asyncio.wait_for(reader.read(65536), 3)
                except (ConnectionError, asyncio.TimeoutError):
                    pass
                finally:
                    writer.close()
            else:
                answer = await raw(proxy.port, data)
            if answer:
                status = int(answer.split(b" ", 2)[1])
                assert 400 <= status < 500 or (name == "header flood" and status == 431), answer[:300]
            # a Host trick is no way out of the fleet either
            answer = await raw(proxy.port, host_trick)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert b'"id": "model-0"' in answer
            assert len(rep.requests) == 0 or name == "invalid UTF-8 body"
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody ever connected to the trap
    finally:
        trap.close()
