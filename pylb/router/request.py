"""The request model: OpenAI request bodies -> `RoutingRequest` (DESIGN.md §4).

Design
------
The router never sees text, only block hashes and token estimates. This module turns the JSON
body of `/v1/completions` or `/v1/chat/completions` into a `RoutingRequest`, validating exactly
the fields routing reads; every other field is left to the replica (the body is forwarded as
received). A malformed field raises `RequestError(field, message)`, which the proxy maps to an
HTTP 400 OpenAI-style error naming the field.

Prompt text -> hashes. Text is UTF-8 encoded and hashed in blocks of `block_chars` bytes (64 by
default, about 16 tokens) with `pylb.native.block_hashes`; the estimated prompt length is
ceil(bytes / 4) tokens. No tokenizer runs on the hot path.

Whole-prompt hash. `RoutingRequest.prompt_hash` is `pylb.native.xxh3_64` of exactly the buffer
whose blocks were hashed: the UTF-8 text (for chat, its canonical rendering), or the uint32
token ids' bytes (the array `block_hashes` reads, native byte order as there); for a batch, the
first prompt's, like its hashes. The router keys a prompt shorter than one router block by it
(`pylb.router.prefix.short_key`), so short prompts that differ get different keys instead of
one key per token count; the simulator fills it the same way (`pylb.sim.cluster`), so a
prompt is placed alike live and in simulation. It costs one more XXH3 pass over the prompt
bytes; it is filled for every prompt, long ones too, so that it is a function of the prompt
alone and not of `block_chars`.

/v1/completions `prompt`:
  - a string: hashed as text.
  - token ids (a list of ints): hashed as uint32 values, `block_chars // 4` ids per block (16 by
    default: the same granularity as 64 bytes of text); prompt tokens = number of ids. Ids must
    be in 0..2**32-1.
  - a batch (a list of strings, or a list of lists of ids): vLLM runs each prompt as its own
    sequence, on one replica, and answers with one choice per prompt. pylb cannot split one HTTP
    request over several replicas without re-encoding the response, so the whole batch is
    routed as one request: its hashes and prompt_hash are the *first* prompt's (batched prompts
    usually share a few-shot or system prefix, and the first is the one whose cached prefix the
    other prompts are most likely to share; concatenating them would produce hashes no replica
    ever caches), its prompt tokens and max tokens are the sums over the batch, so that load
    accounting sees the whole batch.
  - `max_tokens` (default: `completions_default_max_tokens`, vLLM's 16), times `n`.

/v1/chat/completions `messages` (and `tools`) are rendered to one canonical text, in order:

    <|tools|>\\n{tool definitions as compact, key-sorted JSON}\\n      (only when `tools` is given)
    <|{role}|>\\n{content}\\n                                           per message
       (`<|{role}:{name}|>` when the message has a `name`)

  where `content` is the string content, or the parts in order (text parts as their text, image
  parts as `<|image|>{url}`, audio parts as `<|audio|>{format}:{data}`, any other part as its
  compact JSON), followed by the assistant's tool calls (`<|tool_call|>{name}({arguments})` each)
  and, for tool results, the `tool_call_id`. Because each message's rendering depends only on
  that message, the rendering of turn N+1 (turn N's messages, the assistant's reply, the next user
  message) extends the rendering of turn N byte for byte, so turn N+1 shares all of turn N's
  blocks. Tools come first because chat templates put them in the system prompt; a conversation
  that keeps its tools keeps its prefix. `max_tokens` is `max_completion_tokens`, else
  `max_tokens`, else `chat_default_max_tokens`, times `n`.

Both: `model` (string, optional), `stream` (bool, default false), `priority` (int, vLLM's
scheduling priority, default 0; pylb's convention "larger is more urgent" is vLLM's "lower
value is served first" negated), `n` (int >= 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pylb import native

from .interface import BYTES_PER_TOKEN, DEFAULT_BLOCK_CHARS, BlockHashing, RoutingRequest

DEFAULT_COMPLETIONS_MAX_TOKENS = 16
"""max_tokens of a /v1/completions request that omits it (vLLM's default)."""

DEFAULT_CHAT_MAX_TOKENS = 1024
"""max_tokens assumed for routing a chat request that omits it (vLLM fills the context)."""

COMPLETIONS = "completions"
CHAT = "chat"


class RequestError(ValueError):
    """A request body that pylb cannot route: `field` names the offending field (the OpenAI
    error's `param`), `message` says what is wrong with it."""

    def __init__(self, field: str | None, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What the request model needs from the settings. The defaults are written here (and in
    `pylb.router.interface`); `pylb.config.RouterSettings` reads them from here."""

    block_chars: int = DEFAULT_BLOCK_CHARS
    completions_default_max_tokens: int = DEFAULT_COMPLETIONS_MAX_TOKENS
    chat_default_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS

    @classmethod
    def from_settings(cls, s: Any) -> RequestLimits:
        """The limits of router settings `s`: anything with `block_chars`,
        `completions_default_max_tokens` and `chat_default_max_tokens` (`pylb.config.RouterSettings`;
        the router does not import the settings layer)."""
        return cls(s.block_chars, s.completions_default_max_tokens, s.chat_default_max_tokens)


MAX_INT_DIGITS = 20
"""JSON integers longer than this (no token id, count or priority is) are read as an out-of-range
float, which the field's check rejects by name; Python's own limit (4,300 digits) would fail the
whole body without naming the field, and parsing a huge integer costs quadratic time."""


def _json_int(text: str) -> int | float:
    return int(text) if len(text) <= MAX_INT_DIGITS else (math.inf if not text.startswith("-") else -math.inf)


def parse_json_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object; RequestError("body", ...) when it is not one."""
    try:
        data = json.loads(body.decode("utf-8"), parse_int=_json_int)
    except UnicodeDecodeError:
        raise RequestError("body", "the request body is not valid UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError("body", f"the request body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError("body", "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise RequestError("body", f"the request body must be a JSON object, got {type(data).__name__}")
    return data


def build_request(
    kind: str, body: Mapping[str, Any], request_id: str, arrival: float, limits: RequestLimits = RequestLimits()
) -> RoutingRequest:
    """The `RoutingRequest` for an OpenAI request body.

    Args:
        kind: `COMPLETIONS` ("completions") or `CHAT` ("chat").
        body: the parsed JSON body.
        request_id: the id the router will know the request by.
        arrival: arrival time on the driver's clock.
        limits: block size and default max_tokens.

    Raises RequestError naming the field when a field routing needs is missing or malformed.
    """
    if kind == COMPLETIONS:
        hashes, prompt_hash, prompt_tokens, batch, hashing = _completion_prompt(body.get("prompt"), limits.block_chars)
        max_tokens = _int(body, "max_tokens", 1, limits.completions_default_max_tokens) * batch
    elif kind == CHAT:
        text = canonical_chat_text(body.get("messages"), body.get("tools"))
        data = text.encode("utf-8", "surrogatepass")
        hashing = BlockHashing.text(limits.block_chars)
        hashes = native.block_hashes(data, hashing.block_size)
        prompt_hash = native.xxh3_64(data)
        prompt_tokens = max(1, -(-len(data) // BYTES_PER_TOKEN))
        mct = _int(body, "max_completion_tokens", 1, None)
        max_tokens = mct if mct is not None else _int(body, "max_tokens", 1, limits.chat_default_max_tokens)
    else:
        raise ValueError(f"unknown request kind {kind!r}")
    n = _int(body, "n", 1, 1)
    model = body.get("model", "")
    if model is None:
        model = ""
    elif not isinstance(model, str):
        raise RequestError("model", f"model must be a string, got {_tname(model)}")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be a boolean, got {_tname(stream)}")
    priority = _int(body, "priority", None, 0)
    return RoutingRequest(
        request_id=request_id,
        block_hashes=hashes,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens * n,
        arrival=arrival,
        model=model,
        stream=stream,
        priority=-priority,
        prompt_hash=prompt_hash,
        hashing=hashing,
    )


# ---- completions ----------------------------------------------------------------------------------------


def _completion_prompt(prompt: Any, block_chars: int) -> tuple[np.ndarray, int, int, int, BlockHashing]:
    """(hashes, whole-prompt hash, prompt tokens, batch size, hashing) of a completions `prompt`."""
    text, ids = BlockHashing.text(block_chars), BlockHashing.token_ids(block_chars)
    if isinstance(prompt, str):
        data = prompt.encode("utf-8", "surrogatepass")
        if not data:
            raise RequestError("prompt", "prompt must not be empty")
        return native.block_hashes(data, text.block_size), native.xxh3_64(data), -(-len(data) // BYTES_PER_TOKEN), 1, text
    if prompt is None:
        raise RequestError("prompt", "prompt is required: a string, a list of strings, or token ids")
    if not isinstance(prompt, list):
        raise RequestError("prompt", f"prompt must be a string, a list of strings, or token ids, got {_tname(prompt)}")
    if not prompt:
        raise RequestError("prompt", "prompt must not be empty")
    first = prompt[0]
    if isinstance(first, int) and not isinstance(first, bool):
        token_ids = _token_ids(prompt, "prompt")
        return native.block_hashes(token_ids, ids.block_size), native.xxh3_64(token_ids), len(token_ids), 1, ids
    # a batch: strings, or lists of token ids; routed by the first prompt's hashes
    hashes: np.ndarray | None = None
    hashing = text
    whole = 0
    tokens = 0
    for i, item in enumerate(prompt):
        where = f"prompt[{i}]"
        if isinstance(item, str):
            data = item.encode("utf-8", "surrogatepass")
            if not data:
                raise RequestError("prompt", f"{where} must not be empty")
            tokens += -(-len(data) // BYTES_PER_TOKEN)
            if hashes is None:
                hashes, whole = native.block_hashes(data, text.block_size), native.xxh3_64(data)
        elif isinstance(item, list):
            if not item:
                raise RequestError("prompt", f"{where} must not be empty")
            token_ids = _token_ids(item, where)
            tokens += len(token_ids)
            if hashes is None:
                hashes, whole, hashing = native.block_hashes(token_ids, ids.block_size), native.xxh3_64(token_ids), ids
        else:
            raise RequestError("prompt", f"{where} must be a string or a list of token ids, got {_tname(item)}")
    assert hashes is not None
    return hashes, whole, tokens, len(prompt), hashing


def _token_ids(values: list[Any], where: str) -> np.ndarray:
    for i, v in enumerate(values):
        if not isinstance(v, int) or isinstance(v, bool):
            raise RequestError("prompt", f"{where} must be a list of integer token ids; item {i} is {_tname(v)}")
        if not 0 <= v <= 0xFFFFFFFF:
            raise RequestError("prompt", f"{where}: token id {v} (item {i}) is out of range 0..2**32-1")
    return np.asarray(values, dtype=np.uint32)


# ---- chat ------------------------------------------------------------------------------------------------


def _compact(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_chat_text(messages: Any, tools: Any = None) -> str:
    """The canonical text of a chat request (see the module comment for the template).

    Raises RequestError("messages" or "tools", ...) for a malformed list, message or part.
    """
    if messages is None:
        raise RequestError("messages", "messages is required: a non-empty list of message objects")
    if not isinstance(messages, list):
        raise RequestError("messages", f"messages must be a list of message objects, got {_tname(messages)}")
    if not messages:
        raise RequestError("messages", "messages must not be empty")
    out: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            raise RequestError("tools", f"tools must be a list of tool definitions, got {_tname(tools)}")
        if tools:
            out.append(f"<|tools|>\n{_compact(tools)}\n")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise RequestError("messages", f"messages[{i}] must be an object, got {_tname(msg)}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise RequestError("messages", f"messages[{i}].role must be a non-empty string")
        name = msg.get("name")
        if name is not None and not isinstance(name, str):
            raise RequestError("messages", f"messages[{i}].name must be a string")
        out.append(f"<|{role}:{name}|>\n" if name else f"<|{role}|>\n")
        content = msg.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            for j, part in enumerate(content):
                out.append(_render_part(part, i, j))
        elif content is not None:
            raise RequestError("messages", f"messages[{i}].content must be a string or a list of content parts, got {_tname(content)}")
        tool_calls = msg.get("tool_calls")
        if tool_calls is not None:
            if not isinstance(tool_calls, list):
                raise RequestError("messages", f"messages[{i}].tool_calls must be a list")
            for j, call in enumerate(tool_calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict):
                    raise RequestError("messages", f"messages[{i}].tool_calls[{j}] must be an object with a function")
                args = fn.get("arguments", "")
                out.append(f"<|tool_call|>{fn.get('name', '')}({args if isinstance(args, str) else _compact(args)})")
        call_id = msg.get("tool_call_id")
        if isinstance(call_id, str):
            out.append(f"<|tool_result|>{call_id}")
        out.append("\n")
    return "".join(out)


def _render_part(part: Any, i: int, j: int) -> str:
    if not isinstance(part, dict):
        raise RequestError("messages", f"messages[{i}].content[{j}] must be an object, got {_tname(part)}")
    kind = part.get("type")
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise RequestError("messages", f"messages[{i}].content[{j}].text must be a string")
        return text
    if kind == "image_url":
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if not isinstance(url, str):
            raise RequestError("messages", f"messages[{i}].content[{j}].image_url.url must be a string")
        return f"<|image|>{url}"
    if kind == "input_audio":
        audio = part.get("input_audio")
        if not isinstance(audio, dict):
            raise RequestError("messages", f"messages[{i}].content[{j}].input_audio must be an object")
        return f"<|audio|>{audio.get('format', '')}:{audio.get('data', '')}"
    if not isinstance(kind, str):
        raise RequestError("messages", f"messages[{i}].content[{j}].type must be a string")
    return f"<|{kind}|>{_compact(part)}"


# ---- fields ------------------------------------------------------------------------------------------------


def _int(body: Mapping[str, Any], name: str, minimum: int | None, default: int | None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(name, f"{name} must be an integer, got {_tname(value)}")
    if isinstance(value, float):
        if math.isinf(value):
            raise RequestError(name, f"{name} is out of range (an integer of more than {MAX_INT_DIGITS} digits)")
        if not (math.isfinite(value) and value.is_integer()):
            raise RequestError(name, f"{name} must be an integer, got {value!r}")
        value = int(value)
    if minimum is not None and value < minimum:
        raise RequestError(name, f"{name} must be at least {minimum}, got {value}")
    if not -MAX_FIELD_INT <= value <= MAX_FIELD_INT:
        raise RequestError(name, f"{name} must be at most {MAX_FIELD_INT} in magnitude, got {value}")
    return value


MAX_FIELD_INT = 2**53
"""The largest magnitude of an integer field routing reads (max_tokens, n, priority)."""


def _tname(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number" if isinstance(v, (int, float)) else type(v).__name__
    )
