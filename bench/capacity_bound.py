"""Upper bounds on what any routing policy can reach on a Mooncake trace and a hardware profile.

Design
------
Two bounds follow from the simulator's step-time model alone (pylb/sim/engine.py:
t = c0 + c_prefill * prefill_tokens + c_decode * decode_seqs + c_attn * context_tokens
+ c_prefill_attn * prefill_pairs), whatever
the placement:

* Work bound (throughput). A request costs its replica
      c_prefill * (P - H)  +  c_attn * (context after each prefill chunk)
        +  c_prefill_attn * (causal attention pairs of the P - H new tokens after H cached)
    + sum over its O - 1 decode steps of (c_decode + c_attn * context)
  replica-seconds, where P is the prompt, H its cached prefix and O its output. The per-step c0
  is shared by a whole batch and left out, so the bound is optimistic. N replicas can serve at
  most N / mean(work) requests per second, at 100 % utilisation. H comes from a cache model:
  "none" (H = 0), "infinite" (one cache that never forgets: the longest leading run of the
  request's Mooncake block ids seen before, capped at P - 1 like vLLM), or a measured token hit
  rate h applied to every prompt (prefill work scaled by 1 - h).
* SLO bound (attainment). A request cannot reach its first token faster than prefilling its
  uncached tokens on an idle replica: ceil((P - H) / B) steps of c0, plus the prefill and
  attention costs (B = max_num_batched_tokens). The share of requests whose idle-replica TTFT is
  within the SLO bounds every policy's attainment, at any rate.

Usage:
    python bench/capacity_bound.py --trace ../shared/traces/mooncake_conversation_trace.jsonl \
        --profile h100-llama3.1-8b --replicas 8 --slo-ttft 5 [--results RUNS.json ...]

With --results (JSON written by `pylb simulate --sweep --json`), each policy's measured capacity
is printed beside the work bound at its own hit rate (taken from its run nearest to capacity).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass

import numpy as np

from pylb.sim.profiles import Profile, load_profile, prefill_pairs

MOONCAKE_BLOCK_TOKENS = 512


@dataclass
class Trace:
    """Prompt and output lengths, and the cached prefix one infinite cache would give."""

    prompt: np.ndarray  # tokens
    output: np.ndarray  # tokens
    infinite_hit: np.ndarray  # tokens
    span_s: float


def load_mooncake(path: str) -> Trace:
    """Read a Mooncake JSONL trace and replay it through one never-forgetting prefix cache."""
    prompt, output, hit = [], [], []
    seen: set[int] = set()
    first = last = None
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            p = int(row["input_length"])
            ids = row["hash_ids"]
            run = 0
            for block_id in ids:  # ids name whole prefixes, so a leading run is a prefix hit
                if block_id not in seen:
                    break
                run += 1
            seen.update(ids)
            prompt.append(p)
            output.append(max(1, int(row["output_length"])))
            hit.append(min(run * MOONCAKE_BLOCK_TOKENS, p - 1))
            ts = float(row["timestamp"]) / 1000.0
            first = ts if first is None else first
            last = ts
    return Trace(np.array(prompt, float), np.array(output, float), np.array(hit, float), (last or 0.0) - (first or 0.0))


def prefill_work(profile: Profile, prompt: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Replica-seconds of prefill per request (no c0): token cost plus chunked attention."""
    new = prompt - hit
    chunks = np.ceil(new / profile.max_num_batched_tokens)
    # context after chunk k is hit + k*B (the last chunk ends at the prompt): sum over chunks
    attn_ctx = chunks * hit + profile.max_num_batched_tokens * chunks * (chunks + 1) / 2
    attn_ctx = np.minimum(attn_ctx, chunks * prompt)
    # causal attention pairs of the whole prefill (the chunks' pairs add up to the same total)
    pairs = prefill_pairs(new, hit)  # type: ignore[arg-type]  # numpy arrays work elementwise
    return profile.c_prefill * new + profile.c_attn * attn_ctx + profile.c_prefill_attn * pairs


def decode_work(profile: Profile, prompt: np.ndarray, output: np.ndarray) -> np.ndarray:
    """Replica-seconds of decode per request (no c0): O - 1 steps over a growing context."""
    steps = output - 1
    context = steps * prompt + steps * (steps + 1) / 2
    return profile.c_decode * steps + profile.c_attn * context


def idle_ttft(profile: Profile, prompt: np.ndarray, hit: np.ndarray, overhead: float = 0.0) -> np.ndarray:
    """TTFT of each request alone on an idle replica (its chunked prefill, with c0 per step),
    plus `overhead` seconds between dispatch and the engine's queue."""
    chunks = np.maximum(1.0, np.ceil((prompt - hit) / profile.max_num_batched_tokens))
    return overhead + chunks * profile.c0 + prefill_work(profile, prompt, hit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True, help="Mooncake JSONL trace")
    ap.add_argument("--profile", default="h100-llama3.1-8b", help="profile name or YAML file")
    ap.add_argument("--replicas", type=int, default=8)
    ap.add_argument("--slo-ttft", type=float, default=5.0)
    ap.add_argument("--results", nargs="*", default=[], help="`pylb simulate --sweep --json` outputs")
    args = ap.parse_args()

    profile = load_profile(args.profile)
    tr = load_mooncake(args.trace)
    n = len(tr.prompt)
    zero = np.zeros_like(tr.prompt)
    dec = decode_work(profile, tr.prompt, tr.output)
    pre0 = prefill_work(profile, tr.prompt, zero)
    pre_inf = prefill_work(profile, tr.prompt, tr.infinite_hit)
    trace_rate = n / tr.span_s if tr.span_s > 0 else float("nan")
    print(f"trace {args.trace}: {n} requests, {trace_rate:.2f} req/s; profile {profile.name}; {args.replicas} replicas")
    print(f"mean prompt {tr.prompt.mean():.0f} tokens, output {tr.output.mean():.0f}; "
          f"infinite-cache hit rate {tr.infinite_hit.sum() / tr.prompt.sum():.1%} of prompt tokens")
    print(f"mean work per request: prefill {pre0.mean():.3f} s (uncached), {pre_inf.mean():.3f} s (infinite cache); "
          f"decode {dec.mean():.3f} s")

    def bound(h: float) -> float:
        return args.replicas / float(np.mean(dec + (1.0 - h) * pre0))

    print("\nwork bound (req/s at 100 % utilisation, c0 left out):")
    print(f"  no cache        {args.replicas / float(np.mean(dec + pre0)):7.2f}")
    print(f"  infinite cache  {args.replicas / float(np.mean(dec + pre_inf)):7.2f}")
    for slo_hit, label in ((zero, "no cache"), (tr.infinite_hit, "infinite cache")):
        ok = float(np.mean(idle_ttft(profile, tr.prompt, slo_hit) <= args.slo_ttft))
        print(f"SLO bound ({label}): at most {ok:.1%} of requests can have TTFT <= {args.slo_ttft:g} s")

    for path in args.results:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        print(f"\n{path}:")
        print(f"  {'policy':34s} {'capacity':>9s} {'hit':>6s} {'bound at hit':>12s} {'of bound':>8s}")
        for policy, cap in sorted(data["capacity"].items(), key=lambda kv: -kv[1]):
            runs = [r for r in data["runs"] if r["policy"] == policy]
            if not runs:
                continue
            near = min(runs, key=lambda r: abs(r["qps"] - cap) if cap > 0 else r["qps"])
            h = float(near["hit_rate"])
            b = bound(h)
            share = f"{cap / b:.0%}" if cap > 0 and math.isfinite(b) else "-"
            print(f"  {policy:34s} {cap:9.2f} {h:6.1%} {b:12.2f} {share:>8s}")


if __name__ == "__main__":
    main()
