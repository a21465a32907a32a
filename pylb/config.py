"""pylb's typed settings: the one place where defaults live.

Design (STYLE.md 6)
-------------------
Settings are frozen dataclasses, one per section (`server`, `router`, `fleet`, `discovery`,
`upstream`, `logging`, `epp`, `cache`), gathered in `Settings`. Each field carries its default, a
one-line help text, and optionally a check; everything else derives from the dataclasses. (The router section's settings
that configure the router core take their defaults from `pylb.router.interface.RouterOptions`,
which the simulator uses too, so that those are written once as well; see `RouterSettings`.)

    YAML file      section: {field: value}                 e.g.  router: {policy: dualmap}
    environment    PYLB_<NAME>  (NAME = the flag name in capitals, dashes as underscores)
                                                           e.g.  PYLB_POLICY=round-robin
    CLI flags      --<name>                                e.g.  --policy round-robin
    docs table     `settings_table_markdown()` (docs/serve.md carries it; a test keeps it current)

The flag name of a field is `<section>-<field>` with dashes (`--fleet-health-interval-s`), except
for the few short ones named in the field (`--host`, `--port`, `--policy`, `--backend`). Lists
are comma-separated in the environment and repeatable on the command line (`--backend URL
--backend URL`); mappings (`router.extra`) are YAML mappings, or JSON objects in the environment
and on the command line. Booleans accept true/false/1/0/yes/no/on/off.

Precedence, highest first: command-line flag > environment variable > YAML file > default.
The YAML file is named by `--config PATH` or `PYLB_CONFIG`.

Every value is converted and checked when the settings are loaded; a bad one raises
`ConfigError` naming the setting, the value, where it came from and why it is wrong, so that a
typo fails at start-up instead of at the first request. Unknown sections and keys in the YAML
file are errors too (with the known ones listed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pylb.fields import (
    Check,
    SettingError,
    at_least,
    convert,
    default_of,
    fraction,
    in_range,
    non_negative,
    one_of,
    port_number,
    positive,
    setting,
)
from pylb.router.interface import RouterOptions
from pylb.router.request import DEFAULT_CHAT_MAX_TOKENS, DEFAULT_COMPLETIONS_MAX_TOKENS

__all__ = ["Check", "ConfigError", "FIELDS", "Settings", "at_least", "fraction", "load_settings", "non_negative", "one_of",
           "port_number", "positive", "setting"]  # fmt: skip


class ConfigError(ValueError):
    """A setting has a bad value. `field` is "section.name", `value` the offending value,
    `source` where it came from ("default", "YAML file X", "environment PYLB_X", "flag --x"),
    `reason` why it is wrong."""

    def __init__(self, field: str, value: Any, reason: str, source: str = "") -> None:
        self.field = field
        self.value = value
        self.reason = reason
        self.source = source
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid setting {field} = {value!r}{where}: {reason}")


# ---- checks (the generic ones, and `setting`, are `pylb.fields`') --------------------------------


def http_urls(v: Any) -> str | None:
    """A list of distinct http(s)://host[:port] base URLs without a path, query or fragment."""
    from urllib.parse import urlsplit

    seen: set[str] = set()
    for url in v:
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError as exc:
            return f"{url!r} is not a valid URL ({exc})"
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return f"{url!r} must be an http:// or https:// URL with a host, e.g. http://127.0.0.1:8001"
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            return f"{url!r} must be a base URL without a path (pylb adds /v1/...)"
        if url in seen:
            return f"{url!r} is listed twice"
        seen.add(url)
    return None


def _readable_file(v: Any) -> str | None:
    """Empty, or a readable file."""
    return None if not v or os.access(v, os.R_OK) else "must name a readable file"


def path_string(v: Any) -> str | None:
    """An absolute URL path."""
    return None if v.startswith("/") else "must be a URL path starting with /"


# ---- the settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """pylb's own HTTP server."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 for all interfaces)", flag="host")
    port: int = setting(8080, "TCP port to listen on (0 picks a free one)", check=port_number, flag="port")
    workers: int = setting(
        1, "worker processes sharing the port (SO_REUSEPORT); each runs its own router, which agree on placement", check=at_least(1)
    )
    max_body_bytes: int = setting(32 * 1024 * 1024, "largest request body accepted; larger ones get 413", check=at_least(1024))
    shutdown_timeout_s: float = setting(10.0, "on SIGTERM/SIGINT, how long in-flight requests may finish", check=non_negative)
    header_timeout_s: float = setting(10.0, "a client's request line and headers must arrive within this long (else 408 and close)", check=positive)
    body_timeout_s: float = setting(60.0, "a request body must arrive within this long after its headers (else 408)", check=positive)
    keepalive_timeout_s: float = setting(15.0, "an idle client connection (keep-alive, or never used) is closed after this long", check=positive)
    max_connections: int = setting(
        4096, "open client connections at most; beyond, the longest-idle one is closed (503 when none is idle); lowered to fit the descriptor limit", check=at_least(8)
    )
    max_buffered_body_bytes: int = setting(512 * 1024 * 1024, "request-body bytes held at once for all requests; beyond, 503 with Retry-After", check=at_least(1024))
    max_header_bytes: int = setting(16384, "longest request line or header line accepted (longer: 400)", check=at_least(1024))
    max_headers: int = setting(100, "most header lines in a request (more: 400)", check=at_least(8))
    api_keys: list = setting([], "client API keys accepted as Authorization: Bearer KEY on /v1/ (none here and no api_keys_file: no authentication)")
    api_keys_file: str = setting("", "file of accepted client keys as SHA-256 hex digests, one per line (# comments); adds to server.api_keys", check=_readable_file)
    tls_cert: str = setting("", "PEM certificate (chain) for HTTPS on the client side, with server.tls_key (empty: plain HTTP)", check=_readable_file)
    tls_key: str = setting("", "PEM private key of server.tls_cert", check=_readable_file)
    admin_host: str = setting("127.0.0.1", "address of the admin listener (server.admin_port)")
    admin_port: int = setting(0, "serve /metrics, /health and /ready on this port only, not on server.port (0: no admin listener)", check=port_number)
    expose_replicas: bool = setting(True, "name replicas by their address in x-pylb-replica and error messages (false: an opaque id)")


_CORE_FIELDS = {f.name: f for f in dataclasses.fields(RouterOptions)}


def _core(option: str) -> Any:
    """A `RouterSettings` field that sets `RouterOptions.<option>`: its default, help and check
    are the ones declared there (written once, in `pylb/router/interface.py`)."""
    f = _CORE_FIELDS[option]
    return setting(default_of(f), f.metadata["help"], check=f.metadata["check"])


ROUTER_OPTION_FIELDS: dict[str, str] = {
    "slo_ttft_s": "slo_ttft",
    "seed": "seed",
    "block_chars": "block_chars",
    "key_block_tokens": "key_block_tokens",
    "max_unprefilled_tokens": "max_unprefilled_tokens",
    "max_unprefilled_requests": "max_unprefilled_requests",
    "queue_order": "queue_order",
    "starvation_s": "starvation_s",
    "dispatch_interval_s": "dispatch_interval",
    "hot_wait_s": "hot_wait_s",
    "admission_factor": "admission_factor",
    "migration_scan": "migration_scan",
    "prefill_s_per_token": "prefill_seconds_per_token",
    "prefill_learning_rate": "prefill_learning_rate",
    "prefill_intercept": "prefill_intercept",
    "prefill_decoding": "prefill_decoding",
    "cache_capacity_tokens": "cache_capacity_tokens",
    "cache_state": "cache_state",
    "events_grace_s": "events_grace_s",
}
"""`RouterSettings` field -> the `RouterOptions` field it sets (`extra` is passed on too, and a
policy spec's options are merged into it). `RouterOptions.chars_per_token` is not a setting: the
proxy's request model estimates `pylb.router.interface.BYTES_PER_TOKEN` bytes per token."""


@dataclass(frozen=True)
class RouterSettings:
    """The routing policy, pylb's router-side queue and the router core's settings.

    The settings named in `ROUTER_OPTION_FIELDS` are the core router's `RouterOptions`: their
    defaults, help and checks are declared there and read here (`_core`); `router_options()`
    builds them. The request model's defaults are `pylb.router.request`'s.
    """

    policy: str = setting(
        "dualmap",
        "routing policy: NAME, or NAME:key=value:... to set the policy's own options (e.g. dualmap:migration=false); "
        "`pylb simulate --help` lists the names",
        flag="policy",
    )
    slo_ttft_s: float = _core("slo_ttft")
    seed: int = _core("seed")
    block_chars: int = _core("block_chars")
    key_block_tokens: int = _core("key_block_tokens")
    extra: dict = setting({}, "policy-specific settings (a mapping; see the policy's module comment); a policy spec's options win")
    max_queued: int = setting(4096, "requests waiting in pylb's queues at most; more get 429", check=at_least(1))
    queue_timeout_s: float = setting(60.0, "longest wait in pylb's queue before a request gets 504", check=positive)
    queue_order: str = _core("queue_order")
    max_unprefilled_tokens: int = _core("max_unprefilled_tokens")
    max_unprefilled_requests: int = _core("max_unprefilled_requests")
    starvation_s: float = _core("starvation_s")
    dispatch_interval_s: float = _core("dispatch_interval")
    hot_wait_s: float = _core("hot_wait_s")
    admission_factor: float = _core("admission_factor")
    migration_scan: int = _core("migration_scan")
    prefill_s_per_token: float = _core("prefill_seconds_per_token")
    prefill_learning_rate: float = _core("prefill_learning_rate")
    prefill_intercept: bool = _core("prefill_intercept")
    prefill_decoding: bool = _core("prefill_decoding")
    cache_capacity_tokens: int = _core("cache_capacity_tokens")
    cache_state: str = _core("cache_state")
    events_grace_s: float = _core("events_grace_s")
    completions_default_max_tokens: int = setting(
        DEFAULT_COMPLETIONS_MAX_TOKENS, "max_tokens assumed for /v1/completions requests that omit it (vLLM's default)", check=at_least(1)
    )
    chat_default_max_tokens: int = setting(
        DEFAULT_CHAT_MAX_TOKENS, "max_tokens assumed for routing chat requests that omit it (vLLM fills the context)", check=at_least(1)
    )

    def router_options(self, source: str = "") -> RouterOptions:
        """The core router's `RouterOptions` from these settings (see `ROUTER_OPTION_FIELDS`).

        Raises ConfigError naming the setting when `RouterOptions` rejects a value (its checks
        include relations, e.g. key_block_tokens against block_chars); `source` is where the
        setting came from, for the message."""
        values = {opt: getattr(self, name) for name, opt in ROUTER_OPTION_FIELDS.items()}
        try:
            return RouterOptions(**values, extra=dict(self.extra))
        except SettingError as exc:
            opt = exc.field.removeprefix("RouterOptions.")
            name = next((n for n, o in ROUTER_OPTION_FIELDS.items() if o == opt), opt)
            raise ConfigError(f"router.{name}", exc.value, exc.reason, source) from None


@dataclass(frozen=True)
class FleetSettings:
    """The vLLM replicas: membership, health and metrics scraping."""

    backends: list = setting([], "base URL of a vLLM replica, e.g. http://127.0.0.1:8001 (repeat the flag for more)", check=http_urls, flag="backend", env="PYLB_BACKENDS")
    health_path: str = setting("/health", "path of the replicas' health endpoint", check=path_string)
    health_interval_s: float = setting(1.0, "seconds between active health probes of each replica", check=positive)
    health_timeout_s: float = setting(1.0, "a probe without an answer after this long fails", check=positive)
    unhealthy_threshold: int = setting(2, "consecutive failed probes that take a healthy replica out", check=at_least(1))
    healthy_threshold: int = setting(2, "consecutive good probes that bring an unhealthy replica back", check=at_least(1))
    eject_connect_errors: int = setting(1, "consecutive connection errors on requests that eject a replica at once (passive)", check=at_least(1))
    eject_5xx: int = setting(3, "consecutive answers with a status in fleet.eject_statuses that eject a replica (passive)", check=at_least(1))
    eject_statuses: list = setting(
        [502, 503, 504], "replica statuses that count towards fleet.eject_5xx (a 500 answers one request: it never ejects; a dead engine fails /health)"
    )
    ejection_s: float = setting(5.0, "a passively ejected replica stays out at least this long before probes may bring it back", check=non_negative)
    metrics_path: str = setting("/metrics", "path of the replicas' Prometheus metrics", check=path_string)
    scrape_interval_s: float = setting(0.5, "seconds between scrapes of each replica's metrics", check=positive)
    scrape_filtered: bool = setting(
        True,
        "ask each replica for only the series pylb reads (prometheus-client's name[] filter, which vLLM serves under "
        "fleet.metrics_path + '/'); a replica that does not serve it is scraped whole",
    )
    max_metrics_bytes: int = setting(8 * 1024 * 1024, "a replica's /metrics page larger than this fails the scrape", check=at_least(1024))
    scrape_timeout_s: float = setting(5.0, "a scrape without a whole answer after this long fails (a slow one delays only that replica's next scrape)", check=positive)
    discovery: str = setting(
        "static", "where the replica list comes from: static (fleet.backends), dns or k8s (see the discovery section)", check=one_of("static", "dns", "k8s")
    )


# ---- discovery (issue 11 §1; the sources live in pylb/fleet/discovery*.py) ----------------------------


def _dns_name(v: Any) -> str | None:
    """Empty, or a host name without a scheme, port or path."""
    return None if not any(c in v for c in ":/ ") else "must be a bare host name, e.g. vllm-headless.default.svc.cluster.local"


def _replica_port(v: Any) -> str | None:
    """A TCP port a replica listens on, 1..65535."""
    return None if 1 <= v <= 65535 else "must be a TCP port in 1..65535"


@dataclass(frozen=True)
class DiscoverySettings:
    """Dynamic membership (`fleet.discovery` dns or k8s): where replicas are found and how often."""

    interval_s: float = setting(5.0, "dns: seconds between resolutions of discovery.dns_name", check=positive)
    dns_name: str = setting("", "dns: the (headless) Service name whose A/AAAA records are the replicas", check=_dns_name)
    port: int = setting(8000, "the replicas' port: dns always; k8s when the EndpointSlice names no port", check=_replica_port)
    scheme: str = setting("http", "scheme of the replicas' base URLs", check=one_of("http", "https"))
    k8s_service: str = setting("", "k8s: the Service whose EndpointSlices list the replicas (label kubernetes.io/service-name)")
    k8s_namespace: str = setting("", "k8s: its namespace (empty: the pod's own namespace in a cluster, else the kubeconfig context's, else default)")
    k8s_port_name: str = setting("", "k8s: the EndpointSlice port to use, by name (empty: the slice's only port, else discovery.port)")
    kubeconfig: str = setting("", "k8s: kubeconfig file (empty: the in-cluster service account when running in a pod, else $KUBECONFIG or ~/.kube/config)")
    watch_timeout_s: int = setting(300, "k8s: the API server ends each watch after this long; pylb resumes it from the last resourceVersion", check=at_least(1))
    backoff_max_s: float = setting(30.0, "longest wait between retries after a failed resolution, list or watch (doubling from 0.5 s)", check=positive)


def _check_discovery(s: Settings, sources: Mapping[str, str]) -> None:
    """The discovery mode's own setting must be there."""
    mode, d = s.fleet.discovery, s.discovery
    if mode == "dns" and not d.dns_name:
        raise ConfigError("discovery.dns_name", d.dns_name, "fleet.discovery is dns: name the Service to resolve", sources.get("discovery.dns_name", "default"))
    if mode == "k8s" and not d.k8s_service:
        raise ConfigError(
            "discovery.k8s_service", d.k8s_service, "fleet.discovery is k8s: name the Service whose EndpointSlices to watch", sources.get("discovery.k8s_service", "default")
        )


# ---- vLLM KV-cache events (issue 12; the subscriber and keyer live in pylb/fleet/kv_feed.py) ------------


def _endpoint_pairs(v: Any) -> str | None:
    """Items URL=ZMQ_ENDPOINT."""
    for item in v:
        url, sep, ep = str(item).partition("=")
        if not sep or not url.startswith(("http://", "https://")) or "://" not in ep:
            return f"{item!r} must be REPLICA_URL=ZMQ_ENDPOINT, e.g. http://127.0.0.1:8001=ipc:///tmp/kv-8001.sock"
    return None


@dataclass(frozen=True)
class KvEventsSettings:
    """vLLM KV-cache events (ZMQ) and engine-exact keys: used when router.cache_state is events."""

    endpoints: list = setting([], "a replica's event endpoint, REPLICA_URL=ZMQ_ENDPOINT (repeat the flag); others use kv_events.port", check=_endpoint_pairs, flag="kv-events-endpoint")
    port: int = setting(5557, "event port on each replica's host (tcp://HOST:PORT, vLLM's default endpoint tcp://*:5557); 0: only kv_events.endpoints", check=at_least(0))
    bind: bool = setting(False, "bind the SUB sockets instead of connecting (when vLLM's endpoint is a concrete tcp://host:port, vLLM connects)")
    topic: str = setting("", "subscribe to this topic prefix (vLLM's kv-events-config topic)")
    tokenizer: str = setting("", "the served model's tokenizer.json (or its folder); 'sim' for pylb sim-replicas' simulated tokens. Required with cache_state events")
    chat_template: str = setting("", "the model's Jinja chat template file (empty: chat_template.jinja beside the tokenizer, else tokenizer_config.json's)")
    block_size: int = setting(16, "the engine's KV block size in tokens (vLLM --block-size; must match the replicas)", check=at_least(1))
    hash_seed: str = setting("vllm-none-hash", "vLLM's NONE_HASH seed (its PYTHONHASHSEED when set there)")
    tokenizer_threads: int = setting(2, "threads that tokenize and hash prompts, off the event loop", check=at_least(1))
    line_cache_tokens: int = setting(4_000_000, "tokens of prompt lines kept tokenized, so a line seen before is not tokenized again (exact; 0: off)", check=at_least(0))
    max_prompt_bytes: int = setting(1 << 20, "prompts longer than this are not tokenized (bounded cost; they are matched on the predicted mirror)", check=at_least(1))
    backoff_max_s: float = setting(30.0, "longest wait between retries of a failed subscriber socket (doubling from 0.1 s)", check=positive)


@dataclass(frozen=True)
class UpstreamSettings:
    """pylb's HTTP client towards the replicas: timeouts, pooling, retries."""

    connect_timeout_s: float = setting(5.0, "time to open a connection to a replica", check=positive)
    read_timeout_s: float = setting(600.0, "longest silence from a replica while a request is open (0: no limit)", check=non_negative)
    keepalive_s: float = setting(30.0, "idle pooled connections to replicas are closed after this long", check=positive)
    max_retries: int = setting(2, "retries of a request on another replica, only before its first byte reached the client", check=at_least(0))
    retry_deadline_s: float = setting(10.0, "no retry starts later than this after the request arrived", check=non_negative)
    retry_statuses: list = setting([502, 503, 504], "replica HTTP statuses that are retried (connection errors always are)")
    max_idle_per_replica: int = setting(32, "idle pooled connections kept per replica; more are closed when released", check=at_least(0))
    ca_file: str = setting("", "https:// replicas: PEM file of the CAs to trust (empty: the system's)", check=_readable_file)
    forward_authorization: bool = setting(False, "pass the client's Authorization header on to the replica (off: replicas never see client keys)")
    tls_verify: bool = setting(True, "https:// replicas: verify the certificate and host name")


@dataclass(frozen=True)
class LoggingSettings:
    """Logs (structured, one JSON object per line on stderr)."""

    level: str = setting("info", "log level", check=one_of("debug", "info", "warning", "error"), flag="log-level")
    format: str = setting("json", "json (one object per line) or text", check=one_of("json", "text"), flag="log-format")
    access_log: bool = setting(True, "one log line per proxied request (request id, replica, status, latencies)")


@dataclass(frozen=True)
class EppSettings:
    """`pylb epp`: Envoy's external processor (the Gateway API Inference Extension's endpoint
    picker) in place of the HTTP proxy; it listens on server.host (pylb.epp)."""

    grpc_port: int = setting(9002, "epp: gRPC port of the ext_proc service and the gRPC health service (0 picks a free one)", check=port_number)
    metrics_port: int = setting(9090, "epp: HTTP port of /metrics, /health and /ready (0 picks a free one)", check=port_number)
    destination_header: str = setting(
        "x-gateway-destination-endpoint", "epp: request header, and dynamic metadata key, that names the chosen replica as ip:port"
    )
    metadata_namespace: str = setting("envoy.lb", "epp: dynamic metadata namespace of the chosen replica (Envoy must list it in receiving_namespaces)")
    fallbacks: int = setting(
        2, "epp: replicas named after the chosen one (ip:port,ip:port,...), next best first, for the data plane to retry on; "
        "0 names one (all an ORIGINAL_DST cluster reads)", check=in_range(0, 16),
    )  # fmt: skip
    subset_namespace: str = setting(
        "envoy.lb.subset_hint", "epp: filter metadata namespace where the data plane may list the endpoints pylb picks among (key: destination_header + '-subset')"
    )
# ---- the semantic cache (issue 14; the cache lives in pylb/cache/) ------------------------------------


def _header_name(v: Any) -> str | None:
    """Empty, or an HTTP header name."""
    return None if all(c.isalnum() or c in "-_" for c in v) else "must be an HTTP header name, e.g. X-Tenant"


@dataclass(frozen=True)
class CacheSettings:
    """The semantic cache in front of the replicas (off by default; see docs/serve.md#semantic-cache)."""

    enabled: bool = setting(False, "answer repeated and near-identical deterministic requests from pylb's cache")
    embedder: str = setting("hashing", "how query texts are embedded: hashing (built in), minilm (the [minilm] extra) or openai (an /v1/embeddings endpoint)",
                            check=one_of("hashing", "minilm", "openai"))
    embedder_url: str = setting("", "openai embedder: base URL of the /v1/embeddings endpoint (e.g. a vLLM replica serving an embedding model)")
    embedder_model: str = setting("", "openai embedder: the embedding model's name")
    dim: int = setting(384, "hashing embedder: vector size", check=in_range(8, 65536))
    threshold: float = setting(0.9, "cosine similarity at or above which a neighbour may answer (the guards must pass too)", check=in_range(0.0, 1.0))
    thresholds: dict = setting({}, "per-model thresholds (model name -> cosine), overriding cache.threshold")
    threshold_policy: str = setting("fixed", "how a neighbour that passes the threshold and the guards is decided: fixed (it answers) or verified "
                                    "(a per-entry threshold learned online under cache.max_error_rate; unsure candidates go to a replica and teach it)",
                                    check=one_of("fixed", "verified"))
    max_error_rate: float = setting(0.01, "verified policy: the error rate allowed among candidate hits (delta of the vCache paper)", check=fraction)
    verified_floor: float = setting(0.0, "verified policy: the least similarity a neighbour needs to be a candidate "
                                    "(0: the model's threshold, so it never answers where the fixed policy would not)", check=in_range(0.0, 1.0))
    verify_share: float = setting(0.0, "share of semantic hits re-run in the background on an idle replica and compared "
                                  "(a different answer drops the entry; 0: none)", check=in_range(0.0, 1.0))
    verify_max_inflight: int = setting(2, "re-runs of cache.verify_share in flight at most (more are skipped)", check=in_range(1, 64))
    semantic: bool = setting(True, "look up near neighbours (false: exact matches and in-flight joins only)")
    near_threshold: float = setting(0.0, "a miss whose nearest neighbour scores at least this is routed to the replica that answered that neighbour, "
                                    "when that replica is healthy and not hot (0: off)", check=in_range(0.0, 1.0))
    tenant_header: str = setting("", "header naming the tenant (empty: the Authorization header); a request without one is never cached", check=_header_name)
    opt_in_models: list = setting([], "models whose sampled (temperature > 0) requests may be cached too")
    ttl_s: float = setting(3600.0, "an entry is dropped this long after it was stored", check=positive)
    max_entries: int = setting(10000, "entries kept per model at most (least recently used dropped first)", check=at_least(1))
    max_bytes: int = setting(256 * 1024 * 1024, "stored answer bytes per model at most (least recently used dropped first)", check=at_least(1024))
    max_answer_bytes: int = setting(4 * 1024 * 1024, "answers larger than this are not stored", check=at_least(1024))
    batch_window_ms: float = setting(1.0, "a semantic lookup waits at most this long for others to batch with", check=non_negative)
    max_batch: int = setting(64, "a batch of semantic lookups runs at once when this many wait", check=at_least(1))
    device: str = setting("auto", "where similarity runs: auto (CUDA when built with it and a device is present), cpu or cuda",
                          check=one_of("auto", "cpu", "cuda"))


SECTIONS: dict[str, type] = {
    "server": ServerSettings,
    "router": RouterSettings,
    "fleet": FleetSettings,
    "discovery": DiscoverySettings,
    "kv_events": KvEventsSettings,
    "upstream": UpstreamSettings,
    "logging": LoggingSettings,
    "epp": EppSettings,
    "cache": CacheSettings,
}


@dataclass(frozen=True)
class Settings:
    """All of pylb serve's settings; `load_settings` builds it from file, environment and flags."""

    server: ServerSettings = field(default_factory=ServerSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    fleet: FleetSettings = field(default_factory=FleetSettings)
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    kv_events: KvEventsSettings = field(default_factory=KvEventsSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    epp: EppSettings = field(default_factory=EppSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The settings as plain data, in the YAML file's shape."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_yaml(self) -> str:
        """The settings as a YAML document that `load_settings` reads back."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ---- field descriptions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One setting: where it lives, how it is spelled in each source, its type, default and check."""

    section: str
    name: str
    type: Any
    default: Any
    help: str
    check: Check | None
    flag: str
    env: str

    @property
    def key(self) -> str:
        """"section.name", as in error messages and the YAML file."""
        return f"{self.section}.{self.name}"


def _specs() -> list[FieldSpec]:
    out = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            flag = meta.get("flag") or f"{section.replace('_', '-')}-{f.name.replace('_', '-')}"
            env = meta.get("env") or "PYLB_" + flag.upper().replace("-", "_")
            default = default_of(f)
            out.append(FieldSpec(section, f.name, hints[f.name], default, meta.get("help", ""), meta.get("check"), flag, env))
    return out


FIELDS: list[FieldSpec] = _specs()
"""Every setting, in section and declaration order."""

CONFIG_ENV = "PYLB_CONFIG"
"""Environment variable naming the YAML file (the `--config` flag wins)."""


# ---- conversion --------------------------------------------------------------------------------------


def _convert(spec: FieldSpec, value: Any, source: str, from_text: bool) -> Any:
    """`value` as the field's type (`pylb.fields.convert`); ConfigError naming the setting."""
    item_type = type(spec.default[0]) if spec.type is list and spec.default else str
    try:
        return convert(spec.type, value, from_text=from_text, name=spec.key, item_type=item_type)
    except SettingError as exc:
        raise ConfigError(spec.key, value, exc.reason, source) from None


# ---- loading -----------------------------------------------------------------------------------------


def _read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", str(p), f"cannot read the file ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("config", str(p), f"not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", str(p), f"the file must hold a mapping of sections ({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def load_settings(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build the settings: `flags` > `env` > the YAML file > defaults.

    Args:
        flags: values given on the command line, by `FieldSpec.key` ("server.port"); strings are
            parsed like environment values, other values are taken as typed.
        env: environment variables (`os.environ` when None); PYLB_* names are read.
        config_path: the YAML file; when None, `PYLB_CONFIG` from `env` names it (optional).

    Raises ConfigError for an unreadable or malformed file, an unknown section or key in it, or
    any value of the wrong type or out of range.
    """
    env = os.environ if env is None else env
    flags = flags or {}
    if config_path is None and env.get(CONFIG_ENV):
        config_path = env[CONFIG_ENV]
    values: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    sources: dict[str, str] = {}
    by_key = {spec.key: spec for spec in FIELDS}

    if config_path is not None:
        data = _read_yaml(config_path)
        src = f"YAML file {config_path}"
        for section, body in data.items():
            if section not in SECTIONS:
                raise ConfigError(str(section), body, f"unknown section; expected one of {', '.join(SECTIONS)}", src)
            if body is None:
                continue
            if not isinstance(body, dict):
                raise ConfigError(section, body, "a section must be a mapping of settings", src)
            for name, value in body.items():
                key = f"{section}.{name}"
                spec = by_key.get(key)
                if spec is None:
                    known = ", ".join(s.name for s in FIELDS if s.section == section)
                    raise ConfigError(key, value, f"unknown setting; {section} has: {known}", src)
                values[section][name] = _convert(spec, value, src, from_text=False)
                sources[key] = src

    for spec in FIELDS:
        if spec.env in env:
            src = f"environment {spec.env}"
            values[spec.section][spec.name] = _convert(spec, env[spec.env], src, from_text=True)
            sources[spec.key] = src

    for key, value in flags.items():
        spec = by_key.get(key)
        if spec is None:
            raise ConfigError(key, value, "unknown setting")
        src = f"flag --{spec.flag}"
        values[spec.section][spec.name] = _convert(spec, value, src, from_text=isinstance(value, str))
        sources[key] = src

    for spec in FIELDS:
        if spec.check is None:
            continue
        value = values[spec.section].get(spec.name, spec.default)
        reason = spec.check(value)
        if reason:
            raise ConfigError(spec.key, value, reason, sources.get(spec.key, "default"))
    settings = Settings(**{s: cls(**values[s]) for s, cls in SECTIONS.items()})
    _check_relations(settings, sources)
    return settings


def _check_relations(s: Settings, sources: Mapping[str, str]) -> None:
    """Checks that involve two settings (the router core's are `RouterOptions`')."""
    try:
        s.router.router_options()
    except ConfigError as exc:
        key, value = exc.field, exc.value
        if key == "router.key_block_tokens" and key not in sources and "router.block_chars" in sources:
            # the one the user set breaks the pair
            raise ConfigError("router.block_chars", s.router.block_chars, f"router.key_block_tokens {exc.reason}", sources["router.block_chars"]) from None
        raise ConfigError(key, value, exc.reason, sources.get(key, "default")) from None
    for key, codes in (("upstream.retry_statuses", s.upstream.retry_statuses), ("fleet.eject_statuses", s.fleet.eject_statuses)):
        for code in codes:
            if not 500 <= code <= 599:
                raise ConfigError(key, codes, f"{code} is not a 5xx status", sources.get(key, "default"))
    _check_discovery(s, sources)
    c = s.cache
    if c.enabled and c.embedder == "openai":
        for name in ("embedder_url", "embedder_model"):
            if not getattr(c, name):
                raise ConfigError(f"cache.{name}", getattr(c, name), "cache.embedder is openai: name the /v1/embeddings endpoint's base URL and model",
                                  sources.get(f"cache.{name}", "default"))
        if reason := http_urls([c.embedder_url]):
            raise ConfigError("cache.embedder_url", c.embedder_url, reason, sources.get("cache.embedder_url", "default"))
    if s.router.cache_state == "events" and not s.kv_events.tokenizer:
        raise ConfigError("kv_events.tokenizer", "", "router.cache_state is events: name the served model's tokenizer.json (or 'sim')", sources.get("kv_events.tokenizer", "default"))


# ---- command line ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, sections: Sequence[str] = tuple(SECTIONS)) -> None:
    """Add `--config` and one flag per setting of `sections` to `parser`.

    Flags default to "not given" (argparse.SUPPRESS), so `flags_from_args` returns only what the
    user typed and lower-precedence sources keep their say.
    """
    parser.add_argument("--config", metavar="PATH", default=None, help=f"YAML settings file (also ${CONFIG_ENV})")
    for section in sections:
        group = parser.add_argument_group(f"{section} settings")
        for spec in FIELDS:
            if spec.section != section:
                continue
            shown = json.dumps(spec.default) if isinstance(spec.default, (list, dict)) else spec.default
            help_text = f"{spec.help} [default: {shown}; env {spec.env}]".replace("%", "%%")
            dest = f"cfg:{spec.key}"
            if spec.type is list:
                group.add_argument(f"--{spec.flag}", dest=dest, action="append", metavar="VALUE", default=argparse.SUPPRESS, help=help_text)
            elif spec.type is bool:
                group.add_argument(
                    f"--{spec.flag}", dest=dest, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
                )
            else:
                group.add_argument(f"--{spec.flag}", dest=dest, metavar=spec.type.__name__.upper(), default=argparse.SUPPRESS, help=help_text)


def flags_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags in `args` (parsed with `add_arguments`), by "section.name".

    A repeated list flag collects its values; each value may itself be comma-separated."""
    out: dict[str, Any] = {}
    for dest, value in vars(args).items():
        if dest.startswith("cfg:"):
            key = dest[4:]
            if isinstance(value, list):
                value = [part.strip() for item in value for part in str(item).split(",") if part.strip()]
            out[key] = value
    return out


def load_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    """`load_settings` with the flags and `--config` of parsed command-line arguments."""
    return load_settings(flags_from_args(args), env=env, config_path=getattr(args, "config", None))


def command_settings(
    args: argparse.Namespace, command: str, no_backend_help: str, check: typing.Callable[[Settings], None] | None = None
) -> Settings | int:
    """The settings of `pylb COMMAND` from its parsed flags (with `--print-config`), or the exit
    status where the command should stop: 2 for a bad setting (`check` may raise ConfigError for
    the command's own rules; the message goes to stderr) or for no backend without discovery
    (`no_backend_help` to stderr), 0 after printing the effective settings for --print-config."""
    import sys

    try:
        settings = load_from_args(args)
        if check is not None:
            check(settings)
    except ConfigError as exc:
        print(f"pylb {command}: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "print_config", False):
        sys.stdout.write(settings.to_yaml())
        return 0
    if not settings.fleet.backends and settings.fleet.discovery == "static":
        print(no_backend_help, file=sys.stderr)
        return 2
    return settings


def settings_table_markdown() -> str:
    """A Markdown table of every setting: YAML key, flag, environment variable, default, meaning."""
    lines = ["| setting (YAML) | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for spec in FIELDS:
        default = json.dumps(spec.default) if not isinstance(spec.default, str) else (spec.default or '""')
        lines.append(f"| `{spec.key}` | `--{spec.flag}` | `{spec.env}` | `{default}` | {spec.help} |")
    return "\n".join(lines) + "\n"
