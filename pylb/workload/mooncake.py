"""Mooncake trace loader: JSONL with `hash_ids` of 512-token blocks -> requests with real text.

Design
------
A Mooncake trace line is `{"timestamp": ms, "input_length": T, "output_length": O,
"hash_ids": [id, ...]}`, where id k stands for the whole prefix up to the k-th block of 512
tokens (the last block partial). pylb's engines and routers work on prompt *text* (4 bytes per
simulated token), so every id becomes a deterministic 2048-byte ASCII text (`block_text`), and
a prompt is its ids' texts concatenated and cut to 4*T bytes. Equal ids give equal text, and
two ids that differ give texts that differ within their first bytes (each starts with a header
naming its id), so two prompts share their first k*2048 bytes exactly when they share their
first k ids: the prefix structure of the trace survives the trip through text, at every
block size that divides 512 tokens.

The filler after the header is a slice of a fixed pool of pseudo-random words at an offset
derived from the id, so texts look like text and cost about a microsecond each to make. The
prompt text is built on demand (`WorkloadRequest.prompt_text()`), never stored.

Arrival = timestamp / 1000 (seconds); output tokens = output_length (at least 1);
request ids are "mooncake-<line index>" (0-based over the requests read).
Source of the format: kvcache-ai/Mooncake, FAST25-release/traces (see ../shared/traces/README.md).
"""

from __future__ import annotations

import json
import os
import random
from functools import partial

from .types import BYTES_PER_TOKEN, WorkloadRequest

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake hash block."""

BLOCK_BYTES = MOONCAKE_BLOCK_TOKENS * BYTES_PER_TOKEN
"""Bytes of text per hash id (2048)."""


class MooncakeFormatError(ValueError):
    """A line of a Mooncake trace is malformed; the message gives path, line and field."""


def _make_pool() -> str:
    rng = random.Random(0x6D6F6F6E)  # fixed: texts must be the same in every process
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words = []
    for _ in range(512):
        n = rng.randint(1, 4)
        words.append("".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(n)))
    text = []
    size = 0
    while size < 2 * BLOCK_BYTES + 4096:
        w = rng.choice(words)
        sep = ".\n" if rng.random() < 0.08 else " "
        text.append(w + sep)
        size += len(w) + len(sep)
    return "".join(text)


_POOL = _make_pool()
_OFFSETS = 4096  # distinct filler offsets


def block_text(hash_id: int) -> str:
    """The 2048-byte ASCII text of one Mooncake hash id (deterministic, distinct per id)."""
    head = f"<{hash_id}> "
    off = (hash_id * 2654435761) % _OFFSETS
    return head + _POOL[off : off + BLOCK_BYTES - len(head)]


def mooncake_prompt(hash_ids: list[int], input_length: int) -> str:
    """The prompt text of a trace line: its ids' texts, cut to input_length * 4 bytes."""
    nbytes = input_length * BYTES_PER_TOKEN
    full, rest = divmod(nbytes, BLOCK_BYTES)
    parts = [block_text(h) for h in hash_ids[:full]]
    if rest:
        parts.append(block_text(hash_ids[full])[:rest])
    return "".join(parts)


def _field(d: dict, key: str, where: str) -> object:
    if key not in d:
        raise MooncakeFormatError(f"{where}: missing field {key!r}")
    return d[key]


def _int_field(d: dict, key: str, where: str, minimum: int) -> int:
    v = _field(d, key, where)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise MooncakeFormatError(f"{where}: field {key} must be an integer >= {minimum}, got {v!r}")
    return v


def load_mooncake(path: str | os.PathLike[str], limit: int | None = None) -> list[WorkloadRequest]:
    """Read a Mooncake JSONL trace into requests in file order (which is arrival order).

    `limit` keeps the first `limit` requests. Raises FileNotFoundError for a missing file and
    MooncakeFormatError (a ValueError) naming the line and field for a malformed one.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    out: list[WorkloadRequest] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{os.fspath(path)}:{lineno}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MooncakeFormatError(f"{where}: not valid JSON: {exc.msg}") from None
            if not isinstance(d, dict):
                raise MooncakeFormatError(f"{where}: expected a JSON object, got {type(d).__name__}")
            ts = _field(d, "timestamp", where)
            if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not ts >= 0:
                raise MooncakeFormatError(f"{where}: field timestamp must be a number of milliseconds >= 0, got {ts!r}")
            input_length = _int_field(d, "input_length", where, 1)
            output_length = _int_field(d, "output_length", where, 0)
            ids = _field(d, "hash_ids", where)
            if not isinstance(ids, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                raise MooncakeFormatError(f"{where}: field hash_ids must be a list of integers")
            needed = -(-input_length // MOONCAKE_BLOCK_TOKENS)
            if len(ids) < needed:
                raise MooncakeFormatError(
                    f"{where}: input_length {input_length} needs {needed} hash_ids of {MOONCAKE_BLOCK_TOKENS} tokens, got {len(ids)}"
                )
            out.append(
                WorkloadRequest(
                    request_id=f"mooncake-{len(out)}",
                    arrival_s=ts / 1000.0,
                    prompt_tokens=input_length,
                    output_tokens=max(1, output_length),
                    make_text=partial(mooncake_prompt, ids[:needed], input_length),
                )
            )
    return out
