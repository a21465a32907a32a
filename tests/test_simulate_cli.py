"""`pylb simulate`: output schema, sweep, plot, and clear errors for bad arguments."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pylb.cli import main
from pylb.router import registry

RUN_KEYS = {
    "policy", "rate_scale", "qps", "requests", "completed", "ttft_p50", "ttft_p90", "ttft_p99",
    "slo_attainment", "hit_rate", "hotspot_factor",
}  # fmt: skip


@pytest.fixture()
def trace(tmp_path: Path) -> Path:
    """A small Mooncake-format trace: 60 requests over 30 s, conversations sharing prefixes."""
    rng = random.Random(1)
    lines, next_id, convs = [], 1, []
    for i in range(60):
        if convs and rng.random() < 0.5:
            ids = rng.choice(convs) + [next_id]
            next_id += 1
        else:
            ids = [0] + list(range(next_id, next_id + rng.randint(1, 4)))
            next_id += len(ids) - 1
        convs.append(ids)
        length = (len(ids) - 1) * 512 + rng.randint(1, 512)
        lines.append({"timestamp": i * 500, "input_length": length, "output_length": rng.randint(1, 40), "hash_ids": ids})
    p = tmp_path / "small.jsonl"
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


@pytest.fixture()
def fast_profile(tmp_path: Path) -> Path:
    p = tmp_path / "fast.yaml"
    p.write_text(
        "block_size: 16\nnum_blocks: 4096\nmax_num_seqs: 64\nmax_num_batched_tokens: 4096\n"
        "c0: 0.005\nc_prefill: 0.0002\nc_decode: 0.0001\nc_attn: 0.00000005\n"
    )
    return p


def test_single_run_writes_the_json_schema(trace: Path, fast_profile: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.json"
    rc = main(["simulate", "--trace", str(trace), "--replicas", "2", "--profile", str(fast_profile),
               "--policy", "round-robin", "--rate-scale", "2", "--json", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc) >= {"runs", "capacity"}
    (run,) = doc["runs"]
    assert set(run) == RUN_KEYS
    assert (run["policy"], run["rate_scale"], run["requests"], run["completed"]) == ("round-robin", 2.0, 60, 60)
    assert run["qps"] == pytest.approx(60 / 14.75)
    assert 0 <= run["slo_attainment"] <= 1 and 0 < run["hit_rate"] < 1 and run["hotspot_factor"] >= 1
    assert run["ttft_p50"] <= run["ttft_p90"] <= run["ttft_p99"]
    assert doc["capacity"] == {"round-robin": None}  # not measured without --sweep
    table = capsys.readouterr().out
    assert "round-robin" in table and "hit" in table


def test_sweep_all_policies_with_plot(trace: Path, fast_profile: Path, tmp_path: Path) -> None:
    out, png = tmp_path / "sweep.json", tmp_path / "sweep.png"
    rc = main(["simulate", "--trace", str(trace), "--replicas", "2", "--profile", str(fast_profile), "--policy", "all",
               "--sweep", "--sweep-runs", "4", "--slo-ttft", "1", "--json", str(out), "--plot", str(png), "--no-progress"])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["capacity"]) == set(registry.names())
    runs = [r for r in doc["runs"] if r["policy"] == "round-robin"]
    assert 2 <= len(runs) <= 4 and [r["rate_scale"] for r in runs[:2]] in ([1.0, 2.0], [1.0, 0.5])
    passing = [r["qps"] for r in runs if r["slo_attainment"] >= 0.9]
    assert doc["capacity"]["round-robin"] == (max(passing) if passing else 0.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_tolerance_bounds_the_bisection(trace: Path, fast_profile: Path, tmp_path: Path) -> None:
    def sweep_runs(tolerance: str) -> list[dict]:
        out = tmp_path / f"sweep-{tolerance}.json"
        rc = main(["simulate", "--trace", str(trace), "--replicas", "1", "--profile", str(fast_profile), "--policy", "round-robin",
                   "--sweep", "--sweep-runs", "12", "--sweep-tolerance", tolerance, "--slo-ttft", "1", "--json", str(out), "--no-progress"])  # fmt: skip
        assert rc == 0
        doc = json.loads(out.read_text())
        assert doc["config"]["sweep_tolerance"] == float(tolerance)
        return doc["runs"]

    coarse, fine = sweep_runs("4"), sweep_runs("0.01")
    passing = sorted(r["rate_scale"] for r in fine if r["slo_attainment"] >= 0.9)
    failing = sorted(r["rate_scale"] for r in fine if r["slo_attainment"] < 0.9)
    assert passing and failing
    # the coarse search stops once it brackets capacity within a factor 2 (< 1 + 4): no bisection
    assert len(coarse) < len(fine)
    if len(fine) < 12:  # the fine one bisected until the bracket was within 1 %
        assert failing[0] / passing[-1] <= 1.01


def test_builtin_profile_and_limit(trace: Path, capsys) -> None:
    rc = main(["simulate", "--trace", str(trace), "--replicas", "1", "--profile", "dualmap-910b", "--limit", "10", "--no-progress"])
    assert rc == 0
    assert "10 requests; 1 replicas of dualmap-910b" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, flag, value",
    [
        (["--replicas", "0"], "--replicas", "'0'"),
        (["--replicas", "two"], "--replicas", "'two'"),
        (["--rate-scale", "-1"], "--rate-scale", "'-1'"),
        (["--slo-ttft", "nan"], "--slo-ttft", "'nan'"),
        (["--scrape-interval", "0"], "--scrape-interval", "'0'"),
        (["--limit", "0"], "--limit", "'0'"),
        (["--sweep", "--sweep-tolerance", "0"], "--sweep-tolerance", "'0'"),
        (["--rate-scale", "2", "--sweep"], "--sweep", "not allowed with argument --rate-scale"),
    ],
)
def test_bad_flag_values_exit_2_by_argparse(trace: Path, capsys, args: list[str], flag: str, value: str) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--trace", str(trace), *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and value in err and "Traceback" not in err


def test_bad_values_found_after_parsing_exit_2(trace: Path, tmp_path: Path, capsys) -> None:
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("block_size: 16\nnum_blocks: -3\n")
    neg = tmp_path / "neg.yaml"
    neg.write_text(
        "block_size: 16\nnum_blocks: 64\nmax_num_seqs: 4\nmax_num_batched_tokens: 64\n"
        "c0: 0\nc_prefill: -0.1\nc_decode: 0\nc_attn: 0\n"
    )
    bad_trace = tmp_path / "bad.jsonl"
    bad_trace.write_text('{"timestamp": 0}\n')
    cases = [
        (["--policy", "round-robin,nope"], ["--policy", "'nope'", "round-robin"]),
        (["--profile", "h200-magic"], ["--profile", "'h200-magic'", "dualmap-910b"]),
        (["--profile", str(bad_yaml)], ["--profile", "missing profile field"]),
        (["--profile", str(neg)], ["--profile", "c_prefill", "-0.1"]),
        (["--trace", str(tmp_path / "missing.jsonl")], ["--trace", "missing.jsonl"]),
        (["--trace", str(bad_trace)], ["--trace", ":1:", "input_length"]),
        (["--trace", str(tmp_path / "x.csv")], ["--trace"]),
        (["--json", str(tmp_path / "no" / "such" / "dir.json")], ["--json", "directory"]),
    ]
    (tmp_path / "x.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    for args, needles in cases:
        argv = ["simulate", "--trace", str(trace), "--no-progress", *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("pylb simulate: error: argument "), err
        for needle in needles:
            assert needle in err, (needle, err)
        assert "Traceback" not in err


def test_policy_specs_and_router_options(trace: Path, fast_profile: Path, tmp_path: Path, capsys) -> None:
    """`NAME:key=value` runs a policy with options under that label; --router-option sets RouterOptions."""
    out = tmp_path / "ablate.json"
    rc = main(["simulate", "--trace", str(trace), "--replicas", "2", "--profile", str(fast_profile), "--no-progress",
               "--policy", "dualmap, dualmap:migration=no:key_depth=2", "--router-option", "max_unprefilled_requests=2",
               "--router-option", "queue_order=fifo", "--json", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["dualmap", "dualmap:migration=false:key_depth=2"]
    assert doc["config"]["router_options"]["max_unprefilled_requests"] == 2
    assert doc["config"]["router_options"]["queue_order"] == "fifo"
    for args, needles in (
        (["--policy", "dualmap:wings=2"], ["--policy", "no option 'wings'"]),
        (["--policy", "dualmap:migration=perhaps"], ["--policy", "migration='perhaps'"]),
        (["--router-option", "max_unprefilled_tokens=lots"], ["--router-option", "max_unprefilled_tokens", "'lots'"]),
        (["--router-option", "queue_order=random"], ["--router-option", "queue_order"]),
        (["--router-option", "nonsense=1"], ["--router-option", "nonsense"]),
    ):
        capsys.readouterr()
        assert main(["simulate", "--trace", str(trace), "--no-progress", *args]) == 2, args
        err = capsys.readouterr().err
        for needle in needles:
            assert needle in err, (needle, err)


def test_baseline_policy_options_from_the_command_line(trace: Path, fast_profile: Path, tmp_path: Path, capsys) -> None:
    """The baselines' published parameters are policy options: `--policy cache-aware:cache_threshold=0.5`
    runs under that label, and an out-of-range value is a usage error naming policy, option and value."""
    out = tmp_path / "baselines.json"
    rc = main(["simulate", "--trace", str(trace), "--replicas", "2", "--profile", str(fast_profile), "--no-progress",
               "--policy", "cache-aware:cache_threshold=0.5,chwbl:load_factor=1.5,weighted-score:prefix_weight=1",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert [r["policy"] for r in doc["runs"]] == ["cache-aware:cache_threshold=0.5", "chwbl:load_factor=1.5",
                                                  "weighted-score:prefix_weight=1.0"]  # fmt: skip
    assert all(r["completed"] == 60 for r in doc["runs"])
    for spec, needles in (
        ("cache-aware:cache_threshold=2", ["--policy", "'cache-aware'", "cache_threshold='2'", "in [0, 1]"]),
        ("chwbl:load_factor=0.5", ["--policy", "'chwbl'", "load_factor='0.5'", "must be at least 1"]),
        ("weighted-score:queue_weight=-1", ["--policy", "'weighted-score'", "queue_weight='-1'", "must be zero or a positive number"]),
        ("preble-e2:rebalance_ratio=fast", ["--policy", "'preble-e2'", "rebalance_ratio='fast'", "a number"]),
    ):
        capsys.readouterr()
        assert main(["simulate", "--trace", str(trace), "--no-progress", "--policy", spec]) == 2, spec
        err = capsys.readouterr().err
        assert err.startswith("pylb simulate: error: argument --policy: "), err
        for needle in needles:
            assert needle in err, (needle, err)
        assert "Traceback" not in err


def test_help_lists_policy_names_and_trace_forms(capsys) -> None:
    """`simulate --help` names every registered policy and every form `--trace` accepts."""
    from pylb.workload.synthetic import GENERATORS

    with pytest.raises(SystemExit) as exc:
        main(["simulate", "--help"])
    assert exc.value.code == 0
    text = "".join(capsys.readouterr().out.split())  # argparse wraps lines, even at hyphens
    for name in registry.names():
        assert name in text, name
    for needle in (".jsonl", "Mooncake", ".csv", "Azure", "synthetic:NAME", *GENERATORS):
        assert needle in text, needle


def test_json_names_the_trace_by_path_and_hash(trace: Path, fast_profile: Path, tmp_path: Path, monkeypatch) -> None:
    """The trace is recorded as {"name": relative path as given, "sha256": of its bytes}; a
    synthetic spec has no file, so no hash; a finished command says "complete"."""
    import hashlib

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out.json"
    base = ["simulate", "--replicas", "2", "--profile", str(fast_profile), "--no-progress", "--json", str(out)]
    assert main([*base, "--trace", str(trace)]) == 0  # absolute path: recorded relative to the current folder
    doc = json.loads(out.read_text())
    assert doc["status"] == "complete"
    assert doc["config"]["trace"] == {"name": "small.jsonl", "sha256": hashlib.sha256(trace.read_bytes()).hexdigest()}
    spec = "synthetic:zipf:requests=50,seed=1"
    assert main([*base, "--trace", spec]) == 0
    assert json.loads(out.read_text())["config"]["trace"] == {"name": spec, "sha256": None}


def test_sigint_mid_sweep_keeps_finished_policies(tmp_path: Path) -> None:
    """A real `pylb simulate --sweep` process gets SIGINT after its first policy's capacity is
    printed: it stops with one line on stderr and status 130, no traceback, and the JSON keeps
    that policy's runs and capacity (status "interrupted"). Rows appear as runs finish."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep.json"
    policies = ["round-robin", "least-load", "consistent-hash", "dualmap", "min-ttft"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pylb.cli", "simulate", "--trace", "synthetic:zipf:requests=2000,seed=1", "--replicas", "2",
         "--policy", ",".join(policies), "--sweep", "--sweep-runs", "6", "--no-progress", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        seen = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line, "pylb simulate ended before its first policy's capacity was printed"
            seen.append(line)
            if line.startswith("round-robin: effective request capacity"):
                break
        # the rows came one by one, before the command ended: the first policy's rows are there
        assert sum(1 for s in seen if s.startswith("round-robin ")) >= 2
        first = json.loads(out.read_text())  # written after every run
        assert first["status"] == "running" and {r["policy"] for r in first["runs"]} == {"round-robin"}
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    notes = [s for s in err.splitlines() if "interrupted" in s]
    assert len(notes) == 1 and str(out.name) in notes[0], err
    assert "estimate" in err  # the time estimate came up front
    doc = json.loads(out.read_text())
    assert doc["status"] == "interrupted"
    assert "round-robin" in doc["capacity"] and len(doc["capacity"]) < len(policies)
    assert list(doc["capacity"]) == policies[: len(doc["capacity"])]
    rr = [r for r in doc["runs"] if r["policy"] == "round-robin"]
    assert len(rr) >= 2 and doc["capacity"]["round-robin"] == max(r["qps"] for r in rr if r["slo_attainment"] >= 0.9)
    # the finished policies' capacities are printed too
    assert "effective request capacity (qps): round-robin" in rest


def test_simulate_schedule_file_applies_and_bad_entries_name_themselves(fast_profile: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "churn.yaml"
    good.write_text("- {at: 1.0, kind: add, target: replica-9}\n- {at: 2.0, kind: fail, target: replica-0}\n")
    out = tmp_path / "r.json"
    base = ["simulate", "--trace", "synthetic:zipf:requests=200,seed=1", "--replicas", "2", "--profile", str(fast_profile), "--no-progress"]
    assert main([*base, "--schedule", str(good), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["schedule"][1] == {"at": 2.0, "kind": "fail", "target": "replica-0"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {at: 1.0, kind: remove, target: replica-5}\n")
    capsys.readouterr()
    assert main([*base, "--schedule", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "--schedule" in err and "replica-5" in err and "not in rotation" in err
    bad.write_text("- {at: 1.0, kind: remove}\n")
    assert main([*base, "--schedule", str(bad)]) == 2
    assert "entry 0 must have exactly the keys at, kind, target" in capsys.readouterr().err
