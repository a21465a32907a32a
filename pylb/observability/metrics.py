"""pylb's own Prometheus metrics (`pylb_*`), served at pylb's `/metrics`.

Design
------
Two kinds of series, in one `CollectorRegistry` per proxy (several proxies can live in one
process, as in the tests; nothing goes to prometheus-client's global registry):

* Event series, updated where the event happens (`ProxyMetrics` attributes): request outcomes,
  routing decisions by branch, retries, ejections, upstream and background errors, latency
  histograms. They are plain Python numbers (`Counts`, `Hist`), exported by a collector at
  scrape time: an update on the request path is a dict lookup and an add, with no lock (the
  proxy is one event-loop thread; prometheus-client's own metric objects take a lock per update
  and scan histogram buckets in Python).
* State series, read at scrape time from the live proxy through a `snapshot` callable
  (`ProxySnapshot`): queue depth, per-replica in-flight and un-prefilled work, health, scraped
  cache usage, predicted and observed prefix-cache hit rates, hotspot factor. Nothing on the
  request path updates them; the proxy's own accounting (which it keeps anyway) is the source.

The series are listed, with their meaning, in docs/serve.md ("Metrics"); `SERIES` below is the
same list, and a test checks that both name every series the registry exposes.

Hit rates: *observed* = increase of `vllm:prefix_cache_hits_total` / increase of
`vllm:prefix_cache_queries_total` over pylb's lifetime (token-weighted, from the replicas' own
counters, counter resets handled); *predicted* = the prompt tokens the router expected cached
at dispatch (`Dispatch.cached_tokens`, when the router reports it) / prompt tokens dispatched.
Both are also exported as raw counters so that dashboards can take windowed ratios. A ratio
whose denominator is still 0 (an idle replica, a fresh proxy) is not exported at all, never as
NaN: the series appears with the first query or dispatch.
Hotspot factor = replicas x the busiest replica's share of the last `HOTSPOT_WINDOW` dispatches
(1.0 is a perfect spread; N means one replica got everything).

Several workers (`pylb serve --server-workers N`, docs/serve.md "Several workers"): each worker
process has its own proxy, and the kernel hands a scrape to any one of them, so every worker
must answer for all. `share_with_workers(folder, worker)` turns that on in a worker before its
proxy is made:

* Event series use prometheus-client's multiprocess mode: the parent sets
  PROMETHEUS_MULTIPROC_DIR before it starts the workers; each `Counts`/`Hist` update is also
  written to this process's memory-mapped file, and `MultiProcessCollector` sums every
  worker's files at scrape time. Exact at every scrape, and monotone: a worker that exits
  leaves its file, so its counts stay in the sums.
* State series are not events but the state of each worker's router and fleet, and some of
  them cannot be summed (a hit rate is a ratio; every worker scrapes the same replica
  counters, so summing `observed` would count each token N times). Each worker publishes its
  `ProxySnapshot` as JSON in the folder every `PUBLISH_INTERVAL_S` and whenever it answers a
  scrape; the answering worker merges its fresh snapshot with the others' (`merge_snapshots`:
  queue depth, in-flight and un-prefilled work and event-loop tasks summed over live workers; dispatch counters
  summed over all workers, exited ones included; observed cache counters the largest any
  worker saw; a replica healthy only when every live worker has it in rotation; scraped
  replica gauges from the freshest worker; hotspot factor the worst live worker's), and
  exports the merge under the same names and labels as one worker would, ratios recomputed
  from the merged counters. Other workers' state is up to `PUBLISH_INTERVAL_S` old.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pylb.router.driver import HOTSPOT_WINDOW

from prometheus_client import CollectorRegistry, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from prometheus_client.registry import Collector

CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
"""Content-Type of the `/metrics` page."""

LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0,
)  # fmt: skip
"""Buckets of the TTFT, end-to-end and queue-wait histograms (vLLM's TTFT buckets)."""

DECISION_BUCKETS: tuple[float, ...] = (
    1e-6, 2e-6, 5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 0.1,
)  # fmt: skip
"""Buckets of the routing-decision latency histogram (seconds)."""

SERIES: dict[str, str] = {
    "pylb_requests_total": "requests answered, by endpoint and HTTP status (499: the client went away; 502 also counts streams that broke mid-way)",
    "pylb_requests_in_progress": "requests being served now",
    "pylb_decisions_total": "routing decisions by branch (affinity, slo-switch, spill, load, migration, retry, fallback; 'unknown' when the router does not say)",
    "pylb_retries_total": "requests re-sent to another replica before their first byte, by reason",
    "pylb_ejections_total": "replicas taken out of rotation, by replica and reason (probe, connect, 5xx)",
    "pylb_upstream_errors_total": "failed exchanges with replicas, by replica and kind (connect, timeout, status, stream, truncated: a stream ended without [DONE])",
    "pylb_scrape_errors_total": "failed /metrics scrapes, by replica",
    "pylb_background_errors_total": "unexpected failures of background tasks, by task (they are logged and the task goes on)",
    "pylb_ttft_seconds": "time to first token seen by pylb (arrival to first streamed chunk), streamed requests",
    "pylb_e2e_seconds": "arrival to last byte, by endpoint",
    "pylb_queue_wait_seconds": "time requests waited in pylb's router-side queue",
    "pylb_routing_decision_seconds": "router CPU time per routing event (submit plus poll)",
    "pylb_queue_depth": "requests waiting in pylb's router-side queues",
    "pylb_event_loop_tasks": "asyncio tasks alive in pylb's event loop (summed over workers): flat under steady load, back to its idle count after; growth is a leak",
    "pylb_replica_healthy": "1 when the replica is in rotation, else 0",
    "pylb_replica_inflight_requests": "requests dispatched to the replica and not finished",
    "pylb_replica_unprefilled_requests": "dispatched requests whose first token has not come yet",
    "pylb_replica_unprefilled_tokens": "their prompt tokens not expected cached (router estimate)",
    "pylb_replica_dispatched_total": "requests dispatched to the replica",
    "pylb_replica_dispatched_prompt_tokens_total": "estimated prompt tokens dispatched to the replica",
    "pylb_replica_predicted_cached_tokens_total": "of those, tokens the router expected cached",
    "pylb_replica_prefix_cache_queries_total": "increase of the replica's vllm:prefix_cache_queries_total seen by pylb (tokens)",
    "pylb_replica_prefix_cache_hits_total": "increase of the replica's vllm:prefix_cache_hits_total seen by pylb (tokens)",
    "pylb_replica_kv_cache_usage": "last scraped vllm:kv_cache_usage_perc (fraction)",
    "pylb_replica_num_requests_running": "last scraped vllm:num_requests_running",
    "pylb_replica_num_requests_waiting": "last scraped vllm:num_requests_waiting",
    "pylb_observed_prefix_cache_hit_rate": "per replica: hits / queries increase since pylb started (replica='fleet': all replicas)",
    "pylb_predicted_prefix_cache_hit_rate": "per replica: predicted cached / dispatched prompt tokens (replica='fleet': all replicas)",
    "pylb_hotspot_factor": f"replicas x busiest replica's share of the last {HOTSPOT_WINDOW} dispatches",
    "pylb_ttft_prediction_error_seconds": "quantiles (0.5, 0.9) of the absolute error of the predicted against the observed TTFT (submit to first token) over the router's recent first tokens",
}
"""Every series pylb exposes, with its meaning (the docs list the same)."""


@dataclass(slots=True)
class ReplicaLoad:
    """The proxy's own accounting of one replica, kept by the dispatcher at dispatch time."""

    inflight: int = 0
    unprefilled_requests: int = 0
    unprefilled_tokens: int = 0
    dispatched: int = 0
    dispatched_prompt_tokens: int = 0
    predicted_cached_tokens: int = 0


@dataclass(slots=True)
class ReplicaSnapshot:
    """State of one replica at scrape time, as the proxy knows it."""

    replica: str
    healthy: bool
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    observed_queries: int = 0
    observed_hits: int = 0
    kv_cache_usage: float | None = None
    running: int | None = None
    waiting: int | None = None


@dataclass(slots=True)
class ProxySnapshot:
    """State of the whole proxy at scrape time."""

    queue_depth: int = 0
    in_progress: int = 0
    hotspot_factor: float = 0.0
    predicted_known: bool = False
    replicas: Sequence[ReplicaSnapshot] = field(default_factory=list)
    ttft_prediction_error: tuple[float, float] | None = None
    event_loop_tasks: int = 0


def _add_ratio(family: GaugeMetricFamily, labels: list[str], num: float, den: float) -> None:
    """Add num / den to `family`, or nothing while den is 0: a hit rate over zero tokens is
    undefined, and a missing sample says so where a NaN would break sums and alerts."""
    if den > 0:
        family.add_metric(labels, num / den)


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], ProxySnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()

        def gauge(name: str, labels: Sequence[str] = ("replica",)) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, SERIES[name], labels=list(labels))

        def counter(name: str) -> CounterMetricFamily:
            return CounterMetricFamily(name.removesuffix("_total"), SERIES[name], labels=["replica"])

        g = GaugeMetricFamily("pylb_queue_depth", SERIES["pylb_queue_depth"], value=s.queue_depth)
        yield g
        yield GaugeMetricFamily("pylb_requests_in_progress", SERIES["pylb_requests_in_progress"], value=s.in_progress)
        yield GaugeMetricFamily("pylb_hotspot_factor", SERIES["pylb_hotspot_factor"], value=s.hotspot_factor)
        yield GaugeMetricFamily("pylb_event_loop_tasks", SERIES["pylb_event_loop_tasks"], value=s.event_loop_tasks)
        if s.ttft_prediction_error is not None:
            err = gauge("pylb_ttft_prediction_error_seconds", ("quantile",))
            for q, v in zip(("0.5", "0.9"), s.ttft_prediction_error):
                err.add_metric([q], v)
            yield err
        healthy = gauge("pylb_replica_healthy")
        inflight = gauge("pylb_replica_inflight_requests")
        unpre = gauge("pylb_replica_unprefilled_requests")
        unpre_tok = gauge("pylb_replica_unprefilled_tokens")
        kv = gauge("pylb_replica_kv_cache_usage")
        running = gauge("pylb_replica_num_requests_running")
        waiting = gauge("pylb_replica_num_requests_waiting")
        dispatched = counter("pylb_replica_dispatched_total")
        disp_tok = counter("pylb_replica_dispatched_prompt_tokens_total")
        pred_tok = counter("pylb_replica_predicted_cached_tokens_total")
        queries = counter("pylb_replica_prefix_cache_queries_total")
        hits = counter("pylb_replica_prefix_cache_hits_total")
        observed = gauge("pylb_observed_prefix_cache_hit_rate")
        predicted = gauge("pylb_predicted_prefix_cache_hit_rate")
        tq = th = tp = tc = 0
        for r in s.replicas:
            lab = [r.replica]
            healthy.add_metric(lab, 1.0 if r.healthy else 0.0)
            inflight.add_metric(lab, r.load.inflight)
            unpre.add_metric(lab, r.load.unprefilled_requests)
            unpre_tok.add_metric(lab, r.load.unprefilled_tokens)
            dispatched.add_metric(lab, r.load.dispatched)
            disp_tok.add_metric(lab, r.load.dispatched_prompt_tokens)
            queries.add_metric(lab, r.observed_queries)
            hits.add_metric(lab, r.observed_hits)
            _add_ratio(observed, lab, r.observed_hits, r.observed_queries)
            if s.predicted_known:
                pred_tok.add_metric(lab, r.load.predicted_cached_tokens)
                _add_ratio(predicted, lab, r.load.predicted_cached_tokens, r.load.dispatched_prompt_tokens)
            if r.kv_cache_usage is not None:
                kv.add_metric(lab, r.kv_cache_usage)
            if r.running is not None:
                running.add_metric(lab, r.running)
            if r.waiting is not None:
                waiting.add_metric(lab, r.waiting)
            tq += r.observed_queries
            th += r.observed_hits
            tp += r.load.dispatched_prompt_tokens
            tc += r.load.predicted_cached_tokens
        _add_ratio(observed, ["fleet"], th, tq)
        if s.predicted_known:
            _add_ratio(predicted, ["fleet"], tc, tp)
        yield from (healthy, inflight, unpre, unpre_tok, kv, running, waiting, dispatched, disp_tok, pred_tok, queries, hits, observed, predicted)


class Counts:
    """A counter family kept as plain integers by label values (no lock: the proxy is one thread)."""

    __slots__ = ("name", "help", "labels", "values", "shared")

    def __init__(self, name: str, help: str, labels: Sequence[str]) -> None:
        self.name = name
        self.help = help
        self.labels = list(labels)
        self.values: dict[tuple[str, ...], float] = {}
        self.shared: Any = None  # prometheus_client.Counter writing to the workers' folder, when shared

    def share(self) -> None:
        """Also write every update to prometheus-client's multiprocess files (several workers)."""
        from prometheus_client import Counter

        self.shared = Counter(self.name, self.help, self.labels, registry=None)

    def inc(self, *labels: str, amount: float = 1) -> None:
        """Add `amount` to the series of `labels`."""
        self.values[labels] = self.values.get(labels, 0) + amount
        if self.shared is not None:
            (self.shared.labels(*labels) if labels else self.shared).inc(amount)

    def get(self, *labels: str) -> float:
        """The value of the series of `labels` (0 when never counted)."""
        return self.values.get(labels, 0)

    def family(self) -> CounterMetricFamily:
        """The family for the exposition."""
        fam = CounterMetricFamily(self.name.removesuffix("_total"), self.help, labels=self.labels)
        for labels, v in self.values.items():
            fam.add_metric(list(labels), v)
        return fam


class Hist:
    """A histogram family kept as plain lists by label values (bucket found by bisection)."""

    __slots__ = ("name", "help", "labels", "bounds", "series", "shared")

    def __init__(self, name: str, help: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self.name = name
        self.help = help
        self.labels = list(labels)
        self.bounds = list(buckets)
        self.series: dict[tuple[str, ...], list[float]] = {}  # bucket counts..., count, sum
        self.shared: Any = None  # prometheus_client.Histogram writing to the workers' folder, when shared

    def share(self) -> None:
        """Also write every observation to prometheus-client's multiprocess files (several workers)."""
        from prometheus_client import Histogram

        self.shared = Histogram(self.name, self.help, self.labels, registry=None, buckets=self.bounds)

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation in the series of `labels`."""
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = [0.0] * (len(self.bounds) + 3)
        s[bisect_left(self.bounds, value)] += 1
        s[-2] += 1
        s[-1] += value
        if self.shared is not None:
            (self.shared.labels(*labels) if labels else self.shared).observe(value)

    def count(self, *labels: str) -> float:
        """Observations recorded in the series of `labels`."""
        s = self.series.get(labels)
        return s[-2] if s else 0

    def family(self) -> HistogramMetricFamily:
        """The family for the exposition (cumulative buckets, +Inf, sum)."""
        fam = HistogramMetricFamily(self.name, self.help, labels=self.labels)
        for labels, s in self.series.items():
            acc = 0.0
            buckets = []
            for bound, c in zip(self.bounds, s):
                acc += c
                buckets.append((floatToGoString(bound), acc))
            buckets.append(("+Inf", s[-2]))
            fam.add_metric(list(labels), buckets, s[-1])
        return fam


class ProxyMetrics:
    """The `pylb_*` series of one proxy (see the module comment and `SERIES`).

    Event series are plain Python counters and histograms (`Counts`, `Hist`): the proxy runs on one
    event-loop thread, so they need no lock, and an update costs a dict lookup and an add.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counts("pylb_requests_total", SERIES["pylb_requests_total"], ["endpoint", "code"])
        self.decisions = Counts("pylb_decisions_total", SERIES["pylb_decisions_total"], ["branch"])
        self.retries = Counts("pylb_retries_total", SERIES["pylb_retries_total"], ["reason"])
        self.ejections = Counts("pylb_ejections_total", SERIES["pylb_ejections_total"], ["replica", "reason"])
        self.upstream_errors = Counts("pylb_upstream_errors_total", SERIES["pylb_upstream_errors_total"], ["replica", "kind"])
        self.scrape_errors = Counts("pylb_scrape_errors_total", SERIES["pylb_scrape_errors_total"], ["replica"])
        self.background_errors = Counts("pylb_background_errors_total", SERIES["pylb_background_errors_total"], ["task"])
        self.ttft = Hist("pylb_ttft_seconds", SERIES["pylb_ttft_seconds"], ["endpoint"], LATENCY_BUCKETS)
        self.e2e = Hist("pylb_e2e_seconds", SERIES["pylb_e2e_seconds"], ["endpoint"], LATENCY_BUCKETS)
        self.queue_wait = Hist("pylb_queue_wait_seconds", SERIES["pylb_queue_wait_seconds"], [], LATENCY_BUCKETS)
        self.decision_seconds = Hist("pylb_routing_decision_seconds", SERIES["pylb_routing_decision_seconds"], [], DECISION_BUCKETS)
        self._event_families: list[Counts | Hist] = [
            self.requests, self.decisions, self.retries, self.ejections, self.upstream_errors, self.scrape_errors,
            self.background_errors, self.ttft, self.e2e, self.queue_wait, self.decision_seconds,
        ]  # fmt: skip
        self.registry.register(_EventCollector(self._event_families))
        self._snapshot: Callable[[], ProxySnapshot] | None = None
        self.workers = _worker_share
        if self.workers is not None:
            for f in self._event_families:
                f.share()

    def attach(self, snapshot: Callable[[], ProxySnapshot]) -> None:
        """Register the state series, read from `snapshot()` at every scrape."""
        self._snapshot = snapshot
        self.registry.register(_StateCollector(snapshot))

    def publish(self) -> None:
        """With several workers: write this worker's state for the others' scrapes (no-op otherwise)."""
        if self.workers is not None and self._snapshot is not None:
            self.workers.publish(self._snapshot())

    def count_request(self, endpoint: str, code: int) -> None:
        """One request answered (every accepted request is counted exactly once)."""
        self.requests.inc(endpoint, str(code))

    def count_decision(self, branch: str) -> None:
        """One routing decision of `branch`."""
        self.decisions.inc(branch)

    def count_retry(self, reason: str) -> None:
        """One request re-sent after `reason` (connect, timeout, status, stream)."""
        self.retries.inc(reason)

    def count_ejection(self, replica: str, reason: str) -> None:
        """A replica taken out of rotation."""
        self.ejections.inc(replica, reason)

    def count_upstream_error(self, replica: str, kind: str) -> None:
        """A failed exchange with a replica."""
        self.upstream_errors.inc(replica, kind)

    def count_scrape_error(self, replica: str) -> None:
        """A failed scrape of a replica's /metrics."""
        self.scrape_errors.inc(replica)

    def count_background_error(self, task: str) -> None:
        """An unexpected exception in a background task."""
        self.background_errors.inc(task)

    def observe_ttft(self, endpoint: str, seconds: float) -> None:
        """TTFT of a streamed request."""
        self.ttft.observe(seconds, endpoint)

    def observe_e2e(self, endpoint: str, seconds: float) -> None:
        """End-to-end latency of a request."""
        self.e2e.observe(seconds, endpoint)

    def render(self) -> bytes:
        """The `/metrics` page (with several workers: all workers' series, see the module comment)."""
        if self.workers is None or self._snapshot is None:
            return generate_latest(self.registry)
        from prometheus_client.multiprocess import MultiProcessCollector

        own = self._snapshot()
        self.workers.publish(own)
        merged = merge_snapshots([(own, True), *self.workers.others()])
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, self.workers.folder)
        registry.register(_StateCollector(lambda: merged))
        return generate_latest(registry)


class _EventCollector(Collector):
    def __init__(self, families: list[Counts | Hist]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for f in self._families:
            yield f.family()


# ---- several workers (see the module comment) ----------------------------------------------------

PUBLISH_INTERVAL_S = 1.0
"""How often each worker of `pylb serve --server-workers N` publishes its state series."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's multiprocess folder; set by the parent before the workers start."""


class WorkerShare:
    """One worker's view of the folder the workers share: its own state file, the others'."""

    def __init__(self, folder: str, worker: int) -> None:
        self.folder = folder
        self.worker = worker

    def _path(self, worker: int | str) -> str:
        return os.path.join(self.folder, f"state-{worker}.json")

    def publish(self, snapshot: ProxySnapshot) -> None:
        """Write this worker's snapshot (temporary file, then rename: readers see whole files)."""
        doc = {"pid": os.getpid(), "snapshot": asdict(snapshot)}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".state-{self.worker}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(doc, fh)
            os.replace(tmp, self._path(self.worker))
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def others(self) -> list[tuple[ProxySnapshot, bool]]:
        """The other workers' last snapshots, each with whether its process is still running."""
        out = []
        for name in sorted(os.listdir(self.folder)):
            if not (name.startswith("state-") and name.endswith(".json")) or name == f"state-{self.worker}.json":
                continue
            try:
                with open(os.path.join(self.folder, name), encoding="utf-8") as fh:
                    doc = json.load(fh)
            except FileNotFoundError:
                continue
            out.append((snapshot_from_dict(doc["snapshot"]), _alive(int(doc["pid"]))))
        return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a process of another user took the pid
        return True
    return True


def snapshot_from_dict(d: dict[str, Any]) -> ProxySnapshot:
    """The ProxySnapshot of `dataclasses.asdict(snapshot)`."""
    replicas = [ReplicaSnapshot(**{**r, "load": ReplicaLoad(**r["load"])}) for r in d["replicas"]]
    return ProxySnapshot(**{**d, "replicas": replicas})


def merge_snapshots(parts: Sequence[tuple[ProxySnapshot, bool]]) -> ProxySnapshot:
    """One snapshot for several workers' (snapshot, still running) pairs, freshest first; the
    rule for each field is in the module comment."""
    live = [snap for snap, alive in parts if alive]
    replicas: dict[str, ReplicaSnapshot] = {}
    listed_live: dict[str, int] = {}
    for snap, alive in parts:
        for r in snap.replicas:
            m = replicas.get(r.replica)
            if m is None:
                m = replicas[r.replica] = ReplicaSnapshot(r.replica, healthy=True)
            load = m.load
            if alive:
                listed_live[r.replica] = listed_live.get(r.replica, 0) + 1
                m.healthy = m.healthy and r.healthy
                load.inflight += r.load.inflight
                load.unprefilled_requests += r.load.unprefilled_requests
                load.unprefilled_tokens += r.load.unprefilled_tokens
                if m.kv_cache_usage is None:
                    m.kv_cache_usage = r.kv_cache_usage
                if m.running is None:
                    m.running = r.running
                if m.waiting is None:
                    m.waiting = r.waiting
            load.dispatched += r.load.dispatched
            load.dispatched_prompt_tokens += r.load.dispatched_prompt_tokens
            load.predicted_cached_tokens += r.load.predicted_cached_tokens
            m.observed_queries = max(m.observed_queries, r.observed_queries)
            m.observed_hits = max(m.observed_hits, r.observed_hits)
    for url, m in replicas.items():
        m.healthy = m.healthy and listed_live.get(url, 0) > 0
    return ProxySnapshot(
        queue_depth=sum(s.queue_depth for s in live),
        in_progress=sum(s.in_progress for s in live),
        hotspot_factor=max((s.hotspot_factor for s in live), default=0.0),
        predicted_known=any(snap.predicted_known for snap, _ in parts),
        event_loop_tasks=sum(s.event_loop_tasks for s in live),
        replicas=list(replicas.values()),
    )


_worker_share: WorkerShare | None = None


def share_with_workers(folder: str, worker: int) -> None:
    """Make the proxies created from now on in this process answer /metrics for all workers
    sharing `folder` (call once in each worker, before its proxy is made). The parent must have
    set PROMETHEUS_MULTIPROC_DIR to `folder` before starting this process."""
    global _worker_share
    if os.environ.get(MULTIPROC_ENV) != folder:
        raise RuntimeError(f"{MULTIPROC_ENV} must be {folder!r} before the worker starts")
    _worker_share = WorkerShare(folder, worker)
