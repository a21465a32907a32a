"""Routing policies, one module each (STYLE.md 1): each registers a `pylb.router.policy.Policy`
subclass by its kebab-case name with `@pylb.router.registry.register`.

Built in (see each module's design comment for the algorithm, its parameters and sources):

    round-robin      replicas in turn
    least-load       fewest requests queued plus in flight
    consistent-hash  one hash ring on the prefix key (DualMap's cache-affinity baseline)
    min-ttft         lowest predicted TTFT over all replicas
    dualmap          two candidates from two rings on the adaptive prefix key, the better cached
                     one unless it would break slo/2, hotspot migration (the default)

    chwbl            KubeAI's consistent hashing with bounded loads
    cache-aware      SGLang router's approximate prefix tree with load thresholds
    weighted-score   llm-d's default endpoint picker (queue 2 : kv-cache 2 : prefix 3)
    preble-e2        Preble's E2 (exploit / explore, rebalance at 1.5x)

Every one runs behind the same router core (`pylb.router.core`: queues, dispatch budgets, cache
mirror, TTFT model, migration for policies that ask for it), so comparisons are about placement.
`pylb.router.registry.BUILTIN_MODULES` lists the modules to import.
"""

DEFAULT_POLICY = "dualmap"
"""The policy a router gets when none is named."""
