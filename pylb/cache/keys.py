"""What the semantic cache may answer, and under which partition.

Design
------
A request is cacheable only when all of these hold (`plan_request` returns the reason otherwise):
  - a tenant: a keyed hash (HMAC-SHA256 with a per-process secret) of the configured tenant
    header, or of the Authorization header when none is configured; no tenant, no cache, so
    one user's answers never reach another;
  - deterministic: temperature 0 (an absent temperature is 1.0 in the OpenAI API and in vLLM), n
    absent or 1, no tools / functions, and text only (a chat message whose content is not a string
    or a list of text parts is refused), unless the model is in `cache.opt_in_models`, which
    lifts only the temperature rule;
  - the last message is the user's (chat), or the prompt is one string (completions);
  - no `Cache-Control: no-cache` (answer from upstream; the answer may be stored) or `no-store`
    (neither looked up nor stored).

The partition key is a hash of the tenant and the whole request body with the query masked: the
last user message's text (chat) or the prompt (completions) is replaced by a placeholder, and
every other field -- model, system prompt, prior turns, every generation parameter, `stream` and
`stream_options` (they change the answer's bytes) -- goes in as canonical JSON (with the spellings
of one request made one: `stream` absent or false, `n` absent or 1). So two requests
share a partition exactly when they differ at most in the query text, and the semantic lookup
compares query texts only inside one partition. The exact key adds the query text itself.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from typing import Any

MASK = "\x00pylb-cache-query\x00"
"""What stands for the query text in the partition key."""


@dataclass(frozen=True, slots=True)
class CachePlan:
    """A cacheable request: its partition, exact key, query text and model, and whether an answer
    may be served (`lookup`) and stored (`store`)."""

    partition: bytes
    exact_key: bytes
    query: str
    model: str
    tenant: bytes
    stream: bool
    lookup: bool = True
    store: bool = True


class TenantKeys:
    """Keyed hashes of tenant credentials: the raw header value is never kept."""

    def __init__(self, header: str = "", secret: bytes | None = None) -> None:
        self.header = header or "Authorization"
        self._secret = secret if secret is not None else secrets.token_bytes(32)

    def tenant(self, headers: Any) -> bytes | None:
        """The tenant of a request with `headers` (a case-insensitive mapping), None when it has none."""
        value = headers.get(self.header)
        if not value or not value.strip():
            return None
        return hmac.new(self._secret, value.strip().encode("utf-8", "surrogatepass"), hashlib.sha256).digest()[:16]


def _text_parts(content: Any) -> str | None:
    """A message content as text: a string, or a list of only text parts; None otherwise."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None


def _deterministic_refusal(payload: dict[str, Any], opted_in: bool) -> str | None:
    temperature = payload.get("temperature", 1.0)
    if not opted_in and (not isinstance(temperature, (int, float)) or temperature != 0):
        return "temperature is not 0"
    n = payload.get("n", 1)
    if n is not None and n != 1:
        return "n is not 1"
    if payload.get("best_of") not in (None, 1):
        return "best_of is not 1"
    for name in ("tools", "functions", "tool_choice", "function_call"):
        if payload.get(name):
            return f"the request has {name}"
    return None


def plan_request(
    kind: str, payload: dict[str, Any], headers: Any, tenants: TenantKeys, opt_in_models: frozenset[str] = frozenset()
) -> CachePlan | str:
    """The `CachePlan` of a request (`kind` "chat" or "completions", its parsed JSON body and its
    headers), or the reason it is not cacheable (see the module comment)."""
    cache_control = (headers.get("Cache-Control") or "").lower()
    no_store = "no-store" in cache_control
    if no_store:
        return "Cache-Control: no-store"
    tenant = tenants.tenant(headers)
    if tenant is None:
        return f"no tenant ({tenants.header} header missing)"
    model = payload.get("model")
    model = model if isinstance(model, str) else ""
    refusal = _deterministic_refusal(payload, model in opt_in_models)
    if refusal:
        return refusal
    masked = dict(payload)
    # spellings of the same request: stream absent or false, n absent or 1, stream_options without a stream
    masked["stream"] = bool(payload.get("stream"))
    if not masked["stream"]:
        masked.pop("stream_options", None)
    if masked.get("n") == 1:
        del masked["n"]
    if kind == "chat":
        messages = payload.get("messages")
        if not isinstance(messages, list) or not messages:
            return "no messages"
        texts = []
        for m in messages:
            if not isinstance(m, dict):
                return "a message is not an object"
            t = _text_parts(m.get("content"))
            if t is None and m.get("content") is not None:
                return "a message is not text only"
            texts.append(t)
        last = messages[-1]
        if last.get("role") != "user" or texts[-1] is None:
            return "the last message is not the user's text"
        query = texts[-1]
        masked["messages"] = [*messages[:-1], {**last, "content": MASK}]
    else:
        prompt = payload.get("prompt")
        if not isinstance(prompt, str):
            return "the prompt is not one string"
        query = prompt
        masked["prompt"] = MASK
    try:
        canonical = json.dumps(masked, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return "the request cannot be written as canonical JSON"
    h = hashlib.blake2b(digest_size=16)
    h.update(tenant)
    h.update(kind.encode())
    h.update(canonical.encode("utf-8", "surrogatepass"))
    partition = h.digest()
    exact = hashlib.blake2b(partition + query.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return CachePlan(
        partition=partition,
        exact_key=exact,
        query=query,
        model=model,
        tenant=tenant,
        stream=bool(payload.get("stream")),
        lookup="no-cache" not in cache_control,
    )
