"""Helpers the benchmark scripts share: a free loopback port, and waiting for a server to answer 200."""

from __future__ import annotations

import asyncio
import socket
import time


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the caller's server binds it next)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_ready(url: str, timeout: float = 30.0, interval: float = 0.1) -> None:
    """Poll `url` until it answers 200; RuntimeError after `timeout` seconds."""
    import aiohttp

    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(interval)
    raise RuntimeError(f"{url} did not become ready within {timeout:g} s")
