"""Semantic cache quality: precision and paraphrase hit rate per embedder and threshold policy.

How to read it: every distinct `a` of tests/data/cache_pairs.tsv is stored, every `b` looked up
(`pylb.cache.quality`); a hit is correct only for a paraphrase pair answered by its own `a`.
`hit%` = correct hits / paraphrase pairs, `prec` = correct hits / hits, then false hits by kind
(related, opposite, number, identifier, entity). `guards` = threshold and token-difference
guards (pylb's decision); `threshold` = the threshold alone (most semantic caches). Cross-tenant
false hits are zero by construction (a tenant is a partition; tests/test_cache_proxy.py).

The second table is the sequential stream (`pylb.cache.quality.evaluate_stream`): every distinct
text of the set arrives once, in a random order per seed, and is answered from the texts stored
before it; `fixed` is threshold + guards, `verified` the per-entry learned threshold under the
error bound `delta` (`pylb.cache.verified`), its candidates at or above `floor` (guards first):
`pooled xF` learns from the labels of all entries (the cache's way; the pooled curve widened by F
times ENTRY_SPREAD into each entry's prior), `per-entry` (`--per-entry`) from the entry's own only.
`opps` = texts whose paraphrase was stored before them, `hit%` = correct hits / opps, `false` =
false hits, `explore` = candidates sent to a replica for a label, `detect` = false hits found by
re-running `verify` of the hits; counts summed over the seeds.

    python bench/cache_quality.py                    # hashing, and minilm when the [minilm] extra is installed
    python bench/cache_quality.py --out bench/results/cache_quality.json
    python bench/cache_quality.py --seeds 50 --stream-threshold 0.85 --deltas 0.01,0.05,0.1 --verify-share 0.05
    python bench/cache_quality.py --embedders minilm --thresholds 0.85 --floors 0.7,0.8 --deltas 0.01,0.05 --per-entry --spreads 1,0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from pylb.cache.embedders import EmbedderError, HashingEmbedder, MiniLMEmbedder
from pylb.cache.quality import StreamOutcome, evaluate, evaluate_stream, load_pairs

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "cache_pairs.tsv"
KINDS = ("related", "opposite", "number", "identifier", "entity")
STREAM_KINDS = (*KINDS, "unrelated")


def stream_rows(
    pairs: list, vectors: dict, threshold: float, floors: list[float], deltas: list[float], share: float, seeds: int,
    spreads: tuple[float, ...] = (1.0,), per_entry: bool = False,
) -> list[StreamOutcome]:
    """The fixed policy at `threshold`, then the verified one for each floor and delta: per
    entry only (when `per_entry`), then pooled, once per spread."""
    rows = [evaluate_stream(pairs, vectors, "fixed", threshold, seeds)]
    for floor in floors:
        for delta in deltas:
            if per_entry:
                rows.append(evaluate_stream(pairs, vectors, "verified", floor, seeds, max_error_rate=delta, verify_share=share, pooled=False))
            for spread in spreads:
                rows.append(evaluate_stream(pairs, vectors, "verified", floor, seeds, max_error_rate=delta, verify_share=share, spread=spread))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(DATA))
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95")
    ap.add_argument("--seeds", type=int, default=20, help="random orders of the stream")
    ap.add_argument("--stream-threshold", type=float, default=0.85, help="the fixed policy's threshold, and the verified policy's first floor")
    ap.add_argument("--floors", default="", help="more floors for the verified policy (comma-separated), e.g. 0.7")
    ap.add_argument("--deltas", default="0.01,0.05,0.1", help="max error rates of the verified policy")
    ap.add_argument("--verify-share", type=float, default=0.05, help="share of hits re-run for a label")
    ap.add_argument("--spreads", default="1", help="the verified policy's ENTRY_SPREAD, scaled (comma-separated factors; 0: the pooled curve alone)")
    ap.add_argument("--per-entry", action="store_true", help="also the verified policy without the pool (every entry learns from its own labels only)")
    ap.add_argument("--embedders", default="hashing,minilm", help="comma-separated: hashing, minilm (skipped, with a note, when the [minilm] extra is missing)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pairs = load_pairs(args.pairs)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    names = [n.strip() for n in args.embedders.split(",") if n.strip()]
    embedders: list = [HashingEmbedder(384)] if "hashing" in names else []
    if "minilm" in names:
        try:
            embedders.append(MiniLMEmbedder())
        except EmbedderError as exc:
            print(f"(minilm skipped: {exc})", file=sys.stderr)
    print(f"{len(pairs)} pairs ({sum(p.same for p in pairs)} paraphrases), load average {os.getloadavg()[0]:.2f}")
    results = []
    for emb in embedders:
        a = asyncio.run(emb.embed([p.a for p in pairs]))
        b = asyncio.run(emb.embed([p.b for p in pairs]))
        print(f"\n{emb.name}\n{'policy':<10} {'thr':>5} {'hit%':>6} {'prec':>6} {'hits':>5}  " + " ".join(f"{k:>10}" for k in KINDS))
        for o in evaluate(pairs, a, b, thresholds):
            policy = "guards" if o.guards else "threshold"
            print(f"{policy:<10} {o.threshold:>5.2f} {100 * o.hit_rate:>5.1f}% {o.precision:>6.3f} {o.hits:>5}  "
                  + " ".join(f"{o.false_hits.get(k, 0):>10}" for k in KINDS))  # fmt: skip
            results.append({"embedder": emb.name, "policy": policy, "threshold": o.threshold, "hit_rate": o.hit_rate,
                            "precision": o.precision, "hits": o.hits, "false_hits": o.false_hits})  # fmt: skip
        vectors = {**{p.a: a[i] for i, p in enumerate(pairs)}, **{p.b: b[i] for i, p in enumerate(pairs)}}
        floors = [args.stream_threshold] + [float(f) for f in args.floors.split(",") if f]
        deltas = [float(d) for d in args.deltas.split(",")]
        print(f"\n{emb.name}, stream: every distinct text once, {args.seeds} random orders (counts summed)")
        print(f"{'policy':<16} {'floor':>5} {'delta':>5} {'verify':>6} {'lookups':>7} {'opps':>5} {'hit%':>6} {'prec':>6} {'hits':>5} {'false':>5} "
              f"{'explore':>7} {'labels':>6} {'detect':>6}  " + " ".join(f"{k:>10}" for k in STREAM_KINDS))  # fmt: skip
        spreads = tuple(float(x) for x in args.spreads.split(","))
        for o in stream_rows(pairs, vectors, args.stream_threshold, floors, deltas, args.verify_share, args.seeds, spreads, args.per_entry):
            delta = f"{o.max_error_rate:>5.2f}" if o.policy == "verified" else f"{'-':>5}"
            name = o.policy if o.policy == "fixed" else (f"pooled x{o.spread:g}" if o.pooled else "per-entry")
            print(f"{name:<16} {o.threshold:>5.2f} {delta} {o.verify_share:>6.2f} {o.lookups:>7} {o.opportunities:>5} {100 * o.hit_rate:>5.1f}% "
                  f"{o.precision:>6.3f} {o.hits:>5} {o.false:>5} {o.explorations:>7} {o.labels:>6} {o.detected:>6}  "
                  + " ".join(f"{o.false_hits.get(k, 0):>10}" for k in STREAM_KINDS))  # fmt: skip
            results.append({"embedder": emb.name, "stream": True, "policy": o.policy, "pooled": o.pooled, "spread": o.spread, "floor": o.threshold, "max_error_rate": o.max_error_rate,
                            "verify_share": o.verify_share, "seeds": o.seeds, "lookups": o.lookups, "opportunities": o.opportunities,
                            "hits": o.hits, "correct": o.correct, "hit_rate": o.hit_rate, "precision": o.precision, "explorations": o.explorations,
                            "labels": o.labels, "detected": o.detected, "false_hits": o.false_hits})  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "pairs": os.path.relpath(args.pairs), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
