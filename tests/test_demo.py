"""`pylb demo` end to end, small: a real fake-vLLM fleet and `pylb serve` as subprocesses; its
live view under a real pseudo-terminal; the pieces it prints, on literal values."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from pylb.demo import DemoRow, LiveView, ReplicaSample, verdict

SMALL = ["--replicas", "2", "--sessions", "6", "--turns", "3", "--rate-scale", "10", "--speed", "5"]


def test_demo_runs_both_policies_and_reports_replica_hit_rates(tmp_path: Path) -> None:
    out = tmp_path / "demo.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pylb.cli", "demo", *SMALL, "--json", str(out)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dualmap" in proc.stdout and "round-robin" in proc.stdout and "hit rate" in proc.stdout
    assert "\x1b[" not in proc.stdout  # stdout is not a terminal: no live view
    assert "dualmap against round-robin: " in proc.stdout
    rows = {r["policy"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"dualmap", "round-robin"}
    for row in rows.values():
        assert row["requests"] == 18 and row["completed"] == 18 and row["errors"] == 0
        # Every turn after the first re-sends its session's earlier text: the replicas' own
        # counters must show hits, whatever the policy.
        assert 0.0 < row["hit_rate"] < 1.0
        assert row["ttft_p50"] is not None and row["ttft_p50"] <= row["ttft_p90"] <= row["ttft_p99"]
        # by default pylb routes on the fake replicas' KV-cache events, and says how far its
        # predicted hit rate was from the replicas' counters
        assert row["cache_state"] == "events" and 0.0 < row["predicted_hit_rate"] <= 1.0
        assert f"{row['policy']}: pylb predicted a " in proc.stdout


def test_demo_live_view_on_a_terminal_and_plot(tmp_path: Path) -> None:
    """Under a pseudo-terminal the demo redraws per-replica lines in place while it runs; --plot
    writes a PNG."""
    png = tmp_path / "demo.png"
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pylb.cli", "demo", *SMALL, "--policies", "dualmap", "--plot", str(png)],
        stdout=slave, stderr=subprocess.DEVNULL, cwd=tmp_path,
    )  # fmt: skip
    os.close(slave)
    chunks = []
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    frames = text.count("requests answered")
    assert frames >= 2, text[-2000:]  # redrawn while it ran, not printed once
    assert "\x1b[3F" in text  # each new frame moves back over the last (a title and 2 replica lines)
    assert "replica 1" in text and "replica 2" in text and "hit rate" in text
    assert "18/18 requests answered" in text  # the last frame stays
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_live_view_frame() -> None:
    out = io.StringIO()
    view = LiveView("dualmap", ["http://a", "http://b"], "http://pylb", 160, out=out)
    lines = view.render(12.34, 84, [ReplicaSample(6, 2, 780.0, 1000.0), ReplicaSample(4, 0, 0.0, 0.0)])
    assert lines[0] == "dualmap:  12.3 s, 84/160 requests answered"
    assert "#" * 24 in lines[1] and "running   6" in lines[1] and "waiting   2" in lines[1] and lines[1].endswith("hit rate  78%")
    assert "#" * 12 + "." * 12 in lines[2] and lines[2].endswith("hit rate    -")  # half the load; no queries yet
    view.show(lines)
    view.show(lines)
    first, second = out.getvalue().split("\x1b[3F")
    assert first.count("\x1b[2K") == 3 and second.count("\x1b[2K") == 3


def test_verdict_is_computed_from_the_rows() -> None:
    a = DemoRow("dualmap", 160, 160, 0, 0.75, 0.25, 0.5, 1.0, 0.95, 20.0)
    b = DemoRow("round-robin", 160, 160, 0, 0.54, 0.6, 1.9, 2.6, 0.65, 20.0)
    assert verdict(a, b, 1.0) == ("dualmap against round-robin: median TTFT 2.4x lower, 30 points more requests within 1 s, "
                                  "prefix-cache hit rate 75% against 54%")  # fmt: skip
    assert "2.4x higher" in verdict(b, a, 1.0) and "30 points fewer" in verdict(b, a, 1.0)


def test_demo_rejects_an_empty_policy_list(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "pylb.cli", "demo", "--policies", ","],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "--policies" in proc.stderr
