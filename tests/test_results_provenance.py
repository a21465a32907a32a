"""Results name their trace by a path relative to the repository and its SHA-256
(`pylb.workload.loaders.describe_workload`), and the committed docs carry no machine's absolute
paths: a reader of the repository has `../shared/traces/`, not the development machine's folders."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

from pylb.workload.loaders import describe_workload

REPO = Path(__file__).resolve().parents[1]
MACHINE_PATHS = ("/work/", "/home/", "/root/", "/Users/")


def test_describe_workload_names_a_trace_relative_with_its_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "traces").mkdir()
    trace = tmp_path / "traces" / "t.jsonl"
    trace.write_bytes(b'{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}\n')
    digest = hashlib.sha256(trace.read_bytes()).hexdigest()
    repo = tmp_path / "repo"
    repo.mkdir()
    monkeypatch.chdir(repo)
    expected = {"name": os.path.join("..", "traces", "t.jsonl"), "sha256": digest}
    assert describe_workload(str(trace)) == expected  # an absolute path is made relative
    assert describe_workload("../traces/./t.jsonl") == expected
    assert describe_workload("synthetic:multi-turn") == {"name": "synthetic:multi-turn", "sha256": None}
    with pytest.raises(FileNotFoundError):
        describe_workload("../traces/missing.jsonl")


def strings(doc: Any) -> list[str]:
    if isinstance(doc, dict):
        return [s for v in doc.values() for s in strings(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in strings(v)]
    return [doc] if isinstance(doc, str) else []


def results_files() -> list[Path]:
    files = sorted((REPO / "docs" / "results").glob("*.json"))
    if not files:
        pytest.skip("no docs/results in this checkout")
    return files


def test_committed_results_record_the_trace_by_relative_name_and_hash() -> None:
    for path in results_files():
        doc = json.loads(path.read_text(encoding="utf-8"))
        assert not [s for s in strings(doc) if s.startswith("/")], f"{path.name}: an absolute path"
        if "trace" not in doc.get("config", doc):
            continue  # peers/fidelity results name their workload by spec and content hash instead
        trace = doc["config"]["trace"] if "config" in doc else doc["trace"]
        assert set(trace) == {"name", "sha256"} and not os.path.isabs(trace["name"]), path.name
        # the trace beside the repository (or in $PYLB_TRACES) is the one the results came from
        for local in (REPO / trace["name"], Path(os.environ.get("PYLB_TRACES", "/nonexistent")) / Path(trace["name"]).name):
            if local.exists():
                assert hashlib.sha256(local.read_bytes()).hexdigest() == trace["sha256"], f"{path.name}: {local} differs"


def test_docs_and_bench_scripts_carry_no_machine_paths() -> None:
    files = [REPO / "README.md", REPO / "BENCHMARKS.md", *(REPO / "docs").glob("*.md"), *(REPO / "bench").glob("*.py")]
    files = [f for f in files if f.exists()]
    if not files:
        pytest.skip("not running from a source checkout")
    for f in files:
        text = f.read_text(encoding="utf-8")
        assert not [p for p in MACHINE_PATHS if p in text], f"{f.relative_to(REPO)} names an absolute machine path"
    assert "../shared/DESIGN.md" not in (REPO / "README.md").read_text(encoding="utf-8")
