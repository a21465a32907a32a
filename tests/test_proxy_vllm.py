"""Opt-in end-to-end tests: pylb in front of two real vLLM replicas on the CPU.

Skipped unless PYLB_VLLM_VENV and PYLB_VLLM_MODEL name a vLLM installed with
../shared/vllm/install.sh (see ../shared/vllm/README.md):

    bash ../shared/vllm/install.sh /tmp/vllm-venv /tmp/tiny-llama
    PYLB_VLLM_VENV=/tmp/vllm-venv PYLB_VLLM_MODEL=/tmp/tiny-llama .venv/bin/python -P -m pytest -m real_vllm tests/test_proxy_vllm.py

The two replicas (one core each, small KV caches) start once for the module, in about a minute.
The tests check what only a real vLLM can show about the proxy: the OpenAI SDK through pylb
(chat and completions, streamed and not, usage delivered to the router), pylb's scrape of a real
/metrics page (cache sizing from vllm:cache_config_info), and a client disconnect aborting the
request inside vLLM. (dualmap against round-robin on real replicas: tests/test_real_vllm.py.)
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest

from pylb.fleet.scrape import parse_vllm_metrics

from proxy_support import RecordingRouter, running_proxy, settings, wait_for

pytestmark = pytest.mark.real_vllm

REPO = Path(__file__).resolve().parents[1]
BLOCKS, BLOCK_SIZE = 256, 32
MODEL = "small-llama"


def _serve_script() -> Path:
    for d in (os.environ.get("PYLB_VLLM_DIR"), REPO.parent / "shared" / "vllm", REPO / "shared" / "vllm"):
        if d and (Path(d) / "serve.sh").is_file():
            return Path(d) / "serve.sh"
    pytest.skip("serve.sh not found (../shared/vllm beside the repository, or $PYLB_VLLM_DIR)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def vllm_replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    venv, model = os.environ.get("PYLB_VLLM_VENV"), os.environ.get("PYLB_VLLM_MODEL")
    if not venv or not model:
        pytest.skip("set PYLB_VLLM_VENV and PYLB_VLLM_MODEL to run against real vLLM (../shared/vllm/README.md)")
    script = _serve_script()
    logs = tmp_path_factory.mktemp("vllm")
    procs, urls = [], []
    try:
        for i in range(2):
            port = _free_port()
            env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(i % max(1, os.cpu_count() or 1))}
            log = open(logs / f"replica-{i}.log", "w")  # noqa: SIM115 - closed below
            p = subprocess.Popen(
                ["bash", str(script), venv, model, str(port), "--num-gpu-blocks-override", str(BLOCKS), "--block-size", str(BLOCK_SIZE)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
            procs.append((p, log))
            urls.append(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 240
        while not all(_healthy(u) for u in urls):
            for p, _ in procs:
                if p.poll() is not None:
                    pytest.fail(f"a vLLM replica exited with {p.returncode}; see {logs}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM replicas not healthy after 240 s; see {logs}")
            time.sleep(1)
        yield urls
    finally:
        for p, log in procs:
            if p.poll() is None:
                os.killpg(p.pid, 15)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
                    p.wait()
            log.close()


async def _metrics(session: aiohttp.ClientSession, url: str):  # noqa: ANN202
    async with session.get(url + "/metrics") as r:
        return parse_vllm_metrics(await r.text())


async def test_openai_sdk_through_pylb_to_real_vllm(vllm_replicas: list[str]) -> None:
    router = RecordingRouter()
    async with running_proxy(settings(vllm_replicas, fleet__scrape_interval_s=0.5), router=router) as proxy:
        async with openai.AsyncOpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
            assert [m.id for m in (await c.models.list()).data] == [MODEL]
            r = await c.completions.create(model=MODEL, prompt="Hello, my name is", max_tokens=8, extra_body={"ignore_eos": True})
            assert r.usage.completion_tokens == 8 and r.choices[0].text
            stream = await c.completions.create(
                model=MODEL, prompt="Once upon a time", max_tokens=8, stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True}
            )
            chunks = [ch async for ch in stream]
            assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
            msgs = [{"role": "user", "content": "Say something."}]
            chat = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, extra_body={"ignore_eos": True})
            assert chat.usage.completion_tokens == 5
            stream = await c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5, stream=True, extra_body={"ignore_eos": True})
            assert "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])
        await wait_for(lambda: all(r.metrics is not None for r in proxy.fleet.replicas.values()), what="scrapes")
        for rep in proxy.fleet.replicas.values():
            assert (rep.metrics.block_size, rep.metrics.num_gpu_blocks) == (BLOCK_SIZE, BLOCKS)
        usages = [e[4] for e in router.of("complete")]
        assert len(usages) == 4 and all(u is not None for u in usages)
        assert usages[1].completion_tokens == 8  # from the stream's usage chunk


async def test_client_disconnect_aborts_inside_vllm(vllm_replicas: list[str]) -> None:
    async with running_proxy(settings(vllm_replicas[:1])) as proxy, aiohttp.ClientSession() as s:
        body = {"model": MODEL, "prompt": "Tell a long story.", "max_tokens": 1500, "stream": True, "ignore_eos": True}
        async with s.post(proxy.url + "/v1/completions", json=body) as r:
            assert r.status == 200
            await r.content.readany()
            assert (await _metrics(s, vllm_replicas[0])).num_requests_running == 1
        for _ in range(100):
            if (await _metrics(s, vllm_replicas[0])).num_requests_running == 0:
                break
            await asyncio.sleep(0.1)
        assert (await _metrics(s, vllm_replicas[0])).num_requests_running == 0
