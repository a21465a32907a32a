"""bench/fidelity.py's slowdown fit: "real" runs made by the simulator itself with a profile slowed
by a known factor must be matched best by that factor, and the written profile must be that one."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import fidelity  # noqa: E402

from pylb.sim.profiles import TIME_FIELDS, load_profile, load_profile_file  # noqa: E402

SPEC = "synthetic:multi-turn:groups=2,sessions=16,turns=3,system_tokens=256,user_tokens=32,answer_tokens=8,rate=6,think_time_s=0.5"
TARGETS = {"pylb": "pylb=pylb", "sglang-ca": "sglang-ca=sglang --policy cache_aware", "vllmr-x": "vllmr-x=vllm-router --policy random"}


def harness_results(path: Path, measured: dict[str, tuple[float, float, float]] | None = None) -> None:
    """A bench/peers/run.py results file for SPEC on 2 replicas; `measured`: target -> (hit, p50, SLO share)."""
    targets = {}
    for name, spec in TARGETS.items():
        hit, p50, slo = (measured or {}).get(name, (0.5, 0.1, 0.5))
        targets[name] = {"spec": spec, "reps": 1, "hit_rate": {"mean": hit}, "ttft_p50": {"mean": p50}, "slo_attainment": {"mean": slo}}
    doc = {"command": "python bench/peers/run.py ...", "workload": {"spec": SPEC}, "replicas": {"count": 2}, "slo_ttft_s": 0.3, "rate_scale": 1.0, "targets": targets}
    path.write_text(json.dumps(doc))


def test_the_fit_recovers_the_slowdown_that_made_the_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = load_profile("cpu-small-llama")
    truth = base.slowed(1.5)
    results = tmp_path / "peers.json"
    harness_results(results)
    (rows,) = fidelity.compare(results, [truth], fidelity._workloads_module())
    assert [r.target for r in rows] == ["pylb", "sglang-ca"]  # no simulated analog of vllm-router's random: skipped
    assert "no simulated analog" in capsys.readouterr().err
    harness_results(results, {r.target: (r.sim_hit, r.sim_p50, r.sim_slo) for r in rows})  # the "real" runs

    out = tmp_path / "fleet.yaml"
    assert fidelity.main(["--results", str(results), "--factors", "1,1.5,2.5", "--write-profile", str(out), "--json", str(tmp_path / "f.json")]) == 0
    printed = capsys.readouterr().out
    assert "-> best x1.5" in printed
    doc = json.loads((tmp_path / "f.json").read_text())
    assert doc["best_factor"] == 1.5 and doc["fit_error"]["x1.5"] == 0.0 < doc["fit_error"]["x1"]
    assert all(r["slo_ok"] and r["p50_ok"] and r["hit_ok"] for r in doc["rows"])
    written = load_profile_file(out)
    assert written.name == "fleet" and (written.block_size, written.num_blocks) == (base.block_size, base.num_blocks)
    for f in TIME_FIELDS:
        assert getattr(written, f) == pytest.approx(1.5 * getattr(base, f), rel=1e-3)
    assert "fidelity.py" in out.read_text().splitlines()[0]  # the command in the header


def test_the_fit_recovers_a_loaded_overhead_and_compares_engine_phases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import dataclasses

    base = load_profile("cpu-small-llama")
    truth = dataclasses.replace(base.slowed(1.2), loaded_request_overhead=0.1)
    results = tmp_path / "peers.json"
    harness_results(results)
    (rows,) = fidelity.compare(results, [truth], fidelity._workloads_module())
    harness_results(results, {r.target: (r.sim_hit, r.sim_p50, r.sim_slo) for r in rows})
    doc = json.loads(results.read_text())  # the harness's engine phases, as vLLM's histograms give them
    doc["targets"]["pylb"]["engine_phases"] = {"queue_mean": 0.05, "prefill_mean": 0.1, "decode_mean": 0.4, "preemptions": 2.0, "engine_steps": 300.0}
    results.write_text(json.dumps(doc))

    out = tmp_path / "fitted.yaml"
    assert fidelity.main(["--results", str(results), "--factors", "1,1.2", "--overheads", "0,0.1,0.3", "--write-profile", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "-> best x1.2 loaded 100 ms" in printed
    assert "Inside the engines" in printed and "| peers.json | pylb | 150 / " in printed  # queue + prefill, real 150 ms
    written = load_profile_file(out)
    assert written.loaded_request_overhead == pytest.approx(0.1) and written.c0 == pytest.approx(1.2 * base.c0)
    assert written.request_overhead == pytest.approx(1.2 * base.request_overhead)


def test_slos_score_the_kept_requests_and_the_simulated_run_at_each_slo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    results = tmp_path / "peers.json"
    harness_results(results)
    doc = json.loads(results.read_text())
    # two repetitions of pylb's records (the harness's --keep-requests): TTFTs 0.1-0.4 s and an error
    records = [{"ok": True, "ttft_s": t} for t in (0.1, 0.2, 0.3, 0.4)] + [{"ok": False, "ttft_s": None}]
    doc["runs"] = [{"target": t, "rep": k, "requests": records} for t in ("pylb", "sglang-ca") for k in (0, 1)]
    results.write_text(json.dumps(doc))
    (rows,) = fidelity.compare(results, [load_profile("cpu-small-llama")], fidelity._workloads_module(), [0.25, 0.3, 10])
    by = {r.target: r for r in rows}
    assert by["pylb"].slo_shares["0.25"][0] == pytest.approx(2 / 5)  # the error counts as a miss
    assert by["pylb"].slo_shares["10"][0] == pytest.approx(4 / 5)
    for r in rows:  # the simulated side at the run's own SLO (0.3 s) is the row's own share
        assert r.slo_shares["0.3"][1] == pytest.approx(r.sim_slo)
        assert r.slo_shares["0.25"][1] <= r.slo_shares["0.3"][1] <= r.slo_shares["10"][1]
    assert fidelity.main(["--results", str(results), "--slos", "0.25,10"]) == 0
    printed = capsys.readouterr().out
    assert "within 0.25 s real / sim" in printed and "| peers.json | 10 s |" in printed

    # the simulated router's first tokens, in the live router's log format (bench/ttft_model.py reads them)
    import ttft_model

    obs = tmp_path / "obs"
    assert fidelity.main(["--results", str(results), "--observations", str(obs)]) == 0
    capsys.readouterr()
    (log,) = obs.glob("peers__pylb__*.jsonl")  # pylb's target only (the analogs' runs are not written)
    (run,) = ttft_model.read_runs(log)
    assert len(run) == 48 and all(o["latency_s"] > 0 and o["ahead_tokens"] >= 0 and o["decoding"] >= 0 for o in run)

    del doc["runs"]  # no records: the SLO table is left out, with a word on stderr
    results.write_text(json.dumps(doc))
    assert fidelity.main(["--results", str(results), "--slos", "0.25"]) == 0
    captured = capsys.readouterr()
    assert "within 0.25 s" not in captured.out and "--keep-requests" in captured.err


def test_factors_must_be_positive_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    for bad in ("1,x", "0", "1,-2", ""):
        with pytest.raises(SystemExit):
            fidelity.main(["--results", "r.json", "--factors", bad])
        assert "--factors" in capsys.readouterr().err
    for flag in ("--overheads", "--running-overheads", "--slos"):
        for bad in ("0.1,x", "-1"):
            with pytest.raises(SystemExit):
                fidelity.main(["--results", "r.json", flag, bad])
            assert f"argument {flag}: {flag}: expected" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("calibrated", "fitted", "factor", "loaded", "running"),
    [
        ("cpu-small-llama", "cpu-small-llama-fleet", 1.2, 0.3, 0.0),
        ("cpu-small-llama-avx2", "cpu-small-llama-avx2-fleet", 1.1, 0.6, 0.1),
        ("cpu-small-llama-avx2", "cpu-small-llama-avx2-quiet", 0.77, 0.0, 0.075),
    ],
)
def test_a_shipped_fitted_profile_is_its_calibrated_one_scaled_with_the_fitted_overheads(
    calibrated: str, fitted: str, factor: float, loaded: float, running: float
) -> None:
    # each fitted profile was written by `bench/fidelity.py --write-profile` (BENCHMARKS.md, "Fidelity
    # under the fleet's own load", "A second machine's profile" and "The AVX2 machine alone"):
    # recalibrating means refitting it
    base, fitted_profile = load_profile(calibrated), load_profile(fitted)
    assert fitted_profile.c_prefill / base.c_prefill == pytest.approx(factor)
    assert (fitted_profile.block_size, fitted_profile.num_blocks, fitted_profile.max_num_seqs, fitted_profile.max_num_batched_tokens) == (
        base.block_size, base.num_blocks, base.max_num_seqs, base.max_num_batched_tokens
    )  # fmt: skip
    for f in TIME_FIELDS:
        if f not in ("loaded_request_overhead", "running_request_overhead"):
            assert getattr(fitted_profile, f) == pytest.approx(factor * getattr(base, f))
    assert (base.loaded_request_overhead, base.running_request_overhead) == (0, 0)
    assert (fitted_profile.loaded_request_overhead, fitted_profile.running_request_overhead) == (pytest.approx(loaded), pytest.approx(running))
