"""Metrics of simulation runs (DESIGN.md §1) and the effective-capacity sweep.

Design
------
Per run (`summarize`):
  * qps: offered request rate = requests / (last arrival - first arrival), after rate scaling.
  * ttft_p50/p90/p99: percentiles (linear interpolation) of TTFT = first token - arrival, over
    the requests that got a first token; router queueing counts.
  * slo_attainment: fraction of *all* requests with TTFT <= SLO (a request without a first
    token misses).
  * hit_rate: token-weighted prefix-cache hit rate = sum(cached prompt tokens) / sum(prompt
    tokens) over completed requests, the ratio vLLM's `prefix_cache_hits / queries` gives.
  * hotspot_factor: replicas x the busiest replica's share of dispatched requests (1.0 = even
    spread, N = everything on one replica).

Effective request capacity (`find_capacity`): the highest qps at which slo_attainment >= 0.9
(DualMap's definition, SLO 5 s by default). Search on the rate scale: start at `start`, double
(or halve) until the target is bracketed, then bisect geometrically until the bracket is within
`rel_tol` or `max_runs` runs were made. Halving stops early when half the load changes neither
attainment nor median TTFT (the cluster is idle enough already): then no rate meets the target
(long prompts alone may take longer than the SLO) and the capacity is 0. Attainment is not strictly monotone in the rate (cache
reuse changes with the load), so the capacity reported is the largest qps among the runs that
met the target, and every run is kept for the record.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from pylb.router.interface import DEFAULT_SLO_TTFT  # the TTFT target, written once (RouterOptions.slo_ttft)

from .cluster import SimResult

__all__ = ["DEFAULT_SLO_TARGET", "DEFAULT_SLO_TTFT", "RunMetrics", "find_capacity", "meets_slo", "plot_attainment", "summarize"]

DEFAULT_SLO_TARGET = 0.9
"""Fraction of requests that must meet the TTFT target for a rate to count as sustained."""

RUN_FIELDS = (
    "policy",
    "rate_scale",
    "qps",
    "requests",
    "completed",
    "ttft_p50",
    "ttft_p90",
    "ttft_p99",
    "slo_attainment",
    "hit_rate",
    "hotspot_factor",
)
"""Keys of one run in `pylb simulate --json` output, in order."""


@dataclass
class RunMetrics:
    """The section-1 metrics of one simulation run (see the module docstring)."""

    policy: str
    rate_scale: float
    qps: float
    requests: int
    completed: int
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    slo_attainment: float
    hit_rate: float
    hotspot_factor: float
    wall_s: float = 0.0

    def to_json(self) -> dict[str, object]:
        """The run as the JSON object of `pylb simulate --json` (the keys of RUN_FIELDS)."""
        d = asdict(self)
        return {k: _json_number(d[k]) for k in RUN_FIELDS}


def _json_number(v: object) -> object:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def offered_qps(arrival: np.ndarray) -> float:
    """Requests per second of an arrival-time array: n / (last - first); inf if they coincide."""
    a = arrival[~np.isnan(arrival)]
    if len(a) == 0:
        return 0.0
    span = float(a.max() - a.min())
    return len(a) / span if span > 0 else math.inf


def summarize(result: SimResult, policy: str, slo_ttft: float = DEFAULT_SLO_TTFT) -> RunMetrics:
    """The metrics of one run (see the module docstring for each definition)."""
    n = result.num_requests
    ttft = result.ttft
    got = ttft[~np.isnan(ttft)]
    p50: float | None
    p90: float | None
    p99: float | None
    if len(got):
        p50, p90, p99 = (float(x) for x in np.percentile(got, [50, 90, 99]))
    else:
        p50 = p90 = p99 = None  # no first token at all: reported as null
    completed_mask = ~np.isnan(result.completion)
    prompt = int(result.prompt_tokens[completed_mask].sum())
    hit = int(result.cached_tokens[completed_mask].sum()) / prompt if prompt else 0.0
    dispatched = result.replica[result.replica >= 0]
    if len(dispatched):
        counts = np.bincount(dispatched, minlength=len(result.replicas))
        hotspot = len(result.replicas) * float(counts.max()) / len(dispatched)
    else:
        hotspot = 0.0
    return RunMetrics(
        policy=policy,
        rate_scale=result.rate_scale,
        qps=offered_qps(result.arrival),
        requests=n,
        completed=int(completed_mask.sum()),
        ttft_p50=p50,
        ttft_p90=p90,
        ttft_p99=p99,
        slo_attainment=float((got <= slo_ttft).sum()) / n if n else 0.0,
        hit_rate=hit,
        hotspot_factor=hotspot,
        wall_s=result.wall_s,
    )


def meets_slo(m: RunMetrics, target: float = DEFAULT_SLO_TARGET) -> bool:
    """True when at least `target` of the run's requests met the TTFT SLO."""
    return m.slo_attainment >= target


def _plateau(a: RunMetrics, b: RunMetrics) -> bool:
    """Run b (at half a's load) is no better than a: same attainment and median TTFT within 1 %."""
    if b.slo_attainment > a.slo_attainment + 0.001 or a.ttft_p50 is None or b.ttft_p50 is None:
        return False
    return abs(a.ttft_p50 - b.ttft_p50) <= 0.01 * max(a.ttft_p50, b.ttft_p50)


def find_capacity(
    run_at: Callable[[float], RunMetrics],
    *,
    start: float = 1.0,
    target: float = DEFAULT_SLO_TARGET,
    max_runs: int = 8,
    rel_tol: float = 0.05,
    max_scale: float = 1024.0,
    min_scale: float = 1.0 / 1024,
) -> tuple[float, list[RunMetrics]]:
    """Search the rate scale for the effective request capacity.

    `run_at(scale)` runs one simulation and returns its metrics. Returns (capacity in qps, the
    runs in the order they were made); capacity is 0.0 when no run met the target.
    """
    if max_runs < 1:
        raise ValueError(f"max_runs must be >= 1, got {max_runs}")
    runs: list[RunMetrics] = []

    def run(scale: float) -> bool:
        m = run_at(scale)
        runs.append(m)
        return meets_slo(m, target)

    lo: float | None = None  # largest scale known to pass
    hi: float | None = None  # smallest scale known to fail
    scale = start
    if run(scale):
        lo = scale
        while len(runs) < max_runs and scale * 2 <= max_scale:
            scale *= 2
            if run(scale):
                lo = scale
            else:
                hi = scale
                break
    else:
        hi = scale
        while len(runs) < max_runs and scale / 2 >= min_scale:
            prev = runs[-1]
            scale /= 2
            if run(scale):
                lo = scale
                break
            hi = scale
            if _plateau(prev, runs[-1]):
                break  # half the load changed nothing: the target is out of reach at any rate
    while lo is not None and hi is not None and len(runs) < max_runs and hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if run(mid):
            lo = mid
        else:
            hi = mid
    passing = [m.qps for m in runs if meets_slo(m, target)]
    return (max(passing) if passing else 0.0), runs


def plot_attainment(
    runs: list[RunMetrics],
    path: str,
    *,
    target: float = DEFAULT_SLO_TARGET,
    slo_ttft: float = DEFAULT_SLO_TTFT,
    title: str = "",
) -> None:
    """Save a PNG of SLO attainment against offered QPS, one line per policy (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        policies = sorted({m.policy for m in runs})
        for policy in policies:
            pts = sorted((m.qps, 100.0 * m.slo_attainment) for m in runs if m.policy == policy and math.isfinite(m.qps))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=policy)
        ax.axhline(100.0 * target, color="grey", linestyle="--", linewidth=1, label=f"{target:.0%} target")
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(f"requests with TTFT <= {slo_ttft:g} s (%)")
        ax.set_ylim(0, 102)
        ax.grid(True, alpha=0.3)
        if title:
            ax.set_title(title)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
