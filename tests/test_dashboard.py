"""The Grafana dashboard (k8s/monitoring/grafana/pylb-dashboard.json) names only series that pylb
or vLLM export: every metric name in every PromQL query is checked against the sample names of
pylb's own registry (rendered from `ProxyMetrics` with every series populated) and of vLLM's
/metrics sample (../shared/vllm/metrics-sample.txt; the vLLM check skips without it)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pylb.observability.metrics import SERIES, ProxyMetrics, ProxySnapshot, ReplicaLoad, ReplicaSnapshot

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "k8s" / "monitoring" / "grafana" / "pylb-dashboard.json"

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, label lists, matchers, ranges,
    strings, numbers and Grafana variables left out)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', " ", expr)  # strings
    e = re.sub(r"\{[^}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # range selectors
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)  # label lists
    e = re.sub(r"\$\{?\w+\}?", " ", e)  # Grafana variables
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group(0)
        rest = e[m.end() :].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function or an operator
        names.add(word)
    return names


def test_metric_names_parser() -> None:
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(pylb_ttft_seconds_bucket{namespace=~"$namespace", le="5.0"}[$__rate_interval])))') == {
        "pylb_ttft_seconds_bucket"
    }
    assert metric_names("sum(rate(vllm:prefix_cache_hits_total[5m])) / sum(rate(vllm:prefix_cache_queries_total[5m]))") == {
        "vllm:prefix_cache_hits_total",
        "vllm:prefix_cache_queries_total",
    }
    assert metric_names("vector($slo_ttft_s)") == set()


def pylb_sample_names() -> set[str]:
    """Every sample name pylb's /metrics can show: a registry with every series populated."""
    m = ProxyMetrics()
    snap = ProxySnapshot(
        queue_depth=1, in_progress=1, hotspot_factor=1.0, predicted_known=True,
        replicas=[ReplicaSnapshot("http://r:8000", True, ReplicaLoad(1, 1, 1, 1, 1, 1), 1, 1, 0.5, 1, 1)],
        ttft_prediction_error=(0.1, 0.3),
    )  # fmt: skip
    m.attach(lambda: snap)
    m.count_request("chat", 200)
    m.count_decision("affinity")
    m.count_retry("connect")
    m.count_ejection("http://r:8000", "probe")
    m.count_upstream_error("http://r:8000", "connect")
    m.count_scrape_error("http://r:8000")
    m.count_background_error("discovery")
    m.observe_ttft("chat", 0.1)
    m.observe_e2e("chat", 0.2)
    m.queue_wait.observe(0.01)
    m.decision_seconds.observe(1e-5)
    names = {s.name for fam in text_string_to_metric_families(m.render().decode()) for s in fam.samples}
    for series in SERIES:  # the populated registry shows every documented series
        assert any(n == series or n.startswith(series + "_") or n == series.removesuffix("_total") + "_total" for n in names), series
    return names


def vllm_sample_names() -> set[str] | None:
    """Sample names of metrics-sample.txt in ../shared/vllm beside the repository, shared/vllm
    inside it, or $PYLB_VLLM_DIR (as tests/test_scrape.py finds it); None when absent."""
    for d in (os.environ.get("PYLB_VLLM_DIR"), REPO.parent / "shared" / "vllm", REPO / "shared" / "vllm"):
        if d and (Path(d) / "metrics-sample.txt").is_file():
            text = (Path(d) / "metrics-sample.txt").read_text()
            return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    return None


def queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and templating query."""
    out = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            inner = re.fullmatch(r"label_values\((\w+),\s*\w+\)", q)
            out.append((f"variable {v['name']}", inner.group(1) if inner else q))
    return out


def test_dashboard_names_only_series_pylb_or_vllm_export() -> None:
    dash = json.loads(DASHBOARD.read_text())
    qs = queries(dash)
    assert len(qs) >= 20
    pylb = pylb_sample_names()
    vllm = vllm_sample_names()
    unknown = []
    for where, expr in qs:
        for name in metric_names(expr):
            if name.startswith("vllm:"):
                if vllm is not None and name not in vllm:
                    unknown.append((where, name))
            elif name not in pylb:
                unknown.append((where, name))
    assert not unknown, f"series that neither pylb nor vLLM export: {unknown}"
    if vllm is None:
        pytest.skip("pylb names checked; vLLM names not: ../shared/vllm/metrics-sample.txt is absent (or $PYLB_VLLM_DIR)")


def test_dashboard_shape() -> None:
    """Importable anywhere: the data source is the ${DS_PROMETHEUS} input, rates use
    $__rate_interval, and the panels the issue asks for are there."""
    dash = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    titles = " | ".join(p["title"] for p in dash["panels"]).lower()
    for want in ("predicted vs observed", "ttft p50 / p99 against the slo", "queue", "decisions by branch", "hotspot", "replica health", "scrape"):
        assert want in titles, want
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
            for rng in re.findall(r"\[([^\]]*)\]", t["expr"]):
                assert rng == "$__rate_interval", (p["title"], t["expr"])
