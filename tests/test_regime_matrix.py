"""bench/regime_matrix.py's pieces on literal cases: the single-cache hit rates, the capacity
search, the interpolated capacity and the "short" verdict; and one tiny cell end to end (a few
seconds), so the script does not rot."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import regime_matrix as rm  # noqa: E402

from pylb.sim.cluster import SimRequest  # noqa: E402
from pylb.sim.profiles import load_profile  # noqa: E402
from pylb.sim.report import RunMetrics  # noqa: E402


def sim(rid: str, t: float, blocks: list[int], tokens: int) -> SimRequest:
    h = np.array(blocks, dtype=np.uint64)
    return SimRequest(rid, t, tokens, 4, h, h)


def test_cache_hits_lead_prefix_lru_and_cap() -> None:
    work = [sim("a", 0, [1, 2, 3], 48), sim("b", 1, [1, 2, 9], 48), sim("c", 2, [1, 2, 3], 32), sim("d", 3, [7], 16)]
    assert rm.cache_hits(work, 16, math.inf).tolist() == [0, 32, 31, 0]  # c: 3 blocks held, capped at P - 1
    # a 3-block LRU: b's block 9 and d's 7 push out the oldest blocks
    assert rm.cache_hits(work, 16, 3).tolist() == [0, 32, 31, 0]
    assert rm.cache_hits(work, 16, 1).tolist() == [0, 0, 0, 0]


def metrics(qps: float, attainment: float) -> RunMetrics:
    return RunMetrics("p", qps, qps, 10, 10, 1.0, 1.0, 1.0, attainment, 0.5, 1.0, 0.0)


def test_capacity_search_and_interpolation() -> None:
    def run_at(scale: float) -> RunMetrics:  # passes up to scale 3
        return metrics(scale, 0.95 if scale <= 3.0 else 0.8)

    qps, scale, runs = rm.capacity(run_at, 1.0, 0.1, 8, 1.25)
    assert scale is not None and 3.0 / 1.1 <= qps <= 3.0 and len(runs) <= 8
    policy = {"runs": [{"qps": 2.0, "slo_attainment": 0.95}, {"qps": 4.0, "slo_attainment": 0.85}, {"qps": 1.0, "slo_attainment": 1.0}]}
    assert rm.interpolated_capacity(policy) == pytest.approx(3.0)  # 90 % halfway between 95 % at 2 and 85 % at 4
    assert rm.interpolated_capacity({"runs": [{"qps": 1.0, "slo_attainment": 0.5}]}) == 0.0
    cell = {"work_bound_infinite_cache": 10.0}
    assert rm.verdict(cell, 12.0) == "short" and rm.verdict(cell, 5.0) == "" and rm.verdict(cell, 0.0) == "none"
    capped = rm.capacity(lambda s: metrics(s, 1.0), 1.0, 0.1, 8, 2.0, max_scale=5.0)
    assert capped[1] == pytest.approx(5.0)  # up to the cap and never above it, however well it passes


def test_one_small_cell_end_to_end(tmp_path: Path) -> None:
    args = argparse.Namespace(min_requests=60, max_requests=60, span=1.0, tolerance=0.3, max_runs=2, traces=rm.TRACES)
    cell = rm.run_cell("chat", load_profile("cpu-small-llama"), 2, ["dualmap", "min-ttft"], args)
    assert cell["requests"] == 60 and cell["slo_ttft"] == 0.5
    assert 0 <= cell["hit_fleet_cache"] <= cell["hit_infinite_cache"] <= 1
    assert cell["work_bound_no_cache"] <= cell["work_bound_fleet_cache"] <= cell["work_bound_infinite_cache"]
    for spec in ("dualmap", "min-ttft"):
        p = cell["policies"][spec]
        assert 1 <= len(p["runs"]) <= 2 and p["capacity"] >= 0
    out = tmp_path / "cells.json"
    out.write_text(json.dumps({"cells": [cell]}))
    text = rm.table([str(out)])
    assert "| chat | cpu-small-llama | 2 | 0.5 |" in text
    # the same cell at a fixed rate (bench/fixed_rate.py): share, hit rate and decisions per spec;
    # a short cell has no capacity to compare at (this one is short: 60 requests end too soon)
    import fixed_rate

    specs = ["dualmap", "dualmap:migration=false"]
    assert rm.verdict(cell, rm.best_other(cell)[1]) == "short" and fixed_rate.compare_cell(cell, specs, [1.0], rm.TRACES) is None
    row = fixed_rate.compare_cell({**cell, "work_bound_infinite_cache": math.inf}, specs, [1.0], rm.TRACES)
    assert row is not None and set(row["runs"]) == {"1.0|dualmap", "1.0|dualmap:migration=false"}
    for share, hit, decisions in row["runs"].values():
        assert 0 <= share <= 1 and 0 <= hit <= 1
        assert sum(n for branch, n in decisions.items() if branch not in ("migration", "retry")) == 60  # one placement each
    assert row["runs"]["1.0|dualmap:migration=false"][2].get("migration", 0) == 0
    # --requests: the same cell on a longer run of its workload
    longer = fixed_rate.compare_cell({**cell, "work_bound_infinite_cache": math.inf}, specs[:1], [1.0], rm.TRACES, requests=90)
    assert longer is not None and longer["requests"] == 90 and row["requests"] == 60
    assert sum(n for branch, n in longer["runs"]["1.0|dualmap"][2].items() if branch not in ("migration", "retry")) == 90


def test_before_run_reads_the_named_label_else_the_default_labels() -> None:
    run = {"capacity": 1.0, "runs": []}
    before = {("chat", "p", 8): {"policies": {"dualmap": run, "dualmap:migrate_to=spare": {**run, "capacity": 2.0}}}}
    assert rm.before_run(before, ("chat", "p", 8)) is before[("chat", "p", 8)]["policies"]["dualmap"]
    assert rm.before_run(before, ("chat", "p", 8), "dualmap:migrate_to=spare")["capacity"] == 2.0  # type: ignore[index]
    assert rm.before_run(before, ("chat", "p", 8), "dualmap:other") is None
    assert rm.before_run(before, ("chat", "p", 2)) is None


def test_jittered_copies_keep_the_order_of_arrivals_and_move_each_within_the_bound() -> None:
    import fixed_rate

    work = [sim(str(i), t, [i + 1], 16) for i, t in enumerate([0.0, 0.004, 1.0, 1.0, 3.0, 2.0])]
    assert fixed_rate.jittered(work, 0, 0.5) is work  # seed 0: the workload itself
    for seed in (1, 2, 3):
        copy = fixed_rate.jittered(work, seed, 0.5)
        assert [r.request_id for r in copy] == [r.request_id for r in work]  # same requests, same places
        before = sorted(range(len(work)), key=lambda i: (work[i].arrival_s, i))
        moved = [copy[i].arrival_s for i in before]
        assert moved == sorted(moved)  # no two arrivals swap (the equal pair at 1.0 stays put)
        assert copy[2].arrival_s == copy[3].arrival_s == 1.0
        assert all(abs(a.arrival_s - b.arrival_s) <= 0.5 for a, b in zip(copy, work))
        assert abs(copy[1].arrival_s - 0.004) <= 0.002  # at most half the gap to its neighbour
    assert [r.arrival_s for r in fixed_rate.jittered(work, 1, 0.5)] != [r.arrival_s for r in work]
    assert [r.arrival_s for r in fixed_rate.jittered(work, 1, 0.5)] == [r.arrival_s for r in fixed_rate.jittered(work, 1, 0.5)]


def test_paired_differences_pair_each_workload_copy() -> None:
    import fixed_rate

    runs = {"1.0|a": [0.9], "1.0|b": [0.8], "1.0|a|1": [0.5], "1.0|b|1": [0.7], "0.9|a": [1.0], "0.9|b": [1.0], "0.9|a|1": [0.9], "0.9|b|1": [0.8]}
    d = fixed_rate.paired_differences({"runs": runs}, ["a", "b"], [0.9, 1.0], 1)
    assert d.tolist() == pytest.approx([-0.05, 0.05])  # (0 - 0.1) / 2 on the trace, (-0.1 + 0.2) / 2 on copy 1


def test_policy_spec_marks_set_router_options() -> None:
    label, o = rm.policy_spec("dualmap+admit1+decoding#128@5", 0.5)
    assert label == "dualmap" and (o.admission_factor, o.prefill_decoding, o.prefill_intercept, o.key_block_tokens, o.slo_ttft) == (1.0, True, False, 128, 5.0)
    label, o = rm.policy_spec("cache-aware+intercept", 0.5)
    assert label == "cache-aware" and o.prefill_intercept and not o.prefill_decoding and o.slo_ttft == 0.5
    with pytest.raises(ValueError, match=r"\+decodng"):
        rm.policy_spec("dualmap+decodng", 0.5)
