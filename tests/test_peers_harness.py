"""The side-by-side harness (bench/peers): its workloads, and a smoke run against fake replicas.

The smoke run starts `pylb sim-replicas` (simulated engines behind vLLM's real HTTP API and
metric names) and `pylb serve` as the router, exactly as `bench/peers/run.py` does with real vLLM,
so the harness cannot rot unnoticed. Real vLLM and the peer routers are bench usage (see
BENCHMARKS.md, "Side by side on real vLLM").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / "bench" / "peers" / "run.py"
sys.path.insert(0, str(HARNESS.parent))
import procs  # noqa: E402
import workloads  # noqa: E402

SMALL_CHAT = "synthetic:multi-turn:groups=2,sessions=6,turns=2,system_tokens=64,user_tokens=16,answer_tokens=8,rate=20,think_time_s=0.2"


def harness(*args: str) -> list[str]:
    return [sys.executable, str(HARNESS), "--replicas-kind", "fake", "--fake-args", "--speed 10", "--no-progress", *args]


def write_trace(path: Path, lines: list[dict]) -> str:
    path.write_text("".join(json.dumps(d) + "\n" for d in lines))
    return str(path)


# ---- workloads ------------------------------------------------------------------------------------


def test_ideal_hit_rate_counts_leading_blocks_seen_before() -> None:
    chat = workloads.load("synthetic:multi-turn:sessions=2,turns=2,system_tokens=64,user_tokens=16,answer_tokens=16,rate=1,think_time_s=100")
    # Turn 1 of session 0: nothing seen. Turn 1 of session 1: the 64-token system prompt (4 blocks of 16).
    # Turn 2 of each session: its turn 1 (80 tokens = 5 blocks) of 112. Prompts: 80, 80, 112, 112.
    assert workloads.ideal_hit_rate(chat, block_tokens=16) == pytest.approx((0 + 64 + 80 + 80) / (80 + 80 + 112 + 112))
    # A prompt seen whole hits its whole blocks short of the last token (vLLM always computes the last
    # token, and a hit is whole blocks): 2 of its 3 blocks.
    twice = workloads.load("synthetic:zipf:requests=2,prefixes=1,prefix_tokens=32,suffix_tokens=16,rate=1")
    twice[1].make_text = twice[0].make_text
    assert workloads.ideal_hit_rate(twice, block_tokens=16) == pytest.approx(32 / 96)


def test_cached_share_with_a_bounded_cache_evicts_the_least_recent_tails_first() -> None:
    block = 4  # tokens per block; a token is 4 bytes
    a, b = bytes(range(64)), bytes(range(100, 164))  # two unrelated prompts of 16 tokens (4 blocks)
    assert workloads.cached_share([a, a], block) == pytest.approx(12 / 32)  # 3 of 4 blocks (last token computed)
    assert workloads.cached_share([a, b, a], block) == pytest.approx(12 / 48)
    # 6 blocks of room: b's 4 blocks evict a's two tail blocks (a's blocks were freed last-first), so a's
    # head (2 blocks) still hits
    assert workloads.cached_share([a, b, a], block, capacity_blocks=6) == pytest.approx(8 / 48)
    assert workloads.cached_share([a, b, a], block, capacity_blocks=4) == 0.0  # b evicted all of a
    # token ids packed as words replay the same as the bytes they pack
    ids = [7, 8, 9, 10] * 4
    assert workloads.cached_share([workloads.token_bytes(ids)] * 2, block) == pytest.approx(12 / 32)
    with pytest.raises(ValueError, match="capacity_blocks"):
        workloads.cached_share([a], block, capacity_blocks=0)


def test_mooncake_scaled_keeps_prefix_structure(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.jsonl", [
        {"timestamp": 0, "input_length": 1024, "output_length": 320, "hash_ids": [1, 2]},
        {"timestamp": 2000, "input_length": 1500, "output_length": 3, "hash_ids": [1, 2, 3]},
        {"timestamp": 4000, "input_length": 600, "output_length": 2000, "hash_ids": [1, 9]},
        {"timestamp": 6000, "input_length": 9000, "output_length": 16, "hash_ids": list(range(100, 118))},
    ])  # fmt: skip
    w = workloads.load(f"mooncake-scaled:{trace}:scale=16,time_scale=2,max_prompt_tokens=256,max_output_tokens=64")
    assert [r.arrival_s for r in w] == [0.0, 1.0, 2.0, 3.0]
    assert [r.prompt_tokens for r in w] == [64, 94, 38, 256]  # ceil(input / 16), cut to 256
    assert [r.output_tokens for r in w] == [20, 1, 64, 1]  # output / 16, at least 1, at most 64
    texts = [r.prompt_text() for r in w]
    assert all(len(t) == 4 * r.prompt_tokens for t, r in zip(texts, w))
    block = 32 * 4  # one hash id = 512 / 16 = 32 word tokens of 4 bytes
    assert texts[1].startswith(texts[0])  # ids [1, 2] then [1, 2, 3]
    assert texts[2][:block] == texts[0][:block] and texts[2][block : 2 * block] != texts[0][block : 2 * block]
    assert texts[3][:block] != texts[0][:block]
    assert workloads.load(f"mooncake-scaled:{trace}:requests=2")[1].prompt_text() == workloads.mooncake_scaled(trace, requests=2)[1].prompt_text()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mooncake-scaled:", "expected mooncake-scaled:PATH"),
        ("mooncake-scaled:{trace}:scale=5", "scale must divide 512"),
        ("mooncake-scaled:{trace}:speed=2", "key one of requests, scale"),
        ("mooncake-scaled:{trace}:requests=many", "requests must be int"),
        ("synthetic:multi-turn:groups=0", "groups must be"),
    ],
)
def test_bad_workload_specs_name_the_field(tmp_path: Path, spec: str, message: str) -> None:
    trace = write_trace(tmp_path / "t.jsonl", [{"timestamp": 0, "input_length": 10, "output_length": 1, "hash_ids": [1]}])
    with pytest.raises(ValueError, match=message):
        workloads.load(spec.format(trace=trace))


def test_target_specs() -> None:
    t = procs.Target.parse("sg=sglang --policy cache_aware")
    assert (t.name, t.kind, t.args) == ("sg", "sglang", ["--policy", "cache_aware"])
    argv = procs.router_argv(t, ["http://127.0.0.1:1", "http://127.0.0.1:2"], 9000, procs.RouterPaths("/venv/sg", None))
    assert argv[:3] == ["/venv/sg/bin/python", "-m", "sglang_router.launch_router"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--prometheus-host") + 1] == "127.0.0.1"
    assert argv[-2:] == ["--policy", "cache_aware"]
    with pytest.raises(ValueError, match="--vllm-router-venv"):
        procs.router_argv(procs.Target.parse("v=vllm-router"), ["http://127.0.0.1:1"], 9000, procs.RouterPaths(None, None))
    pylb = procs.Target.parse("p=pylb --router-cache-state events --kv-events-tokenizer {model}")
    argv = procs.router_argv(pylb, ["http://127.0.0.1:1", "http://127.0.0.1:2"], 9000, procs.RouterPaths(None, None),
                             ["ipc:///l/kv-0.sock", "tcp://127.0.0.1:5600"], "/models/tiny")  # fmt: skip
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--kv-events-endpoint"]
    assert pairs == ["http://127.0.0.1:1=ipc:///l/kv-0.sock", "http://127.0.0.1:2=tcp://127.0.0.1:5600"]
    assert argv[-2:] == ["--kv-events-tokenizer", "/models/tiny"]
    for bad in ("pylb", "x=nginx", "=pylb", "x="):
        with pytest.raises(ValueError, match="NAME=KIND"):
            procs.Target.parse(bad)


def test_each_replica_gets_its_own_kv_event_endpoint(tmp_path: Path) -> None:
    config = '{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"ipc://{logs}/kv-{replica}.sock"}'
    args = ["--block-size", "32", "--kv-events-config", config]
    second = procs.replica_args(args, 1, tmp_path)
    assert second[:3] == ["--block-size", "32", "--kv-events-config"]
    assert procs.kv_events_endpoint(second) == f"ipc://{tmp_path}/kv-1.sock"
    assert procs.kv_events_endpoint(["--kv-events-config={\"enable_kv_cache_events\":true,\"endpoint\":\"tcp://*:5601\"}"]) == "tcp://127.0.0.1:5601"
    assert procs.kv_events_endpoint(["--kv-events-config", '{"enable_kv_cache_events":false}']) is None
    assert procs.kv_events_endpoint(["--block-size", "32"]) is None
    with pytest.raises(ValueError, match="not JSON"):
        procs.kv_events_endpoint(["--kv-events-config", "{endpoint"])


def test_cli_rejects_bad_targets() -> None:
    proc = subprocess.run(harness("--workload", SMALL_CHAT, "--target", "a=haproxy"), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "KIND one of pylb, sglang, vllm-router" in proc.stderr


# ---- smoke run ------------------------------------------------------------------------------------


def test_smoke_run_with_fake_replicas_and_pylb(tmp_path: Path) -> None:
    out = tmp_path / "peers.json"
    proc = subprocess.run(
        harness("--replicas", "2", "--workload", SMALL_CHAT, "--target", "dm=pylb", "--target", "rr=pylb --policy round-robin",
                "--reps", "2", "--slo-ttft", "5", "--out", str(out), "--log-dir", str(tmp_path / "logs")),  # fmt: skip
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["command"].startswith("python bench/peers/run.py --replicas-kind fake")
    assert res["workload"]["requests"] == 12 and 0 < res["workload"]["ideal_hit_rate"] < 1
    assert res["workload"]["offered_rate"] == pytest.approx(res["workload"]["arrival_rate"])  # rate scale 1
    assert res["replicas"]["cache_reset"] == "restart"
    for check in res["replicas"]["cache_reset_check"]:
        assert check["hits_repeat"] > 0 and check["hits_after_reset"] == 0
    assert [(r["target"], r["rep"]) for r in res["runs"]] == [("dm", 0), ("rr", 0), ("rr", 1), ("dm", 1)]  # A B B A
    ideal = res["workload"]["ideal_hit_rate"]
    engine = res["workload"]["engine_ideal"]  # from the replicas' /tokenize and cache_config_info
    assert engine["block_size"] == 16 and engine["fleet_cache_blocks"] > 0
    # the fake's tokens are the simulator's 4-byte ones and its blocks 16 of them: the same replay
    assert engine["unbounded"] == pytest.approx(ideal) and engine["fleet_cache"] == pytest.approx(ideal)  # 12 requests fit
    assert "engine ideal hit rate (16-token blocks" in proc.stderr
    for run in res["runs"]:
        assert run["errors"] == 0 and run["slo_attainment"] == 1.0
        assert sum(r["requests"] for r in run["per_replica"]) == 12  # every request seen by the replicas' counters
        assert 0 < run["hit_rate"] <= ideal + 1e-9  # caches start empty: never above one unbounded cache
        assert 1.0 <= run["hotspot"] <= 2.0 and run["request_throughput"] > 0 and run["load_avg_mean"] >= 0
        phases = run["engine_phases"]  # from the replicas' own histograms (the fake exports TTFT, E2E, step tokens)
        assert 0 < phases["ttft_engine_mean"] <= phases["e2e_engine_mean"] and phases["engine_steps"] >= 12
        assert phases["preemptions"] == 0
        assert run["router_cpu_s"] is not None and 0 <= run["router_cpu_s"] < 60 and run["client_cpu_s"] > 0
        # pylb's own view, from its /metrics: what it predicted (round-robin predicts from the same mirror)
        assert 0 <= run["predicted_hit_rate"] <= 1 and 0 <= run["ttft_error_p50"] <= run["ttft_error_p90"]
        # ... and its decisions by branch: every request decided once, by a branch the policy has
        decided = sum(run[f"decisions_{b}"] or 0 for b in ("affinity", "load", "slo_switch", "spill", "migration", "retry", "fallback"))
        assert decided >= 12 and (run["target"] != "rr" or run["decisions_load"] == 12)
    rr = [r for r in res["runs"] if r["target"] == "rr"]
    assert all(r["hotspot"] == 1.0 for r in rr)  # round-robin alternates: 6 requests each
    stats = res["targets"]["dm"]["hit_rate"]
    assert stats["min"] <= stats["mean"] <= stats["max"]
    assert "| dm | 2 |" in proc.stdout and "| rr | 2 |" in proc.stdout
    assert "router-dm" in (tmp_path / "logs" / "pids.txt").read_text()


def test_interrupt_stops_everything_it_started(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    slow = "synthetic:multi-turn:sessions=200,turns=2,system_tokens=64,user_tokens=16,answer_tokens=8,rate=2"
    proc = subprocess.Popen(harness("--workload", slow, "--target", "dm=pylb", "--log-dir", str(logs)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        pids = logs / "pids.txt"
        while not (pids.exists() and "router-dm" in pids.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        time.sleep(2.0)  # the replay is running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    for line in pids.read_text().splitlines():
        pid = int(line.split()[0])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---- the machine ----------------------------------------------------------------------------------


def test_host_info_reads_the_cpu_model_and_the_features_vllm_depends_on() -> None:
    import run as harness_run

    cpuinfo = ("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n\n"
               "processor\t: 1\nmodel name\t: other\nflags\t\t: avx512f avx512_bf16\n")  # fmt: skip
    host = harness_run.host_info(cpuinfo)
    assert host["cpu_model"] == "AMD EPYC"  # the first processor's entry
    assert host["cpu_features"] == ["avx2"]
    assert host["cpus"] == os.cpu_count()
    # bfloat16 replicas on that CPU get a note naming the missing features and the fix ...
    note = harness_run.bf16_note(host, ["--block-size", "32"])
    assert note is not None and "avx512_bf16" in note and "--dtype float32" in note
    # ... unless a dtype is chosen, or the CPU has native bfloat16, or its features are unknown
    assert harness_run.bf16_note(host, ["--dtype", "float32"]) is None
    assert harness_run.bf16_note(host, ["--dtype=bfloat16"]) is None
    assert harness_run.bf16_note(harness_run.host_info("flags\t: avx2 amx_bf16\n"), []) is None
    assert harness_run.bf16_note(harness_run.host_info(""), []) is None


def test_rescore_counts_errors_as_misses_and_needs_the_request_records(tmp_path: Path) -> None:
    import rescore  # bench/peers/rescore.py

    def rec(ttft: float | None, ok: bool = True) -> dict:
        return {"ok": ok, "ttft_s": ttft}

    results = {"runs": [{"target": "a", "rep": 0, "requests": [rec(0.3), rec(0.9), rec(1.5), rec(None, ok=False)]},
                        {"target": "a", "rep": 1, "requests": [rec(0.4), rec(2.5)]}]}  # fmt: skip
    table = rescore.rescore(results, [0.5, 1.0, 2.0])
    assert table == {"a": {0.5: [0.25, 0.5], 1.0: [0.5, 0.5], 2.0: [0.75, 0.5]}}
    with pytest.raises(ValueError, match="--keep-requests"):
        rescore.rescore({"runs": [{"target": "b", "rep": 0}]}, [1.0])
    f = tmp_path / "r.json"
    f.write_text(json.dumps(results))
    out = subprocess.run([sys.executable, "-P", str(HARNESS.parent / "rescore.py"), str(f), "--slo", "0.5,2"], capture_output=True, text=True, check=True).stdout
    assert "| a | 2 | 37.5 (25.0-50.0) % | 62.5 (50.0-75.0) % |" in out
    bad = subprocess.run([sys.executable, "-P", str(HARNESS.parent / "rescore.py"), str(f), "--slo", "0,x"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--slo" in bad.stderr
