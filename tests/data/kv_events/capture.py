"""Capture vLLM KV-cache event frames from a running replica, with the requests that caused them.

Run with the Python of a vLLM install (it needs pyzmq only), against a replica started with
`--kv-events-config` (see README.md next to this file for the exact commands):

    python capture.py ipc:///tmp/pylb-kv-capture.sock http://127.0.0.1:8011 MODEL_DIR OUT.json

It subscribes first, then sends a fixed list of requests (completions with text and token ids,
chat, long prompts that overflow a small KV cache so blocks are evicted, and a prefix-cache reset
so AllBlocksCleared is published; one more reset first, so the capture starts from an empty cache), each with `return_token_ids` so the engine's own prompt token
ids are recorded, and writes every frame [topic, seq, payload] (base64) and every request with
its response's prompt token ids to OUT.json.
"""

import base64
import json
import sys
import time
import urllib.error
import urllib.request

import zmq

endpoint, base, model_dir, out_path = sys.argv[1:5]


def post(path: str, body: dict | None) -> dict:
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read()
    except urllib.error.HTTPError as exc:
        sys.exit(f"{path}: HTTP {exc.code}: {exc.read()[:500]!r}")
    return json.loads(raw) if raw.strip() else {}


def words(seed: int, n: int) -> str:
    """n pseudo-random English-ish words (deterministic): prompts that tokenize to many tokens."""
    vocab = ["alpha", "router", "cache", "block", "token", "replica", "prefix", "engine", "event", "queue",
             "latency", "memory", "hash", "stream", "model", "request", "python", "return", "class", "import"]
    x = seed * 2654435761 % 2**32
    out = []
    for _ in range(n):
        x = (x * 1103515245 + 12345) % 2**31
        out.append(vocab[x % len(vocab)])
    return " ".join(out)


ctx = zmq.Context()
sub = ctx.socket(zmq.SUB)
sub.connect(endpoint)
sub.setsockopt(zmq.SUBSCRIBE, b"")
time.sleep(1.0)  # let the subscription reach the publisher
post("/reset_prefix_cache", None)  # start from an empty cache (needs VLLM_SERVER_DEV_MODE=1)
time.sleep(0.5)

system = "You are a helpful assistant. " + words(1, 120)
requests = [
    ("completions", {"prompt": words(2, 200), "max_tokens": 2}),
    ("completions", {"prompt": words(2, 200) + " " + words(3, 60), "max_tokens": 2}),  # extends the first
    ("completions", {"prompt": list(range(10, 10 + 100)), "max_tokens": 2}),  # token ids
    ("chat", {"messages": [{"role": "system", "content": system}, {"role": "user", "content": words(4, 40)}], "max_tokens": 2}),
    ("chat", {"messages": [{"role": "system", "content": system}, {"role": "user", "content": words(4, 40)},
                           {"role": "assistant", "content": "ok " + words(5, 10)}, {"role": "user", "content": words(6, 30)}],
              "max_tokens": 2}),
]
# long distinct prompts: more than the small KV cache holds, so earlier blocks are evicted
requests += [("completions", {"prompt": words(100 + k, 400), "max_tokens": 2}) for k in range(4)]

log = []
for kind, body in requests:
    body = dict(body, model="small-llama", return_token_ids=True)
    resp = post("/v1/completions" if kind == "completions" else "/v1/chat/completions", body)
    ids = resp.get("prompt_token_ids")
    if ids is None and resp.get("choices"):
        ids = resp["choices"][0].get("prompt_token_ids")
    log.append({"kind": kind, "body": body, "prompt_token_ids": ids, "usage": resp.get("usage")})
    time.sleep(0.3)
post("/reset_prefix_cache", None)  # AllBlocksCleared, published with the engine's next step:
post("/v1/completions", {"model": "small-llama", "prompt": "flush", "max_tokens": 1})
time.sleep(1.0)

frames = []
while sub.poll(500):
    frames.append([base64.b64encode(f).decode() for f in sub.recv_multipart()])
with urllib.request.urlopen(base + "/metrics", timeout=30) as r:
    metrics = [ln for ln in r.read().decode().splitlines() if ln.startswith(("vllm:prefix_cache", "vllm:cache_config_info"))]
json.dump({"frames": frames, "requests": log, "metrics": metrics}, open(out_path, "w"), indent=1)
print(f"{len(frames)} frames, {len(log)} requests -> {out_path}")
