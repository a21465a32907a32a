"""Fake vLLM server: one simulated engine behind vLLM's OpenAI-compatible HTTP API, in real time.

Design
------
`FakeVllmServer` is an aiohttp application around one `pylb.sim.engine.Engine`. It speaks what
pylb's proxy, its tests, the replay client and other routers need from a vLLM replica:

    POST /v1/completions        OpenAI completions, streaming (SSE) or not
    POST /v1/chat/completions   OpenAI chat completions, streaming (SSE) or not
    GET  /v1/models             the one served model, with max_model_len
    POST /tokenize              a prompt's (or chat's) token ids, as vLLM answers: one token per
                                4 bytes of text (`text_token_ids`)
    GET  /health                200, empty body
    GET  /metrics               vLLM's Prometheus series (`pylb.sim.prom`)
    GET  /metrics/?name[]=...   only the series named (prometheus-client's filter, as vLLM mounts it)

Time. One asyncio task drives the engine: while it has work it calls `step(start)`, sleeps
until the step's end in wall time, then delivers the step's tokens to the requests' handlers;
with no work it waits until a request arrives. Engine time is `(wall - t0) * speed`, so
`speed` X runs every step X times faster. A step starts when the previous one ended
(`busy_until`), so timer overshoot does not accumulate, but never more than `MAX_LAG_S` wall
seconds in the past: a loop that falls behind does not replay a burst of back-dated steps. The
first step after an idle period starts at the current time.

Tokens. A prompt's text is UTF-8 and one simulated token is 4 bytes of it
(`pylb.workload.types.BYTES_PER_TOKEN`): prompt_tokens = ceil(bytes / 4), and the engine's block
hashes are `prompt_block_hashes(text_bytes, block_size)`, so prompts that share a text prefix
share KV blocks. A completions prompt may also be token ids (hashed as uint32, one token each).
Chat messages are rendered by a fixed template, `<|role|>\\ncontent\\n` per message plus
`<|assistant|>\\n` (the generation prompt), so turn N+1 of a conversation (the earlier
messages, the assistant's reply, a new user message) extends turn N's rendering, and hits its
cached blocks. Generated text is `GEN_TOKEN_TEXT` (" tok", 4 bytes) per token, so a reply fed
back as the next turn's input is as many tokens as were generated.

Length and EOS. A request generates `max_tokens` tokens when `ignore_eos` is true. Otherwise the
simulated model emits EOS after `output_len` tokens (a server setting, at least `min_tokens`),
so it generates min(max_tokens, output_len) tokens; `finish_reason` is "length" when it stopped
at max_tokens and "stop" when it stopped at EOS (the EOS token is neither counted nor shown).
Defaults as in vLLM: `max_tokens` 16 for completions, max_model_len - prompt_tokens for chat.
`stop` strings, `logprobs`, `temperature` and other sampling fields are accepted and ignored.

Streaming (as vLLM sends it). Headers go out when the request is accepted. Then one SSE event
`data: {json}` per generated token; chat sends a `{"role": "assistant", "content": ""}` delta
together with the first token. The last token's chunk carries `finish_reason`; with
`stream_options.include_usage` a chunk with `choices: []` and `usage` follows; the stream ends
with `data: [DONE]`. `usage` always includes `prompt_tokens_details.cached_tokens` (the prefix
cache hit at the request's first scheduling), as vLLM does with
`--enable-prompt-tokens-details`.

Disconnects. The app runs with aiohttp's handler cancellation: when a client goes away, its
handler is cancelled (or its next write fails) and the request is aborted in the engine, which
frees its KV blocks at once, as vLLM does.

Errors (vLLM 0.3x shapes). 400 `{"error": {"message", "type": "BadRequestError", "param",
"code": 400}}` for a body that is not a JSON object, a missing or malformed prompt/messages,
bad max_tokens, n != 1 (one choice per request is supported), stream_options without stream,
or a prompt (plus max_tokens) longer than max_model_len; 404 NotFoundError with param "model"
for an unknown model name; 413 for a body over the size limit; unknown paths get FastAPI's 404
`{"detail": "Not Found"}`, as from vLLM.

Metrics: `pylb.sim.prom.VllmMetrics`; latencies are wall-clock seconds measured here (TTFT from
the moment the handler got the request to the delivery of the first token).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from aiohttp import web

from pylb import native
from pylb.router.interface import ReplicaMetrics
from pylb.workload.types import BYTES_PER_TOKEN

from .engine import Engine, FinishedRequest, RequestRejected, StepResult, prompt_block_hashes
from .profiles import Profile
from .prom import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .prom import VllmMetrics

log = logging.getLogger(__name__)

GEN_TOKEN_TEXT = " tok"
"""Text of one generated token (4 bytes, one simulated token)."""

MAX_LAG_S = 0.005
"""Wall seconds a step may start in the past to absorb timer overshoot (see module docstring)."""

_clock = time.perf_counter
"""Wall clock of the server (engine time, latencies): fine-grained, unlike uvloop's loop.time() (1 ms)."""

DEFAULT_COMPLETION_MAX_TOKENS = 16
"""vLLM's default `max_tokens` for /v1/completions (chat defaults to what fits max_model_len)."""


@dataclass(frozen=True)
class FakeServerConfig:
    """Settings of one fake vLLM replica (the only place their defaults live).

    Attributes:
        host: address to bind (loopback by default).
        port: TCP port; 0 picks a free one (read it back from `FakeVllmServer.port`).
        model_name: the served model's name (`/v1/models`, `model` in responses, metric labels).
        speed: engine time runs `speed` times faster than wall time (> 0).
        max_model_len: longest prompt + output in tokens; None: the whole KV cache
            (num_blocks * block_size). Must not exceed the KV cache, as in vLLM.
        output_len: tokens the simulated model writes before EOS when a request does not set
            `ignore_eos` (>= 1).
        kv_events_port: when > 0, publish the engine's KV-cache events as vLLM does (ZMQ PUB bound
            on tcp://host:port, frames [topic, seq, msgpack KVEventBatch], one batch per engine
            step that changed the cache; block hashes in vLLM's integer form). 0: none.
    """

    host: str = "127.0.0.1"
    port: int = 0
    model_name: str = "pylb-sim"
    speed: float = 1.0
    max_model_len: int | None = None
    output_len: int = 32
    kv_events_port: int = 0

    def resolved_max_model_len(self, profile: Profile) -> int:
        """max_model_len for `profile`, checked against its KV cache (ValueError if invalid)."""
        capacity = profile.kv_capacity_tokens
        if self.max_model_len is None:
            return capacity
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be at least 2 tokens, got {self.max_model_len}")
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV cache of profile {profile.name} "
                f"({profile.num_blocks} blocks x {profile.block_size} = {capacity} tokens)"
            )
        return self.max_model_len

    def validate(self, profile: Profile) -> None:
        """Raise ValueError naming the field and value of the first invalid setting."""
        if not (self.speed > 0 and math.isfinite(self.speed)):
            raise ValueError(f"speed must be a positive number, got {self.speed}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if not 0 <= self.kv_events_port <= 65535:
            raise ValueError(f"kv_events_port must be in 0..65535, got {self.kv_events_port}")
        if self.output_len < 1:
            raise ValueError(f"output_len must be at least 1, got {self.output_len}")
        if not self.model_name:
            raise ValueError("model_name must not be empty")
        self.resolved_max_model_len(profile)


# ---- errors ------------------------------------------------------------------------------------


class BindError(OSError):
    """The server's address could not be bound; `host`, `port` and `errno` say which and why."""

    def __init__(self, host: str, port: int, cause: OSError) -> None:
        reason = "already in use" if cause.errno == errno.EADDRINUSE else (cause.strerror or str(cause))
        super().__init__(cause.errno, f"cannot listen on {host}:{port}: {reason}")
        self.host = host
        self.port = port


class ApiError(Exception):
    """A request error, mapped to vLLM's OpenAI-style JSON error at the HTTP edge (`_error_response`)."""

    _TYPES: ClassVar[dict[int, str]] = {
        400: "BadRequestError",
        404: "NotFoundError",
        413: "BadRequestError",
        500: "InternalServerError",
        503: "ServiceUnavailableError",
    }

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    def to_json(self) -> dict[str, Any]:
        """The `{"error": {...}}` body vLLM sends."""
        return {
            "error": {
                "message": self.message,
                "type": self._TYPES.get(self.status, "BadRequestError"),
                "param": self.param,
                "code": self.status,
            }
        }


def _error_response(err: ApiError) -> web.Response:
    return web.json_response(err.to_json(), status=err.status)


@web.middleware
async def _errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """The one place errors become HTTP responses."""
    try:
        return await handler(request)
    except ApiError as err:
        return _error_response(err)
    except web.HTTPRequestEntityTooLarge as exc:
        return _error_response(ApiError(f"request body too large: {exc.text}", 413))
    except web.HTTPNotFound:
        return web.json_response({"detail": "Not Found"}, status=404)
    except web.HTTPMethodNotAllowed as exc:
        return web.json_response({"detail": "Method Not Allowed"}, status=405, headers={"Allow": ", ".join(exc.allowed_methods)})


# ---- request parsing ----------------------------------------------------------------------------


@dataclass(slots=True)
class ParsedRequest:
    """A validated generation request, as the engine takes it.

    Attributes:
        chat: chat completion (True) or completion (False).
        prompt_tokens: prompt length in simulated tokens.
        block_hashes: the prompt's engine block hashes.
        max_tokens: the client's max_tokens (or the default).
        gen_tokens: tokens the simulated model will generate (max_tokens, or fewer at EOS).
        stream: whether to stream SSE.
        include_usage: with stream, send a usage chunk before [DONE].
    """

    chat: bool
    prompt_tokens: int
    block_hashes: np.ndarray
    max_tokens: int
    gen_tokens: int
    stream: bool
    include_usage: bool

    @property
    def finish_reason(self) -> str:
        """"length" when the request stops at max_tokens, "stop" when it stops at EOS."""
        return "length" if self.gen_tokens >= self.max_tokens else "stop"


def render_chat(messages: Any, add_generation_prompt: bool = True) -> str:
    """Render chat messages to one prompt text with the fixed template of the module docstring.

    Raises ApiError (400) for anything but a non-empty list of {role: str, content: str | list
    of text parts | None} objects.
    """
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of message objects", param="messages")
    parts: list[str] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ApiError(f"messages[{i}] must be an object, got {type(msg).__name__}", param="messages")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise ApiError(f"messages[{i}].role must be a non-empty string", param="messages")
        content = msg.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(
                        f"messages[{i}].content[{j}]: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                        param="messages",
                    )
                texts.append(part["text"])
            text = "\n".join(texts)
        else:
            raise ApiError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        parts.append(f"<|{role}|>\n{text}\n")
    if add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


def _token_ids(value: list[Any]) -> np.ndarray | None:
    """`value` as uint32 token ids, or None when it is not a list of ints."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
        return None
    if any(x < 0 or x > 0xFFFFFFFF for x in value):
        raise ApiError("token ids in prompt must be in 0..2**32-1", param="prompt")
    return np.asarray(value, dtype=np.uint32)


def text_token_ids(text: bytes) -> list[int]:
    """The fake's tokenizer, as `/tokenize` answers it: one token per `BYTES_PER_TOKEN` (4) bytes of
    text, its id those bytes as a little-endian word (the last zero-padded), so token ids packed
    back into 4-byte words give the text the engine hashes."""
    padded = text + b"\0" * (-len(text) % BYTES_PER_TOKEN)
    return np.frombuffer(padded, dtype="<u4").tolist()


def parse_prompt(prompt: Any, block_size: int) -> tuple[int, np.ndarray]:
    """(prompt_tokens, block_hashes) of a completions `prompt`.

    Accepts a string, a list of one string, a list of token ids, or a list of one list of token
    ids. Several prompts in one request (n choices) are rejected with 400.
    """
    if prompt is None:
        raise ApiError("Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        data = prompt.encode("utf-8")
        if not data:
            raise ApiError("prompt must not be empty", param="prompt")
        return -(-len(data) // BYTES_PER_TOKEN), prompt_block_hashes(data, block_size)
    if isinstance(prompt, list):
        if not prompt:
            raise ApiError("prompt must not be empty", param="prompt")
        ids = _token_ids(prompt)
        if ids is not None:
            return len(ids), native.block_hashes(ids, block_size)
        if all(isinstance(p, (str, list)) for p in prompt):
            raise ApiError(
                f"batched prompts ({len(prompt)} in one request) are not supported by pylb sim-replicas; "
                "send one prompt per request",
                param="prompt",
            )
    raise ApiError("prompt must be a string, a list of token ids, or a list of one of those", param="prompt")


def _int_field(body: dict[str, Any], name: str, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ApiError(f"{name} must be an integer, got {value!r}", param=name)
    if value < minimum:
        raise ApiError(f"{name} must be at least {minimum}, got {value}.", param=name)
    return value


def _bool_field(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(f"{name} must be a boolean, got {value!r}", param=name)
    return value


# ---- per-request state ---------------------------------------------------------------------------


class _Pending:
    """A request in the engine, as its handler and the driver share it.

    The driver adds delivered tokens to `new_tokens`, sets `finished`, and sets `event`;
    the handler waits on `event`, takes the tokens, and writes them.
    """

    __slots__ = ("arrival", "closed", "error", "event", "finished", "first_at", "last_at", "new_tokens", "parsed", "rid")

    def __init__(self, rid: str, arrival: float, parsed: ParsedRequest) -> None:
        self.rid = rid
        self.arrival = arrival
        self.parsed = parsed
        self.event = asyncio.Event()
        self.new_tokens = 0
        self.first_at: float | None = None
        self.last_at = 0.0
        self.finished: FinishedRequest | None = None
        self.error: str | None = None
        self.closed = False


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _sse(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


_DONE = b"data: [DONE]\n\n"


def _usage_json(usage: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "completion_tokens": usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


# ---- the server ----------------------------------------------------------------------------------


class FakeVllmServer:
    """One fake vLLM replica: an aiohttp server around one simulated engine.

    Use in-process (tests, benchmarks):

        async with FakeVllmServer(profile, FakeServerConfig(speed=100)) as srv:
            ... srv.url ...   # "http://127.0.0.1:<port>"

    or `port = await srv.start()` ... `await srv.stop()`. Raises BindError (an OSError) from
    `start` when the port cannot be bound, ValueError from the constructor for invalid settings.
    A server runs once: after `stop` make a new one (the engine's cache state is not reused).
    """

    def __init__(self, profile: Profile, config: FakeServerConfig | None = None) -> None:
        self.profile = profile
        self.config = config or FakeServerConfig()
        self.config.validate(profile)
        self.max_model_len = self.config.resolved_max_model_len(profile)
        self.engine = Engine(profile, name=self.config.model_name)
        self.metrics = VllmMetrics(
            self._snapshot,
            model_name=self.config.model_name,
            max_model_len=self.max_model_len,
            block_size=profile.block_size,
            num_gpu_blocks=profile.num_blocks,
        )
        self._speed = self.config.speed
        self._pending: dict[str, _Pending] = {}
        self._wake: asyncio.Event | None = None
        self._driver: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self._t0 = 0.0
        self._port: int | None = None
        self._closing = False
        self.driver_errors = 0
        self.created = int(time.time())
        self._kv_pub: Any = None  # zmq PUB socket when config.kv_events_port
        self._kv_seq = 0

    # ---- lifecycle -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (after `start`)."""
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. http://127.0.0.1:8001 (the OpenAI base_url is url + "/v1")."""
        return f"http://{self.config.host}:{self.port}"

    def make_app(self) -> web.Application:
        """The aiohttp application (routes and error middleware)."""
        app = web.Application(
            middlewares=[_errors_middleware],
            client_max_size=16 * self.max_model_len + (1 << 20),
        )
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/metrics/", self._metrics_filtered)
        return app

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Raises BindError (an OSError) when the port is taken."""
        if self._runner is not None:
            raise RuntimeError("server already started")
        self._t0 = _clock()
        self._wake = asyncio.Event()
        runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.config.host, self.config.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise BindError(self.config.host, self.config.port, exc) from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        if self.config.kv_events_port:
            self._start_kv_events()
        self._driver = asyncio.create_task(self._drive(), name=f"fake-vllm-engine:{self._port}")
        return self._port

    async def stop(self) -> None:
        """Stop serving: end in-flight responses, close connections, stop the engine task."""
        if self._runner is None:
            return
        self._closing = True
        for p in list(self._pending.values()):
            p.closed = True
            p.event.set()
        await self._runner.cleanup()
        self._runner = None
        if self._driver is not None:
            self._driver.cancel()
            try:
                await self._driver
            except asyncio.CancelledError:
                pass
            self._driver = None
        if self._kv_pub is not None:
            self._kv_pub.close(linger=0)
            self._kv_pub = None

    # ---- KV-cache events (vLLM's ZmqEventPublisher; pylb.fleet.kv_events has the format) ----

    @property
    def kv_events_endpoint(self) -> str | None:
        """tcp://host:port of the KV-event publisher, or None when it publishes none."""
        return f"tcp://{self.config.host}:{self.config.kv_events_port}" if self.config.kv_events_port else None

    def _start_kv_events(self) -> None:
        import zmq

        sock: Any = zmq.Context.instance().socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.bind(f"tcp://{self.config.host}:{self.config.kv_events_port}")
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise BindError(self.config.host, self.config.kv_events_port, OSError(exc.errno, str(exc))) from exc
        self._kv_pub = sock
        self.engine.kv_events = []

    def _publish_kv_events(self) -> None:
        """Send the engine's cache changes since the last step as one KVEventBatch (PUB never blocks)."""
        pending = self.engine.kv_events
        if self._kv_pub is None or not pending:
            return
        from pylb.fleet.kv_events import BlockRemoved, BlockStored, encode_batch

        events: list[Any] = []
        for kind, hashes, parent in pending:
            keys = np.asarray(hashes, dtype=np.uint64)
            if kind == "stored":
                events.append(BlockStored(keys, parent, [], self.engine.block_size, "GPU"))
            else:
                events.append(BlockRemoved(keys, "GPU"))
        pending.clear()
        self._kv_pub.send_multipart(encode_batch(self._kv_seq, time.time(), events), copy=False)
        self._kv_seq += 1

    async def __aenter__(self) -> FakeVllmServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- clock and engine driver -------------------------------------------------------------

    def sim_now(self) -> float:
        """Engine time: wall seconds since start, times speed."""
        return (_clock() - self._t0) * self._speed

    def _snapshot(self) -> ReplicaMetrics:
        return self.engine.metrics_snapshot(self.sim_now())

    async def _drive(self) -> None:
        """Run engine steps in real time while there is work (see the module docstring)."""
        engine = self.engine
        wake = self._wake
        assert wake is not None
        max_lag = MAX_LAG_S * self._speed
        resumed = True  # the engine was idle: its next step starts now, not back-dated
        while True:
            if not engine.has_work():
                wake.clear()
                await wake.wait()
                resumed = True
                continue
            try:
                now = self.sim_now()
                start = now if resumed else max(engine.busy_until, now - max_lag)
                resumed = False
                res = engine.step(start)
            except Exception as exc:  # never let the engine take the server down
                self._fail_all(exc)
                continue
            if res.num_steps == 0:
                continue
            delay = self._t0 + res.end / self._speed - _clock()
            await asyncio.sleep(max(0.0, delay))
            self._deliver(res, _clock())
            self._publish_kv_events()

    def _deliver(self, res: StepResult, now: float) -> None:
        """Hand a finished step's tokens and completions to the waiting handlers."""
        pending = self._pending
        metrics = self.metrics
        metrics.on_iteration(res.prefill_tokens + res.decode_seqs)
        for rid in res.sampled:
            p = pending.get(rid)
            if p is None:  # aborted while its step was in flight
                continue
            p.new_tokens += res.num_steps
            if p.first_at is None:
                p.first_at = now
                metrics.on_first_token(now - p.arrival)
            else:
                metrics.on_token(now - p.last_at)
            p.last_at = now
            p.event.set()
        for f in res.finished:
            p = pending.get(f.request_id)
            if p is None:
                continue
            p.finished = f
            assert p.first_at is not None
            metrics.on_finished(
                p.parsed.finish_reason,
                e2e=now - p.arrival,
                decode_time=now - p.first_at,
                prompt_tokens=f.usage.prompt_tokens,
                generation_tokens=f.usage.completion_tokens,
                max_tokens=p.parsed.max_tokens,
            )
            p.event.set()

    def _fail_all(self, exc: Exception) -> None:
        """The engine raised: log it, abort every request in it, fail their responses."""
        self.driver_errors += 1
        log.exception("fake vLLM %s: engine step failed; failing %d requests", self.config.model_name, len(self._pending))
        now = self.sim_now()
        for p in list(self._pending.values()):
            self.engine.abort(p.rid, now)
            p.error = f"engine failure: {exc}"
            p.event.set()

    # ---- request handling ---------------------------------------------------------------------

    async def _read_json(self, request: web.Request) -> dict[str, Any]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(f"request body must be a JSON object, got {type(body).__name__}")
        return body

    def _check_model(self, body: dict[str, Any]) -> None:
        model = body.get("model")
        if model is None:
            return
        if model != self.config.model_name:
            raise ApiError(f"The model `{model}` does not exist.", 404, param="model")

    def _parse(self, body: dict[str, Any], chat: bool) -> ParsedRequest:
        """Validate a generation request body (vLLM's checks and messages)."""
        self._check_model(body)
        bs = self.profile.block_size
        if chat:
            add_gen = _bool_field(body, "add_generation_prompt", True)
            text = render_chat(body.get("messages"), add_gen).encode("utf-8")
            prompt_tokens = -(-len(text) // BYTES_PER_TOKEN)
            hashes = prompt_block_hashes(text, bs)
        else:
            prompt_tokens, hashes = parse_prompt(body.get("prompt"), bs)
        n = _int_field(body, "n", 1)
        if n is not None and n != 1:
            raise ApiError(f"n must be 1 (pylb sim-replicas returns one choice per request), got {n}", param="n")
        if body.get("best_of") not in (None, 1):
            raise ApiError("best_of must be 1 (pylb sim-replicas returns one choice per request)", param="best_of")
        stream = _bool_field(body, "stream", False)
        opts = body.get("stream_options")
        include_usage = False
        if opts is not None:
            if not stream:
                raise ApiError("Stream options can only be defined when `stream=True`.", param="stream_options")
            if not isinstance(opts, dict):
                raise ApiError("stream_options must be an object", param="stream_options")
            include_usage = _bool_field(opts, "include_usage", False)
        max_len = self.max_model_len
        if prompt_tokens >= max_len:
            raise ApiError(
                f"This model's maximum context length is {max_len} tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
                param="messages" if chat else "prompt",
            )
        max_tokens = _int_field(body, "max_completion_tokens", 1) if chat else None
        if max_tokens is None:
            max_tokens = _int_field(body, "max_tokens", 1)
        if max_tokens is None:
            max_tokens = max_len - prompt_tokens if chat else min(DEFAULT_COMPLETION_MAX_TOKENS, max_len - prompt_tokens)
        elif prompt_tokens + max_tokens > max_len:
            raise ApiError(
                f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum context "
                f"length is {max_len} tokens and your request has {prompt_tokens} input tokens "
                f"({max_tokens} > {max_len} - {prompt_tokens}).",
                param="max_tokens",
            )
        min_tokens = _int_field(body, "min_tokens", 0) or 0
        if min_tokens > max_tokens:
            raise ApiError(f"min_tokens must be less than or equal to max_tokens={max_tokens}, got {min_tokens}.", param="min_tokens")
        if _bool_field(body, "ignore_eos", False):
            gen = max_tokens
        else:
            gen = min(max_tokens, max(self.config.output_len, min_tokens))
        return ParsedRequest(chat, prompt_tokens, hashes, max_tokens, gen, stream, include_usage)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        arrival = _clock()
        if self._closing:
            raise ApiError("server is shutting down", 503)
        parsed = self._parse(await self._read_json(request), chat)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        p = _Pending(rid, arrival, parsed)
        try:
            self.engine.add_request(rid, parsed.prompt_tokens, parsed.gen_tokens, parsed.block_hashes, self.sim_now())
        except RequestRejected as exc:
            raise ApiError(str(exc)) from None
        self._pending[rid] = p
        assert self._wake is not None
        self._wake.set()
        try:
            if parsed.stream:
                return await self._stream(request, p)
            return await self._unary(p)
        finally:
            self._pending.pop(rid, None)
            if p.finished is None:
                self.engine.abort(rid, self.sim_now())
                self.metrics.on_aborted("error" if p.error else "abort")

    async def _unary(self, p: _Pending) -> web.StreamResponse:
        """Wait for the whole completion and answer with one JSON body."""
        while p.finished is None:
            if p.error:
                raise ApiError(p.error, 500)
            if p.closed:
                raise ApiError("server is shutting down", 503)
            await p.event.wait()
            p.event.clear()
        usage = p.finished.usage
        text = GEN_TOKEN_TEXT * usage.completion_tokens
        reason = p.parsed.finish_reason
        model = self.config.model_name
        if p.parsed.chat:
            body = {
                "id": p.rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                    }
                ],
                "usage": _usage_json(usage),
                "prompt_logprobs": None,
            }
        else:
            body = {
                "id": p.rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": reason,
                        "stop_reason": None,
                        "prompt_logprobs": None,
                    }
                ],
                "usage": _usage_json(usage),
            }
        return web.Response(text=_dumps(body), content_type="application/json")

    async def _stream(self, request: web.Request, p: _Pending) -> web.StreamResponse:
        """Stream one SSE chunk per generated token (see the module docstring)."""
        chat = p.parsed.chat
        base = {
            "id": p.rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.config.model_name,
        }
        if chat:
            role_chunk = _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
            token_chunk = _sse({**base, "choices": [{"index": 0, "delta": {"content": GEN_TOKEN_TEXT}, "logprobs": None, "finish_reason": None}]})
            last_chunk = _sse({**base, "choices": [{"index": 0, "delta": {"content": GEN_TOKEN_TEXT}, "logprobs": None, "finish_reason": p.parsed.finish_reason, "stop_reason": None}]})
        else:
            role_chunk = b""
            token_chunk = _sse({**base, "choices": [{"index": 0, "text": GEN_TOKEN_TEXT, "logprobs": None, "finish_reason": None, "stop_reason": None}]})
            last_chunk = _sse({**base, "choices": [{"index": 0, "text": GEN_TOKEN_TEXT, "logprobs": None, "finish_reason": p.parsed.finish_reason, "stop_reason": None}]})  # fmt: skip
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        started = False
        try:
            while True:
                await p.event.wait()
                p.event.clear()
                n, p.new_tokens = p.new_tokens, 0
                fin = p.finished
                out: list[bytes] = []
                if n and not started:
                    started = True
                    if role_chunk:
                        out.append(role_chunk)
                if fin is not None:
                    if n > 1:
                        out.append(token_chunk * (n - 1))
                    out.append(last_chunk)
                    if p.parsed.include_usage:
                        out.append(_sse({**base, "choices": [], "usage": _usage_json(fin.usage)}))
                    out.append(_DONE)
                    await resp.write(b"".join(out))
                    break
                if n:
                    out.append(token_chunk * n)
                if p.error:  # vLLM reports a mid-stream failure as an error event, then [DONE]
                    err = ApiError(p.error, 500).to_json()
                    out.append(_sse(err))
                    out.append(_DONE)
                    await resp.write(b"".join(out))
                    break
                if p.closed:
                    break
                if out:
                    await resp.write(b"".join(out))
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away; _generate aborts the request
        return resp

    async def _models(self, request: web.Request) -> web.StreamResponse:
        name = self.config.model_name
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "vllm",
            "root": name,
            "parent": None,
            "max_model_len": self.max_model_len,
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _tokenize(self, request: web.Request) -> web.StreamResponse:
        """vLLM's `POST /tokenize`: `prompt` (text or token ids) or chat `messages`, answered with
        count, max_model_len and tokens."""
        body = await self._read_json(request)
        self._check_model(body)
        if "messages" in body:
            add_gen = _bool_field(body, "add_generation_prompt", True)
            tokens = text_token_ids(render_chat(body.get("messages"), add_gen).encode("utf-8"))
        else:
            prompt = body.get("prompt")
            ids = _token_ids(prompt) if isinstance(prompt, list) and prompt else None
            if ids is not None:
                tokens = ids.tolist()
            elif isinstance(prompt, str):
                tokens = text_token_ids(prompt.encode("utf-8"))
            else:
                raise ApiError("prompt must be a string or a list of token ids (or give messages)", param="prompt")
        _bool_field(body, "add_special_tokens", True)  # checked like vLLM's; the fake has no special tokens
        return web.json_response({"count": len(tokens), "max_model_len": self.max_model_len, "tokens": tokens, "token_strs": None})

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=200)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        # vLLM's /metrics is the FastAPI instrumentator's route: it ignores query parameters
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def _metrics_filtered(self, request: web.Request) -> web.StreamResponse:
        # vLLM mounts prometheus-client's ASGI app under /metrics/, which honours name[] filters
        names = request.query.getall("name[]", [])
        return web.Response(body=self.metrics.render(names), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def start_replicas(
    profile: Profile, count: int, base_port: int, config: FakeServerConfig | None = None
) -> list[FakeVllmServer]:
    """Start `count` replicas on ports base_port, base_port+1, ... (all ephemeral when base_port is 0).

    On failure (e.g. a port in use) the replicas already started are stopped and the error
    (OSError) propagates.
    """
    from dataclasses import replace

    config = config or FakeServerConfig()
    servers: list[FakeVllmServer] = []
    try:
        for i in range(count):
            kv_port = config.kv_events_port + i if config.kv_events_port else 0
            srv = FakeVllmServer(profile, replace(config, port=base_port + i if base_port else 0, kv_events_port=kv_port))
            await srv.start()
            servers.append(srv)
    except BaseException:
        for srv in servers:
            await srv.stop()
        raise
    return servers


__all__: Sequence[str] = (
    "GEN_TOKEN_TEXT",
    "ApiError",
    "BindError",
    "FakeServerConfig",
    "FakeVllmServer",
    "ParsedRequest",
    "parse_prompt",
    "render_chat",
    "start_replicas",
)
