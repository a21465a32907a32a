"""A lean HTTP/1.1 client for the proxy's hot path: pooled keep-alive connections to replicas.

Design
------
pylb forwards every routed request to a replica and streams the answer back. aiohttp's client
does that correctly but spends ~100 us of Python per request on this machine (request and
response objects, cookie and trace machinery, header processing), a third of pylb's CPU per
request. The routed path only needs: send one already-encoded request, read the status and
headers, then hand over the body piece by piece as it arrives. This module does exactly that
on an asyncio `Protocol` (uvloop's when `pylb serve` runs):

- `UpstreamPool.request(base_url, method, target, headers, body)` takes an idle connection to
  `base_url` (LIFO, so warm connections are reused) or opens one (TCP_NODELAY, connect timeout),
  writes head and body in one `write`, and returns an `UpstreamResponse` once the status line and
  headers are in (1xx interim answers are skipped). (`target` and header values are written as
  given: the proxy passes what aiohttp's server parser accepted.)
- The body is framed by Content-Length, chunked transfer coding (decoded here; trailers are
  dropped), or the connection's end. `UpstreamResponse.read()` returns it whole; iterating the
  response (`async for piece in resp`) yields pieces as they arrive -- for SSE, typically one or a
  few events each -- so the proxy can pass them through at once. `pipe(sink)` hands the pieces
  to a callback straight from the connection's data callback instead (no task switch per
  piece), with `pause()`/`resume()` for the sink's flow control, and `abort()` to give up.
- Flow control: when more than `HIGH_WATER` bytes are buffered (a slow client), the connection
  stops reading until the consumer catches up, so memory stays bounded and TCP back-pressure
  reaches the replica.
- Timeouts: connect (`connect_timeout`); silence (`read_timeout`: no byte from the replica for
  that long while an answer is expected, checked by one lazy timer per connection, not per read).
- Errors are `UpstreamError` (a `ConnectionError`): refused, reset, closed mid-answer,
  malformed answer; `UpstreamTimeout` (also an `asyncio.TimeoutError`) for timeouts. A request on
  a *reused* connection that fails before any byte of the answer came back is re-sent once on a
  new connection (never another pooled one, which went idle as long ago): the replica closed an
  idle keep-alive connection (uvicorn, so vLLM, does after 5 s) just as it was reused, and never
  saw the request. Only a failure of that new connection reaches the caller, so a stale
  connection is never counted against the replica.
- A connection goes back to the pool when its answer was read to the end and neither side said
  `Connection: close`; `UpstreamResponse.close()` before the end closes the connection, which is
  how a client disconnect aborts the request on the replica. Idle connections older than
  `keepalive` seconds are closed when next looked at; a connection the replica closes while idle
  leaves the pool at once (one whose close is under way is never taken). At most `max_idle`
  connections per replica stay idle (more are closed when released), and a sweep every
  `keepalive` / 2 seconds closes the idle ones past `keepalive`, so a burst leaves no crowd of
  idle connections behind.
- `https://` replicas are reached over TLS with the pool's `ssl` context (`UpstreamPool(ssl=...)`).
- `expedite(base_url, silence)` shortens the read timeout of a replica's open exchanges (the
  proxy calls it when health probes eject the replica: a hung replica's requests fail within
  `silence` instead of `read_timeout`); `abort_active()` fails every open exchange (shutdown).

Only what the proxy needs: no proxies, no redirects, no cookies, no compression handling
(bytes pass through as they are).
"""

from __future__ import annotations

import asyncio
import math
import socket
import ssl as ssl_mod
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from urllib.parse import urlsplit

HIGH_WATER = 256 * 1024
"""Buffered body bytes above which a connection stops reading until the consumer catches up."""

LOW_WATER = 64 * 1024
"""Buffered body bytes below which a paused connection reads again."""

MAX_HEAD = 64 * 1024
"""Largest status line plus headers accepted from a replica."""


UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, asyncio.TimeoutError)
"""Exceptions that mean an exchange with a replica through the pool failed (`UpstreamError` and
`UpstreamTimeout` among them)."""


class UpstreamError(ConnectionError):
    """The exchange with the replica failed (refused, reset, closed early, malformed answer)."""


class UpstreamTimeout(UpstreamError, asyncio.TimeoutError):
    """The replica did not connect or went silent for too long."""


_NO_BODY, _LENGTH, _CHUNKED, _UNTIL_CLOSE = 0, 1, 2, 3
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _DONE = range(7)


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the parser of the answer in progress on it."""

    def __init__(self, pool: UpstreamPool, key: str) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.used = 0
        self.idle_since = 0.0
        self.limit = 0.0  # a read timeout shorter than the pool's, for this exchange (expedite)
        self.last_data = -math.inf  # loop time of the last byte the replica sent on this connection
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.mode = _NO_BODY
        self.buf = b""
        self.head_future: asyncio.Future[tuple[int, str, list[tuple[str, str]]]] | None = None
        self.pieces: deque[bytes] = deque()
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.remaining = 0
        self.keep_alive = True
        self.got_bytes = False
        self.head_only = False
        self.last_rx = 0.0
        self.watchdog: asyncio.TimerHandle | None = None
        self.sink: Callable[[bytes], None] | None = None
        self.limit = 0.0

    # ---- protocol callbacks -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - not a TCP socket
                pass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.state == _BODY and self.mode == _UNTIL_CLOSE:
            self.state = _DONE
            self._wake()
            return
        if self.state != _DONE and (self.head_future is not None or self.waiter is not None or self.state != _HEAD):
            self._fail(UpstreamError(f"the replica closed the connection{' mid-answer' if self.got_bytes else ' before answering'}" + (f": {exc}" if exc else "")))

    def eof_received(self) -> bool | None:
        return False  # close the transport; connection_lost does the rest

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.last_rx = self.last_data = self.loop.time()
        if self.state == _BODY and self.mode == _LENGTH and not self.buf:
            # fast path: a body piece of known length
            n = len(data)
            if n < self.remaining:
                self.remaining -= n
                self._push(data)
                return
            if n == self.remaining:
                self.remaining = 0
                self._push(data)
                self._finish()
                return
        self.buf += data
        try:
            self._parse()
        except UpstreamError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()

    # ---- parsing --------------------------------------------------------------------------------

    def _parse(self) -> None:
        while self.buf and self.state != _DONE:
            st = self.state
            if st == _HEAD:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        raise UpstreamError("the replica's answer head is too large")
                    return
                head, self.buf = self.buf[:end], self.buf[end + 4 :]
                self._on_head(head)
            elif st == _BODY:
                if self.mode == _LENGTH:
                    n = len(self.buf)
                    if n < self.remaining:
                        self.remaining -= n
                        self._push(self.buf)
                        self.buf = b""
                        return
                    piece, self.buf = self.buf[: self.remaining], self.buf[self.remaining :]
                    self.remaining = 0
                    self._push(piece)
                    self._finish()
                else:  # until close
                    self._push(self.buf)
                    self.buf = b""
            elif st in (_CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF):
                if not self._dechunk():
                    return
            elif st == _TRAILERS:
                nl = self.buf.find(b"\r\n")
                if nl < 0:
                    return
                line, self.buf = self.buf[:nl], self.buf[nl + 2 :]
                if not line:
                    self._finish()
        if self.state == _DONE and self.buf:
            # bytes after the answer: the replica broke HTTP/1.1 (no pipelining here)
            self.keep_alive = False
            self.buf = b""

    def _dechunk(self) -> bool:
        """Decode as many chunks as `buf` holds, pushing their data as one piece (a burst of SSE
        events arrives as one piece). Walks `buf` by position and slices it once at the end.
        Returns False when it needs more bytes, True when the state moved past the chunks."""
        buf = self.buf
        n = len(buf)
        pos = 0
        state = self.state
        remaining = self.remaining
        out: list[bytes] = []
        while True:
            if state == _CHUNK_SIZE:
                nl = buf.find(b"\r\n", pos)
                if nl < 0:
                    if n - pos > 1024:
                        raise UpstreamError("malformed chunk size line from the replica")
                    break
                try:
                    size = int(buf[pos:nl], 16)
                except ValueError:
                    line = buf[pos:nl].split(b";", 1)[0].strip()  # chunk extensions
                    try:
                        size = int(line, 16)
                    except ValueError:
                        raise UpstreamError(f"malformed chunk size {line[:20]!r} from the replica") from None
                if size < 0:
                    raise UpstreamError("malformed chunk size from the replica")
                pos = nl + 2
                if size == 0:
                    state = _TRAILERS
                    break
                remaining = size
                state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                end = pos + remaining
                if end <= n:
                    out.append(buf[pos:end])
                    pos = end
                    remaining = 0
                    state = _CHUNK_CRLF
                else:
                    if pos < n:
                        out.append(buf[pos:])
                        remaining -= n - pos
                        pos = n
                    break
            else:  # _CHUNK_CRLF
                if n - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise UpstreamError("malformed chunk end from the replica")
                pos += 2
                state = _CHUNK_SIZE
        self.buf = buf[pos:] if pos else buf
        self.state = state
        self.remaining = remaining
        if out:
            self._push(out[0] if len(out) == 1 else b"".join(out))
        return state == _TRAILERS

    def _on_head(self, head: bytes) -> None:
        try:
            text = head.decode("latin-1")
            lines = text.split("\r\n")
            version, _, rest = lines[0].partition(" ")
            code_s, _, reason = rest.partition(" ")
            status = int(code_s)
        except (ValueError, IndexError):
            raise UpstreamError(f"malformed status line from the replica: {head[:80]!r}") from None
        if not version.startswith("HTTP/1."):
            raise UpstreamError(f"the replica answered with {version!r}, not HTTP/1.x")
        headers: list[tuple[str, str]] = []
        length: int | None = None
        chunked = False
        close = version == "HTTP/1.0"
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise UpstreamError(f"malformed header line from the replica: {line[:80]!r}")
            name = name.strip()
            value = value.strip()
            low = name.lower()
            if low == "content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise UpstreamError(f"malformed Content-Length {value!r} from the replica") from None
            elif low == "transfer-encoding":
                chunked = "chunked" in value.lower()
            elif low == "connection":
                v = value.lower()
                if "close" in v:
                    close = True
                elif "keep-alive" in v and version == "HTTP/1.0":
                    close = False
            headers.append((name, value))
        if 100 <= status < 200:  # interim answer: skip it, wait for the real one
            return
        self.keep_alive = not close
        if self.head_only or status in (204, 304):
            self.mode = _NO_BODY
        elif chunked:
            self.mode = _CHUNKED
        elif length is not None:
            self.mode = _LENGTH
            self.remaining = length
        else:
            self.mode = _UNTIL_CLOSE
            self.keep_alive = False
        if self.mode == _NO_BODY or (self.mode == _LENGTH and length == 0):
            self.state = _DONE
        elif self.mode == _CHUNKED:
            self.state = _CHUNK_SIZE
        else:
            self.state = _BODY
        fut = self.head_future
        self.head_future = None
        if fut is not None and not fut.done():
            fut.set_result((status, reason, headers))

    def _push(self, piece: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink(piece)
            return
        self.pieces.append(piece)
        self.buffered += len(piece)
        if self.buffered > HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.state = _DONE
        self._wake()

    def _wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        self.keep_alive = False
        fut = self.head_future
        self.head_future = None
        if fut is not None and not fut.done():
            fut.set_exception(exc)
        w = self.waiter
        self.waiter = None
        if w is not None and not w.done():
            w.set_exception(exc)

    # ---- read timeout -------------------------------------------------------------------------------

    def arm_watchdog(self, timeout: float) -> None:
        if self.limit > 0:
            timeout = self.limit if timeout <= 0 else min(timeout, self.limit)
        if timeout > 0 and self.watchdog is None:
            self.watchdog = self.loop.call_at(self.last_rx + timeout, self._check_silence, timeout)

    def _check_silence(self, timeout: float) -> None:
        self.watchdog = None
        if self.state == _DONE or self.closed:
            return
        if self.paused:  # the consumer is slow, not the replica
            self.watchdog = self.loop.call_at(self.loop.time() + timeout, self._check_silence, timeout)
            return
        due = self.last_rx + timeout
        if self.loop.time() >= due:
            self._fail(UpstreamTimeout(f"no answer from the replica for {timeout:g} s"))
            if self.transport is not None:
                self.transport.abort()
        else:
            self.watchdog = self.loop.call_at(due, self._check_silence, timeout)

    def cancel_watchdog(self) -> None:
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None


class UpstreamResponse:
    """An answer from a replica: `status`, `reason`, `headers` (name, value pairs in order), and
    the body through `read()` or `async for piece in response`. Call `close()` when done (or use
    `async with`): it returns the connection to the pool after a complete answer, and aborts the
    exchange (closing the connection) otherwise."""

    __slots__ = ("status", "reason", "headers", "_conn", "_pool", "_read_timeout", "_released")

    def __init__(self, conn: _Conn, pool: UpstreamPool, status: int, reason: str, headers: list[tuple[str, str]], read_timeout: float) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._conn = conn
        self._pool = pool
        self._read_timeout = read_timeout
        self._released = False

    def header(self, name: str, default: str | None = None) -> str | None:
        """The first value of header `name` (case-insensitive)."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return default

    @property
    def content_type(self) -> str:
        """The media type of the body, without parameters, lowercase ("" when absent)."""
        ct = self.header("content-type") or ""
        return ct.split(";", 1)[0].strip().lower()

    @property
    def done(self) -> bool:
        """Whether the whole body has been received."""
        return self._conn.state == _DONE

    async def next_piece(self) -> bytes | None:
        """The next piece of the body as it arrives, or None at its end. Raises UpstreamError."""
        c = self._conn
        while True:
            if c.pieces:
                piece = c.pieces.popleft()
                c.buffered -= len(piece)
                if c.paused and c.buffered < LOW_WATER and c.transport is not None and not c.closed:
                    c.paused = False
                    c.transport.resume_reading()
                return piece
            if c.error is not None:
                raise c.error
            if c.state == _DONE:
                return None
            c.waiter = c.loop.create_future()
            c.arm_watchdog(self._read_timeout)
            await c.waiter

    async def pipe(self, sink: Callable[[bytes], None]) -> None:
        """Hand every further piece of the body to `sink(piece)` as it arrives, from the
        connection's data callback (no task switch per piece), and return at the body's end.
        Raises UpstreamError (or UpstreamTimeout) when the exchange fails first.

        `sink` must not block; to slow the replica down it calls `pause()` and later `resume()`.
        Pieces already buffered go to `sink` first."""
        c = self._conn
        while c.pieces:
            piece = c.pieces.popleft()
            c.buffered -= len(piece)
            sink(piece)
        if c.paused and c.transport is not None and not c.closed:
            c.paused = False
            c.transport.resume_reading()
        if c.error is not None:
            raise c.error
        if c.state == _DONE:
            return
        c.sink = sink
        try:
            while c.state != _DONE:
                if c.error is not None:
                    raise c.error
                c.waiter = c.loop.create_future()
                c.arm_watchdog(self._read_timeout)
                await c.waiter
        finally:
            c.sink = None

    def abort(self) -> None:
        """Abandon the exchange: close the connection (the replica sees the client leave) and
        make a pending `pipe`/`next_piece` raise UpstreamError."""
        c = self._conn
        c._fail(UpstreamError("the exchange was aborted by pylb"))
        self._released = True
        self._pool._close_conn(c)

    def pause(self) -> None:
        """Stop reading from the replica (the consumer is behind)."""
        c = self._conn
        if not c.paused and c.transport is not None and not c.closed:
            c.paused = True
            c.transport.pause_reading()

    def resume(self) -> None:
        """Read from the replica again."""
        c = self._conn
        if c.paused and c.transport is not None and not c.closed:
            c.paused = False
            c.transport.resume_reading()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        while True:
            piece = await self.next_piece()
            if piece is None:
                return
            yield piece

    async def read(self) -> bytes:
        """The whole body (the rest of it). Raises UpstreamError."""
        parts = []
        while True:
            piece = await self.next_piece()
            if piece is None:
                break
            parts.append(piece)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Return the connection to the pool (complete answer) or close it (anything else)."""
        if self._released:
            return
        self._released = True
        self._pool._release(self._conn)

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class UpstreamPool:
    """Keep-alive connections to replicas, by base URL (see the module comment)."""

    def __init__(
        self, connect_timeout: float = 5.0, read_timeout: float = 0.0, keepalive: float = 30.0, *, ssl: ssl_mod.SSLContext | None = None, max_idle: int = 32
    ) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive = keepalive
        self.ssl = ssl
        self.max_idle = max_idle
        self._idle: dict[str, list[_Conn]] = {}
        self._all: set[_Conn] = set()
        self._addr: dict[str, tuple[str, int, str, bool]] = {}
        self._reaper: asyncio.TimerHandle | None = None
        self.closed = False

    def _address(self, base_url: str) -> tuple[str, int, str, bool]:
        a = self._addr.get(base_url)
        if a is None:
            parts = urlsplit(base_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise UpstreamError(f"unsupported replica URL {base_url!r}: http:// or https://host:port only")
            tls = parts.scheme == "https"
            port = parts.port or (443 if tls else 80)
            host = parts.hostname
            host_header = parts.netloc.rsplit("@", 1)[-1]
            a = self._addr[base_url] = (host, port, host_header, tls)
        return a

    async def _connect(self, base_url: str) -> _Conn:
        host, port, _, tls = self._address(base_url)
        loop = asyncio.get_running_loop()
        ctx = (self.ssl or ssl_mod.create_default_context()) if tls else None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Conn(self, base_url), host, port, ssl=ctx, server_hostname=host if tls else None), self.connect_timeout
            )
        except asyncio.TimeoutError:
            raise UpstreamTimeout(f"connecting to {base_url} timed out after {self.connect_timeout:g} s") from None
        except ssl_mod.SSLError as exc:
            raise UpstreamError(f"TLS with {base_url} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {base_url}: {exc.strerror or exc}") from None
        self._all.add(conn)
        if self._reaper is None and not self.closed:
            self._reaper = loop.call_later(max(0.05, self.keepalive / 2), self._reap)
        return conn

    def _reap(self) -> None:
        """Close the idle connections past `keepalive` (every keepalive / 2 seconds)."""
        self._reaper = None
        if self.closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for idle in list(self._idle.values()):
            for c in [c for c in idle if now - c.idle_since >= self.keepalive]:
                self._close_conn(c)
        if self._all:
            self._reaper = loop.call_later(max(0.05, self.keepalive / 2), self._reap)

    def expedite(self, base_url: str, silence: float) -> int:
        """Give the open exchanges with `base_url` a read timeout of `silence` seconds since their
        last byte (they fail now when silent that long already); returns how many there are."""
        n = 0
        for c in list(self._all):
            if c.key == base_url and c.state != _DONE and (c.head_future is not None or c.state != _HEAD):
                c.limit = silence
                c.cancel_watchdog()
                c.arm_watchdog(self.read_timeout)
                n += 1
        return n

    def sent_data_within(self, base_url: str, window: float) -> bool:
        """Whether `base_url` sent a byte on any of the pool's connections to it in the last
        `window` seconds (a replica busy answering, as opposed to a hung one)."""
        since = asyncio.get_running_loop().time() - window
        return any(c.key == base_url and c.last_data >= since for c in self._all)

    def abort_active(self, reason: str) -> None:
        """Fail every open exchange (`UpstreamError(reason)`) and close its connection."""
        for c in list(self._all):
            if c.state != _DONE and (c.head_future is not None or c.state != _HEAD):
                c._fail(UpstreamError(reason))
                self._close_conn(c)

    def _take_idle(self, base_url: str) -> _Conn | None:
        idle = self._idle.get(base_url)
        if not idle:
            return None
        now = asyncio.get_running_loop().time()
        while idle:
            c = idle.pop()
            if not c.closed and now - c.idle_since < self.keepalive and c.transport is not None and not c.transport.is_closing():
                return c
            self._close_conn(c)
        return None

    async def request(
        self, base_url: str, method: str, target: str, headers: bytes | Iterable[tuple[str, str]], body: bytes = b""
    ) -> UpstreamResponse:
        """Send a request and return the answer once its head is in. Raises UpstreamError or
        UpstreamTimeout (the request may or may not have reached the replica).

        `headers` are (name, value) pairs, or an already encoded block of `Name: value\\r\\n` lines;
        Host and Content-Length are added here and must not be among them."""
        if self.closed:
            raise UpstreamError("the upstream pool is closed")
        host_header = self._address(base_url)[2]
        if not isinstance(headers, bytes):
            headers = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1", "replace")
        length = f"Content-Length: {len(body)}\r\n" if body or method in ("POST", "PUT", "PATCH") else ""
        head = f"{method} {target} HTTP/1.1\r\nHost: {host_header}\r\n".encode("latin-1", "replace") + headers + length.encode() + b"\r\n"
        payload = head + body if len(body) < 65536 else None
        for attempt in (0, 1):
            # the resend after a stale connection opens a new one: the other idle connections to
            # the replica went idle as long ago and are as likely to be closed as that one was
            conn = self._take_idle(base_url) if attempt == 0 else None
            reused = conn is not None
            if conn is None:
                conn = await self._connect(base_url)
            conn._reset()
            conn.head_only = method == "HEAD"
            conn.used += 1
            conn.last_rx = conn.loop.time()
            fut: asyncio.Future[tuple[int, str, list[tuple[str, str]]]] = conn.loop.create_future()
            conn.head_future = fut
            assert conn.transport is not None
            if conn.closed or conn.transport.is_closing():
                self._close_conn(conn)
                if reused and attempt == 0:
                    continue
                raise UpstreamError(f"the connection to {base_url} closed before the request was sent")
            if payload is not None:
                conn.transport.write(payload)
            else:
                conn.transport.writelines((head, body))
            conn.arm_watchdog(self.read_timeout)
            try:
                status, reason, resp_headers = await fut
            except UpstreamError:
                self._close_conn(conn)
                if reused and attempt == 0 and not conn.got_bytes and not isinstance(conn.error, UpstreamTimeout):
                    continue  # a stale keep-alive connection: send once more on a fresh one
                raise
            except BaseException:
                self._close_conn(conn)  # cancelled: abort the exchange
                raise
            return UpstreamResponse(conn, self, status, reason, resp_headers, self.read_timeout)
        raise AssertionError("unreachable")  # pragma: no cover

    def _release(self, conn: _Conn) -> None:
        conn.cancel_watchdog()
        if conn.state == _DONE and conn.keep_alive and not conn.closed and not self.closed and conn.error is None and not conn.paused:
            idle = self._idle.setdefault(conn.key, [])
            if len(idle) >= self.max_idle:
                self._close_conn(conn)
                return
            conn.idle_since = conn.loop.time()
            conn.head_future = None
            conn.waiter = None
            idle.append(conn)
        else:
            self._close_conn(conn)

    def _close_conn(self, conn: _Conn) -> None:
        conn.cancel_watchdog()
        conn.keep_alive = False
        if conn.transport is not None and not conn.closed:
            conn.transport.abort() if conn.state not in (_DONE, _HEAD) else conn.transport.close()
        conn.closed = True
        self._forget(conn)

    def _forget(self, conn: _Conn) -> None:
        self._all.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    @property
    def idle_connections(self) -> int:
        """Idle pooled connections (all replicas)."""
        return sum(len(v) for v in self._idle.values())

    async def close(self) -> None:
        """Close every connection."""
        self.closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        for conn in list(self._all):
            self._close_conn(conn)
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing
