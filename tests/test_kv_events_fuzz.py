"""The KV-event decoder under hostile input (hypothesis, 100 cases each; the long run
is bench/fuzz.py's kv-events target): a ZMQ message off a replica's socket, whatever its frames
and payload, is either delivered as a batch or counted in the subscriber's decode_errors and
skipped. The decoder never raises anything else (which would stop the subscriber's task)."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pylb.fleet.kv_events import AllBlocksCleared, KvEventBatch, KvEventDecodeError, KvEventSubscriber, decode_frames, decode_payload

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = ["type", "block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name", "extra_keys"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.binary(max_size=40), st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "GPU", "cpu"]),
)  # fmt: skip
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=4), inner, max_size=5),
                      max_leaves=20)  # fmt: skip
hashes = st.lists(st.one_of(st.integers(min_value=-(2**63), max_value=2**64 - 1), st.binary(min_size=32, max_size=32), values), max_size=6)
event_maps = st.fixed_dictionaries(
    {"type": st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"]) | values},
    optional={"block_hashes": hashes | values, "parent_block_hash": st.none() | st.integers(min_value=0, max_value=2**64 - 1) | values,
              "token_ids": st.lists(st.integers(min_value=0, max_value=2**31), max_size=8) | values, "block_size": st.sampled_from([16, 0, -3]) | values,
              "medium": st.sampled_from([None, "GPU", "CPU"]) | values, "lora_name": values, "extra_keys": values},
)  # fmt: skip
tagged_arrays = st.tuples(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared", "Other"]), st.lists(values, max_size=8)).map(
    lambda t: [t[0], *t[1]]
)
batches = st.tuples(st.one_of(st.floats(), st.integers(min_value=0, max_value=2**40), values), st.lists(event_maps | tagged_arrays | values, max_size=4),
                    st.lists(values, max_size=1)).map(lambda t: [t[0], t[1], *t[2]])  # fmt: skip


def packed(batch: Any, use_bin_type: bool) -> bytes:
    return msgpack.packb(batch, use_bin_type=use_bin_type)


def corrupt(raw: bytes, data: st.DataObject) -> bytes:
    """Flip, drop or insert a few bytes."""
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(0, 3))):
        op = data.draw(st.sampled_from(["flip", "drop", "insert"]))
        i = data.draw(st.integers(0, max(len(b) - 1, 0)))
        if op == "flip" and b:
            b[i] = data.draw(st.integers(0, 255))
        elif op == "drop" and b:
            del b[i]
        else:
            b.insert(i, data.draw(st.integers(0, 255)))
    return bytes(b)


class Sink:
    def __init__(self) -> None:
        self.batches: list[KvEventBatch] = []

    def on_kv_batch(self, replica: str, batch: KvEventBatch) -> None:
        self.batches.append(batch)

    def on_kv_resync(self, replica: str, reason: str) -> None:
        pass


def check_delivered(batch: KvEventBatch) -> None:
    for e in batch.events:
        _ = e.applies
        if not isinstance(e, AllBlocksCleared):
            assert e.keys.dtype.kind == "u"


@SETTINGS
@given(batch=batches, bin_type=st.booleans())
def test_structured_payload_decodes_or_is_a_decode_error(batch: Any, bin_type: bool) -> None:
    try:
        decoded = decode_payload(packed(batch, bin_type), 5)
    except KvEventDecodeError as exc:
        assert str(exc)
        return
    assert decoded.seq == 5
    check_delivered(decoded)


@SETTINGS
@given(payload=st.binary(max_size=200))
def test_random_bytes_decode_or_are_a_decode_error(payload: bytes) -> None:
    try:
        check_delivered(decode_payload(payload))
    except KvEventDecodeError:
        pass


@SETTINGS
@given(data=st.data(), batch=batches)
def test_subscriber_counts_every_bad_message_and_never_raises(data: st.DataObject, batch: Any) -> None:
    sink = Sink()
    sub = KvEventSubscriber("r0", "tcp://127.0.0.1:1", sink)  # type: ignore[arg-type]
    payload = corrupt(packed(batch, True), data)
    seq = data.draw(st.sampled_from([(7).to_bytes(8, "big"), b"", b"\x00" * 7, b"\x00" * 9]))
    frames = data.draw(st.sampled_from([[b"kv@", seq, payload], [b"kv@", seq], [b"kv@", seq, payload, b"x"], []]))
    try:
        decode_frames(frames)
        good = True
    except KvEventDecodeError:
        good = False
    sub.handle(frames)  # must not raise
    assert (sub.stats.batches, sub.stats.decode_errors) == ((1, 0) if good else (0, 1))
    assert len(sink.batches) == sub.stats.batches


def test_a_map_key_that_is_a_map_is_a_decode_error_not_a_type_error() -> None:
    # msgpack allows any key; Python cannot hash a dict or list key: the decoder must say "not msgpack".
    payload = bytes([0x92, 0x00, 0x91, 0x81, 0x80, 0x01])  # [0, [{{}: 1}]]
    try:
        decode_payload(payload)
    except KvEventDecodeError as exc:
        assert "not msgpack" in str(exc)
    else:
        raise AssertionError("decoded a map with a map as key")


def test_token_ids_that_are_not_a_list_are_a_decode_error() -> None:
    payload = msgpack.packb([0, [{"type": "BlockStored", "block_hashes": [1], "block_size": 16, "token_ids": 7}]])
    try:
        decode_payload(payload)
    except KvEventDecodeError as exc:
        assert "token_ids" in str(exc)
    else:
        raise AssertionError("accepted token_ids: 7")
