"""A request carries the parameters its block hashes were made with, and the router refuses others.

The bug this guards: `pylb simulate --router-option block_chars=128` was accepted while the
simulator still hashed prompts in 64-byte blocks, so the router read 64-byte hashes as 128-byte
blocks and over-predicted cached tokens.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from pylb import native
from pylb.router import registry
from pylb.router.interface import BlockHashing, RouterOptions, RoutingRequest
from pylb.router.request import CHAT, COMPLETIONS, RequestLimits, build_request
from pylb.sim import simulate_cli
from pylb.sim.cluster import prepare_workload, simulate
from pylb.sim.profiles import load_profile
from pylb.workload.loaders import load_workload

TRACE = "synthetic:multi-turn:sessions=6,turns=3"


def _args(tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    simulate_cli.add_arguments(parser)
    return parser.parse_args(["--trace", TRACE, "--replicas", "2", "--policy", "dualmap", "--no-progress",
                              "--json", str(tmp_path / "out.json"), *extra])  # fmt: skip


def test_simulate_hashes_prompts_with_the_routers_block_size(tmp_path, monkeypatch) -> None:
    seen = {}
    real = simulate_cli.simulate

    def spy(workload, profile, replicas, router, **kw):
        seen["workload"] = workload
        return real(workload, profile, replicas, router, **kw)

    monkeypatch.setattr(simulate_cli, "simulate", spy)
    assert simulate_cli.run(_args(tmp_path, "--router-option", "block_chars=128")) == 0
    texts = [r.prompt_text().encode() for r in load_workload(TRACE)]
    work = seen["workload"]
    assert len(work) == len(texts)
    for req, text in zip(work, texts):
        assert req.router_hashing == BlockHashing(128, "bytes")
        np.testing.assert_array_equal(req.router_hashes, native.block_hashes(text, 128))
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["config"]["router_options"]["block_chars"] == 128


def test_router_refuses_a_request_hashed_with_other_parameters() -> None:
    router = registry.create("dualmap", RouterOptions(block_chars=128))
    router.on_membership(["a", "b"], 0.0)
    data = b"x" * 1000
    wrong = RoutingRequest("r64", native.block_hashes(data, 64), 250, 8, 0.0)  # default: 64-byte blocks
    with pytest.raises(ValueError, match=r"'r64' was hashed in 64-byte blocks.*128-byte blocks.*block_chars=128"):
        router.submit(wrong, 0.0)
    seeded = RoutingRequest("seed", native.block_hashes(data, 128, 7), 250, 8, 0.0, hashing=BlockHashing(128, "bytes", 7))
    with pytest.raises(ValueError, match="seed 7"):
        router.submit(seeded, 0.0)
    # the router's own hashing, for text and for token ids, is accepted
    router.submit(RoutingRequest("ok", native.block_hashes(data, 128), 250, 8, 0.0, hashing=BlockHashing.text(128)), 0.0)
    ids = np.arange(100, dtype=np.uint32)
    router.submit(RoutingRequest("ids", native.block_hashes(ids, 32), 100, 8, 0.0, hashing=BlockHashing.token_ids(128)), 0.0)
    assert sorted(d.request_id for d in router.poll(0.0)) == ["ids", "ok"]


def test_simulating_a_workload_hashed_for_another_block_size_fails_clearly() -> None:
    profile = load_profile("h100-llama3.1-8b")
    work = prepare_workload(load_workload(TRACE), profile.block_size)  # 64-byte blocks
    with pytest.raises(ValueError, match="64-byte blocks.*128-byte blocks"):
        simulate(work, profile, 2, registry.create("round-robin", RouterOptions(block_chars=128)))


def test_proxy_request_model_says_how_it_hashed() -> None:
    limits = RequestLimits(block_chars=128)
    chat = build_request(CHAT, {"messages": [{"role": "user", "content": "hi " * 100}]}, "c", 0.0, limits)
    assert chat.hashing == BlockHashing(128, "bytes")
    text = build_request(COMPLETIONS, {"prompt": "y" * 300}, "t", 0.0, limits)
    assert text.hashing == BlockHashing(128, "bytes") and len(text.block_hashes) == 2
    ids = build_request(COMPLETIONS, {"prompt": list(range(70))}, "i", 0.0, limits)
    assert ids.hashing == BlockHashing(32, "tokens") and len(ids.block_hashes) == 2
    batch = build_request(COMPLETIONS, {"prompt": [list(range(40)), "z" * 10]}, "b", 0.0, limits)
    assert batch.hashing == BlockHashing(32, "tokens") and len(batch.block_hashes) == 1
