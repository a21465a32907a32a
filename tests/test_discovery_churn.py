"""Churn under load (issue 11 §1): a real `pylb serve` process with Kubernetes discovery, in front
of real fake-vLLM processes (`pylb sim-replicas`, one per loopback address, as pods of one
Service), while a replay (pylb.workload.replay) runs through it. The fake API server
(tests/fake_kube.py) plays the control plane: replicas join, one is marked terminating, drains
and leaves, the watch is bookmarked, dropped and expired (410).

Every request is counted: served, or answered with a clear error; none lost, none hung. The
draining replica gets no new request after pylb saw it terminating, and every request pylb had
sent it finishes there (its own vllm:request_success_total). The counts are printed (-s)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("kubernetes_asyncio", reason="the k8s extra is not installed (pip install '.[k8s]')")

from pylb.workload.replay import replay  # noqa: E402
from pylb.workload.synthetic import multi_turn  # noqa: E402

from fake_kube import Endpoint, FakeKubeApi  # noqa: E402
from proxy_support import free_port_on

CLI = [sys.executable, "-P", "-m", "pylb.cli"]
HOSTS = ["127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34"]
A, B, C, D = HOSTS


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PYLB_")}


async def _wait_line(path: Path, needle: str, proc: asyncio.subprocess.Process, timeout: float = 90.0) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        text = path.read_text() if path.exists() else ""
        for line in text.splitlines():
            if needle in line:
                return line
        if proc.returncode is not None:
            raise AssertionError(f"process exited ({proc.returncode}): {text[-2000:]}")
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {needle!r} in {path}: {path.read_text()[-2000:]}")


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[str, dict[tuple, float]]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    out: dict[str, dict[tuple, float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _sum(m: dict[str, dict[tuple, float]], name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for k, v in m.get(name, {}).items() if want <= set(k))


async def _until(cond, timeout: float, what: str) -> None:  # noqa: ANN001
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_replicas_join_drain_and_leave_while_a_replay_runs(tmp_path: Path) -> None:
    port = free_port_on(HOSTS)
    url = {h: f"http://{h}:{port}" for h in HOSTS}
    api = FakeKubeApi(namespace="serving", service="vllm")
    await api.start()
    procs: list[asyncio.subprocess.Process] = []
    logs = []
    try:
        reps: dict[str, asyncio.subprocess.Process] = {}
        for h in HOSTS:
            log = tmp_path / f"replica-{h}.log"
            with log.open("w") as f:
                p = await asyncio.create_subprocess_exec(
                    *CLI, "sim-replicas", "--replicas", "1", "--host", h, "--base-port", str(port), "--output-len", "64",
                    stdout=f, stderr=asyncio.subprocess.STDOUT, env=_env(),
                )  # fmt: skip
            procs.append(p)
            reps[h] = p
            logs.append(log)
        for h in HOSTS:
            await _wait_line(tmp_path / f"replica-{h}.log", "replica 0:", reps[h])

        api.put_slice("vllm-a", [Endpoint(A), Endpoint(B)], port)
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        cfg = tmp_path / "pylb.yaml"
        cfg.write_text(
            "server: {port: 0}\n"
            "fleet: {discovery: k8s, health_interval_s: 0.2, scrape_interval_s: 0.2}\n"
            f"discovery: {{k8s_service: vllm, k8s_namespace: serving, kubeconfig: {kubeconfig}, backoff_max_s: 0.5}}\n"
            "logging: {access_log: false}\n"
        )
        serve_log = tmp_path / "pylb.log"
        with serve_log.open("w") as f:
            pylb = await asyncio.create_subprocess_exec(*CLI, "serve", "--config", str(cfg), stdout=f, stderr=asyncio.subprocess.STDOUT, env=_env())
        procs.append(pylb)
        line = await _wait_line(serve_log, "pylb serving on", pylb)
        assert "k8s discovery" in line
        lb = line.split("pylb serving on ")[1].split()[0]

        workload = multi_turn(sessions=40, turns=4, system_tokens=512, user_tokens=64, answer_tokens=96, rate=4.0, think_time_s=1.0, seed=11)
        facts: dict[str, float] = {}

        async with aiohttp.ClientSession() as s:
            m0 = await _metrics(s, lb)
            assert _sum(m0, "pylb_replica_healthy", replica=url[A]) == 1 and _sum(m0, "pylb_replica_healthy", replica=url[B]) == 1

            async def healthy(h: str) -> float:
                return _sum(await _metrics(s, lb), "pylb_replica_healthy", replica=url[h])

            async def control_plane() -> None:
                await asyncio.sleep(2.0)
                api.put_slice("vllm-b", [Endpoint(C)], port)  # C joins (ADDED)
                await _until(lambda: _eq(healthy(C), 1), 10, "C in rotation")
                await asyncio.sleep(1.0)
                api.bookmark()
                await asyncio.sleep(0.5)
                api.drop_watches()  # resumed from the bookmark's resourceVersion
                await asyncio.sleep(0.5)
                # A is terminating (still serving): it drains
                api.put_slice("vllm-a", [Endpoint(A, ready=False, serving=True, terminating=True), Endpoint(B)], port)
                await _until(lambda: _eq(healthy(A), 0), 10, "A draining")
                m = await _metrics(s, lb)
                facts["sent_to_A_before_drain"] = _sum(m, "pylb_replica_dispatched_total", replica=url[A])
                facts["in_flight_on_A_at_drain"] = _sum(m, "pylb_replica_inflight_requests", replica=url[A])
                await asyncio.sleep(1.0)
                api.expire()  # 410: pylb lists again
                await asyncio.sleep(0.5)
                api.put_slice("vllm-b", [Endpoint(C), Endpoint(D)], port)  # D joins (MODIFIED)
                await _until(lambda: _eq(healthy(D), 1), 10, "D in rotation")
                # A's requests finish on A; then A leaves the slice and its pod stops
                async def a_idle() -> bool:
                    ma = await _metrics(s, url[A])
                    return _sum(ma, "vllm:num_requests_running") + _sum(ma, "vllm:num_requests_waiting") == 0

                await _until(a_idle, 30, "A's requests to finish")
                m = await _metrics(s, lb)
                facts["sent_to_A_at_removal"] = _sum(m, "pylb_replica_dispatched_total", replica=url[A])
                ma = await _metrics(s, url[A])
                facts["finished_on_A"] = _sum(ma, "vllm:request_success_total")
                facts["aborted_on_A"] = _sum(ma, "vllm:request_success_total", finished_reason="abort")
                api.put_slice("vllm-a", [Endpoint(B)], port)
                await _until(lambda: _absent(s, lb, url[A]), 10, "A removed")
                reps[A].send_signal(signal.SIGTERM)
                await reps[A].wait()

            chaos = asyncio.create_task(control_plane())
            result = await asyncio.wait_for(replay(workload, lb, model="pylb-sim", timeout_s=60.0, session=s), 180)
            await asyncio.wait_for(chaos, 60)
            m_end = await _metrics(s, lb)

        recs = result.records
        served = sum(r.ok for r in recs)
        errors: dict[str, int] = {}
        for r in recs:
            if not r.ok:
                errors[r.error or "?"] = errors.get(r.error or "?", 0) + 1
        answered_by_pylb = _sum(m_end, "pylb_requests_total", endpoint="completions")
        codes = {dict(k)["code"]: v for k, v in m_end.get("pylb_requests_total", {}).items() if dict(k).get("endpoint") == "completions"}
        print(
            f"\nchurn: sent {len(recs)} of {len(workload)}, served {served}, clear errors {sum(errors.values())} {errors}, "
            f"lost {len(workload) - served - sum(errors.values())}; pylb counted {answered_by_pylb:.0f}; "
            f"A: in flight at drain {facts['in_flight_on_A_at_drain']:.0f}, sent before drain {facts['sent_to_A_before_drain']:.0f}, "
            f"at removal {facts['sent_to_A_at_removal']:.0f}, finished on A {facts['finished_on_A']:.0f} (aborted {facts['aborted_on_A']:.0f}); "
            f"dispatched to C {_sum(m_end, 'pylb_replica_dispatched_total', replica=url[C]):.0f}, D {_sum(m_end, 'pylb_replica_dispatched_total', replica=url[D]):.0f}; "
            f"lists {len(api.list_requests)}, watches {len(api.watch_requests)}; pylb's codes {codes}"
        )
        # every request sent, each one served or answered with an error kind; none hung (timeout)
        assert len(recs) == len(workload)
        assert all(r.ok or r.error for r in recs)
        assert "timeout" not in errors
        assert served == len(workload), errors  # churn done right costs no request
        assert answered_by_pylb == len(workload)
        # draining: nothing new went to A, and everything it had finished there
        assert facts["sent_to_A_at_removal"] == facts["sent_to_A_before_drain"]
        assert facts["finished_on_A"] == facts["sent_to_A_before_drain"] and facts["aborted_on_A"] == 0
        # the joiners took traffic; the watch protocol went through its paths
        assert _sum(m_end, "pylb_replica_dispatched_total", replica=url[C]) > 0
        assert _sum(m_end, "pylb_replica_dispatched_total", replica=url[D]) > 0
        assert len(api.list_requests) >= 2  # the first list and the one after 410
        assert len(api.watch_requests) >= 3  # first, after the drop, after the relist
        assert _sum(m_end, "pylb_background_errors_total") == 0
        # nothing went wrong in pylb's own code (discovery, fleet, dispatcher, proxy)
        bad = [r for r in _log_records(serve_log) if r.get("level") in ("error", "critical") and str(r.get("logger", "")).startswith("pylb")]
        assert not bad, bad[:3]
    finally:
        for p in procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                await asyncio.wait_for(p.wait(), 15)
            except asyncio.TimeoutError:
                p.kill()
                await p.wait()
        await api.stop()


def _log_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


async def _eq(value, want: float) -> bool:  # noqa: ANN001
    return (await value) == want


async def _absent(s: aiohttp.ClientSession, lb: str, replica: str) -> bool:
    return not any(("replica", replica) in k for k in (await _metrics(s, lb)).get("pylb_replica_healthy", {}))
