"""Streamed answers: each piece from the replica goes straight to the client's socket.

Design
------
After a stream's first chunk (its head sent with it, so the request could still be retried until
then), pylb splices: `UpstreamResponse.pipe` calls a `StreamSplice` from the upstream
connection's data callback with each piece the replica sent, and the splice writes it to the
client's transport at once, framed as an HTTP/1.1 chunk when the answer is chunked. No task
switch and no pass through aiohttp's write path per piece. Back-pressure: the replica's
connection is paused while the client's socket buffer holds more than `CLIENT_HIGH_WATER` bytes
and resumed below `CLIENT_LOW_WATER`, so a slow client costs pylb at most that much memory. The
splice also counts SSE events (a usage estimate when the stream reports none), keeps the last
pieces (where the final `usage` event is), records the whole answer when the semantic cache
asks, and notes a client that went away (then it aborts the upstream answer, so vLLM frees the
request's KV blocks).
"""

from __future__ import annotations

import asyncio

from .upstream import UpstreamResponse

CLIENT_HIGH_WATER = 256 * 1024
"""Bytes waiting in a client's socket buffer above which pylb stops reading the replica's stream."""

CLIENT_LOW_WATER = 64 * 1024
"""... and below which it reads again."""


class StreamSplice:
    """The sink of a streamed answer: writes each piece from the replica straight to the client's
    transport, from the upstream connection's data callback (`UpstreamResponse.pipe`), in HTTP/1.1
    chunked framing when the response is chunked (aiohttp wrote the head and the first piece, and
    writes the last chunk at `write_eof`). This saves a task switch and aiohttp's write path per
    piece. It counts SSE events, keeps the last pieces (for the final `usage`), pauses the
    replica while the client's socket buffer is over `CLIENT_HIGH_WATER` and resumes it below
    `CLIENT_LOW_WATER`, and notes a client that went away (then aborts the upstream answer)."""

    __slots__ = ("transport", "up", "framed", "events", "c1", "c2", "c3", "gone", "record", "_loop")

    def __init__(self, transport: asyncio.Transport | None, up: UpstreamResponse, framed: bool, first: bytes, record: list[bytes] | None = None) -> None:
        self.transport = transport
        self.record = record  # every piece of the answer is appended here when given
        if record is not None:
            record.append(first)
        self.up = up
        self.framed = framed
        self.events = first.count(b"data:")
        self.c1 = self.c2 = b""
        self.c3 = first
        self.gone = transport is None
        self._loop = asyncio.get_running_loop()

    def __call__(self, piece: bytes) -> None:
        t = self.transport
        if self.gone or t is None or t.is_closing():
            if not self.gone:
                self.gone = True
                self.up.abort()
            return
        t.write(b"%x\r\n%s\r\n" % (len(piece), piece) if self.framed else piece)
        if self.record is not None:
            self.record.append(piece)
        self.events += piece.count(b"data:")
        self.c1, self.c2, self.c3 = self.c2, self.c3, piece
        if t.get_write_buffer_size() > CLIENT_HIGH_WATER:
            self.up.pause()
            self._loop.call_later(0.005, self._check)

    def _check(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or t.get_write_buffer_size() <= CLIENT_LOW_WATER:
            self.up.resume()
        else:
            self._loop.call_later(0.005, self._check)

    def tail(self) -> bytes:
        """The last three pieces, where a stream's final `usage` event is."""
        return self.c1 + self.c2 + self.c3

    @property
    def delivered(self) -> bool:
        """Whether the stream's last event, `data: [DONE]`, was written to the client."""
        return self.tail().rstrip().endswith(b"data: [DONE]")
