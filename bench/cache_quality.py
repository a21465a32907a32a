"""Semantic cache quality: precision and paraphrase hit rate per embedder and threshold policy.

How to read it: every distinct `a` of tests/data/cache_pairs.tsv is stored, every `b` looked up
(`pylb.cache.quality`); a hit is correct only for a paraphrase pair answered by its own `a`.
`hit%` = correct hits / paraphrase pairs, `prec` = correct hits / hits, then false hits by kind
(related, opposite, number, identifier, entity). `guards` = threshold and token-difference
guards (pylb's decision); `threshold` = the threshold alone (most semantic caches). Cross-tenant
false hits are zero by construction (a tenant is a partition; tests/test_cache_proxy.py).

    python bench/cache_quality.py                    # hashing, and minilm when the [minilm] extra is installed
    python bench/cache_quality.py --out bench/results/cache_quality.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from pylb.cache.embedders import EmbedderError, HashingEmbedder, MiniLMEmbedder
from pylb.cache.quality import evaluate, load_pairs

DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "cache_pairs.tsv"
KINDS = ("related", "opposite", "number", "identifier", "entity")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default=str(DATA))
    ap.add_argument("--thresholds", default="0.5,0.6,0.7,0.75,0.8,0.85,0.9,0.95")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    pairs = load_pairs(args.pairs)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    embedders = [HashingEmbedder(384)]
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
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "pairs": args.pairs, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
