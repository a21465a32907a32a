"""Long fuzz runs of pylb's parsers of untrusted input (issue 16 §2): the OpenAI request model
(completions and chat bodies, through `parse_json_body` + `build_request`), the vLLM /metrics
parser (`parse_vllm_metrics`) and the vLLM KV-event decoder (`kv-events`: ZMQ messages
`[topic, seq, payload]` through `KvEventSubscriber.handle`, as the subscriber gets them off the
socket; every bad message must be counted in `decode_errors` and skipped, never raise).

    .venv/bin/python bench/fuzz.py --cases 1000000            # per target
    .venv/bin/python bench/fuzz.py --cases 20000 --seed 7     # a short run
    .venv/bin/python bench/fuzz.py --cases 100000 --targets kv-events

How to read it: per target, the cases run, their rate, how many were accepted and how many were
rejected (by the field named: every rejection of a request must name one), the unexpected
exceptions (must be 0: each would be a 500 or a stopped scrape loop in pylb), and the process's
peak RSS before and after (must not grow with the number of cases). Cases are random
structured values (nested JSON with integers of any size, NaN, infinities, unicode, wrong
types) and 1 in 5 get random byte-level mutations after encoding. The same properties run for a
few hundred cases in CI (tests/test_hostile_input.py, with hypothesis). Results go to
bench/results/fuzz.json with the command that produced them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgpack

from pylb.fleet.kv_events import AllBlocksCleared, KvEventBatch, KvEventSubscriber
from pylb.fleet.scrape import ScrapeError, parse_vllm_metrics
from pylb.router.request import CHAT, COMPLETIONS, RequestError, build_request, parse_json_body

KEYS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "n", "priority", "stream", "model", "tools", "stream_options", "temperature"]
NAMES = ["vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
         "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total", "vllm:cache_config_info", "vllm:num_preemptions_total"]  # fmt: skip


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def value(rng: random.Random, depth: int = 0) -> Any:
    r = rng.random()
    if depth > 3 or r < 0.55:
        return rng.choice([
            None, True, False, 0, -1, 1, rng.randint(-10, 10**6), rng.randint(-(2**64), 2**64), 10 ** rng.randint(15, 40),
            float("nan"), float("inf"), -float("inf"), rng.random() * 1e6, 1e308,
            "", "x" * rng.randint(0, 300), "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 20))),
        ])  # fmt: skip
    if r < 0.8:
        return [value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {rng.choice(["type", "text", "role", "content", "image_url", "url", "function", "name", "x"]): value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def message(rng: random.Random) -> Any:
    if rng.random() < 0.2:
        return value(rng)
    content: Any = rng.choice([
        "hello " * rng.randint(0, 30), [{"type": "text", "text": "part"}, {"type": "image_url", "image_url": {"url": "data:,x"}}], value(rng),
    ])  # fmt: skip
    return {"role": rng.choice(["system", "user", "assistant", "tool", "developer", "x", 3]), "content": content}


def request_body(rng: random.Random, kind: str) -> bytes:
    body: dict[str, Any] = {}
    for key in rng.sample(KEYS, rng.randint(0, len(KEYS))):
        body[key] = value(rng)
    if rng.random() < 0.7:  # mostly well-formed at the top, so the fields behind get exercised
        if kind == COMPLETIONS:
            body["prompt"] = rng.choice(["a prompt " * rng.randint(0, 50), [rng.randint(-5, 2**33) for _ in range(rng.randint(0, 40))], ["a", "b"], value(rng)])
        else:
            body["messages"] = [message(rng) for _ in range(rng.randint(0, 5))]
    raw = json.dumps(body, allow_nan=True).encode()
    return mutate(rng, raw) if rng.random() < 0.2 else raw


def mutate(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randint(0, len(b)) if b else 0
        if op < 0.4 and b:
            b[min(pos, len(b) - 1)] = rng.randint(0, 255)
        elif op < 0.7:
            b[pos:pos] = bytes(rng.randint(0, 255) for _ in range(rng.randint(1, 4)))
        elif b:
            del b[pos : pos + rng.randint(1, 8)]
    return bytes(b)


def metrics_page(rng: random.Random) -> str:
    lines = []
    for _ in range(rng.randint(0, 14)):
        if rng.random() < 0.15:
            lines.append("".join(chr(rng.randint(0, 0x7FF)) for _ in range(rng.randint(0, 60))))
            continue
        labels = {k: rng.choice(["0", "16", "None", "x", "1e9", "-3", ""]) for k in rng.sample(["engine", "model_name", "block_size", "num_gpu_blocks"], rng.randint(0, 3))}
        lab = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
        v = rng.choice(["0", "1", "3.5", "NaN", "+Inf", "-Inf", "1e400", "-0", str(rng.randint(-(2**70), 2**70)), "x", ""])
        lines.append(f"{rng.choice(NAMES)}{lab} {v}")
    text = "\n".join(lines) + "\n"
    return mutate(rng, text.encode()).decode("utf-8", "replace") if rng.random() < 0.2 else text


EVENT_TYPES = ["BlockStored", "BlockRemoved", "AllBlocksCleared", "Nope", ""]
EVENT_FIELDS = ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name", "extra_keys"]


def kv_value(rng: random.Random, depth: int = 0) -> Any:
    """A msgpack-encodable value: ints up to 64 bits either sign, floats (NaN, inf), bytes, strings, lists, maps."""
    r = rng.random()
    if depth > 3 or r < 0.5:
        return rng.choice([
            0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, rng.getrandbits(64), rng.randint(-(2**63), 2**63 - 1), 16, 0.5, float("nan"), float("inf"),
            None, True, False, "", "GPU", "cpu", "x" * rng.randint(0, 40), rng.randbytes(rng.choice([0, 8, 32, 33])), rng.choice(EVENT_TYPES),
        ])  # fmt: skip
    if r < 0.8:
        return [kv_value(rng, depth + 1) for _ in range(rng.randint(0, 6))]
    return {kv_value(rng, 4) if rng.random() < 0.2 else rng.choice(EVENT_FIELDS): kv_value(rng, depth + 1) for _ in range(rng.randint(0, 5))}


def kv_event(rng: random.Random) -> Any:
    """One event, near vLLM's shape (a map with a type, or a tagged array) with fields of random types."""
    kind = rng.choice(EVENT_TYPES)
    if rng.random() < 0.5:
        d: dict[Any, Any] = {"type": kind}
        for f in rng.sample(EVENT_FIELDS[1:], rng.randint(0, len(EVENT_FIELDS) - 1)):
            if f == "block_hashes" and rng.random() < 0.6:
                d[f] = [rng.choice([rng.getrandbits(64), rng.randbytes(32), kv_value(rng, 3)]) for _ in range(rng.randint(0, 8))]
            elif f == "block_size" and rng.random() < 0.6:
                d[f] = rng.choice([16, 32, 0, -1, 2**63 - 1])
            else:
                d[f] = kv_value(rng, 2)
        return d
    if rng.random() < 0.8:
        return [kind, *[kv_value(rng, 2) for _ in range(rng.randint(0, 9))]]
    return kv_value(rng)


def kv_message(rng: random.Random, seq: int) -> list[bytes]:
    """Frames `[topic, seq, payload]`: mostly well framed with a random batch; some with bad frames or raw bytes."""
    r = rng.random()
    if r < 0.05:
        return [rng.randbytes(rng.randint(0, 20)) for _ in range(rng.choice([0, 1, 2, 4]))]
    seq_frame = seq.to_bytes(8, "big") if rng.random() < 0.95 else rng.randbytes(rng.choice([0, 7, 9]))
    if r < 0.15:
        payload = rng.randbytes(rng.randint(0, 64))
    else:
        batch: Any = [rng.choice([1.5, 0, float("nan"), "x", None]), [kv_event(rng) for _ in range(rng.randint(0, 4))]]
        if rng.random() < 0.3:
            batch.append(kv_value(rng, 3))
        if rng.random() < 0.1:
            batch = rng.choice([kv_value(rng), {"ts": 1.0, "events": batch[1]}, batch[1]])
        payload = msgpack.packb(batch, use_bin_type=rng.random() < 0.8)
        if rng.random() < 0.2:
            payload = mutate(rng, payload)
    return [b"kv@" if rng.random() < 0.9 else rng.randbytes(3), seq_frame, payload]


class CountingSink:
    """A KV-event sink that only counts what reaches it."""

    def __init__(self) -> None:
        self.batches = 0
        self.resyncs = 0

    def on_kv_batch(self, replica: str, batch: KvEventBatch) -> None:
        self.batches += 1
        for e in batch.events:  # what a real sink reads first
            if e.applies and not isinstance(e, AllBlocksCleared):
                int(e.keys.sum())

    def on_kv_resync(self, replica: str, reason: str) -> None:
        self.resyncs += 1


def fuzz_kv_events(cases: int, rng: random.Random) -> dict[str, Any]:
    """Each message through the subscriber's `handle`: delivered, or counted in decode_errors; nothing else."""
    import logging

    logging.getLogger("pylb").setLevel(logging.ERROR)  # each skipped message logs a warning
    sink = CountingSink()
    sub = KvEventSubscriber("r0", "tcp://127.0.0.1:1", sink)  # type: ignore[arg-type]
    unexpected, examples = Counter[str](), []
    for i in range(cases):
        frames = kv_message(rng, i)
        before = sub.stats.decode_errors + sub.stats.batches
        try:
            sub.handle(frames)
            if sub.stats.decode_errors + sub.stats.batches != before + 1:
                raise AssertionError("a message was neither delivered nor counted as a decode error")
        except Exception as exc:  # noqa: BLE001 - what the run looks for
            unexpected[type(exc).__name__] += 1
            if len(examples) < 5:
                examples.append(f"{type(exc).__name__}: {exc} <- {[f[:80] for f in frames]!r}")
    return {"accepted": sub.stats.batches, "rejected": sub.stats.decode_errors, "delivered": sink.batches, "unexpected": dict(unexpected), "examples": examples}


def fuzz_requests(kind: str, cases: int, rng: random.Random) -> dict[str, Any]:
    accepted, fields, unexpected = 0, Counter[str](), Counter[str]()
    examples: list[str] = []
    for i in range(cases):
        raw = request_body(rng, kind)
        try:
            build_request(kind, parse_json_body(raw), f"r{i}", 0.0)
            accepted += 1
        except RequestError as exc:
            fields[exc.field or "(none)"] += 1
        except Exception as exc:  # noqa: BLE001 - what the run looks for
            unexpected[type(exc).__name__] += 1
            if len(examples) < 5:
                examples.append(f"{type(exc).__name__}: {exc} <- {raw[:200]!r}")
    return {"accepted": accepted, "rejected_by_field": dict(fields.most_common()), "unexpected": dict(unexpected), "examples": examples}


def fuzz_metrics(cases: int, rng: random.Random) -> dict[str, Any]:
    accepted, rejected, unexpected = 0, 0, Counter[str]()
    examples: list[str] = []
    for _ in range(cases):
        page = metrics_page(rng)
        try:
            m = parse_vllm_metrics(page)
            assert 0.0 <= m.kv_cache_usage <= 1.0
            accepted += 1
        except ScrapeError:
            rejected += 1
        except Exception as exc:  # noqa: BLE001 - what the run looks for
            unexpected[type(exc).__name__] += 1
            if len(examples) < 5:
                examples.append(f"{type(exc).__name__}: {exc} <- {page[:200]!r}")
    return {"accepted": accepted, "rejected": rejected, "unexpected": dict(unexpected), "examples": examples}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1_000_000, help="cases per target (default 1,000,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--targets", default="completions,chat,metrics,kv-events", help="comma-separated targets (default all)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fuzz.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    results: dict[str, Any] = {"command": " ".join(["bench/fuzz.py", *sys.argv[1:]]), "load_average": os.getloadavg(), "targets": {}}
    bad = 0
    targets = {"completions": lambda: fuzz_requests(COMPLETIONS, args.cases, rng), "chat": lambda: fuzz_requests(CHAT, args.cases, rng),
               "metrics": lambda: fuzz_metrics(args.cases, rng), "kv-events": lambda: fuzz_kv_events(args.cases, rng)}  # fmt: skip
    chosen = [t.strip() for t in args.targets.split(",") if t.strip()]
    for t in chosen:
        if t not in targets:
            ap.error(f"argument --targets: unknown target {t!r} (one of {', '.join(targets)})")
    for name in chosen:
        run = targets[name]
        rss0, t0 = rss_mb(), time.perf_counter()
        res = run()
        dt = time.perf_counter() - t0
        res.update(cases=args.cases, seconds=round(dt, 1), per_second=round(args.cases / dt), peak_rss_mb_before=round(rss0, 1), peak_rss_mb_after=round(rss_mb(), 1))
        results["targets"][name] = res
        bad += sum(res["unexpected"].values())
        print(f"{name:12s} {args.cases:>9,} cases in {dt:6.1f} s ({res['per_second']:,}/s): accepted {res['accepted']:,}, "
              f"unexpected {sum(res['unexpected'].values())}, peak RSS {rss0:.0f} -> {rss_mb():.0f} MB", flush=True)  # fmt: skip
        for e in res["examples"]:
            print("   ", e)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"load average {results['load_average'][0]:.2f}; results in {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
