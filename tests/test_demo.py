"""`pylb demo` end to end, small: a real fake-vLLM fleet and `pylb serve` as subprocesses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_runs_both_policies_and_reports_replica_hit_rates(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pylb.cli", "demo", "--replicas", "2", "--sessions", "6", "--turns", "3",
         "--rate-scale", "10", "--speed", "5", "--no-progress", "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dualmap" in proc.stdout and "round-robin" in proc.stdout and "hit rate" in proc.stdout
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dualmap", "round-robin"}
    for row in rows.values():
        assert row["requests"] == 18 and row["completed"] == 18 and row["errors"] == 0
        # Every turn after the first re-sends its session's earlier text: the replicas' own
        # counters must show hits, whatever the policy.
        assert 0.0 < row["hit_rate"] < 1.0
        assert row["ttft_p50"] is not None and row["ttft_p50"] <= row["ttft_p99"]


def test_demo_rejects_an_empty_policy_list(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pylb.cli", "demo", "--policies", ","],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "--policies" in proc.stderr
