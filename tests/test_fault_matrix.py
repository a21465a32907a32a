"""Issue 16 §1: the fault matrix. Fake vLLM replicas as real processes (`pylb sim-replicas`, one
process per replica) are killed, stopped (SIGSTOP), slowed, or all taken down, and scripted
replicas flap their /health or serve garbage, empty, huge or slow /metrics pages, while a load of
streamed and JSON requests runs through pylb. Each case checks the invariant:

- every request ends served, or with a clear OpenAI-style error (in a stream: an error event,
  then `data: [DONE]`); none is dropped without an answer, none runs past its deadline;
- pylb's `pylb_requests_total` by status equals what the clients saw, status by status;
- the faulty replica is back in rotation once healthy, and serves again.

Each case prints one row of counts (`pytest -s tests/test_fault_matrix.py`); docs/hardening.md
has the table."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest

from proxy_support import ScriptedReplica, free_port_on, running_proxy, scrape, settings, wait_for

DEADLINE_S = 15.0
"""No request may take longer (the slow replica's answers take about 2 s)."""


class SimReplica:
    """One `pylb sim-replicas` process on a fixed port, which can be killed and started again."""

    def __init__(self, port: int, speed: float = 4.0) -> None:
        self.port = port
        self.speed = speed
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "pylb.cli", "sim-replicas", "--replicas", "1", "--base-port", str(self.port),
             "--speed", str(self.speed), "--output-len", "12", "--max-model-len", "4096"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                try:
                    async with s.get(self.url + "/health", timeout=aiohttp.ClientTimeout(total=1)) as r:
                        if r.status == 200:
                            return
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"sim replica on {self.port} did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()


@asynccontextmanager
async def sim_fleet(speeds: list[float]) -> AsyncIterator[list[SimReplica]]:
    reps = [SimReplica(free_port_on(["127.0.0.1"]), s) for s in speeds]
    try:
        for r in reps:
            r.start()
        await asyncio.gather(*(r.ready() for r in reps))
        yield reps
    finally:
        for r in reps:
            r.stop()


# ---- the load and its outcomes -----------------------------------------------------------------------------


async def one_request(s: aiohttp.ClientSession, url: str, i: int) -> tuple[str, int]:
    """("served" | "error" | "unclear", status): a served answer is complete; an error is an
    OpenAI-style error body, or a stream's error event followed by [DONE]."""
    stream = i % 2 == 0
    body = {"model": "pylb-sim", "prompt": f"request {i} " + "words " * (20 + i % 7), "max_tokens": 12, "stream": stream}
    async with s.post(url + "/v1/completions", json=body) as r:
        data = await r.read()
        if r.status != 200:
            err = json.loads(data)["error"]
            return ("error" if err["message"] and err["code"] == r.status else "unclear"), r.status
        if not stream:
            return ("served" if json.loads(data)["choices"] else "unclear"), 200
        text = data.decode()
        if not text.rstrip().endswith("data: [DONE]"):
            return "unclear", 200
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        errors = [e["error"] for e in events if "error" in e]
        if errors:
            return ("error" if errors[-1]["message"] else "unclear"), int(errors[-1]["code"])
        return "served", 200


async def run_load(url: str, n: int, concurrency: int, fault: Callable[[], Awaitable[None]] | None = None, fault_after: float = 0.3) -> Counter[tuple[str, int]]:
    """`n` requests, `concurrency` at a time; `fault()` runs `fault_after` seconds in."""
    out: Counter[tuple[str, int]] = Counter()
    sem = asyncio.Semaphore(concurrency)

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        async with sem:
            try:
                out[await asyncio.wait_for(one_request(s, url, i), DEADLINE_S)] += 1
            except asyncio.TimeoutError:
                out[("hung", 0)] += 1
            except (aiohttp.ClientError, ValueError, KeyError):
                out[("unclear", 0)] += 1

    async def later() -> None:
        await asyncio.sleep(fault_after)
        if fault is not None:
            await fault()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(later(), *(one(s, i) for i in range(n)))
    return out


async def check_invariant(case: str, proxy: Any, outcomes: Counter[tuple[str, int]], extra: str = "") -> None:
    assert outcomes[("hung", 0)] == 0 and outcomes[("unclear", 0)] == 0, outcomes
    assert not [k for k in outcomes if k[0] == "unclear"], outcomes
    by_status = Counter[int]()
    for (_, status), n in outcomes.items():
        by_status[status] += n
    m = await scrape(proxy)
    counted = {int(dict(labels)["code"]): v for labels, v in m.get("pylb_requests_total", {}).items() if dict(labels)["endpoint"] == "completions"}
    assert counted == {k: float(v) for k, v in by_status.items()}, (counted, by_status)
    errors = ", ".join(f"{s}: {n}" for (kind, s), n in sorted(outcomes.items()) if kind == "error") or "none"
    served = sum(n for (kind, _), n in outcomes.items() if kind == "served")
    print(f"\n| {case} | {sum(outcomes.values())} | {served} | {errors} | 0 | {extra} |")


def proxy_settings(urls: list[str], **kw: Any) -> Any:
    base = {"fleet__health_interval_s": 0.1, "fleet__health_timeout_s": 0.3, "fleet__ejection_s": 0.3, "upstream__read_timeout_s": 60.0}
    return settings(urls, **{**base, **kw})


async def back_in_rotation(proxy: Any, url: str, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    await wait_for(lambda: url in proxy.fleet.healthy, timeout=timeout, what=f"{url} back in rotation")
    return time.monotonic() - t0


# ---- the cases ------------------------------------------------------------------------------------------------


async def test_replica_killed_mid_run_then_restarted() -> None:
    async with sim_fleet([4.0, 4.0, 4.0]) as reps, running_proxy(proxy_settings([r.url for r in reps])) as proxy:
        victim = reps[2]

        async def kill() -> None:
            victim.signal(signal.SIGKILL)

        outcomes = await run_load(proxy.url, 120, 24, kill, fault_after=0.05)
        victim.start()
        back = await back_in_rotation(proxy, victim.url, 30)
        after = await run_load(proxy.url, 12, 12)
        outcomes.update(after)
        await check_invariant("replica killed (SIGKILL) mid-run, restarted", proxy, outcomes, f"back {back:.1f} s after restart")
        assert after[("served", 200)] == 12


async def test_replica_hung_with_requests_in_flight_then_resumed() -> None:
    # real-time speed and an early fault: the load must still be running when the replica hangs,
    # however idle the machine is
    async with sim_fleet([1.0, 1.0, 1.0]) as reps, running_proxy(proxy_settings([r.url for r in reps])) as proxy:
        victim = reps[1]

        async def stop() -> None:
            victim.signal(signal.SIGSTOP)

        t0 = time.monotonic()
        outcomes = await run_load(proxy.url, 120, 24, stop, fault_after=0.05)
        took = time.monotonic() - t0
        assert victim.url not in proxy.fleet.healthy
        victim.signal(signal.SIGCONT)
        back = await back_in_rotation(proxy, victim.url)
        await check_invariant("replica hung (SIGSTOP) with requests in flight, resumed", proxy, outcomes, f"load took {took:.1f} s; back {back:.1f} s after SIGCONT")


async def test_slow_replica_ttft_x50() -> None:
    async with sim_fleet([4.0, 4.0, 4.0 / 50]) as reps, running_proxy(proxy_settings([r.url for r in reps])) as proxy:
        outcomes = await run_load(proxy.url, 60, 12)
        assert outcomes[("served", 200)] == 60
        await check_invariant("replica slow (TTFT x50)", proxy, outcomes)


async def test_all_replicas_down_then_back() -> None:
    async with sim_fleet([4.0, 4.0]) as reps, running_proxy(proxy_settings([r.url for r in reps])) as proxy:

        async def all_down() -> None:
            for r in reps:
                r.signal(signal.SIGKILL)

        outcomes = await run_load(proxy.url, 60, 12, all_down)
        await wait_for(lambda: not proxy.fleet.healthy, what="every replica out")
        t0 = time.monotonic()
        during = await run_load(proxy.url, 10, 10)
        assert during[("error", 503)] == 10 and time.monotonic() - t0 < 2.0  # at once, with Retry-After
        outcomes.update(during)
        for r in reps:
            r.start()
        back = max([await back_in_rotation(proxy, r.url, 30) for r in reps])
        after = await run_load(proxy.url, 10, 10)
        assert after[("served", 200)] == 10
        outcomes.update(after)
        await check_invariant("all replicas down (SIGKILL), then restarted", proxy, outcomes, f"10/10 got 503 while down; back {back:.1f} s after restart")


@pytest.mark.parametrize(
    "case",
    ["health flapping", "metrics garbage", "metrics empty", "metrics huge", "metrics timing out", "metrics NaN"],
)
async def test_scripted_faults_leave_every_request_served(case: str) -> None:
    async with sim_fleet([4.0, 4.0]) as reps:
        odd = ScriptedReplica(model="pylb-sim")
        odd.events = 12
        if case == "health flapping":
            odd.health = "flap"
        elif case == "metrics garbage":
            odd.metrics_page = "\x00\x01 not { prometheus text\nvllm:num_requests_running{engine= 1\n"
        elif case == "metrics empty":
            odd.metrics_page = ""
        elif case == "metrics huge":
            odd.metrics_page = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n" + "# filler\n" * 300_000
        elif case == "metrics timing out":
            odd.metrics_delay = 5.0
        else:
            odd.metrics_page = "vllm:num_requests_running NaN\nvllm:num_requests_waiting +Inf\n"
        await odd.start()
        try:
            s = proxy_settings([r.url for r in reps] + [odd.url], fleet__scrape_timeout_s=0.5, fleet__max_metrics_bytes=1_000_000)
            async with running_proxy(s) as proxy:
                outcomes = await run_load(proxy.url, 60, 12)
                assert outcomes[("served", 200)] == 60, outcomes
                scrape_errors = sum((await scrape(proxy)).get("pylb_scrape_errors_total", {}).values())
                await check_invariant(case, proxy, outcomes, f"{int(scrape_errors)} scrape errors counted")
        finally:
            await odd.stop()



async def test_membership_churn_every_second_leaves_every_request_served() -> None:
    # Two steady replicas and two that leave and rejoin the static list by turns, one reload a
    # second (what SIGHUP does), while the load runs: a replica removed with requests in flight
    # lets them finish, a re-added one is probed before it serves. Timing of the steady
    # replicas' clients against a fault-free run is measured in bench/churn.py, not here.
    async with sim_fleet([4.0, 4.0, 4.0, 4.0]) as reps:
        urls = [r.url for r in reps]
        async with running_proxy(proxy_settings(urls)) as proxy:
            baseline = await run_load(proxy.url, 40, 8)
            assert baseline[("served", 200)] == 40, baseline
            reloads: list[list[str]] = []
            seen: set[frozenset[str]] = set()

            async def churn() -> None:
                for k in range(6):
                    members = urls[:2] + ([urls[2]] if k % 2 else [urls[3]])
                    await proxy.reload(proxy_settings(members))
                    reloads.append(members)
                    for _ in range(10):
                        seen.add(frozenset(proxy.fleet.healthy))
                        await asyncio.sleep(0.1)

            outcomes = await run_load(proxy.url, 240, 12, churn, fault_after=0.0)
            assert outcomes[("served", 200)] == 240, outcomes
            assert len(reloads) == 6
            assert any(urls[2] in m for m in seen) and any(urls[3] in m for m in seen), seen  # both churned replicas served in turn
            await proxy.reload(proxy_settings(urls))
            back = max([await back_in_rotation(proxy, u, 10) for u in urls])
            outcomes.update(baseline)
            await check_invariant("membership churn (a reload every second, 2 of 4 replicas in and out)", proxy, outcomes,
                                  f"6 reloads; all back {back:.1f} s after the last")  # fmt: skip
