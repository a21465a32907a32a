"""pylb.proxy.upstream: the lean HTTP/1.1 client of the proxy's hot path.

The parser is fed answers split at every byte boundary; real sockets check keep-alive reuse,
the stale-connection resend, timeouts, errors and flow control against scripted raw servers.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from pylb.proxy import upstream
from pylb.proxy.upstream import UpstreamError, UpstreamPool, UpstreamTimeout

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"6\r\ndata: \r\n"
    b"7;ext=1\r\nhello\n\n\r\n"
    b"0\r\nX-Trailer: 1\r\n\r\n"
)
LENGTH = b"HTTP/1.1 201 Created\r\nContent-Length: 11\r\nX-A: b\r\n\r\nhello world"


class Script(asyncio.Protocol):
    """A raw server: `answer(request_index, connection_index)` returns bytes to write, or None to
    close the connection without answering."""

    connections = 0

    def __init__(self, answer: Callable[[int, int], bytes | None], log: list[bytes]) -> None:
        self.answer = answer
        self.log = log
        Script.connections += 1
        self.index = Script.connections
        self.n = 0
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, rest = self.buf.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            if len(rest) < length:
                return
            self.log.append(head + b"\r\n\r\n" + rest[:length])
            self.buf = rest[length:]
            self.n += 1
            out = self.answer(self.n, self.index)
            if out is None:
                self.t.close()
                return
            self.t.write(out)
            if b"Connection: close" in out:
                self.t.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future]]:
    servers: list[asyncio.AbstractServer] = []

    async def start(answer: Callable[[int, int], bytes | None], log: list[bytes] | None = None) -> str:
        Script.connections = 0
        srv = await asyncio.get_running_loop().create_server(lambda: Script(answer, log if log is not None else []), "127.0.0.1", 0)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"

    yield start  # type: ignore[misc]
    for srv in servers:
        srv.close()
        await srv.wait_closed()


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout=1.0, read_timeout=0.0, keepalive=30.0)
    yield p
    await p.close()


# ---- the parser, fed in pieces -----------------------------------------------------------------------


class FakeTransport:
    def __init__(self) -> None:
        self.paused = False
        self.closed = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_extra_info(self, name: str) -> None:
        return None

    def is_closing(self) -> bool:
        return self.closed


async def feed(answer: bytes, splits: list[int]) -> tuple[tuple[int, str, list], bytes, bool]:
    p = UpstreamPool()
    conn = upstream._Conn(p, "k")
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    fut = asyncio.get_running_loop().create_future()
    conn.head_future = fut
    last = 0
    for s in [*splits, len(answer)]:
        if s > last:
            conn.data_received(answer[last:s])
            last = s
    assert conn.error is None, conn.error
    assert fut.done()
    body = b"".join(conn.pieces)
    return fut.result(), body, conn.state == upstream._DONE


@pytest.mark.parametrize("answer", [CHUNKED, LENGTH], ids=["chunked", "length"])
async def test_parser_at_every_split(answer: bytes) -> None:
    expected = await feed(answer, [])
    for i in range(1, len(answer)):
        assert await feed(answer, [i]) == expected
    assert await feed(answer, list(range(len(answer)))) == expected  # one byte at a time
    head, body, done = expected
    assert done
    if answer is CHUNKED:
        assert head[0] == 200 and body == b"data: hello\n\n"
        assert ("Transfer-Encoding", "chunked") in head[2]
    else:
        assert head[:2] == (201, "Created") and body == b"hello world" and ("X-A", "b") in head[2]


async def test_parser_skips_interim_answers() -> None:
    head, body, done = await feed(b"HTTP/1.1 100 Continue\r\n\r\n" + LENGTH, [10, 30])
    assert head[0] == 201 and body == b"hello world" and done


@pytest.mark.parametrize(
    "answer",
    [b"HTTX/1.1 200 OK\r\n\r\n", b"HTTP/1.1 abc OK\r\n\r\n", b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
     b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY"],
)  # fmt: skip
async def test_parser_rejects_malformed_answers(answer: bytes) -> None:
    conn = upstream._Conn(UpstreamPool(), "k")
    conn.connection_made(FakeTransport())  # type: ignore[arg-type]
    fut = asyncio.get_running_loop().create_future()
    conn.head_future = fut
    conn.data_received(answer)
    assert isinstance(conn.error, UpstreamError)
    if fut.done() and fut.exception() is None:
        assert conn.state != upstream._DONE
    elif fut.done():
        fut.exception()


# ---- real sockets ---------------------------------------------------------------------------------------


async def test_keep_alive_reuse_and_request_bytes(serve, pool: UpstreamPool) -> None:
    log: list[bytes] = []
    url = await serve(lambda n, c: LENGTH, log)
    for i in range(3):
        r = await pool.request(url, "POST", "/v1/x?q=1", [("X-Id", str(i))], b'{"a": 1}')
        assert r.status == 201 and r.header("x-a") == "b" and r.content_type == ""
        assert await r.read() == b"hello world"
        r.close()
    assert Script.connections == 1 and pool.idle_connections == 1
    host = url.removeprefix("http://")
    assert log[0] == f"POST /v1/x?q=1 HTTP/1.1\r\nHost: {host}\r\nX-Id: 0\r\nContent-Length: 8\r\n\r\n".encode() + b'{"a": 1}'
    r = await pool.request(url, "GET", "/h", b"Accept: */*\r\n")
    await r.read()
    r.close()
    assert log[-1] == f"GET /h HTTP/1.1\r\nHost: {host}\r\nAccept: */*\r\n\r\n".encode()


async def test_streamed_pieces(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: CHUNKED)
    r = await pool.request(url, "POST", "/", [], b"x")
    assert r.content_type == "text/event-stream"
    assert b"".join([p async for p in r]) == b"data: hello\n\n"
    assert r.done
    r.close()
    assert pool.idle_connections == 1


async def test_stale_keep_alive_connection_is_resent_once(serve, pool: UpstreamPool) -> None:
    # connection 1 answers its first request, then closes on the second without answering
    url = await serve(lambda n, c: LENGTH if (c, n) == (1, 1) or c > 1 else None)
    for _ in range(2):
        r = await pool.request(url, "POST", "/", [], b"x")
        assert await r.read() == b"hello world"
        r.close()
    assert Script.connections == 2


async def test_resend_after_a_stale_connection_opens_a_new_one(serve, pool: UpstreamPool) -> None:
    # every connection answers its first request and closes on the next, unanswered: two pooled
    # connections that went idle together are both stale, and the resend must not take the other
    url = await serve(lambda n, c: LENGTH if n == 1 else None)
    first = await asyncio.gather(*(pool.request(url, "POST", "/", [], b"x") for _ in range(2)))
    for r in first:
        assert await r.read() == b"hello world"
        r.close()
    assert pool.idle_connections == 2
    r = await pool.request(url, "POST", "/", [], b"x")
    assert await r.read() == b"hello world"
    r.close()
    assert Script.connections == 3  # the stale one, then a new one; the other stale one untouched


async def test_fresh_connection_closed_before_answer_is_an_error(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: None)
    with pytest.raises(UpstreamError, match="before answering"):
        await pool.request(url, "POST", "/", [], b"x")


async def test_connect_refused(pool: UpstreamPool) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request(f"http://127.0.0.1:{port}", "GET", "/", [])


async def test_close_mid_body_is_an_error(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    async def close_soon() -> None:
        await asyncio.sleep(0.05)
        for conn in list(pool._all):
            conn.transport.close()  # type: ignore[union-attr]

    r = await pool.request(url, "POST", "/", [], b"x")
    assert await r.next_piece() == b"hello"
    task = asyncio.create_task(close_soon())
    with pytest.raises(UpstreamError):
        await r.next_piece()
    await task
    r.close()
    assert pool.idle_connections == 0


async def test_body_until_close_and_no_body(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
    r = await pool.request(url, "GET", "/", [])
    assert await r.read() == b"all of it"
    r.close()
    url2 = await serve(lambda n, c: b"HTTP/1.1 204 No Content\r\n\r\n")
    r = await pool.request(url2, "GET", "/", [])
    assert r.status == 204 and await r.read() == b""
    r.close()
    assert pool.idle_connections == 1  # the 204 connection is reusable, the closed one is not


async def test_read_timeout(serve) -> None:
    p = UpstreamPool(read_timeout=0.1)
    try:
        url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        r = await p.request(url, "POST", "/", [], b"x")
        assert await r.next_piece() == b"partial"
        with pytest.raises(UpstreamTimeout):
            await r.next_piece()
        r.close()
        url2 = await serve(lambda n, c: b"")  # never answers
        with pytest.raises(UpstreamTimeout):
            await p.request(url2, "POST", "/", [], b"x")
    finally:
        await p.close()


async def test_flow_control_pauses_a_connection_with_a_slow_consumer(serve, pool: UpstreamPool) -> None:
    big = 1024 * 1024
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big + b"x" * big)
    r = await pool.request(url, "GET", "/", [])
    conn = r._conn
    for _ in range(50):
        await asyncio.sleep(0.01)
        if conn.paused:
            break
    assert conn.paused and conn.buffered <= upstream.HIGH_WATER + 256 * 1024
    assert len(await r.read()) == big
    r.close()


async def test_cancelled_request_closes_its_connection(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: b"")  # never answers
    task = asyncio.create_task(pool.request(url, "POST", "/", [], b"x"))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pool._all and pool.idle_connections == 0


async def test_early_close_aborts_and_does_not_pool(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    r = await pool.request(url, "POST", "/", [], b"x")
    assert await r.next_piece() == b"hello"
    r.close()
    assert pool.idle_connections == 0 and not pool._all


async def test_pipe_hands_pieces_to_the_sink_and_returns_at_the_end(serve, pool: UpstreamPool) -> None:
    events = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in [b"data: %d\n\n" % i for i in range(50)])
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + events + b"0\r\n\r\n")
    r = await pool.request(url, "POST", "/", [], b"x")
    first = await r.next_piece()
    got: list[bytes] = []
    await r.pipe(got.append)
    assert first + b"".join(got) == b"".join(b"data: %d\n\n" % i for i in range(50))
    r.close()
    assert pool.idle_connections == 1  # complete: back to the pool


async def test_pipe_raises_when_the_replica_breaks_and_abort_closes(serve, pool: UpstreamPool) -> None:
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    r = await pool.request(url, "POST", "/", [], b"x")
    got: list[bytes] = []

    async def break_soon() -> None:
        await asyncio.sleep(0.05)
        for conn in list(pool._all):
            conn.transport.abort()  # type: ignore[union-attr]

    task = asyncio.create_task(break_soon())
    with pytest.raises(UpstreamError):
        await r.pipe(got.append)
    await task
    assert got == [b"hello"]
    r.close()
    # abort() from inside a sink ends the pipe at once
    r = await pool.request(url, "POST", "/", [], b"x")
    with pytest.raises(UpstreamError, match="aborted"):
        await r.pipe(lambda piece: r.abort())
    assert not pool._all


async def test_pipe_pause_and_resume(serve, pool: UpstreamPool) -> None:
    big = 2 * 1024 * 1024
    url = await serve(lambda n, c: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big + b"y" * big)
    r = await pool.request(url, "GET", "/", [])
    got = 0
    loop = asyncio.get_running_loop()

    def sink(piece: bytes) -> None:
        nonlocal got
        got += len(piece)
        r.pause()
        loop.call_later(0.001, r.resume)

    await r.pipe(sink)
    assert got == big
    r.close()
