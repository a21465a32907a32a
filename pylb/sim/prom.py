"""vLLM-format Prometheus metrics of one fake vLLM replica.

Design
------
A real vLLM (0.32, V1 engine) serves `/metrics` with metric names prefixed `vllm:` and the
labels `engine` (the data-parallel engine index, "0" here) and `model_name`; a copy of a real
page is in `../shared/vllm/metrics-sample.txt`. This module renders the same names, types,
labels, HELP texts and histogram buckets for the subset a router reads, with
`prometheus-client` and one `CollectorRegistry` per replica (several replicas share one
process, so nothing goes to the global default registry, and no `python_*`/`process_*`
series are exposed).

Two kinds of series:

  * Read at scrape time from the engine (`Engine.metrics_snapshot(now)`), by a custom
    collector: the gauges `vllm:num_requests_running`, `vllm:num_requests_waiting`,
    `vllm:num_requests_waiting_by_reason`, `vllm:kv_cache_usage_perc` (fraction, 1 = full),
    `vllm:engine_sleep_state`, `vllm:cache_config_info` (value 1, configuration in labels; as in
    vLLM it carries `engine` but no `model_name`), and the counters
    `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total` (both in tokens),
    `vllm:prompt_tokens_cached_total`, `vllm:num_preemptions_total`, `vllm:prompt_tokens_total`,
    `vllm:generation_tokens_total`. Counters carry a `_created` sample (replica start time), as
    vLLM's do.
  * Observed by the server as requests progress (`VllmMetrics.on_*`): the histograms
    `vllm:time_to_first_token_seconds`, `vllm:inter_token_latency_seconds`,
    `vllm:request_time_per_output_token_seconds`, `vllm:e2e_request_latency_seconds`,
    `vllm:request_prompt_tokens`, `vllm:request_generation_tokens`,
    `vllm:request_params_max_tokens`, `vllm:request_max_num_generation_tokens`,
    `vllm:request_params_n`, `vllm:iteration_tokens_total`, and the counter
    `vllm:request_success_total{finished_reason}` (stop, length, abort, error, repetition).

Latencies are in wall-clock seconds, as a real vLLM measures them; with `--speed X` they are the
simulated latencies divided by X. Buckets are vLLM's (token-count histograms use vLLM's
1-2-5 series up to max_model_len).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Counter, Histogram, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pylb.router.interface import ReplicaMetrics

CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
"""Content-Type of the `/metrics` page (the classic text format, as vLLM serves it)."""

TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
"""vLLM's buckets of `vllm:time_to_first_token_seconds`."""

ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
"""vLLM's buckets of `vllm:inter_token_latency_seconds` and `vllm:request_time_per_output_token_seconds`."""

REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
"""vLLM's buckets of `vllm:e2e_request_latency_seconds` (and its other request-phase histograms)."""

ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
"""vLLM's buckets of `vllm:iteration_tokens_total` (tokens per engine step)."""

N_BUCKETS: tuple[float, ...] = (1, 2, 5, 10, 20)
"""vLLM's buckets of `vllm:request_params_n`."""

FINISHED_REASONS: tuple[str, ...] = ("stop", "length", "abort", "error", "repetition")
"""Values of the `finished_reason` label of `vllm:request_success_total`, in vLLM's order."""

LABELS: tuple[str, str] = ("engine", "model_name")
"""Labels of every per-engine vLLM series."""


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to `max_value` (inclusive)."""
    out: list[int] = []
    exponent = 0
    while True:
        for m in (1, 2, 5):
            v = m * 10**exponent
            if v > max_value:
                return out
            out.append(v)
        exponent += 1


class _EngineCollector:
    """Collects the series that are read from the engine at scrape time."""

    def __init__(self, owner: VllmMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterator[Metric]:
        return self._families(self._owner.snapshot())

    def describe(self) -> Iterator[Metric]:
        """The families without samples: a registry made with auto_describe=False reads them at
        registration, and its `restricted_registry` (the `name[]` filter) finds this collector
        by these names."""
        empty = ReplicaMetrics(0, 0, 0.0, 0, 0, block_size=0, num_gpu_blocks=0)
        for family in self._families(empty):
            family.samples = []
            yield family

    def _families(self, m: ReplicaMetrics) -> Iterator[Metric]:
        o = self._owner
        lv = [o.engine, o.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(lv, value, created=o.created)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution batches.", m.num_requests_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", m.num_requests_waiting)
        by_reason = GaugeMetricFamily(
            "vllm:num_requests_waiting_by_reason",
            "Number of waiting requests by reason. Reason labels: 'capacity' = waiting for scheduling capacity; "
            "'deferred' = deferred by transient constraints (LoRA budget, KV transfer, blocked status). "
            "Sum of all reasons equals vllm:num_requests_waiting.",
            labels=(*LABELS, "reason"),
        )
        by_reason.add_metric([*lv, "capacity"], m.num_requests_waiting)
        by_reason.add_metric([*lv, "deferred"], 0)
        yield by_reason
        sleep = GaugeMetricFamily(
            "vllm:engine_sleep_state",
            "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
            "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
            labels=(*LABELS, "sleep_state"),
        )
        for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
            sleep.add_metric([*lv, state], value)
        yield sleep
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", m.kv_cache_usage)
        yield counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            m.prefix_cache_queries,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens.", m.prefix_cache_hits
        )
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.", m.num_preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.", m.prompt_tokens)
        yield counter(
            "vllm:prompt_tokens_cached", "Number of cached prompt tokens (local + external).", m.prefix_cache_hits
        )
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.", m.generation_tokens)
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the LLMEngine CacheConfig", labels=list(o.cache_config)
        )
        info.add_metric(list(o.cache_config.values()), 1.0)
        yield info


class VllmMetrics:
    """The `/metrics` page of one fake vLLM replica (see the module docstring).

    Args:
        snapshot: returns the engine's current `ReplicaMetrics` (called at every scrape).
        model_name: value of the `model_name` label.
        max_model_len: largest prompt + output length (sets the token-count buckets).
        block_size, num_gpu_blocks: KV-cache geometry, shown in `vllm:cache_config_info`.
        engine: value of the `engine` label ("0": one engine per server).
    """

    def __init__(
        self,
        snapshot: Callable[[], ReplicaMetrics],
        *,
        model_name: str,
        max_model_len: int,
        block_size: int,
        num_gpu_blocks: int,
        engine: str = "0",
    ) -> None:
        self.snapshot = snapshot
        self.model_name = model_name
        self.engine = engine
        self.created = time.time()
        self.cache_config: dict[str, str] = {
            "block_size": str(block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "engine": engine,
            "kv_cache_size_tokens": str(block_size * num_gpu_blocks),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(num_gpu_blocks),
            "num_gpu_blocks_override": "None",
            "prefix_caching_hash_algo": "xxh3_64",
        }
        self.registry = CollectorRegistry(auto_describe=False)
        reg = self.registry
        lv = (engine, model_name)
        tok_buckets = build_1_2_5_buckets(max_model_len)

        def hist(name: str, doc: str, buckets: tuple[float, ...] | list[int]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets, registry=reg)

        self._ttft = hist(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", TTFT_BUCKETS
        ).labels(*lv)
        self._itl = hist(
            "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", ITL_BUCKETS
        ).labels(*lv)
        self._tpot = hist(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            ITL_BUCKETS,
        ).labels(*lv)
        self._e2e = hist(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS
        ).labels(*lv)
        self._prompt_tokens = hist(
            "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tok_buckets
        ).labels(*lv)
        self._generation_tokens = hist(
            "vllm:request_generation_tokens", "Number of generation tokens processed.", tok_buckets
        ).labels(*lv)
        self._max_tokens_param = hist(
            "vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.", tok_buckets
        ).labels(*lv)
        self._max_generation = hist(
            "vllm:request_max_num_generation_tokens",
            "Histogram of maximum number of requested generation tokens.",
            tok_buckets,
        ).labels(*lv)
        self._n_param = hist("vllm:request_params_n", "Histogram of the n request parameter.", N_BUCKETS).labels(*lv)
        self._iteration_tokens = hist(
            "vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", ITERATION_TOKENS_BUCKETS
        ).labels(*lv)
        success = Counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry=reg,
        )
        self._success = {r: success.labels(engine, model_name, r) for r in FINISHED_REASONS}
        reg.register(_EngineCollector(self))

    # ---- observations (called by the server) ---------------------------------------------------

    def on_first_token(self, ttft: float) -> None:
        """A request's first token reached the client `ttft` seconds after it arrived."""
        self._ttft.observe(ttft)

    def on_token(self, gap: float) -> None:
        """A request's next token came `gap` seconds after its previous one."""
        self._itl.observe(gap)

    def on_iteration(self, tokens: int) -> None:
        """An engine step computed `tokens` tokens (prompt tokens plus decoding sequences)."""
        self._iteration_tokens.observe(tokens)

    def on_finished(
        self,
        reason: str,
        *,
        e2e: float,
        decode_time: float,
        prompt_tokens: int,
        generation_tokens: int,
        max_tokens: int,
    ) -> None:
        """A request finished normally (`reason` "stop" or "length")."""
        self._success[reason].inc()
        self._e2e.observe(e2e)
        if generation_tokens > 1:
            self._tpot.observe(decode_time / (generation_tokens - 1))
        self._prompt_tokens.observe(prompt_tokens)
        self._generation_tokens.observe(generation_tokens)
        self._max_tokens_param.observe(max_tokens)
        self._max_generation.observe(max_tokens)
        self._n_param.observe(1)

    def on_aborted(self, reason: str = "abort") -> None:
        """A request left without finishing (client went away: "abort"; engine failure: "error")."""
        self._success[reason].inc()

    # ---- rendering -------------------------------------------------------------------------------

    def render(self, names: Sequence[str] = ()) -> bytes:
        """The `/metrics` page in the Prometheus text format; with `names`, only those series
        (what prometheus-client's exposition does for `name[]` query parameters)."""
        return generate_latest(self.registry.restricted_registry(names) if names else self.registry)
