"""Open-loop load generator: replays a workload against any OpenAI-compatible endpoint.

Design
------
`replay(requests, url, ...)` sends every request at its scaled arrival time (`arrival_s /
rate_scale` seconds after the start) whatever happens to earlier ones (open loop, as traces are
recorded), over one aiohttp session with an unbounded connection pool, and streams each answer:

    POST {url}/v1/completions       {"model", "prompt": text, ...}
    POST {url}/v1/chat/completions  {"model", "messages": [{"role": "user", "content": text}], ...}
    ... "max_tokens": output_tokens (at least 1), "ignore_eos": true, "stream": true,
        "stream_options": {"include_usage": true}

It reads the Server-Sent Events stream (`data: {json}` lines, ending in `data: [DONE]`) and
measures, per request, from the moment it is sent:
  - TTFT: until the first chunk that carries content (`choices[].text`, or `delta.content` /
    `delta.reasoning_content` for chat); a stream that completes without any content gets TTFT = E2E;
  - E2E: until `data: [DONE]`;
  - TPOT: (E2E - TTFT) / (output tokens - 1), output tokens from `usage.completion_tokens`, else
    the number of content chunks; undefined for one-token answers;
  - usage: `prompt_tokens` and `prompt_tokens_details.cached_tokens` when the server reports them.

Failures are recorded, never raised, one kind each: `http_<status>` (a non-200 answer),
`stream_error` (an error object inside the stream, as vLLM sends when generation fails),
`timeout` (no `[DONE]` within `timeout_s` of sending; the connection is closed, which makes
vLLM abort the request), `connection` (refused, reset or dropped mid-stream), `incomplete` (the
stream ended cleanly but without `[DONE]`), `bad_response` (not SSE, or a chunk that is not JSON).

Options: `duration_s` stops issuing new requests once the scaled clock passes it (requests
scheduled later are counted as not sent) and waits for those in flight, each bounded by
`timeout_s`. `concurrency_limit` caps requests in flight; a request that waits for a slot is
sent late, its lateness is recorded (`sent_s - scheduled_s`) and its latencies still start at
sending. The model is `model`, else the first one `GET {url}/v1/models` lists.

Summary (`ReplaySummary`): TTFT/TPOT/E2E P50/P90/P99 over successful requests, SLO attainment =
successful requests with TTFT <= `slo_ttft_s` / requests sent (errors count as misses; 5 s is
DualMap's SLO), errors by kind, throughput (completed requests and output tokens per second of
wall time from the start to the end of the last request), and the token-weighted cached-token rate
(sum of cached_tokens / sum of prompt_tokens over requests whose usage reports cached tokens:
the client-side view of vLLM's `prefix_cache_hits / prefix_cache_queries`).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import aiohttp
from yarl import URL

from pylb.router.interface import DEFAULT_SLO_TTFT

from .types import WorkloadRequest

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}
DEFAULT_SLO_TTFT_S = DEFAULT_SLO_TTFT  # the router's TTFT target
DEFAULT_TIMEOUT_S = 300.0
_DETAIL_BYTES = 2048  # how much of an error body is kept


class ReplayError(Exception):
    """The replay could not start (for example, the model list could not be fetched)."""


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times are seconds; `*_s` offsets count from the replay start."""

    request_id: str
    session_id: str | None
    scheduled_s: float
    prompt_tokens: int
    max_tokens: int
    sent_s: float | None = None
    status: int | None = None
    ok: bool = False
    error: str | None = None
    error_detail: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int | None = None
    content_chunks: int = 0
    usage_prompt_tokens: int | None = None
    cached_tokens: int | None = None

    def fail(self, kind: str, detail: str) -> None:
        """Mark the request failed with an error kind (the first failure wins)."""
        if self.error is None:
            self.ok, self.error, self.error_detail = False, kind, detail[:_DETAIL_BYTES]


@dataclass(slots=True)
class ReplaySummary:
    """Aggregate results of a replay (latencies in seconds; None where nothing was measured)."""

    url: str
    model: str
    endpoint: str
    rate_scale: float
    slo_ttft_s: float
    requests: int  # sent
    not_sent: int  # cut off by duration_s
    completed: int
    errors: int
    errors_by_kind: dict[str, int]
    wall_s: float
    request_throughput: float
    output_throughput: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p90: float | None
    tpot_p99: float | None
    e2e_p50: float | None
    e2e_p90: float | None
    e2e_p99: float | None
    slo_attainment: float | None
    cached_token_rate: float | None
    usage_prompt_tokens: int
    usage_cached_tokens: int
    send_lag_p99: float | None


@dataclass(slots=True)
class ReplayResult:
    """The summary and every request's record; `to_json()` gives what `pylb replay --json` writes."""

    summary: ReplaySummary
    records: list[RequestRecord] = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """{"summary": {...}, "requests": [{...}, ...]} with plain JSON types."""
        return {"summary": asdict(self.summary), "requests": [asdict(r) for r in self.records]}

    def table(self) -> str:
        """A human-readable table of the summary."""
        return format_table(self.summary)


def normalize_url(url: str) -> str:
    """`http(s)://host[:port][/prefix]` without a trailing `/` or `/v1`; ValueError if not such a URL."""
    try:
        parsed = URL(url.strip())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"not a URL: {url!r} ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"expected http://HOST[:PORT][/PREFIX], got {url!r}")
    if parsed.query_string or parsed.fragment:
        raise ValueError(f"expected no query or fragment, got {url!r}")
    text = str(parsed).rstrip("/")
    if text.endswith("/v1"):
        text = text[: -len("/v1")]
    return text


def _percentiles(values: list[float]) -> tuple[float | None, float | None, float | None]:
    """P50, P90, P99 with linear interpolation between order statistics (numpy's default)."""
    if not values:
        return None, None, None
    xs = sorted(values)

    def q(p: float) -> float:
        pos = (len(xs) - 1) * p
        lo = math.floor(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.5), q(0.9), q(0.99)


def slo_share(outcomes: Sequence[tuple[bool, float | None]], slo_ttft_s: float) -> float | None:
    """The share of requests, given as (ok, ttft_s) pairs, that succeeded with a first token
    within `slo_ttft_s`: failed and refused requests count as misses. None for no requests."""
    if not outcomes:
        return None
    return sum(1 for ok, ttft in outcomes if ok and ttft is not None and ttft <= slo_ttft_s) / len(outcomes)


def summarize(
    records: list[RequestRecord],
    *,
    not_sent: int,
    wall_s: float,
    url: str,
    model: str,
    endpoint: str,
    rate_scale: float,
    slo_ttft_s: float,
) -> ReplaySummary:
    """Aggregate request records into a `ReplaySummary` (see the module comment for definitions)."""
    ok = [r for r in records if r.ok]
    errors = Counter(r.error or "unknown" for r in records if not r.ok)
    ttft = _percentiles([r.ttft_s for r in ok if r.ttft_s is not None])
    tpot = _percentiles([r.tpot_s for r in ok if r.tpot_s is not None])
    e2e = _percentiles([r.e2e_s for r in ok if r.e2e_s is not None])
    lag = _percentiles([r.sent_s - r.scheduled_s for r in records if r.sent_s is not None])
    with_cache = [r for r in records if r.cached_tokens is not None and r.usage_prompt_tokens]
    prompt_sum = sum(r.usage_prompt_tokens or 0 for r in with_cache)
    cached_sum = sum(r.cached_tokens or 0 for r in with_cache)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    return ReplaySummary(
        url=url,
        model=model,
        endpoint=endpoint,
        rate_scale=rate_scale,
        slo_ttft_s=slo_ttft_s,
        requests=len(records),
        not_sent=not_sent,
        completed=len(ok),
        errors=len(records) - len(ok),
        errors_by_kind=dict(sorted(errors.items())),
        wall_s=wall_s,
        request_throughput=len(ok) / wall_s if wall_s > 0 else 0.0,
        output_throughput=out_tokens / wall_s if wall_s > 0 else 0.0,
        ttft_p50=ttft[0],
        ttft_p90=ttft[1],
        ttft_p99=ttft[2],
        tpot_p50=tpot[0],
        tpot_p90=tpot[1],
        tpot_p99=tpot[2],
        e2e_p50=e2e[0],
        e2e_p90=e2e[1],
        e2e_p99=e2e[2],
        slo_attainment=slo_share([(r.ok, r.ttft_s) for r in records], slo_ttft_s),
        cached_token_rate=cached_sum / prompt_sum if prompt_sum else None,
        usage_prompt_tokens=sum(r.usage_prompt_tokens or 0 for r in records),
        usage_cached_tokens=cached_sum,
        send_lag_p99=lag[2],
    )


def format_table(s: ReplaySummary) -> str:
    """The summary as an aligned text table (latencies in milliseconds)."""

    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.1f}"

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{x * 100:.1f} %"

    errors = ", ".join(f"{k} {v}" for k, v in s.errors_by_kind.items()) or "none"
    rows = [
        ("target", f"{s.url} ({s.endpoint}, model {s.model})"),
        ("rate scale", f"{s.rate_scale:g}"),
        ("requests sent", f"{s.requests}" + (f" ({s.not_sent} not sent: past --duration)" if s.not_sent else "")),
        ("completed", f"{s.completed}"),
        ("errors", f"{s.errors} ({errors})"),
        ("wall time", f"{s.wall_s:.2f} s"),
        ("throughput", f"{s.request_throughput:.2f} req/s, {s.output_throughput:.1f} output tok/s"),
        (f"SLO attainment (TTFT <= {s.slo_ttft_s:g} s)", pct(s.slo_attainment)),
        ("cached-token rate (usage)", pct(s.cached_token_rate)),
        ("send lag P99", ms(s.send_lag_p99) + " ms"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    lines.append(f"{'latency (ms)':<12}  {'P50':>10}  {'P90':>10}  {'P99':>10}")
    for name, vals in (
        ("TTFT", (s.ttft_p50, s.ttft_p90, s.ttft_p99)),
        ("TPOT", (s.tpot_p50, s.tpot_p90, s.tpot_p99)),
        ("E2E", (s.e2e_p50, s.e2e_p90, s.e2e_p99)),
    ):
        lines.append(f"{name:<12}  " + "  ".join(f"{ms(v):>10}" for v in vals))
    return "\n".join(lines)


async def fetch_model(session: aiohttp.ClientSession, base_url: str, timeout_s: float) -> str:
    """The first model id that `GET {base_url}/v1/models` lists; ReplayError if there is none."""
    where = f"{base_url}/v1/models"
    try:
        async with session.get(where, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                body = (await resp.content.read(_DETAIL_BYTES)).decode(errors="replace")
                raise ReplayError(f"GET {where} answered {resp.status}: {body}")
            payload = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise ReplayError(f"GET {where} failed: {type(exc).__name__}: {exc}") from None
    data = payload.get("data") if isinstance(payload, dict) else None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise ReplayError(f"GET {where} lists no models (pass --model)")
    return str(data[0]["id"])


def request_body(req: WorkloadRequest, model: str, endpoint: str, extra_body: dict[str, Any] | None) -> dict[str, Any]:
    """The streaming OpenAI request body for one workload request."""
    text = req.prompt_text()
    body: dict[str, Any] = {"model": model}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = text
    body.update(
        max_tokens=max(1, req.output_tokens),
        ignore_eos=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    if extra_body:
        body.update(extra_body)
    return body


def _error_message(raw: bytes) -> str:
    """The `message` of an OpenAI-style error body, else the body itself."""
    text = raw.decode(errors="replace")
    try:
        obj = json.loads(text)
    except ValueError:
        return text
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
    return text


class _Stream:
    """Parses one SSE response into a RequestRecord."""

    __slots__ = ("rec", "start", "done")

    def __init__(self, rec: RequestRecord, start: float) -> None:
        self.rec, self.start, self.done = rec, start, False

    def line(self, line: bytes) -> bool:
        """Handle one SSE line; False when reading should stop (done or failed)."""
        if not line.startswith(b"data:"):
            return True  # blank separators, comments, event:/id:/retry: fields
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self.done = True
            return False
        try:
            obj = json.loads(payload)
        except ValueError:
            self.rec.fail("bad_response", f"chunk is not JSON: {payload[:200]!r}")
            return False
        if not isinstance(obj, dict):
            self.rec.fail("bad_response", f"chunk is not a JSON object: {payload[:200]!r}")
            return False
        if "error" in obj or obj.get("object") == "error":
            err = obj.get("error", obj)
            msg = err.get("message", err) if isinstance(err, dict) else err
            self.rec.fail("stream_error", str(msg))
            return False
        for choice in obj.get("choices") or ():
            delta = choice.get("delta") or {}
            if choice.get("text") or delta.get("content") or delta.get("reasoning_content"):
                if self.rec.ttft_s is None:
                    self.rec.ttft_s = time.perf_counter() - self.start
                self.rec.content_chunks += 1
        usage = obj.get("usage")
        if isinstance(usage, dict):
            rec = self.rec
            if isinstance(usage.get("prompt_tokens"), int):
                rec.usage_prompt_tokens = usage["prompt_tokens"]
            if isinstance(usage.get("completion_tokens"), int):
                rec.output_tokens = usage["completion_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                rec.cached_tokens = details["cached_tokens"]
        return True


async def _send_one(
    session: aiohttp.ClientSession, endpoint_url: str, body: bytes, rec: RequestRecord, t0: float
) -> None:
    """Send one request and read its stream into `rec` (errors recorded, not raised)."""
    start = time.perf_counter()
    rec.sent_s = start - t0
    try:
        async with session.post(endpoint_url, data=body, headers={"Content-Type": "application/json"}) as resp:
            rec.status = resp.status
            if resp.status != 200:
                detail = _error_message(await resp.content.read(_DETAIL_BYTES))
                rec.fail(f"http_{resp.status}", detail)
                return
            if resp.content_type == "application/json":  # not a stream: the server ignored stream=true
                raw = await resp.content.read(_DETAIL_BYTES)
                rec.fail("bad_response", f"expected text/event-stream, got JSON: {_error_message(raw)}")
                return
            stream, buf = _Stream(rec, start), b""
            reading = True
            async for chunk in resp.content.iter_any():
                lines = (buf + chunk).split(b"\n")
                buf = lines.pop()
                for line in lines:
                    if not stream.line(line.rstrip(b"\r")):
                        reading = False
                        break
                if not reading:
                    break
            if reading and buf.strip():
                stream.line(buf.rstrip(b"\r"))  # a last line without its newline
    except aiohttp.ClientPayloadError as exc:
        rec.fail("connection", f"stream broken: {exc}")
        return
    except (aiohttp.ClientConnectionError, ConnectionError) as exc:
        rec.fail("connection", f"{type(exc).__name__}: {exc}")
        return
    except aiohttp.ClientError as exc:
        rec.fail("bad_response", f"{type(exc).__name__}: {exc}")
        return
    if rec.error is not None:
        return
    if not stream.done:
        rec.fail("incomplete", "stream ended without data: [DONE]")
        return
    rec.e2e_s = time.perf_counter() - start
    rec.ok = True
    if rec.output_tokens is None:
        rec.output_tokens = rec.content_chunks
    if rec.ttft_s is None:
        rec.ttft_s = rec.e2e_s
    if rec.output_tokens > 1:
        rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number, got {value!r}")


async def replay(
    requests: Iterable[WorkloadRequest],
    url: str,
    *,
    rate_scale: float = 1.0,
    duration_s: float | None = None,
    model: str | None = None,
    endpoint: Endpoint = "completions",
    slo_ttft_s: float = DEFAULT_SLO_TTFT_S,
    concurrency_limit: int | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    progress: bool = False,
    extra_body: dict[str, Any] | None = None,
    session: aiohttp.ClientSession | None = None,
) -> ReplayResult:
    """Replay `requests` against the OpenAI-compatible server at `url` (see the module comment).

    Args:
        requests: the workload; sent in arrival order at `arrival_s / rate_scale`.
        url: base URL, `http://host:port` (a trailing `/v1` is accepted).
        rate_scale: arrival-rate multiplier (> 0); 2.0 sends the trace twice as fast.
        duration_s: stop issuing requests scheduled after this many seconds; None sends all.
        model: model name; None asks `GET /v1/models` and takes the first.
        endpoint: "completions" or "chat".
        slo_ttft_s: the TTFT SLO for `slo_attainment`.
        concurrency_limit: most requests in flight at once; None is unlimited.
        timeout_s: per-request limit from sending to `[DONE]`.
        progress: show a tqdm progress bar on stderr (when it is a terminal).
        extra_body: fields merged into every request body (overriding the defaults).
        session: an aiohttp session to use (not closed); None makes and closes one.

    Raises ValueError for bad arguments and ReplayError when the model cannot be discovered;
    request failures are recorded in the result, not raised.
    """
    base = normalize_url(url)
    _check_positive("rate_scale", rate_scale)
    _check_positive("duration_s", duration_s)
    _check_positive("slo_ttft_s", slo_ttft_s)
    _check_positive("timeout_s", timeout_s)
    if endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"endpoint must be one of {', '.join(ENDPOINT_PATHS)}, got {endpoint!r}")
    if concurrency_limit is not None and concurrency_limit < 1:
        raise ValueError(f"concurrency_limit must be >= 1, got {concurrency_limit!r}")
    workload = sorted(requests, key=lambda r: r.arrival_s)  # stable; a no-op for loaded workloads
    own_session = session is None
    if session is None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None))
    try:
        if model is None:
            model = await fetch_model(session, base, min(timeout_s, 30.0))
        records, not_sent, wall_s = await _run(
            workload, session, base + ENDPOINT_PATHS[endpoint], model, endpoint,
            rate_scale=rate_scale, duration_s=duration_s, concurrency_limit=concurrency_limit,
            timeout_s=timeout_s, progress=progress, extra_body=extra_body,
        )  # fmt: skip
    finally:
        if own_session:
            await session.close()
    summary = summarize(
        records, not_sent=not_sent, wall_s=wall_s, url=base, model=model, endpoint=endpoint,
        rate_scale=rate_scale, slo_ttft_s=slo_ttft_s,
    )  # fmt: skip
    return ReplayResult(summary=summary, records=records)


async def _run(
    workload: list[WorkloadRequest],
    session: aiohttp.ClientSession,
    endpoint_url: str,
    model: str,
    endpoint: str,
    *,
    rate_scale: float,
    duration_s: float | None,
    concurrency_limit: int | None,
    timeout_s: float,
    progress: bool,
    extra_body: dict[str, Any] | None,
) -> tuple[list[RequestRecord], int, float]:
    """The dispatcher: returns (records of sent requests, number not sent, wall seconds)."""
    from tqdm.auto import tqdm

    slots = asyncio.Semaphore(concurrency_limit) if concurrency_limit else None
    records: list[RequestRecord] = []
    tasks: list[asyncio.Task[None]] = []
    failed = 0
    # disable=None: tqdm shows the bar only when stderr is a terminal.
    bar = tqdm(total=len(workload), unit="req", desc="replay", disable=True if not progress else None, dynamic_ncols=True)

    async def one(req: WorkloadRequest, rec: RequestRecord) -> None:
        nonlocal failed
        try:
            body = json.dumps(request_body(req, model, endpoint, extra_body)).encode()
            await asyncio.wait_for(_send_one(session, endpoint_url, body, rec, t0), timeout_s)
        except asyncio.TimeoutError:
            rec.fail("timeout", f"no [DONE] within {timeout_s:g} s of sending")
        finally:
            if slots is not None:
                slots.release()
            if not rec.ok:
                failed += 1
                bar.set_postfix(errors=failed, refresh=False)
            bar.update()

    t0 = time.perf_counter()
    sent = 0
    try:
        for req in workload:
            scheduled = req.arrival_s / rate_scale
            if duration_s is not None and scheduled > duration_s:
                break
            delay = t0 + scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is not None:
                await slots.acquire()
                if duration_s is not None and time.perf_counter() - t0 > duration_s:
                    slots.release()
                    break
            rec = RequestRecord(
                request_id=req.request_id,
                session_id=req.session_id,
                scheduled_s=scheduled,
                prompt_tokens=req.prompt_tokens,
                max_tokens=max(1, req.output_tokens),
            )
            records.append(rec)
            tasks.append(asyncio.create_task(one(req, rec)))
            sent += 1
        if sent < len(workload):
            bar.total = sent
            bar.refresh()
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()  # only does something when the replay itself is cancelled
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        bar.close()
    return records, len(workload) - sent, time.perf_counter() - t0


__all__ = [
    "DEFAULT_SLO_TTFT_S",
    "DEFAULT_TIMEOUT_S",
    "ENDPOINT_PATHS",
    "ReplayError",
    "ReplayResult",
    "ReplaySummary",
    "RequestRecord",
    "fetch_model",
    "format_table",
    "normalize_url",
    "replay",
    "request_body",
    "summarize",
]
