"""Routing policies, one module each (STYLE.md 1): each registers a `pylb.router.policy.Policy`
subclass by its kebab-case name with `@pylb.router.registry.register`.

Built in (see each module's design comment for the algorithm, its parameters and sources):

    round-robin      replicas in turn
    least-load       fewest requests queued plus in flight
    consistent-hash  one hash ring on the prefix key (DualMap's cache-affinity baseline)
    min-ttft         lowest predicted TTFT over all replicas
    dualmap          two candidates from two rings on the adaptive prefix key, the better cached
                     one unless it would break slo/2, hotspot migration (the default)

plus the baselines of issue 4 (chwbl, cache-aware, weighted-score, preble-e2) in their own
modules. `pylb.router.registry.BUILTIN_MODULES` lists the modules to import.
"""

DEFAULT_POLICY = "dualmap"
"""The policy a router gets when none is named."""
