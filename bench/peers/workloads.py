"""Workloads of the side-by-side harness: deterministic request lists, and their ideal hit rate.

Design
------
A workload is named by a *spec* string and is a pure function of it, so the same
`WorkloadRequest` list can be rebuilt anywhere (the harness replays it against real replicas;
`pylb simulate` or `pylb.sim` can be fed the very same list to compare the simulator with them):

    synthetic:multi-turn:groups=8,sessions=96,...   pylb's own generators (`load_workload`), e.g.
                                                     chat sessions under G shared system prompts
    mooncake-scaled:PATH[:key=value,...]             a Mooncake trace scaled to a small model
    any trace path (.jsonl Mooncake, .csv Azure)     as `pylb simulate --trace` reads it

Mooncake scaled (`mooncake_scaled`). The Mooncake conversation trace has ~12k-token prompts in
512-token hash blocks; the tiny CPU model has max-model-len 2048. Every token count is divided by
`scale` (16 by default): hash id h becomes `512/scale` word tokens of `token_text("mc:h", ...)`
(pylb's deterministic text, 4 bytes per simulated token), a prompt is its ids' texts
concatenated and cut to ceil(input_length/scale) tokens, then to `max_prompt_tokens`, and
max_tokens = clamp(output_length/scale, 1, max_output_tokens). Two prompts share their first k
blocks of text exactly when they share their first k hash ids, so the trace's prefix structure
survives at 1/scale of its size. Arrivals are the trace's, divided by `time_scale` (time
compression); the first `requests` requests are kept.

    parameter          default  meaning
    requests           400      first N requests of the trace
    scale              16       token counts divided by this (512 / scale must be an integer)
    time_scale         1.0      arrival times divided by this (> 1 compresses time)
    max_prompt_tokens  896      prompts cut to this many simulated tokens (after scaling)
    max_output_tokens  64       max_tokens capped at this (after scaling)

Token counts are pylb's simulated tokens (4 bytes of text each). The tiny vLLM model's tokenizer
(`../shared/vllm/make_tiny_model.py`, byte-level BPE) needs about 1.9 of its tokens per word
token, so 896 simulated tokens are about 1,700 real ones and a prompt plus its answer fits 2,048.

`python bench/peers/workloads.py SPEC` prints a description (size, rate, ideal hit rate, digest).

Ideal hit rate (`ideal_hit_rate`): replay the prompts in arrival order through one cache that
never forgets, in blocks of `block_tokens` simulated tokens (chained hashes of the text, as vLLM
hashes token blocks); a request hits its longest run of leading blocks seen before, in whole
blocks of at most prompt - 1 tokens (vLLM always computes the last token, and a hit is whole
blocks). Token-weighted: hits / prompt tokens. The default 16 simulated tokens are about one
32-token vLLM block of the tiny model.

The engine's own ideal (`engine_ideal`, `python bench/peers/workloads.py --engine URL SPEC`): the
same replay on the prompts as the replicas see them, tokenized by a replica (vLLM's
`POST /tokenize`, special tokens added as `/v1/completions` adds them), in the replicas' block
size (`vllm:cache_config_info`), through one never-forgetting cache (`unbounded`) and through one
LRU cache as large as the whole fleet's KV cache (`fleet_cache`: the replicas' `num_gpu_blocks`
summed; a request's blocks are freed last-block-first, as vLLM frees them, so an older prompt's
tail is evicted before its head). `fleet_cache` is the hit rate the issue's simulator target
compares with (one cache of the fleet's total size): no router over N caches of that total can
beat it on this replay, except by the timing of its evictions. The byte-level estimate above
differs from the engine's by the tokenizer and the block alignment (on the tiny model's chat cell
84.8 % against 83.6 % unbounded; BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import inspect
import json
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import aiohttp
import numpy as np

from pylb.fleet.scrape import parse_vllm_metrics
from pylb.workload.loaders import load_workload
from pylb.workload.mooncake import MOONCAKE_BLOCK_TOKENS
from pylb.workload.replay import fetch_model
from pylb.workload.synthetic import token_text
from pylb.workload.types import BYTES_PER_TOKEN, WorkloadRequest

MOONCAKE_SCALED = "mooncake-scaled:"


def _scaled_prompt(hash_ids: tuple[int, ...], block_tokens: int, tokens: int) -> str:
    """The text of `tokens` simulated tokens made of one `block_tokens` segment per hash id."""
    text = "".join(token_text(f"mc:{h}", block_tokens) for h in hash_ids)
    return text[: tokens * BYTES_PER_TOKEN]


def mooncake_scaled(
    path: str | Path,
    *,
    requests: int = 400,
    scale: int = 16,
    time_scale: float = 1.0,
    max_prompt_tokens: int = 896,
    max_output_tokens: int = 64,
) -> list[WorkloadRequest]:
    """The first `requests` requests of a Mooncake JSONL trace, scaled down (see the module comment)."""
    for name, value in (("requests", requests), ("scale", scale), ("max_prompt_tokens", max_prompt_tokens),
                        ("max_output_tokens", max_output_tokens)):  # fmt: skip
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value!r}")
    if MOONCAKE_BLOCK_TOKENS % scale:
        raise ValueError(f"scale must divide {MOONCAKE_BLOCK_TOKENS}, got {scale!r}")
    if not (0 < time_scale < math.inf):
        raise ValueError(f"time_scale must be a positive number, got {time_scale!r}")
    block_tokens = MOONCAKE_BLOCK_TOKENS // scale
    out: list[WorkloadRequest] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if len(out) >= requests:
                break
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                ts, n_in, n_out, ids = d["timestamp"], int(d["input_length"]), int(d["output_length"]), d["hash_ids"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: not a Mooncake trace line ({exc})") from None
            tokens = min(max_prompt_tokens, max(1, -(-n_in // scale)))
            used = tuple(int(h) for h in ids[: -(-tokens // block_tokens)])
            if len(used) * block_tokens < tokens:
                raise ValueError(f"{path}:{lineno}: input_length {n_in} needs more hash_ids than {len(ids)}")
            out.append(
                WorkloadRequest(
                    request_id=f"mooncake-{len(out)}",
                    arrival_s=float(ts) / 1000.0 / time_scale,
                    prompt_tokens=tokens,
                    output_tokens=min(max_output_tokens, max(1, round(n_out / scale))),
                    make_text=partial(_scaled_prompt, used, block_tokens, tokens),
                )
            )
    return out


def _parse_params(text: str, defaults: dict[str, int | float], what: str) -> dict[str, int | float]:
    """`k=v,k=v` into typed keyword arguments (each typed like its default)."""
    out: dict[str, int | float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or key.strip() not in defaults:
            raise ValueError(f"{what}: expected key=value with key one of {', '.join(defaults)}, got {item!r}")
        kind = type(defaults[key.strip()])
        try:
            out[key.strip()] = kind(value.strip())
        except ValueError:
            raise ValueError(f"{what}: {key.strip()} must be {kind.__name__}, got {value.strip()!r}") from None
    return out


def load(spec: str) -> list[WorkloadRequest]:
    """The workload a spec names (see the module comment), sorted by arrival."""
    if spec.startswith(MOONCAKE_SCALED):
        rest = spec[len(MOONCAKE_SCALED) :]
        path, _, params = rest.partition(":")
        if not path:
            raise ValueError(f"{spec!r}: expected mooncake-scaled:PATH[:key=value,...]")
        defaults = {p.name: p.default for p in inspect.signature(mooncake_scaled).parameters.values()
                    if p.kind is p.KEYWORD_ONLY}  # fmt: skip
        requests = mooncake_scaled(path, **_parse_params(params, defaults, "mooncake-scaled"))  # type: ignore[arg-type]
    else:
        requests = load_workload(spec)
    return sorted(requests, key=lambda r: r.arrival_s)


def cached_share(prompts: Iterable[bytes], block_tokens: int, capacity_blocks: int | None = None) -> float:
    """Token-weighted share of prompt tokens one prefix cache serves, the prompts replayed in order.

    Each prompt is bytes of `BYTES_PER_TOKEN` (4) bytes per token (text as the simulator counts it,
    or token ids packed as 4-byte words); its full blocks of `block_tokens` tokens are chained
    hashes. A prompt hits its longest run of leading blocks cached before it, in whole blocks of at
    most prompt - 1 tokens (vLLM's rule). With `capacity_blocks` the cache is LRU and holds that
    many blocks; a prompt's blocks are touched last-block-first (the order vLLM frees them), so an
    older prompt's tail goes before its head.
    """
    if block_tokens < 1:
        raise ValueError(f"block_tokens must be >= 1, got {block_tokens!r}")
    if capacity_blocks is not None and capacity_blocks < 1:
        raise ValueError(f"capacity_blocks must be >= 1, got {capacity_blocks!r}")
    cache: OrderedDict[bytes, None] = OrderedDict()
    hits = total = 0
    step = block_tokens * BYTES_PER_TOKEN
    for data in prompts:
        tokens = -(-len(data) // BYTES_PER_TOKEN)
        h = hashlib.blake2b(digest_size=16)
        keys = []
        for start in range(0, len(data) - step + 1, step):  # full blocks only
            h.update(data[start : start + step])
            keys.append(h.digest())
        hit_blocks = 0
        for key in keys[: (tokens - 1) // block_tokens]:
            if key not in cache:
                break
            hit_blocks += 1
        for key in reversed(keys):
            cache[key] = None
            cache.move_to_end(key)
        while capacity_blocks is not None and len(cache) > capacity_blocks:
            cache.popitem(last=False)
        hits += hit_blocks * block_tokens
        total += tokens
    return hits / total if total else 0.0


def ideal_hit_rate(requests: list[WorkloadRequest], block_tokens: int = 16) -> float:
    """Token-weighted hit rate of one never-forgetting prefix cache, on the simulator's byte-level
    tokens (see the module comment)."""
    return cached_share((r.prompt_text().encode() for r in sorted(requests, key=lambda r: r.arrival_s)), block_tokens)


def token_bytes(ids: Sequence[int]) -> bytes:
    """Token ids as `cached_share` reads them: one little-endian 4-byte word per token (the fake
    vLLM's `text_token_ids` packs back into its text this way)."""
    return np.asarray(ids, dtype="<u4").tobytes()


async def engine_ideal(urls: Sequence[str], model: str, requests: list[WorkloadRequest], *, concurrency: int = 8) -> dict[str, object]:
    """The workload's ideal hit rates in the engines' own tokens and blocks (see the module comment).

    Tokenizes every prompt with the first replica's `POST /tokenize` and reads each replica's block
    size and block count from its `/metrics` (`vllm:cache_config_info`). Raises ValueError naming
    the replica and what it answered when a replica lacks either.
    """
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        configs = []
        for url in urls:
            async with session.get(f"{url}/metrics") as resp:
                page = await resp.text()
            m = parse_vllm_metrics(page)
            if m.block_size < 1 or m.num_gpu_blocks < 1:
                raise ValueError(f"{url}/metrics: no vllm:cache_config_info with block_size and num_gpu_blocks")
            configs.append((m.block_size, m.num_gpu_blocks))
        if len({bs for bs, _ in configs}) != 1:
            raise ValueError(f"replicas disagree on block_size: {[bs for bs, _ in configs]}")
        gate = asyncio.Semaphore(concurrency)

        async def tokenize(req: WorkloadRequest) -> list[int]:
            async with gate, session.post(f"{urls[0]}/tokenize", json={"model": model, "prompt": req.prompt_text()}) as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(body, dict) or not isinstance(body.get("tokens"), list):
                    raise ValueError(f"{urls[0]}/tokenize answered {resp.status}: {str(body)[:200]}")
                return [int(t) for t in body["tokens"]]

        ordered = sorted(requests, key=lambda r: r.arrival_s)
        ids = await asyncio.gather(*(tokenize(r) for r in ordered))
    block_size = configs[0][0]
    fleet_blocks = sum(n for _, n in configs)
    prompts = [token_bytes(t) for t in ids]
    return {
        "block_size": block_size,
        "fleet_cache_blocks": fleet_blocks,
        "prompt_tokens_mean": sum(map(len, ids)) / len(ids) if ids else 0.0,
        "unbounded": cached_share(prompts, block_size),
        "fleet_cache": cached_share(prompts, block_size, fleet_blocks),
    }


def describe(spec: str, requests: list[WorkloadRequest]) -> dict[str, object]:
    """What the results record about a workload: its size, arrival rate, ideal hit rate and digest."""
    digest = hashlib.sha256()
    for r in requests:
        digest.update(f"{r.request_id}|{r.arrival_s!r}|{r.output_tokens}|{r.prompt_text()}\n".encode())
    span = requests[-1].arrival_s - requests[0].arrival_s if len(requests) > 1 else 0.0
    return {
        "spec": spec,
        "requests": len(requests),
        "arrival_span_s": span,
        "arrival_rate": (len(requests) - 1) / span if span > 0 else None,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in requests) / len(requests),
        "output_tokens_mean": sum(r.output_tokens for r in requests) / len(requests),
        "ideal_hit_rate": ideal_hit_rate(requests),
        "sha256": digest.hexdigest(),
    }


def main(argv: list[str] | None = None) -> int:
    """Describe workloads without running them; with --engine, their ideal in a replica's tokens too."""
    ap = argparse.ArgumentParser(description="Describe harness workloads (size, rate, ideal hit rates, digest).")
    ap.add_argument("specs", nargs="+", metavar="SPEC", help="workload spec (see the module comment)")
    ap.add_argument("--engine", action="append", default=[], metavar="URL",
                    help="a running replica (vLLM or pylb sim-replicas); repeat for each replica of the fleet: "
                         "adds engine_ideal (its tokenizer, block size and the fleet's blocks)")  # fmt: skip
    ap.add_argument("--model", default=None, help="model name for /tokenize (default: the engine's first)")
    args = ap.parse_args(argv)
    for spec in args.specs:
        requests = load(spec)
        info = describe(spec, requests)
        if args.engine:
            info["engine_ideal"] = asyncio.run(_engine_ideal_cli(args.engine, args.model, requests))
        print(json.dumps(info, indent=1))
    return 0


async def _engine_ideal_cli(urls: list[str], model: str | None, requests: list[WorkloadRequest]) -> dict[str, object]:
    if model is None:
        async with aiohttp.ClientSession() as session:
            model = await fetch_model(session, urls[0], 30.0)
    return await engine_ideal(urls, model, requests)


if __name__ == "__main__":  # python bench/peers/workloads.py [--engine URL ...] SPEC...
    raise SystemExit(main())
