"""Token usage from a replica's answer, for `Router.on_complete`.

A JSON answer carries OpenAI's `usage` object; a stream carries it in one of its last events
when the client asked for it (`stream_options.include_usage`). vLLM reports cached prompt tokens
in `usage.prompt_tokens_details.cached_tokens` when started with
`--enable-prompt-tokens-details`; without it they read 0.
"""

from __future__ import annotations

import json
from typing import Any

from pylb.router.interface import Usage


def usage_from_json(obj: Any) -> Usage | None:
    """`Usage` from an OpenAI `usage` object, None when absent or malformed."""
    if not isinstance(obj, dict):
        return None
    try:
        details = obj.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return Usage(int(obj["prompt_tokens"]), int(obj.get("completion_tokens") or 0), int(cached or 0))
    except (KeyError, TypeError, ValueError):
        return None


def usage_from_sse_tail(tail: bytes) -> Usage | None:
    """The last `usage` object in the final SSE events of a stream, None when there is none."""
    i = tail.rfind(b'"usage"')
    while i >= 0:
        start = tail.rfind(b"data:", 0, i)
        end = tail.find(b"\n", i)
        if start >= 0:
            try:
                obj = json.loads(tail[start + 5 : end if end >= 0 else len(tail)])
                u = usage_from_json(obj.get("usage")) if isinstance(obj, dict) else None
                if u is not None:
                    return u
            except ValueError:
                pass
        i = tail.rfind(b'"usage"', 0, max(start, 0))
    return None


def usage_from_json_body(data: bytes) -> Usage | None:
    """`Usage` from a non-streamed answer's body, None when it is not JSON or has none."""
    try:
        return usage_from_json(json.loads(data.decode("utf-8")).get("usage"))
    except (ValueError, AttributeError):  # not JSON (UnicodeDecodeError is a ValueError)
        return None
