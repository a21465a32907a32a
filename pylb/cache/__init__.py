"""pylb's semantic cache (issue 14): answers a request from an earlier answer to the same request,
or to one of the same meaning under the same context, without touching a replica.

Modules: `keys` (what may be cached and under which partition), `guards` (token-difference
checks beside the similarity threshold), `embedders` (text -> vector), `store` (entries, TTL, LRU,
exact and similarity lookups on the native core), `batcher` (micro-batched semantic lookups),
`verified` (per-entry thresholds learned online under an error bound) and `cache` (`SemanticCache`,
the one object the proxy calls).
"""
