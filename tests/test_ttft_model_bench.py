"""bench/ttft_model.py on a literal log: runs split at the harness's command lines, and a model
with the decoding term predicting latencies that carry a cost per decoding request better than
the fit through the origin."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import ttft_model  # noqa: E402

from pylb.observability.logging import JsonFormatter  # noqa: E402
from pylb.router.core import CoreRouter  # noqa: E402,F401  (the logger the lines come from)


def observation_line(replica: str, ahead: int, decoding: int, latency: float) -> str:
    """One line as the core logs it at debug level, through pylb's own JSON formatter."""
    rec = logging.LogRecord("pylb.router.core", logging.DEBUG, __file__, 0, "ttft observation", (), None)
    for k, v in {"replica": replica, "ahead_tokens": ahead, "decoding": decoding, "latency_s": latency, "waited_s": 0.0, "predicted_s": 0.1}.items():
        setattr(rec, k, v)
    return JsonFormatter().format(rec)


def test_runs_are_split_and_the_decoding_model_wins_where_decoding_costs(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    lines = []
    for run in range(2):
        lines.append(f"$ pylb serve --run {run}")
        lines.append('{"level": "info", "msg": "request"}')
        for _ in range(150):
            ahead, decoding = int(rng.integers(50, 800)), int(rng.integers(0, 10))
            lines.append(observation_line(f"r{run % 2}", ahead, decoding, 2e-3 * ahead + 0.2 * decoding))
    log = tmp_path / "router-pylb.log"
    log.write_text("\n".join(lines) + "\n")
    runs = ttft_model.read_runs(log)
    assert [len(r) for r in runs] == [150, 150]
    err = {name: np.concatenate([ttft_model.replay(r, a, d, 1e-4, 0.05) for r in runs]) for name, (a, d) in ttft_model.MODELS.items()}
    assert np.median(err["decoding"]) < 0.5 * np.median(err["origin"])
    out = tmp_path / "out.json"
    sys.argv = ["ttft_model.py", str(log), "--json", str(out)]
    assert ttft_model.main() == 0
    row = json.loads(out.read_text())["results"][0]
    assert row["runs"] == 2 and row["first_tokens"] == 300 and set(row["models"]) == set(ttft_model.MODELS)
