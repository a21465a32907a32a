"""Which headers cross pylb, in each direction.

Design
------
pylb is an HTTP/1.1 proxy: headers that concern one connection only (hop-by-hop, RFC 9110
§7.6.1, and those a `Connection` header names) are never forwarded. Towards a replica pylb also
drops `Host` (the replica's own is written by the connection pool), `Content-Length` and
`Content-Encoding` (the body is forwarded decoded, with its own length), `Expect`, the client's
`X-Request-Id` (pylb sets the one it uses) and, unless `upstream.forward_authorization` says
otherwise, `Authorization` (a client's key for pylb is not a key for the replicas). Towards a
client, the replica's `Content-Length` is dropped (aiohttp frames the answer) and every answer
names the replica (`x-pylb-replica`, its label), the request (`x-request-id`) and how many
replicas were tried before this answer (`x-pylb-attempts`: 1, or more after retries).

Routed requests build their upstream header block from the raw header pairs as bytes
(`raw_request_headers`), without decoding them to `str` and back.
"""

from __future__ import annotations

import hashlib
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te", "trailer", "trailers", "transfer-encoding", "upgrade")
)
"""Headers that concern one connection only (RFC 9110 §7.6.1) and are never forwarded."""

REQUEST_SKIP = HOP_BY_HOP | {"host", "content-length", "expect", "content-encoding"}  # pylb forwards bodies decoded
"""Client headers never sent to a replica."""

RESPONSE_SKIP = HOP_BY_HOP | {"content-length"}
"""Replica headers never sent to a client."""

REQUEST_SKIP_RAW = frozenset(h.encode() for h in REQUEST_SKIP | {"x-request-id"})
"""`REQUEST_SKIP` and X-Request-Id, as lower-case bytes: the client's Authorization is forwarded."""

REQUEST_SKIP_RAW_AUTH = REQUEST_SKIP_RAW | {b"authorization"}
"""... and Authorization too (the default: `upstream.forward_authorization` off)."""


def request_skip_raw(forward_authorization: bool) -> frozenset[bytes]:
    """The raw header names dropped towards a replica, by `upstream.forward_authorization`."""
    return REQUEST_SKIP_RAW if forward_authorization else REQUEST_SKIP_RAW_AUTH


def strip_headers(headers: CIMultiDictProxy[str] | CIMultiDict[str], skip: frozenset[str] | set[str]) -> CIMultiDict[str]:
    """A copy of `headers` without `skip` and without the headers the Connection header names."""
    extra = headers.get("Connection")
    if extra:
        skip = set(skip) | {h.strip().lower() for h in extra.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        if k.lower() not in skip:
            out.add(k, v)
    return out


def strip_header_pairs(headers: Any, skip: frozenset[str] | set[str]) -> list[tuple[str, str]]:
    """(name, value) pairs of `headers` (a mapping or pairs) without `skip` and the headers the
    Connection header names."""
    pairs = headers.items() if hasattr(headers, "items") else headers
    out = []
    extra: set[str] | None = None
    for k, v in pairs:
        low = k.lower()
        if low in skip:
            if low == "connection":
                extra = {h.strip().lower() for h in v.split(",")}
            continue
        out.append((k, v))
    if extra:
        out = [(k, v) for k, v in out if k.lower() not in extra]
    return out


def raw_request_headers(raw: tuple[tuple[bytes, bytes], ...], request_id: str, skip: frozenset[bytes] = REQUEST_SKIP_RAW_AUTH) -> bytes:
    """The client's headers as an encoded block for the replica: those in `skip` and those the
    Connection header names dropped, X-Request-Id set to `request_id`."""
    out = []
    extra: set[bytes] | None = None
    for k, v in raw:
        low = k.lower()
        if low in skip:
            if low == b"connection":
                extra = {h.strip().lower() for h in v.split(b",")}
            continue
        out.append(b"%s: %s\r\n" % (k, v))
    if extra:
        out = [line for line in out if line.split(b":", 1)[0].lower() not in extra]
    out.append(b"X-Request-Id: %s\r\n" % request_id.encode("latin-1", "replace"))
    return b"".join(out)


def response_headers(upstream_headers: Any, request_id: str, replica_label: str, attempts: int = 1) -> CIMultiDict[str]:
    """The headers of a replica's answer as the client gets them: `RESPONSE_SKIP` dropped,
    `x-pylb-replica`, `x-pylb-attempts` (this answer's attempt, 1 without retries) and
    `x-request-id` set."""
    h: CIMultiDict[str] = CIMultiDict(strip_header_pairs(upstream_headers, RESPONSE_SKIP))
    h["x-pylb-replica"] = replica_label
    h["x-pylb-attempts"] = str(attempts)
    h["x-request-id"] = request_id
    return h


class ReplicaLabels:
    """How clients see a replica: by its base URL, or by an opaque stable id when
    `server.expose_replicas` is off (answers' `x-pylb-replica` and error messages)."""

    __slots__ = ("expose",)

    def __init__(self, expose: bool) -> None:
        self.expose = expose

    def label(self, replica: str) -> str:
        """The replica's name for clients."""
        if self.expose:
            return replica
        return "replica-" + hashlib.sha256(replica.encode()).hexdigest()[:10]

    def public(self, text: str, replica: str) -> str:
        """`text` for a client: the replica's address replaced by its label when hidden."""
        if self.expose:
            return text
        label = self.label(replica)
        return text.replace(replica, label).replace(replica.split("://", 1)[-1], label)
