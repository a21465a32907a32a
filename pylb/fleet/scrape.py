"""Reading a vLLM replica's `/metrics` page into `pylb.router.interface.ReplicaMetrics`.

Design
------
vLLM serves Prometheus text (names `vllm:*`, labels `engine` and `model_name`; a real page is in
`../shared/vllm/metrics-sample.txt`). The router needs a dozen of its ~600 lines, and the page is
scraped every 500 ms from every replica on the proxy's event loop, so `parse_vllm_metrics` first
keeps only the lines of the series it reads (a string prefix test per line, no regex), then
parses those with prometheus-client's own text parser (`text_string_to_metric_families`), which
handles label quoting and escapes. Parsing a full page this way costs a few tens of microseconds
instead of milliseconds.

Series read (summed over the label sets of one page: a data-parallel vLLM reports one `engine`
per rank; the cache usage is averaged over engines instead):

    vllm:num_requests_running           -> num_requests_running
    vllm:num_requests_waiting           -> num_requests_waiting
    vllm:kv_cache_usage_perc            -> kv_cache_usage (a fraction despite its name;
                                           vllm:gpu_cache_usage_perc on vLLM < 0.10)
    vllm:prefix_cache_queries_total     -> prefix_cache_queries (tokens; vllm:gpu_prefix_cache_*
    vllm:prefix_cache_hits_total        -> prefix_cache_hits     on vLLM < 0.10)
    vllm:num_preemptions_total          -> num_preemptions
    vllm:prompt_tokens_total            -> prompt_tokens
    vllm:generation_tokens_total        -> generation_tokens
    vllm:cache_config_info{block_size, num_gpu_blocks}  -> block_size, num_gpu_blocks (0 when absent)

A missing series reads as 0. A page with none of the `vllm:` request gauges raises `ScrapeError`
(it is not a vLLM replica, or not a ready one).

Asking for less. Rendering the whole page (~50 kB, mostly histograms) costs a CPU vLLM's API
server about 8-12 ms of CPU per scrape, on the process that also streams the tokens. vLLM mounts
prometheus-client's ASGI app under `/metrics/` (its plain `/metrics` route is the FastAPI
instrumentator's, which ignores query parameters), and that app renders only the series named
by `name[]` parameters (`CollectorRegistry.restricted_registry`): ~2.7 kB and about 1 ms
(`bench/scrape_cost.py`). `filtered_metrics_path` and `FILTER_PARAMS` build that request; the
fleet falls back to the whole page for a replica that does not serve it (a 404, or a page
without the series: a vLLM running several API servers collects through prometheus-client's
multiprocess collector, which the filter cannot find by name, so its filtered page is empty).
"""

from __future__ import annotations

import math
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

from pylb.router.interface import ReplicaMetrics


class ScrapeError(ValueError):
    """A metrics page that cannot be read as a vLLM replica's."""


# sample name -> ReplicaMetrics field; the first name of a field that appears wins.
_SUMMED: dict[str, str] = {
    "vllm:num_requests_running": "num_requests_running",
    "vllm:num_requests_waiting": "num_requests_waiting",
    "vllm:prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:gpu_prefix_cache_queries_total": "prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits_total": "prefix_cache_hits",
    "vllm:num_preemptions_total": "num_preemptions",
    "vllm:prompt_tokens_total": "prompt_tokens",
    "vllm:generation_tokens_total": "generation_tokens",
}
_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_INFO = "vllm:cache_config_info"
_WANTED: tuple[str, ...] = (*_SUMMED, *_USAGE, _INFO)
# a line is kept when it starts with a wanted name followed by "{" or " "
_PREFIXES: tuple[str, ...] = tuple(name + sep for name in _WANTED for sep in ("{", " "))


FILTER_PARAMS: tuple[tuple[str, str], ...] = tuple(("name[]", name) for name in _WANTED)
"""Query parameters that ask prometheus-client's exposition for only the series read here."""


def filtered_metrics_path(metrics_path: str) -> str:
    """The path under which vLLM serves prometheus-client's own app, which honours `name[]`:
    `metrics_path` with one trailing slash (`/metrics` -> `/metrics/`)."""
    return metrics_path.rstrip("/") + "/"


def filter_lines(text: str) -> str:
    """Only the sample lines of the series `parse_vllm_metrics` reads."""
    return "\n".join(line for line in text.splitlines() if line.startswith(_PREFIXES)) + "\n"


def parse_vllm_metrics(text: str) -> ReplicaMetrics:
    """A vLLM `/metrics` page as `ReplicaMetrics` (see the module comment for the mapping).

    Raises ScrapeError when the page is malformed or has no `vllm:num_requests_*` gauge.
    """
    sums: dict[str, float] = defaultdict(float)
    seen: set[str] = set()
    usage: dict[str, list[float]] = {}
    block_size = 0
    num_gpu_blocks = 0
    try:
        for family in text_string_to_metric_families(filter_lines(text)):
            for sample in family.samples:
                name = sample.name
                if not math.isfinite(sample.value):
                    raise ScrapeError(f"{name} is {sample.value}, not a finite number")
                seen.add(name)
                if name in _SUMMED:
                    sums[name] += sample.value
                elif name in _USAGE:
                    usage.setdefault(name, []).append(sample.value)
                elif name == _INFO:
                    block_size = max(block_size, _label_int(sample.labels.get("block_size")))
                    num_gpu_blocks += _label_int(sample.labels.get("num_gpu_blocks"))
    except (ValueError, IndexError, TypeError) as exc:  # the parser's errors on malformed lines
        raise ScrapeError(f"malformed metrics page: {exc}") from None
    if "vllm:num_requests_running" not in seen and "vllm:num_requests_waiting" not in seen:
        raise ScrapeError("no vllm:num_requests_running/waiting series: not a vLLM metrics page")
    fields: dict[str, float] = {}
    for name, target in _SUMMED.items():
        if name in seen and target not in fields:
            fields[target] = sums[name]
    kv = next((usage[n] for n in _USAGE if n in usage), [0.0])
    return ReplicaMetrics(
        num_requests_running=int(round(fields.get("num_requests_running", 0))),
        num_requests_waiting=int(round(fields.get("num_requests_waiting", 0))),
        kv_cache_usage=min(1.0, max(0.0, sum(kv) / len(kv))),
        prefix_cache_queries=int(fields.get("prefix_cache_queries", 0)),
        prefix_cache_hits=int(fields.get("prefix_cache_hits", 0)),
        block_size=block_size,
        num_gpu_blocks=num_gpu_blocks,
        num_preemptions=int(fields.get("num_preemptions", 0)),
        prompt_tokens=int(fields.get("prompt_tokens", 0)),
        generation_tokens=int(fields.get("generation_tokens", 0)),
    )


def _label_int(value: str | None) -> int:
    """An integer label value; 0 for absent, "None", "inf", "nan" or anything not an integer."""
    if value is None:
        return 0
    try:
        number = float(value)
    except ValueError:
        return 0
    return int(number) if math.isfinite(number) else 0
