"""bench/peers/sim_screen.py: harness targets in the simulator, per seed and rate scale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "peers"))

import sim_screen  # noqa: E402

SPEC = "synthetic:multi-turn:groups=2,sessions=12,turns=3,system_tokens=256,user_tokens=32,answer_tokens=8,rate=6,think_time_s=0.5"


def test_with_seed_sets_or_replaces_the_generators_seed() -> None:
    assert sim_screen.with_seed(SPEC, 3) == SPEC + ",seed=3"
    assert sim_screen.with_seed(SPEC + ",seed=7", 3) == SPEC + ",seed=3"
    assert sim_screen.with_seed(SPEC + ", seed = -7", 3) == SPEC + ",seed=3"  # one seed, the new one
    assert sim_screen.with_seed("synthetic:multi-turn", 2) == "synthetic:multi-turn:seed=2"
    assert sim_screen.with_seed("synthetic:multi-turn:", 2) == "synthetic:multi-turn:seed=2"
    assert sim_screen.with_seed("synthetic:zipf:seed=1,requests=50", 4) == "synthetic:zipf:requests=50,seed=4"
    with pytest.raises(ValueError, match="only synthetic"):
        sim_screen.with_seed("mooncake:trace.jsonl", 1)


def test_a_screen_ranks_load_as_it_should_and_writes_its_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "screen.json"
    code = sim_screen.main(["--workload", SPEC, "--rate-scales", "0.05,20", "--seeds", "0,1", "--slos", "0.2,60",
                            "--profile", "cpu-small-llama", "--target", "rr=pylb --policy round-robin",
                            "--target", "sglang-ca=sglang --policy cache_aware", "--json", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# python bench/peers/sim_screen.py --workload") and "| 0.05 | rr |" in printed
    doc = json.loads(out.read_text())
    light, heavy = doc["result"]["0.05"], doc["result"]["20"]
    for name in ("rr", "sglang-ca"):
        assert [r["seed"] for r in light[name]["per_seed"]] == [0, 1]
        assert light[name]["within"]["60"] == pytest.approx(100.0)  # everything within a minute
        assert light[name]["within"]["0.2"] > heavy[name]["within"]["0.2"]  # 400x the load waits longer
        assert light[name]["within"]["0.2"] == pytest.approx(sum(r["0.2"] for r in light[name]["per_seed"]) / 2)
    assert light["sglang-ca"]["hit"] > light["rr"]["hit"]  # the cache-aware analog keeps the prefixes


def test_bad_arguments_name_the_flag_before_anything_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--workload", SPEC, "--rate-scales", "1"]
    for argv, message in (
        ([*base, "--target", "nameless"], "--target 'nameless': expected NAME=KIND ARGS"),
        ([*base, "--target", "a=pylb", "--target", "a=pylb"], "the name 'a' is given twice"),
        ([*base, "--target", "a=sglang --policy bogus"], "no simulated analog"),
        ([*base, "--target", "a=pylb --no-such-flag"], "its arguments are not `pylb serve`'s"),
        ([*base, "--target", "a=pylb", "--seeds", "x"], "--seeds 'x'"),
        ([*base, "--target", "a=pylb", "--slo-ttft", "0"], "--slo-ttft 0.0: expected a positive"),
        ([*base, "--target", "a=pylb", "--replicas", "0"], "--replicas 0: expected at least 1"),
        (["--workload", SPEC, "--rate-scales", "0", "--target", "a=pylb"], "--rate-scales: --rate-scales: expected"),
        (["--workload", SPEC, "--rate-scales", "1,1.0", "--target", "a=pylb"], "each scale once"),
        (["--workload", "mooncake:x.jsonl", "--rate-scales", "1", "--target", "a=pylb"], "only synthetic"),
        (["--workload", "synthetic:multi-turn:turns=0", "--rate-scales", "1", "--target", "a=pylb"], "turns"),
        ([*base, "--target", "a=pylb", "--json", str(tmp_path / "no" / "out.json")], "no directory"),
    ):
        with pytest.raises(SystemExit):
            sim_screen.main(argv)
        assert message in capsys.readouterr().err, argv
