"""`pylb calibrate`: measure a live vLLM replica and fit the engine model's step-time constants.

    pylb calibrate --url http://replica:8000 --out profile.yaml [--name NAME] [--model NAME]
                   [--max-num-seqs N] [--max-num-batched-tokens N] [--max-prompt-tokens N]
                   [--max-batch N] [--decode-tokens N] [--repeats N] [--units simulator|replica]
                   [--timeout S]

Design
------
The engine model (`pylb.sim.engine`, `pylb.sim.profiles`) prices one step as

    t = c0 + c_prefill * prefill_tokens + c_decode * decode_seqs + c_attn * context_tokens

(+ c_prefill_attn * prefill_pairs, the causal attention pairs among the prompt tokens computed)
and a replica's geometry as block_size x num_blocks KV blocks, max_num_seqs, max_num_batched_tokens.
Calibration fills both in from the outside, with the replica otherwise idle:

Geometry. `vllm:cache_config_info` on `/metrics` carries `block_size` and `num_gpu_blocks`
(read with `pylb.fleet.scrape.parse_vllm_metrics`); `/v1/models` gives `max_model_len`. vLLM
exports neither max_num_seqs nor max_num_batched_tokens, so those come from flags (defaults:
vLLM's OpenAI-server defaults; pass the replica's own values when it was started with others).

Probes (one request at a time unless said; streamed /v1/completions, `ignore_eos`, text from
`pylb.workload.synthetic.token_text` under a fresh random key, so no probe hits the prefix cache
and the text is the kind pylb's workloads send):

  prefill   one request of N prompt tokens and max_tokens 1, N from 5 % to 95 % of the longest
            prompt one step can compute; its TTFT (client clock, request sent to first chunk) is
            one step of N prefill tokens over N context tokens plus a fixed request overhead
            (HTTP, tokenization, scheduling): TTFT = overhead + c0 + (c_prefill + c_attn) * N
            + c_prefill_attn * N(N+1)/2.
  decode    B concurrent streams of P-token prompts generating G tokens each, B in 1, 2, 4, ...
            up to --max-batch, P short and long; in the window where all B streams are decoding
            (after the last first token, up to the first stream's last token) every gap between
            two chunks of a stream is one decode step: t = c0 + c_decode * B + c_attn * C, C the
            sum over the streams of prompt + tokens generated. One observation per probe: the
            median gap, with the window's mean C.

Token counts are the replica's own (`usage.prompt_tokens`, its real tokenizer). The bytes per
token of the probe text are fitted from (bytes, prompt_tokens) over all probes (slope of a line,
so a BOS token does not bias it).

Fit. One prefill observation per length: the least TTFT of its repeats. On a shared machine the
noise is one-sided (a replica or client that waits for a core only ever adds time: seen here, 2-3x
on single repeats at load average 15), so the minimum is the estimate of the undisturbed step; the
decode gaps are many per probe and their median is already undisturbed. Weighted least squares (numpy) for (c0, c_prefill, c_decode, c_attn, c_prefill_attn,
overhead) over all
observations at once, each row divided by its measured time so every probe counts by its relative
error; a coefficient that comes out negative is pinned to 0 and the rest refitted (non-negative
least squares by active set). The residuals (relative, per probe) are printed and written into
the profile's header comment.

Units. The simulator counts one token per 4 bytes of text (`pylb.workload.types.BYTES_PER_TOKEN`),
a real tokenizer something else (about 2.2 bytes per token for the CPU test model on pylb's word
text). With `--units simulator` (the default) the profile is written in simulator tokens, so that a
workload replayed through `pylb simulate` meets the same capacity and costs per byte of text as
on the replica: with r = 4 / bytes_per_token real tokens per simulated token, c_prefill and c_attn
are multiplied by r, c_prefill_attn by r^2 (pairs of tokens), block_size divided by r (rounded), num_blocks chosen so the cache holds the
same bytes, max_num_batched_tokens divided by r; c0, c_decode and max_num_seqs are per step or per
sequence and stay. (Generated tokens stay one token each: a simulated one stands for one real one.)
`--units replica` writes the fitted values as measured, in the replica's tokens.

The fixed request overhead is written as the profile's `request_overhead`: the simulator delays
every dispatched request by it before it reaches the engine's queue.

Exit status: 0 written; 1 the replica cannot be reached, is not a vLLM replica, or failed a
probe; 2 bad flags (the message names the flag and value); 3 the replica is busy (requests
running or waiting before or between probes: the measurements would be wrong).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from pylb.cli_args import UsageError, positive_float, positive_int, run_async
from pylb.fleet.scrape import ScrapeError, parse_vllm_metrics
from pylb.router.interface import ReplicaMetrics
from pylb.workload.replay import ReplayError, fetch_model, normalize_url
from pylb.workload.synthetic import token_text
from pylb.workload.types import BYTES_PER_TOKEN

from .profiles import Profile, ProfileError, prefill_pairs, profile_from_dict

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BUSY = 3

VLLM_DEFAULT_MAX_NUM_SEQS = 256
"""vLLM's OpenAI-server default `--max-num-seqs` (GPU; its CPU build defaults to 128)."""

VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS = 2048
"""vLLM's OpenAI-server default `--max-num-batched-tokens` (CPU, and GPUs below the H100 class)."""

PREFILL_FRACTIONS = (0.05, 0.15, 0.3, 0.5, 0.75, 0.95)
"""Prefill probe lengths as fractions of the longest prompt one step computes."""

UNITS = ("simulator", "replica")

_IDLE_WAIT_S = 3.0  # how long to wait for the replica's gauges to drop to 0 between probes
_IDLE_POLL_S = 0.05


class CalibrationError(RuntimeError):
    """The replica cannot be calibrated (unreachable, not vLLM, a probe failed)."""


class ReplicaBusy(CalibrationError):
    """The replica has requests running or waiting that are not ours."""


@dataclass(frozen=True)
class CalibrateConfig:
    """Settings of one calibration run (the only place their defaults live).

    Attributes:
        url: the replica's base URL.
        model: model name to send (None: the first one `/v1/models` lists).
        max_num_seqs, max_num_batched_tokens: the replica's scheduler limits (vLLM does not export them).
        max_prompt_tokens: longest prefill probe in replica tokens (None: the longest one step computes).
        max_batch: largest decode batch probed.
        decode_tokens: tokens each decode probe stream generates.
        repeats: prefill probes per length.
        timeout_s: per request.
        units: "simulator" (4-byte tokens) or "replica" (the replica's tokens) for the written profile.
    """

    url: str
    model: str | None = None
    max_num_seqs: int = VLLM_DEFAULT_MAX_NUM_SEQS
    max_num_batched_tokens: int = VLLM_DEFAULT_MAX_NUM_BATCHED_TOKENS
    max_prompt_tokens: int | None = None
    max_batch: int = 8
    decode_tokens: int = 32
    repeats: int = 3
    timeout_s: float = 60.0
    units: str = "simulator"


# ---- observations and the fit ------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillSample:
    """One prefill probe: `prompt_tokens` (replica tokens) computed in one step; TTFT in seconds."""

    prompt_bytes: int
    prompt_tokens: int
    ttft_s: float


@dataclass(frozen=True)
class DecodeSample:
    """One decode probe: median step time with `batch` sequences over `context_tokens` of KV."""

    batch: int
    prompt_tokens: int
    context_tokens: float
    step_s: float
    gaps: int


FIT_TERMS = ("c0", "c_prefill", "c_decode", "c_attn", "c_prefill_attn", "overhead")
"""Unknowns of the fit, in column order."""


@dataclass
class Fit:
    """Fitted constants (seconds, replica tokens) and the relative residual of every observation."""

    c0: float
    c_prefill: float
    c_decode: float
    c_attn: float
    c_prefill_attn: float
    overhead: float
    residuals: list[tuple[str, float, float]] = field(default_factory=list)  # (probe label, measured s, fitted s)

    def rms(self, kind: str) -> float:
        """Root-mean-square relative residual of the observations whose label starts with `kind`."""
        rel = [(f - m) / m for label, m, f in self.residuals if label.startswith(kind)]
        return math.sqrt(sum(r * r for r in rel) / len(rel)) if rel else float("nan")


def prefill_minima(prefill: Sequence[PrefillSample]) -> list[PrefillSample]:
    """One sample per probe text length: the median prompt tokens and the least TTFT of its repeats."""
    groups: dict[int, list[PrefillSample]] = {}
    for s in prefill:
        groups.setdefault(s.prompt_bytes, []).append(s)
    return [
        PrefillSample(b, round(float(np.median([s.prompt_tokens for s in g]))), min(s.ttft_s for s in g))
        for b, g in sorted(groups.items())
    ]


def _design(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rows, ys, labels = [], [], []
    for s in prefill_minima(prefill):
        n = s.prompt_tokens
        rows.append([1.0, n, 0.0, n, prefill_pairs(n, 0), 1.0])
        ys.append(s.ttft_s)
        labels.append(f"prefill N={s.prompt_tokens}")
    for d in decode:
        rows.append([1.0, 0.0, d.batch, d.context_tokens, 0.0, 0.0])
        ys.append(d.step_s)
        labels.append(f"decode B={d.batch} P={d.prompt_tokens} C={d.context_tokens:.0f}")
    return np.asarray(rows, dtype=float), np.asarray(ys, dtype=float), labels


def fit_constants(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample]) -> Fit:
    """Non-negative, relatively weighted least squares of the engine model (see the module comment).

    Needs at least two prefill lengths and two decode batch sizes; raises CalibrationError otherwise.
    """
    if len({s.prompt_tokens for s in prefill}) < 3:
        raise CalibrationError("need prefill probes of at least three prompt lengths to fit c_prefill and c_prefill_attn")
    if len({s.batch for s in decode}) < 2:
        raise CalibrationError("need decode probes of at least two batch sizes to fit c_decode")
    a, y, labels = _design(prefill, decode)
    if np.any(y <= 0):
        raise CalibrationError("a probe measured a time <= 0")
    w = 1.0 / y
    aw, yw = a * w[:, None], y * w
    scale = np.abs(aw).max(axis=0)  # columns span 1 .. thousands of tokens: equilibrate
    scale[scale == 0] = 1.0
    active = list(range(a.shape[1]))
    coef = np.zeros(a.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(aw[:, active] / scale[active], yw, rcond=None)
        sol = sol / scale[active]
        if np.all(sol >= 0):
            coef[:] = 0.0
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))  # pin the most negative coefficient to 0
    fitted = a @ coef
    c0, c_prefill, c_decode, c_attn, c_prefill_attn, overhead = (float(c) for c in coef)
    return Fit(
        c0, c_prefill, c_decode, c_attn, c_prefill_attn, overhead,
        residuals=[(label, float(m), float(f)) for label, m, f in zip(labels, y, fitted)],
    )


def fit_bytes_per_token(samples: Sequence[tuple[int, int]]) -> float:
    """Bytes of probe text per replica token: 1 / slope of prompt_tokens against bytes (least squares)."""
    if len({b for b, _ in samples}) < 2:
        only_bytes, only_tokens = samples[0]
        return only_bytes / only_tokens
    x = np.asarray([b for b, _ in samples], dtype=float)
    t = np.asarray([tok for _, tok in samples], dtype=float)
    slope, _ = np.polyfit(x, t, 1)
    return float(1.0 / slope)


def decode_step(
    prompts: Sequence[int], chunk_times: Sequence[Sequence[float]]
) -> tuple[float, float, int] | None:
    """(median step time, mean context tokens, gaps used) of one decode probe, or None if no gap fits.

    `chunk_times[i][k]` is when stream i's token k arrived; `prompts[i]` its prompt tokens. Only gaps
    inside the window where every stream is decoding count (see the module comment); the gap that
    ends at token k is the step over context prompt + k.
    """
    if not chunk_times or any(len(t) < 2 for t in chunk_times):
        return None
    start = max(t[0] for t in chunk_times)
    end = min(t[-1] for t in chunk_times)
    gaps: list[float] = []
    context = 0.0
    for p, times in zip(prompts, chunk_times):
        ks = [k for k in range(1, len(times)) if times[k - 1] >= start and times[k] <= end]
        if not ks:
            return None
        gaps.extend(times[k] - times[k - 1] for k in ks)
        context += p + sum(ks) / len(ks)
    return float(np.median(gaps)), context, len(gaps)


# ---- talking to the replica --------------------------------------------------------------------


@dataclass
class StreamResult:
    """One streamed probe: send time, arrival time of every chunk that carried a token, usage."""

    sent: float
    chunk_times: list[float]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None


class Replica:
    """The HTTP side of calibration: metrics, model, streamed probes (one aiohttp session)."""

    def __init__(self, session: aiohttp.ClientSession, url: str, timeout_s: float) -> None:
        self.session = session
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.model = ""

    async def metrics(self) -> ReplicaMetrics:
        """The replica's `/metrics` page as ReplicaMetrics; CalibrationError if unreachable or not vLLM."""
        where = f"{self.url}/metrics"
        try:
            async with self.session.get(where, timeout=self.timeout) as resp:
                text = await resp.text()
                if resp.status != 200:
                    raise CalibrationError(f"GET {where} answered {resp.status}: {text[:200]}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise CalibrationError(f"cannot reach {where}: {type(exc).__name__}: {exc}") from None
        try:
            return parse_vllm_metrics(text)
        except ScrapeError as exc:
            raise CalibrationError(f"{where} is not a vLLM metrics page: {exc}") from None

    async def max_model_len(self) -> int | None:
        """`max_model_len` of the served model from `/v1/models`, None when not listed."""
        try:
            async with self.session.get(f"{self.url}/v1/models", timeout=self.timeout) as resp:
                payload = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, OSError):
            return None
        for entry in payload.get("data") or () if isinstance(payload, dict) else ():
            if isinstance(entry, dict) and entry.get("id") == self.model and isinstance(entry.get("max_model_len"), int):
                return int(entry["max_model_len"])
        return None

    async def wait_idle(self, wait_s: float) -> ReplicaMetrics:
        """Metrics once no request runs or waits; ReplicaBusy after `wait_s` seconds of load."""
        deadline = time.monotonic() + wait_s
        while True:
            m = await self.metrics()
            if m.num_requests_running == 0 and m.num_requests_waiting == 0:
                return m
            if time.monotonic() >= deadline:
                raise ReplicaBusy(
                    f"replica {self.url} is busy: {m.num_requests_running} request(s) running, "
                    f"{m.num_requests_waiting} waiting; calibrate an idle replica (take it out of the fleet first)"
                )
            await asyncio.sleep(_IDLE_POLL_S)

    async def stream(self, text: str, max_tokens: int) -> StreamResult:
        """Send one streamed completion and time its chunks; CalibrationError on any failure."""
        body = {
            "model": self.model,
            "prompt": text,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        where = f"{self.url}/v1/completions"
        times: list[float] = []
        usage: dict[str, Any] = {}
        sent = time.perf_counter()
        try:
            async with self.session.post(where, json=body, timeout=self.timeout) as resp:
                if resp.status != 200:
                    raise CalibrationError(f"POST {where} answered {resp.status}: {(await resp.text())[:300]}")
                buf = b""
                async for chunk in resp.content.iter_any():
                    now = time.perf_counter()
                    lines = (buf + chunk).split(b"\n")
                    buf = lines.pop()
                    for line in lines:
                        if not line.startswith(b"data:"):
                            continue
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            break
                        obj = json.loads(payload)
                        if "error" in obj:
                            raise CalibrationError(f"POST {where}: error in stream: {obj['error']}")
                        if obj.get("choices"):
                            times.append(now)
                        if isinstance(obj.get("usage"), dict):
                            usage = obj["usage"]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise CalibrationError(f"POST {where} failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(usage.get("prompt_tokens"), int):
            raise CalibrationError(f"POST {where}: the stream carried no usage.prompt_tokens")
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        return StreamResult(sent, times, usage["prompt_tokens"], int(usage.get("completion_tokens") or 0), cached)


# ---- the calibration run -----------------------------------------------------------------------


@dataclass
class Calibration:
    """Everything one run measured: geometry, observations, the fit and the profile it makes."""

    url: str
    model: str
    block_size: int
    num_blocks: int
    max_model_len: int | None
    max_num_seqs: int
    max_num_batched_tokens: int
    bytes_per_token: float
    prefill: list[PrefillSample]
    decode: list[DecodeSample]
    fit: Fit
    cache_hit_tokens: int
    probe_prompt_tokens: int

    def profile(self, name: str, units: str) -> Profile:
        """The fitted profile in `units` ("simulator": 4-byte tokens; "replica": as measured)."""
        f = self.fit
        r = BYTES_PER_TOKEN / self.bytes_per_token if units == "simulator" else 1.0  # replica tokens per profile token
        block_size = max(1, round(self.block_size / r))
        capacity = self.block_size * self.num_blocks / r  # in profile tokens
        how = (
            f"fitted by pylb calibrate from {len(self.prefill)} prefill probes (TTFT of uncached prompts, "
            f"client clock) and {len(self.decode)} decode probes (median inter-token gap of 1-"
            f"{max(s.batch for s in self.decode)} concurrent streams) on {self.url} (model {self.model}); "
            f"{self.bytes_per_token:.3f} bytes of pylb word text per replica token (usage.prompt_tokens)"
        )
        if units == "simulator":
            how += (
                f"; written in simulator tokens of {BYTES_PER_TOKEN} bytes (x{r:.3f} replica tokens): "
                f"replica block_size {self.block_size} x {self.num_blocks} blocks, c_prefill "
                f"{f.c_prefill:.4g} and c_attn {f.c_attn:.4g} s per replica token, c_prefill_attn "
                f"{f.c_prefill_attn:.4g} s per pair"
            )
        else:
            how += "; in the replica's own tokens"
        how += f"; fixed request overhead {f.overhead * 1e3:.1f} ms per TTFT (request_overhead)"
        data = {
            "name": name,
            "description": how,
            "block_size": block_size,
            "num_blocks": max(1, math.floor(capacity / block_size * (1 + 1e-9))),  # no 1023.9999 -> 1023
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": max(1, round(self.max_num_batched_tokens / r)),
            "c0": _sig(f.c0),
            "c_prefill": _sig(f.c_prefill * r),
            "c_decode": _sig(f.c_decode),
            "c_attn": _sig(f.c_attn * r),
            "c_prefill_attn": _sig(f.c_prefill_attn * r * r),
            "request_overhead": _sig(max(0.0, f.overhead)),
        }
        return profile_from_dict(data, name=name, source="calibrated profile")

    def residual_table(self) -> list[str]:
        """One line per observation: measured and fitted milliseconds and the relative residual."""
        width = max(len(label) for label, _, _ in self.fit.residuals)
        lines = [f"{'probe':<{width}}  {'measured ms':>11}  {'fitted ms':>9}  {'residual':>8}"]
        for label, m, f in self.fit.residuals:
            lines.append(f"{label:<{width}}  {m * 1e3:11.2f}  {f * 1e3:9.2f}  {100 * (f - m) / m:+7.1f}%")
        lines.append(
            f"rms relative residual: prefill {100 * self.fit.rms('prefill'):.1f}%, decode {100 * self.fit.rms('decode'):.1f}%"
        )
        return lines


def _sig(x: float) -> float:
    """`x` to 4 significant digits (the profile's precision is far below that of the fit anyway)."""
    return float(f"{x:.4g}")


Progress = Callable[[str], None]


async def calibrate(config: CalibrateConfig, progress: Progress = lambda _: None) -> Calibration:
    """Probe the replica at `config.url` and fit its profile (see the module comment).

    Raises ReplicaBusy when it has foreign load, CalibrationError for any other failure.
    """
    async with aiohttp.ClientSession() as session:
        rep = Replica(session, config.url, config.timeout_s)
        first = await rep.metrics()
        if first.num_requests_running or first.num_requests_waiting:
            await rep.wait_idle(0.0)  # raises ReplicaBusy with the numbers
        if first.block_size <= 0 or first.num_gpu_blocks <= 0:
            raise CalibrationError(
                f"{config.url}/metrics has no vllm:cache_config_info with block_size and num_gpu_blocks"
            )
        try:
            rep.model = config.model or await fetch_model(session, config.url, config.timeout_s)
        except ReplayError as exc:
            raise CalibrationError(str(exc)) from None
        max_len = await rep.max_model_len()
        bs, nb = first.block_size, first.num_gpu_blocks
        progress(
            f"replica {config.url}: model {rep.model}, KV cache {nb} blocks x {bs} tokens = {nb * bs} tokens, "
            f"max_model_len {max_len if max_len is not None else 'not listed'}; max_num_seqs {config.max_num_seqs} and "
            f"max_num_batched_tokens {config.max_num_batched_tokens} from flags (vLLM does not export them)"
        )
        nonce = uuid.uuid4().hex[:12]
        serial = iter(range(1 << 30))

        def text(tokens: int) -> str:
            return token_text(f"pylb-calibrate-{nonce}-{next(serial)}", max(1, tokens))

        async def probe(tokens_text: int, max_tokens: int) -> StreamResult:
            await rep.wait_idle(_IDLE_WAIT_S)
            return await rep.stream(text(tokens_text), max_tokens)

        # Warm-up (first requests pay one-off costs) and a first bytes-per-token estimate.
        progress("warm-up: 2 requests (not measured)")
        warm = await probe(64, 4)
        bpt0 = 64 * BYTES_PER_TOKEN / max(1, warm.prompt_tokens - 1)
        await probe(int(min(512, (config.max_num_batched_tokens // 2)) * bpt0 / BYTES_PER_TOKEN), 4)
        size_samples: list[tuple[int, int]] = []

        def text_tokens(replica_tokens: float) -> int:
            """Simulated-token length of probe text that is about `replica_tokens` replica tokens."""
            return max(1, int(replica_tokens * bpt0 / BYTES_PER_TOKEN))

        # Prefill: one step per probe, so the prompt must fit one step's budget and the model.
        limit = min(config.max_num_batched_tokens, nb * bs - bs)
        if max_len is not None:
            limit = min(limit, max_len - 2)
        if config.max_prompt_tokens is not None:
            limit = min(limit, config.max_prompt_tokens)
        lengths = sorted({max(8, int(f * limit)) for f in PREFILL_FRACTIONS})
        order = [n for rep_i in range(config.repeats) for n in (lengths if rep_i % 2 == 0 else lengths[::-1])]
        prefill: list[PrefillSample] = []
        for i, n in enumerate(order, 1):
            t = text_tokens(n)
            res = await probe(t, 1)
            if not res.chunk_times:
                raise CalibrationError(f"prefill probe of {res.prompt_tokens} tokens streamed no token")
            s = PrefillSample(t * BYTES_PER_TOKEN, res.prompt_tokens, res.chunk_times[0] - res.sent)
            prefill.append(s)
            size_samples.append((s.prompt_bytes, s.prompt_tokens))
            progress(f"prefill {i}/{len(order)}: {s.prompt_tokens} prompt tokens -> TTFT {s.ttft_s * 1e3:.1f} ms")

        # Decode: B concurrent streams, short and long prompts, KV cache and step budget permitting.
        bpt0 = fit_bytes_per_token(size_samples)  # now from every prefill probe
        g = config.decode_tokens
        batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= min(config.max_batch, config.max_num_seqs)]
        if config.max_batch not in batches and config.max_batch <= config.max_num_seqs:
            batches.append(config.max_batch)
        plan: list[tuple[int, int]] = []
        for b in batches:
            long_p = min(limit, int(0.8 * nb * bs / b) - g - bs)
            if max_len is not None:  # 5 % below: the tokenizer's bytes per token vary from text to text
                long_p = min(long_p, int(0.95 * (max_len - g - 2)))
            for p in sorted({32, max(32, long_p)}):
                plan.append((b, p))
        decode: list[DecodeSample] = []
        for i, (b, p) in enumerate(plan, 1):
            await rep.wait_idle(_IDLE_WAIT_S)
            results = await asyncio.gather(*(rep.stream(text(text_tokens(p)), g) for _ in range(b)))
            for res in results:
                if res.completion_tokens != g:
                    raise CalibrationError(f"decode probe stream generated {res.completion_tokens} tokens, expected {g}")
            step = decode_step([r.prompt_tokens for r in results], [r.chunk_times for r in results])
            if step is None:
                progress(f"decode {i}/{len(plan)}: batch {b}, prompts ~{p} tokens: no window with all streams decoding; skipped")
                continue
            prompt_mean = round(sum(r.prompt_tokens for r in results) / b)
            decode.append(DecodeSample(b, prompt_mean, step[1], step[0], step[2]))
            progress(
                f"decode {i}/{len(plan)}: batch {b}, prompts {prompt_mean} tokens, context {step[1]:.0f} -> "
                f"step {step[0] * 1e3:.2f} ms (median of {step[2]} gaps)"
            )

        last = await rep.wait_idle(_IDLE_WAIT_S)
        bpt = fit_bytes_per_token(size_samples)
        fit = fit_constants(prefill, decode)
        return Calibration(
            url=config.url,
            model=rep.model,
            block_size=bs,
            num_blocks=nb,
            max_model_len=max_len,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            bytes_per_token=bpt,
            prefill=prefill,
            decode=decode,
            fit=fit,
            cache_hit_tokens=last.prefix_cache_hits - first.prefix_cache_hits,
            probe_prompt_tokens=last.prefix_cache_queries - first.prefix_cache_queries,
        )


# ---- writing the profile -----------------------------------------------------------------------


def profile_yaml(profile: Profile, header: Sequence[str]) -> str:
    """A profile file: `header` as comment lines, then the fields `load_profile_file` reads."""
    import yaml

    body = yaml.safe_dump(profile.to_dict(), sort_keys=False, width=100, allow_unicode=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body


def header_lines(cal: Calibration, command: str, units: str, notes: Sequence[str] = ()) -> list[str]:
    """The comment block of a calibrated profile: how it was made, the raw fit, the residuals."""
    f = cal.fit
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return [
        f"Calibrated profile of {cal.url} (model {cal.model}), {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC}.",
        f"Command: {command}",
        *(f"Note: {n}" for n in notes),
        f"Load average at the end (1/5/15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        f"Units: {units} tokens; {cal.bytes_per_token:.3f} bytes of probe text per replica token.",
        (
            f"Replica: {cal.num_blocks} KV blocks x {cal.block_size} tokens, max_model_len {cal.max_model_len}, "
            f"max_num_seqs {cal.max_num_seqs}, max_num_batched_tokens {cal.max_num_batched_tokens} (the last two from flags)."
        ),
        "Fit in replica tokens: "
        + ", ".join(f"{k} {getattr(f, k):.4g}" for k in FIT_TERMS)
        + " (seconds; overhead = TTFT minus the prefill step: the profile's request_overhead).",
        f"Prefix-cache hits during the probes: {cal.cache_hit_tokens} of {cal.probe_prompt_tokens} prompt tokens.",
        "",
        *cal.residual_table(),
    ]


# ---- command line ------------------------------------------------------------------------------

_DEFAULTS = CalibrateConfig(url="")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the flags of `pylb calibrate` on its subparser."""
    parser.add_argument("--url", required=True, metavar="URL", help="the vLLM replica, http://HOST:PORT (it must be idle)")
    parser.add_argument("--out", required=True, metavar="FILE", help="profile YAML to write (for pylb simulate --profile)")
    parser.add_argument("--name", metavar="NAME", help="profile name (default: the file name without .yaml)")
    parser.add_argument("--model", metavar="NAME", help="model to send (default: the first one /v1/models lists)")
    parser.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=_DEFAULTS.max_num_seqs,
        metavar="N",
        help=f"the replica's --max-num-seqs (not exported by vLLM; default {_DEFAULTS.max_num_seqs}, vLLM's on GPUs; 128 on CPUs)",
    )
    parser.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=_DEFAULTS.max_num_batched_tokens,
        metavar="N",
        help=f"the replica's --max-num-batched-tokens (not exported by vLLM; default {_DEFAULTS.max_num_batched_tokens})",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        metavar="N",
        help="longest prefill probe in replica tokens (default: the longest prompt one step computes)",
    )
    parser.add_argument(
        "--max-batch", type=positive_int, default=_DEFAULTS.max_batch, metavar="N", help=f"largest decode batch probed (default {_DEFAULTS.max_batch})"
    )
    parser.add_argument(
        "--decode-tokens",
        type=positive_int,
        default=_DEFAULTS.decode_tokens,
        metavar="N",
        help=f"tokens per decode probe stream (default {_DEFAULTS.decode_tokens})",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=_DEFAULTS.repeats, metavar="N", help=f"prefill probes per length (default {_DEFAULTS.repeats})"
    )
    parser.add_argument(
        "--units",
        choices=UNITS,
        default=_DEFAULTS.units,
        help=f"token unit of the written profile: simulator ({BYTES_PER_TOKEN}-byte tokens, for pylb workloads) "
        f"or replica (its tokenizer's) (default {_DEFAULTS.units})",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        metavar="TEXT",
        help="a line for the profile's header comment, e.g. how the replica was started (repeatable)",
    )
    parser.add_argument(
        "--timeout", type=positive_float, default=_DEFAULTS.timeout_s, metavar="S", help=f"per-request timeout (default {_DEFAULTS.timeout_s:g} s)"
    )


def _config(args: argparse.Namespace) -> tuple[CalibrateConfig, Path, str]:
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        raise UsageError(f"argument --url: {exc}") from None
    out = Path(args.out)
    if out.is_dir():
        raise UsageError(f"argument --out: {args.out!r} is a directory; give a file name")
    if not out.parent.resolve().is_dir():
        raise UsageError(f"argument --out: directory does not exist: {str(out.parent)!r}")
    name = args.name if args.name is not None else out.stem
    if not name:
        raise UsageError(f"argument --name: must not be empty, got {args.name!r}")
    if args.decode_tokens < 4:
        raise UsageError(f"argument --decode-tokens: must be >= 4 to see inter-token gaps, got {args.decode_tokens}")
    if args.max_batch < 2:
        raise UsageError(f"argument --max-batch: must be >= 2 to fit c_decode, got {args.max_batch}")
    if args.max_batch > args.max_num_seqs:
        raise UsageError(f"argument --max-batch: {args.max_batch} exceeds --max-num-seqs {args.max_num_seqs}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 16:
        raise UsageError(f"argument --max-prompt-tokens: must be >= 16, got {args.max_prompt_tokens}")
    config = CalibrateConfig(
        url=url,
        model=args.model,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_prompt_tokens=args.max_prompt_tokens,
        max_batch=args.max_batch,
        decode_tokens=args.decode_tokens,
        repeats=args.repeats,
        timeout_s=args.timeout,
        units=args.units,
    )
    return config, out, name


def _say(line: str) -> None:
    print(f"pylb calibrate: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Run `pylb calibrate`; returns the exit status (see the module comment)."""
    try:
        config, out, name = _config(args)
    except UsageError as exc:
        print(f"pylb calibrate: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cal = run_async(calibrate(config, _say))
        profile = cal.profile(name, config.units)
    except ReplicaBusy as exc:
        print(f"pylb calibrate: error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except (CalibrationError, ProfileError) as exc:
        print(f"pylb calibrate: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    command = _command(args)
    for line in cal.residual_table():
        _say(line)
    if cal.cache_hit_tokens:
        _say(f"warning: {cal.cache_hit_tokens} prompt tokens of the probes hit the prefix cache (expected 0)")
    out.write_text(profile_yaml(profile, header_lines(cal, command, config.units, args.note)), encoding="utf-8")
    _say(
        f"wrote {out}: block_size {profile.block_size}, num_blocks {profile.num_blocks}, c0 {profile.c0:.4g} s, "
        f"c_prefill {profile.c_prefill:.4g} s, c_decode {profile.c_decode:.4g} s, c_attn {profile.c_attn:.4g} s, "
        f"c_prefill_attn {profile.c_prefill_attn:.4g} s "
        f"request_overhead {profile.request_overhead * 1e3:.1f} ms ({config.units} tokens)"
    )
    return 0


_FLAGS = (
    ("url", "--url"), ("out", "--out"), ("name", "--name"), ("model", "--model"), ("max_num_seqs", "--max-num-seqs"),
    ("max_num_batched_tokens", "--max-num-batched-tokens"), ("max_prompt_tokens", "--max-prompt-tokens"),
    ("max_batch", "--max-batch"), ("decode_tokens", "--decode-tokens"), ("repeats", "--repeats"), ("units", "--units"),
    ("timeout", "--timeout"),
)  # --note lines go into the header on their own


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (every flag given or defaulted, explicitly)."""
    import shlex

    parts = ["pylb", "calibrate"]
    for attr, flag in _FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            parts += [flag, shlex.quote(f"{value:g}" if isinstance(value, float) else str(value))]
    for note in getattr(args, "note", ()):
        parts += ["--note", shlex.quote(note)]
    return " ".join(parts)
