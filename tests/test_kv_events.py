"""vLLM KV-cache events: decoding real frames, engine-exact keys against a real vLLM's hashes, and
the ZMQ subscriber over real sockets (issue 12 §1-2).

The frames in tests/data/kv_events/ were published by a real vLLM 0.32.0 CPU replica (how they
were made: tests/data/kv_events/README.md), with the requests that caused them and the prompt
token ids vLLM returned for each.
"""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from pylb import native
from pylb.fleet.kv_events import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvEventDecodeError,
    KvEventSubscriber,
    block_key,
    block_keys,
    decode_frames,
    encode_batch,
    endpoint_for,
)
from pylb.router.engine_keys import EngineKeyer, EngineKeyerError

DATA = Path(__file__).parent / "data" / "kv_events"
CAPTURES = sorted(DATA.glob("vllm-0.32-*.json"))
TOKENIZER = DATA / "tiny-llama"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def frames_of(capture: dict) -> list[list[bytes]]:
    return [[base64.b64decode(x) for x in f] for f in capture["frames"]]


@pytest.fixture(scope="module")
def keyer() -> EngineKeyer:
    return EngineKeyer(TOKENIZER, block_size=32)


def test_captures_exist() -> None:
    names = {p.name for p in CAPTURES}
    assert "vllm-0.32-int-hashes.json" in names


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.stem)
def test_real_frames_decode_in_sequence(path: Path) -> None:
    batches = [decode_frames(f) for f in frames_of(load(path))]
    seqs = [b.seq for b in batches]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one stream, no gap
    kinds = {type(e) for b in batches for e in b.events}
    assert kinds == {BlockStored, BlockRemoved, AllBlocksCleared}  # the capture evicts and resets
    for b in batches:
        assert b.ts > 1.7e9  # wall-clock seconds
        for e in b.events:
            if isinstance(e, BlockStored):
                assert e.block_size == 32 and e.medium == "GPU" and e.applies
                assert len(e.token_ids) == 32 * len(e.keys)
                assert e.keys.dtype == np.uint64
            elif isinstance(e, BlockRemoved):
                assert len(e.keys) >= 1 and e.applies


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.stem)
def test_stored_chain_and_token_ids_are_engine_hashes(path: Path) -> None:
    """Each BlockStored's hashes are pylb's native sha256_cbor chain over the event's own token
    ids, from its parent block: the hash function itself, checked on every stored block."""
    capture = load(path)
    full_hashes: dict[int, bytes] = {}  # key -> 32-byte hash, to chain from a parent
    n = 0
    for b in (decode_frames(f) for f in frames_of(capture)):
        for e in b.events:
            if not isinstance(e, BlockStored):
                continue
            parent = None if e.parent_key is None else full_hashes[e.parent_key]
            keys, hashes = native.engine_block_hashes(e.token_ids, e.block_size, parent, return_hashes=True)
            assert keys.tolist() == e.keys.tolist()
            for i, k in enumerate(keys.tolist()):
                full_hashes[k] = hashes[32 * i : 32 * i + 32]
            n += len(keys)
    assert n >= 100


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.stem)
def test_engine_keys_of_requests_match_real_events(path: Path, keyer: EngineKeyer) -> None:
    """Tokenizing each captured request body with the model's tokenizer (and chat template)
    gives exactly the prompt token ids vLLM used, and their keys are blocks the replica stored."""
    capture = load(path)
    stored = {int(k) for b in map(decode_frames, frames_of(capture)) for e in b.events if isinstance(e, BlockStored) for k in e.keys}
    kinds = set()
    for r in capture["requests"]:
        ids = keyer.token_ids(r["kind"], r["body"])
        assert ids == r["prompt_token_ids"], r["kind"]
        keys = keyer.keys_for(r["kind"], r["body"])
        assert keys is not None and keys.prompt_tokens == len(ids)
        assert len(keys.keys) == len(ids) // 32 >= 3
        assert set(keys.keys.tolist()) <= stored
        kinds.add((r["kind"], isinstance(r["body"].get("prompt"), str)))
    assert {("completions", True), ("completions", False), ("chat", False)} <= kinds


def test_engine_hash_format() -> None:
    # NONE_HASH: SHA-256 of CBOR text "vllm-none-hash" (0x6e = text of 14 bytes)
    import hashlib

    assert native.engine_none_hash() == hashlib.sha256(b"\x6e" + b"vllm-none-hash").digest()
    # one block of 3 tokens covering CBOR's 1-byte, 2-byte and 5-byte integer forms
    parent = native.engine_none_hash()
    cbor = b"\x83\x58\x20" + parent + b"\x83" + b"\x17" + b"\x19\x01\x00" + b"\x1a\x00\x01\x00\x00" + b"\xf6"
    keys, hashes = native.engine_block_hashes([23, 256, 65536], 3, return_hashes=True)
    assert hashes == hashlib.sha256(cbor).digest()
    assert int(keys[0]) == int.from_bytes(hashes[-8:], "big")
    assert len(native.engine_block_hashes(list(range(10)), 4)) == 2  # partial blocks are not hashed
    with pytest.raises(ValueError):
        native.engine_block_hashes([1, 2], 0)
    with pytest.raises(ValueError):
        native.engine_block_hashes([1, 2], 1, parent=b"short")


def test_keyer_declines_what_it_cannot_reproduce(keyer: EngineKeyer) -> None:
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    assert keyer.keys_for("chat", {"messages": image}) is None
    assert keyer.keys_for("completions", {"prompt": ["a", "b"]}) is None  # a batch
    assert keyer.keys_for("completions", {"prompt": None}) is None
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert keyer.token_ids("chat", {"messages": parts}) == keyer.token_ids("chat", {"messages": [{"role": "user", "content": "a\nb"}]})
    with pytest.raises(EngineKeyerError, match="tokenizer"):
        EngineKeyer(DATA / "missing.json", 32)
    with pytest.raises(EngineKeyerError, match="block_size"):
        EngineKeyer(TOKENIZER, 0)


# ---- the wire format -------------------------------------------------------------------------------------


def test_block_key_of_bytes_is_vllms_int_form() -> None:
    h = bytes(range(32))
    assert block_key(h) == int.from_bytes(h, "big") & (2**64 - 1)
    assert block_key(2**70 + 5) == 5
    assert block_keys([h, h[::-1]]).tolist() == [block_key(h), block_key(h[::-1])]
    assert block_keys([7, h]).tolist() == [7, block_key(h)]
    assert block_keys([2**64 - 1, -1, 2**70 + 3]).tolist() == [2**64 - 1, 2**64 - 1, 3]  # ints masked to 64 bits
    with pytest.raises(KvEventDecodeError):
        block_key("nope")  # type: ignore[arg-type]


def test_encode_decode_round_trip_with_bytes_hashes() -> None:
    events = [BlockStored(np.array([1, 2], np.uint64), None, list(range(8)), 4, "GPU"), BlockRemoved(np.array([1], np.uint64), "GPU"),
              BlockRemoved(np.array([9], np.uint64), "CPU"), AllBlocksCleared()]  # fmt: skip
    frames = encode_batch(41, 12.5, events, hashes_as_bytes=lambda k: b"\0" * 24 + k.to_bytes(8, "big"))
    b = decode_frames(frames)
    assert (b.seq, b.ts) == (41, 12.5)
    assert [type(e) for e in b.events] == [BlockStored, BlockRemoved, BlockRemoved, AllBlocksCleared]
    assert b.events[0].keys.tolist() == [1, 2] and b.events[1].keys.tolist() == [1]
    assert [e.applies for e in b.events] == [True, True, False, True]
    assert b.block_events == 4


@pytest.mark.parametrize(
    "frames, match",
    [
        ([b"", b"\0" * 8], "3 frames"),
        ([b"", b"\0" * 4, b""], "8 bytes"),
        ([b"", b"\0" * 8, b"\xc1"], "msgpack"),
        ([b"", b"\0" * 8, msgpack.packb({"x": 1})], "array"),
        ([b"", b"\0" * 8, msgpack.packb([1.0, [{"type": "Nope"}]])], "unknown KV event type"),
        ([b"", b"\0" * 8, msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 0}]])], "block_size"),
    ],
)
def test_malformed_messages_are_rejected(frames: list[bytes], match: str) -> None:
    with pytest.raises(KvEventDecodeError, match=match):
        decode_frames(frames)


def test_endpoint_for() -> None:
    assert endpoint_for("http://10.0.0.5:8000", {}, 5557) == "tcp://10.0.0.5:5557"
    assert endpoint_for("http://[::1]:8000/", {}, 5557) == "tcp://[::1]:5557"
    assert endpoint_for("http://a:1", {"http://a:1": "ipc:///tmp/a.sock"}, 5557) == "ipc:///tmp/a.sock"
    assert endpoint_for("http://a:1", {}, 0) is None


# ---- the subscriber ---------------------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[str, KvEventBatch]] = []
        self.resyncs: list[tuple[str, str]] = []

    def on_kv_batch(self, replica: str, batch: KvEventBatch) -> None:
        self.batches.append((replica, batch))

    def on_kv_resync(self, replica: str, reason: str) -> None:
        self.resyncs.append((replica, reason))


def test_sequence_gap_and_restart_resync() -> None:
    rec = Recorder()
    sub = KvEventSubscriber("r0", "tcp://127.0.0.1:1", rec)
    stored = [BlockStored(np.array([1], np.uint64), None, [0] * 4, 4)]
    for seq in (5, 6, 8, 2):  # 7 lost: gap; then the replica restarted (counts from 0 again)
        sub.handle(encode_batch(seq, 1.0, stored))
    sub.handle([b"", b"\0" * 8])  # undecodable: counted, skipped, no resync
    assert [b.seq for _, b in rec.batches] == [5, 6, 8, 2]
    assert rec.resyncs == [("r0", "gap"), ("r0", "restart")]
    assert (sub.stats.resyncs, sub.stats.decode_errors, sub.stats.batches, sub.stats.block_events) == (2, 1, 4, 4)


async def test_subscriber_receives_real_frames_over_zmq(tmp_path: Path) -> None:
    """A PUB socket that binds (as vLLM does for ipc://) replays the captured frames; the
    subscriber connects, decodes them in order and reports none missing."""
    capture = frames_of(load(DATA / "vllm-0.32-int-hashes.json"))
    endpoint = f"ipc://{tmp_path}/kv.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.bind(endpoint)
    rec = Recorder()
    sub = KvEventSubscriber("http://127.0.0.1:8000", endpoint, rec)
    sub.start()
    try:
        assert await sub.wait_ready()
        deadline = asyncio.get_running_loop().time() + 10
        # PUB drops messages until the subscription has arrived: send a probe until one gets through
        while not rec.batches and asyncio.get_running_loop().time() < deadline:
            pub.send_multipart(encode_batch(0, 0.0, []))
            await asyncio.sleep(0.05)
        base = rec.batches[-1][1].seq
        first_real = decode_frames(capture[0]).seq
        assert first_real > base + 1  # the capture does not continue the probe's sequence: one resync
        for f in capture:
            pub.send_multipart(f)
        while len(rec.batches) < len(capture) + 1 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        got = [b.seq for _, b in rec.batches if b.seq >= first_real]
        assert got == [decode_frames(f).seq for f in capture]
        assert sub.stats.decode_errors == 0
    finally:
        await sub.stop()
        pub.close(0)
        ctx.term()


async def test_subscriber_binds_when_vllm_connects() -> None:
    """With a concrete tcp://host:port vLLM connects: pylb binds and the publisher connects."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"tcp://127.0.0.1:{port}"
    rec = Recorder()
    sub = KvEventSubscriber("r", endpoint, rec, bind=True)
    sub.start()
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    try:
        assert await sub.wait_ready()
        pub.connect(endpoint)
        deadline = asyncio.get_running_loop().time() + 10
        seq = 0
        while not rec.batches and asyncio.get_running_loop().time() < deadline:
            pub.send_multipart(encode_batch(seq, 0.0, [AllBlocksCleared()]))
            seq += 1
            await asyncio.sleep(0.05)
        assert rec.batches and isinstance(rec.batches[0][1].events[0], AllBlocksCleared)
    finally:
        await sub.stop()
        pub.close(0)
        ctx.term()


async def test_subscriber_retries_a_bad_endpoint_with_backoff() -> None:
    rec = Recorder()
    sub = KvEventSubscriber("r", "nonsense://x", rec, backoff_max_s=0.2)
    sub.start()
    try:
        await asyncio.sleep(0.5)
        assert sub.stats.connect_errors >= 3  # 0.1 + 0.2 + 0.2 ... retried, not crashed
        assert not await sub.wait_ready(0.01)
    finally:
        await sub.stop()
