"""Benchmark of the KV-events path (issue 12): what exact cache state costs pylb.

How to read it
--------------
- keying, per prompt size (1k, 8k, 32k tokens of the tiny Llama's tokenizer, one thread):
  `tokenize` = `tokenizers` encode (completions text), `hash native` = vLLM's sha256_cbor chain in
  the C++ core (OpenSSL SHA-256), `hash python` = the same chain in Python (hashlib + a CBOR
  encoder; checked equal to the native one), `match` = the events mirror's leading match over 4
  replicas. The routing cost a request adds is tokenize + hash native + match. Target: < 1 ms
  for 8k tokens. (Text tokenized whole: the line cache is off for this part.)
- chat keying, per conversation size: `keys_for("chat")` end to end (chat template, tokenize,
  hash) with every prompt tokenized whole, and with the line cache (pylb.router.line_tokens)
  cold (a conversation never seen) and warm (the next turn of a conversation keyed before: the
  history's lines are cached, the new message is not); `render` is the chat template alone.
- events/s: block events (stored + removed) decoded from msgpack frames and applied to a router
  core's events mirror (4 replicas, BlockStored of 16 blocks, then their BlockRemoved). Target
  >= 500k block events/s.
- memory: resident-set growth per million blocks held in the events mirror (one replica; and
  the same million spread over 4 replicas), measured from /proc/self/statm.
The machine is shared: the load average is printed with the results; compare ratios.

    .venv/bin/python bench/bench_kv_events.py            # writes bench/results/kv_events.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from pylb import native
from pylb.fleet.kv_events import BlockRemoved, BlockStored, decode_frames, encode_batch
from pylb.router import registry
from pylb.router.engine_keys import EngineKeyer
from pylb.router.interface import RouterOptions

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "data" / "kv_events" / "tiny-llama"
BLOCK = 16  # vLLM's default block size on GPUs


def best_of(fn, repeat: int = 7, number: int = 1) -> float:
    """Best per-call seconds of `number` calls, over `repeat` rounds."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def cbor_uint(major: int, v: int) -> bytes:
    mt = major << 5
    if v < 24:
        return bytes([mt | v])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if v < 1 << (8 * size):
            return bytes([mt | extra]) + v.to_bytes(size, "big")
    raise ValueError(v)


def python_chain(ids: list[int], block: int, parent: bytes) -> list[bytes]:
    """vLLM's sha256_cbor chain in Python (hashlib; CBOR written out), for the comparison."""
    out = []
    head = cbor_uint(4, block)
    for b in range(len(ids) // block):
        body = b"".join(cbor_uint(0, t) for t in ids[b * block : (b + 1) * block])
        parent = hashlib.sha256(b"\x83\x58\x20" + parent + head + body + b"\xf6").digest()
        out.append(parent)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def keying(keyer: EngineKeyer) -> list[dict]:
    words = ("router cache block token replica prefix engine event queue latency memory hash stream model request "
             "python return class import alpha").split()  # fmt: skip
    text = " ".join(words[(i * 7919) % len(words)] for i in range(40_000))
    ids_all = keyer.tokenizer.encode(text).ids
    rows = []
    router = registry.create("dualmap", RouterOptions(cache_state="events"))
    router.on_membership([f"r{i}" for i in range(4)], 0.0)
    for n in (1024, 8192, 32768):
        ids = ids_all[:n]
        prompt = keyer.tokenizer.decode(ids)
        got = len(keyer.tokenizer.encode(prompt).ids)
        t_tok = best_of(lambda: keyer.tokenizer.encode(prompt, add_special_tokens=True), number=3)
        arr = np.asarray(ids, dtype=np.uint32)
        t_native = best_of(lambda: native.engine_block_hashes(arr, BLOCK), number=5)
        keys, full = native.engine_block_hashes(arr, BLOCK, return_hashes=True)
        py = python_chain(ids, BLOCK, native.engine_none_hash())
        assert b"".join(py) == full, "python and native chains differ"
        t_py = best_of(lambda: python_chain(ids, BLOCK, native.engine_none_hash()), repeat=3)
        assert router.events is not None
        for i in range(4):
            router.on_kv_event(f"r{i}", "stored", keys[: len(keys) * (i + 1) // 4], 0.0)
        t_match = best_of(lambda: router.events.match(keys), number=20)  # type: ignore[union-attr]
        rows.append({"tokens": n, "tokens_reencoded": got, "blocks": len(keys), "tokenize_ms": t_tok * 1e3, "hash_native_ms": t_native * 1e3,
                     "hash_python_ms": t_py * 1e3, "match_ms": t_match * 1e3, "added_routing_ms": (t_tok + t_native + t_match) * 1e3})  # fmt: skip
    return rows


def chat_history(tokens: int, keyer: EngineKeyer) -> list[dict]:
    """A conversation of about `tokens` tokens: a system prompt of short rules, then turns of a
    few lines each (the shape a chat or agent client resends on every turn)."""
    words = "router cache block token replica prefix engine event queue latency memory hash stream model request".split()
    rng = np.random.default_rng(tokens)

    def lines(n: int) -> str:
        return "\n".join(" ".join(words[int(w)] for w in rng.integers(0, len(words), size=int(rng.integers(4, 14)))) + "." for _ in range(n))

    msgs = [{"role": "system", "content": lines(40)}]
    while True:
        text = keyer.render_chat(msgs)
        assert text is not None
        if len(keyer.tokenizer.encode(text, add_special_tokens=False).ids) >= tokens:
            return msgs
        msgs.append({"role": "user" if len(msgs) % 2 else "assistant", "content": lines(int(rng.integers(1, 8)))})


def chat_keying(lines: EngineKeyer, whole: EngineKeyer) -> list[dict]:
    """keys_for("chat") end to end (render, tokenize, hash): `whole` tokenizes every prompt whole
    (line cache off); `lines` with the line cache, `cold` = a history never seen, `warm` = the
    same history plus one new user message after the history was keyed once (the next turn)."""
    rows = []
    for n in (1024, 8192, 32768):
        history = chat_history(n, whole)
        next_turn = [*history, {"role": "user", "content": "one more question about the replica cache, please."}]
        a, b = whole.keys_for("chat", {"messages": next_turn}), lines.keys_for("chat", {"messages": next_turn})
        assert a is not None and b is not None and a.keys.tolist() == b.keys.tolist(), "line cache changed the keys"
        t_whole = best_of(lambda: whole.keys_for("chat", {"messages": next_turn}), number=3)

        def cold() -> None:
            lines.lines.clear()
            lines.keys_for("chat", {"messages": next_turn})

        t_cold = best_of(cold, number=3)
        lines.lines.clear()
        lines.keys_for("chat", {"messages": history})
        t_warm = best_of(lambda: lines.keys_for("chat", {"messages": next_turn}), number=5)
        text = whole.render_chat(next_turn)
        t_render = best_of(lambda: whole.render_chat(next_turn), number=5)
        rows.append({"tokens": len(whole.tokenizer.encode(text, add_special_tokens=False).ids), "messages": len(next_turn),
                     "whole_ms": t_whole * 1e3, "lines_cold_ms": t_cold * 1e3, "lines_warm_ms": t_warm * 1e3, "render_ms": t_render * 1e3})  # fmt: skip
    return rows


def events_per_second() -> dict:
    rng = np.random.default_rng(0)
    router = registry.create("dualmap", RouterOptions(cache_state="events"))
    names = [f"r{i}" for i in range(4)]
    router.on_membership(names, 0.0)
    frames = []
    for b in range(2000):
        keys = rng.integers(0, 2**63, size=16, dtype=np.uint64)
        frames.append(encode_batch(2 * b, 1.0, [BlockStored(keys, None, list(range(16 * BLOCK)), BLOCK, "GPU")]))
        frames.append(encode_batch(2 * b + 1, 1.0, [BlockRemoved(keys, "GPU")]))
    blocks = 2000 * 32

    def decode_only() -> None:
        for f in frames:
            decode_frames(f)

    def decode_apply() -> None:
        for k, f in enumerate(frames):
            batch = decode_frames(f)
            name = names[k // 2 % 4]
            for e in batch.events:
                router.on_kv_event(name, "stored" if isinstance(e, BlockStored) else "removed", e.keys, 1.0)  # type: ignore[union-attr]

    t_dec = best_of(decode_only, repeat=3)
    t_all = best_of(decode_apply, repeat=3)
    return {"block_events": blocks, "tokens_per_stored_event": 16 * BLOCK, "decode_block_events_per_s": blocks / t_dec,
            "decode_apply_block_events_per_s": blocks / t_all}  # fmt: skip


def memory() -> dict:
    out = {}
    for replicas in (1, 4):
        router = registry.create("dualmap", RouterOptions(cache_state="events"))
        router.on_membership([f"r{i}" for i in range(replicas)], 0.0)
        keys = np.random.default_rng(replicas).integers(0, 2**63, size=1_000_000, dtype=np.uint64)
        before = rss_bytes()
        per = len(keys) // replicas
        for i in range(replicas):
            for c in range(0, per, 10_000):
                router.on_kv_event(f"r{i}", "stored", keys[i * per + c : i * per + c + 10_000], 0.0)
        out[f"bytes_per_block_{replicas}_replicas"] = (rss_bytes() - before) / 1_000_000
        assert router.events is not None
        assert sum(router.events.blocks(i) for i in range(replicas)) == 1_000_000
    return out


def main() -> None:
    keyer = EngineKeyer(TOKENIZER, BLOCK, line_cache_tokens=0)
    result = {
        "command": "python " + " ".join(["bench/bench_kv_events.py", *sys.argv[1:]]),
        "load_average": os.getloadavg(),
        "block_size": BLOCK,
        "keying": keying(keyer),
        "chat_keying": chat_keying(EngineKeyer(TOKENIZER, BLOCK), keyer),
        "events": events_per_second(),
        "memory": memory(),
    }
    print(f"load average {result['load_average']}")
    print(f"{'tokens':>7} {'blocks':>6} {'tokenize ms':>12} {'hash C++ ms':>12} {'hash py ms':>11} {'match ms':>9} {'added ms':>9}")
    for r in result["keying"]:
        print(f"{r['tokens']:>7} {r['blocks']:>6} {r['tokenize_ms']:>12.3f} {r['hash_native_ms']:>12.3f} {r['hash_python_ms']:>11.3f} "
              f"{r['match_ms']:>9.4f} {r['added_routing_ms']:>9.3f}")  # fmt: skip
    print("chat keys_for (render + tokenize + hash), ms:")
    print(f"{'tokens':>7} {'messages':>8} {'whole':>8} {'lines cold':>11} {'lines warm':>11} {'render':>8}")
    for r in result["chat_keying"]:
        print(f"{r['tokens']:>7} {r['messages']:>8} {r['whole_ms']:>8.3f} {r['lines_cold_ms']:>11.3f} {r['lines_warm_ms']:>11.3f} {r['render_ms']:>8.3f}")
    ev = result["events"]
    print(f"block events/s: decode {ev['decode_block_events_per_s']:,.0f}, decode + apply {ev['decode_apply_block_events_per_s']:,.0f}")
    print("memory per block: " + ", ".join(f"{k} {v:.1f} B" for k, v in result["memory"].items()))
    out = REPO / "bench" / "results" / "kv_events.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"-> {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
