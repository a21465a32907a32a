"""vLLM KV-cache events: the wire format, and one ZMQ subscriber per replica.

Design (DESIGN.md §5; issue 12 §1)
----------------------------------
A vLLM replica started with `--kv-events-config '{"enable_kv_cache_events": true, "publisher":
"zmq", "endpoint": ...}'` publishes every change of its prefix cache on a ZMQ PUB socket
(`vllm/distributed/kv_events.py: ZmqEventPublisher`). Each message is three frames:

    [topic (bytes, "" by default), seq (8-byte big-endian uint, +1 per batch from 0), payload]

where payload is msgpack of `KVEventBatch`, encoded by msgspec as an array
`[ts, events, data_parallel_rank?]` (array_like; a trailing None rank is omitted), and each
event is a map tagged by its class name in "type" (fields with their default value omitted):

    {"type": "BlockStored", "block_hashes": [h...], "parent_block_hash": h | None,
     "token_ids": [...], "block_size": B, "lora_id": .., "medium": "GPU" | "CPU" | .., ...}
    {"type": "BlockRemoved", "block_hashes": [h...], "medium": ..}
    {"type": "AllBlocksCleared"}

A hash h is 32 bytes (SHA-256 of vLLM's sha256 / sha256_cbor block hashing) or, with
VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES, its low 64 bits as an int. pylb keys blocks by that 64-bit
value either way (`block_key`: the bytes' last 8, big-endian, exactly vLLM's int conversion),
so a 32-byte hash and its int form name the same block. Only the GPU tier (medium None or
"GPU") is the prefix cache a request hits; events of other tiers (CPU offload, storage) are
decoded but not applied (`KvEventBatch.events` keeps them, `applies` says which count).

The subscriber (`KvEventSubscriber`): one SUB socket per replica on pyzmq's asyncio context,
subscribed to all topics. vLLM binds when its endpoint has "*" or "::" or is ipc:// or inproc://,
and *connects* for a concrete tcp://host:port, in which case pylb must bind
(`../shared/vllm/README.md`); `bind` chooses. Per batch it checks the sequence number: the first
batch after (re)connecting starts the stream; a batch whose seq is not last + 1 (a gap: the PUB
socket dropped messages at its high-water mark, or the replica restarted and counts from 0 again)
means pylb's copy of that replica's cache is no longer exact, so the subscriber reports a
*resync* (`on_resync(replica, reason)`, and the sink drops the replica's mirror state, which the
following events rebuild) and counts it. A socket that stays silent is not an error (an idle
replica publishes nothing). Undecodable payloads are counted and skipped. When the replica leaves
the membership its subscriber is closed; failures to create or connect a socket are retried with
exponential backoff (0.1 s doubling to `backoff_max_s`), each counted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

log = logging.getLogger("pylb.kv_events")

_MASK64 = (1 << 64) - 1
GPU_MEDIUMS = (None, "GPU")
"""`medium` values of events about the GPU prefix cache (None: a vLLM that does not say)."""


class KvEventDecodeError(ValueError):
    """A payload that is not a msgpack KVEventBatch of the shape documented above."""


def block_key(h: bytes | int) -> int:
    """The 64-bit mirror key of a vLLM block hash: an int as it is (masked to 64 bits), bytes by
    their last 8 bytes read big-endian (vLLM's own `int.from_bytes(h, "big") & (2**64-1)`)."""
    if isinstance(h, (bytes, bytearray, memoryview)):
        return int.from_bytes(bytes(h[-8:]), "big")
    if isinstance(h, int) and not isinstance(h, bool):
        return h & _MASK64
    raise KvEventDecodeError(f"a block hash must be bytes or an int, got {type(h).__name__}")


def block_keys(hashes: Sequence[bytes | int]) -> np.ndarray:
    """`block_key` of each hash, as a uint64 array (vectorised for the usual all-32-byte case)."""
    n = len(hashes)
    if n and all(type(h) is bytes and len(h) == 32 for h in hashes):
        raw = np.frombuffer(b"".join(h for h in hashes if isinstance(h, bytes)), dtype=np.uint8).reshape(n, 32)[:, 24:]
        return np.ascontiguousarray(raw).view(">u8").reshape(n).astype(np.uint64)
    if n and all(type(h) is int for h in hashes):  # vLLM's default integer form (already 64-bit)
        try:
            return np.array(hashes, dtype=np.uint64)
        except OverflowError:  # negative or wider than 64 bits: mask each
            pass
    return np.fromiter((block_key(h) for h in hashes), dtype=np.uint64, count=n)


@dataclass(slots=True)
class BlockStored:
    """Blocks the replica now holds (in prefix order: each one's parent is the one before)."""

    keys: np.ndarray  # uint64 block keys
    parent_key: int | None
    token_ids: list[int]
    block_size: int
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None

    @property
    def applies(self) -> bool:
        """Whether it is about the GPU prefix cache (what requests hit)."""
        return self.medium in GPU_MEDIUMS


@dataclass(slots=True)
class BlockRemoved:
    """Blocks the replica evicted."""

    keys: np.ndarray
    medium: str | None = None

    @property
    def applies(self) -> bool:
        """Whether it is about the GPU prefix cache."""
        return self.medium in GPU_MEDIUMS


@dataclass(slots=True)
class AllBlocksCleared:
    """The replica dropped its whole prefix cache (e.g. POST /reset_prefix_cache)."""

    applies: bool = True


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(slots=True)
class KvEventBatch:
    """One decoded message: its sequence number, the engine's timestamp and its events."""

    seq: int
    ts: float
    events: list[KvEvent] = field(default_factory=list)
    dp_rank: int | None = None

    @property
    def block_events(self) -> int:
        """Blocks stored plus blocks removed in this batch (what the events/s benchmark counts)."""
        return sum(len(e.keys) for e in self.events if not isinstance(e, AllBlocksCleared))


def _decode_event(raw: Any) -> KvEvent:
    if isinstance(raw, dict):
        kind = raw.get("type")
        get = raw.get
    elif isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        # array_like encoders put the tag first and the fields in declaration order
        kind = raw[0]
        names = {"BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium", "lora_name", "extra_keys"),
                 "BlockRemoved": ("block_hashes", "medium"), "AllBlocksCleared": ()}.get(kind, ())  # fmt: skip
        as_map = dict(zip(names, raw[1:]))
        get = as_map.get
    else:
        raise KvEventDecodeError(f"an event must be a map or a tagged array, got {type(raw).__name__}")
    if kind == "BlockStored":
        hashes = get("block_hashes")
        if not isinstance(hashes, list):
            raise KvEventDecodeError("BlockStored.block_hashes must be a list")
        parent = get("parent_block_hash")
        token_ids = get("token_ids")
        if token_ids is not None and not isinstance(token_ids, list):
            raise KvEventDecodeError(f"BlockStored.token_ids must be a list, got {type(token_ids).__name__}")
        block_size = get("block_size")
        if not isinstance(block_size, int) or block_size <= 0:
            raise KvEventDecodeError(f"BlockStored.block_size must be a positive int, got {block_size!r}")
        return BlockStored(
            keys=block_keys(hashes),
            parent_key=None if parent is None else block_key(parent),
            token_ids=list(token_ids or ()),
            block_size=block_size,
            medium=get("medium"),
            lora_name=get("lora_name"),
            extra_keys=get("extra_keys"),
        )
    if kind == "BlockRemoved":
        hashes = get("block_hashes")
        if not isinstance(hashes, list):
            raise KvEventDecodeError("BlockRemoved.block_hashes must be a list")
        return BlockRemoved(keys=block_keys(hashes), medium=get("medium"))
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise KvEventDecodeError(f"unknown KV event type {kind!r}")


def decode_payload(payload: bytes, seq: int = -1) -> KvEventBatch:
    """Decode one msgpack `KVEventBatch` payload (KvEventDecodeError when it is not one)."""
    try:
        raw = msgpack.unpackb(payload, raw=False, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:  # TypeError: a map key that is a map or an array
        raise KvEventDecodeError(f"not msgpack: {exc}") from None
    if isinstance(raw, dict):  # a map-encoded batch (not what vLLM sends, but unambiguous)
        raw = [raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")]
    if not isinstance(raw, (list, tuple)) or len(raw) < 2 or not isinstance(raw[1], list):
        raise KvEventDecodeError("a KVEventBatch must be an array [ts, events, data_parallel_rank?]")
    ts = raw[0]
    if not isinstance(ts, (int, float)):
        raise KvEventDecodeError(f"KVEventBatch.ts must be a number, got {type(ts).__name__}")
    dp = raw[2] if len(raw) > 2 else None
    return KvEventBatch(seq, float(ts), [_decode_event(e) for e in raw[1]], dp if isinstance(dp, int) else None)


def decode_frames(frames: Sequence[bytes]) -> KvEventBatch:
    """Decode one ZMQ message `[topic, seq, payload]` (KvEventDecodeError when malformed)."""
    if len(frames) != 3:
        raise KvEventDecodeError(f"a KV event message has 3 frames [topic, seq, payload], got {len(frames)}")
    _, seq_bytes, payload = frames
    if len(seq_bytes) != 8:
        raise KvEventDecodeError(f"the sequence frame must be 8 bytes, got {len(seq_bytes)}")
    return decode_payload(bytes(payload), int.from_bytes(bytes(seq_bytes), "big"))


def encode_batch(seq: int, ts: float, events: Sequence[KvEvent], topic: bytes = b"", hashes_as_bytes: Callable[[int], bytes] | None = None) -> list[bytes]:
    """The frames `[topic, seq, payload]` vLLM would send for `events` (the fake replicas'
    publisher and the tests use it). Block keys are sent as ints (vLLM's integer form) unless
    `hashes_as_bytes` maps a key to its 32-byte hash."""

    def h(k: Any) -> Any:
        return hashes_as_bytes(int(k)) if hashes_as_bytes is not None else int(k)

    out: list[Any] = []
    for e in events:
        if isinstance(e, BlockStored):
            d: dict[str, Any] = {"type": "BlockStored", "block_hashes": [h(k) for k in e.keys],
                                 "parent_block_hash": None if e.parent_key is None else h(e.parent_key),
                                 "token_ids": list(e.token_ids), "block_size": e.block_size, "lora_id": None,
                                 "medium": e.medium, "lora_name": e.lora_name}  # fmt: skip
            out.append(d)
        elif isinstance(e, BlockRemoved):
            out.append({"type": "BlockRemoved", "block_hashes": [h(k) for k in e.keys], "medium": e.medium})
        else:
            out.append({"type": "AllBlocksCleared"})
    return [topic, int(seq).to_bytes(8, "big"), msgpack.packb([ts, out], use_bin_type=True)]


# ---- the subscriber -------------------------------------------------------------------------------------


class KvEventSink:
    """What a subscriber feeds (the proxy's router glue implements it)."""

    def on_kv_batch(self, replica: str, batch: KvEventBatch) -> None:  # pragma: no cover - interface
        """A decoded batch, in sequence order, for `replica`."""

    def on_kv_resync(self, replica: str, reason: str) -> None:  # pragma: no cover - interface
        """The replica's event stream broke (gap, restart, reconnect): drop its state."""


@dataclass(slots=True)
class SubscriberStats:
    """Counters of one replica's subscriber (exported as Prometheus series by the proxy)."""

    batches: int = 0
    block_events: int = 0
    resyncs: int = 0
    decode_errors: int = 0
    connect_errors: int = 0
    last_seq: int | None = None


class KvEventSubscriber:
    """One replica's ZMQ SUB socket, read by an asyncio task (see the module comment).

    Args:
        replica: the replica's name (the router's replica id: its base URL).
        endpoint: the ZMQ endpoint, e.g. tcp://10.0.0.1:5557 or ipc:///tmp/kv.sock.
        sink: receives batches and resyncs.
        bind: bind instead of connect (vLLM connects to a concrete tcp://host:port endpoint).
        topic: subscribe to this topic prefix ("" = all).
        backoff_max_s: the longest wait between retries of a failed socket set-up.
    """

    def __init__(self, replica: str, endpoint: str, sink: KvEventSink, *, bind: bool = False, topic: str = "", backoff_max_s: float = 30.0) -> None:
        self.replica = replica
        self.endpoint = endpoint
        self.sink = sink
        self.bind = bind
        self.topic = topic.encode()
        self.backoff_max_s = backoff_max_s
        self.stats = SubscriberStats()
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()

    def start(self) -> None:
        """Start the reading task on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"pylb-kv-events {self.replica}")

    async def wait_ready(self, timeout: float = 5.0) -> bool:
        """Wait until the socket is connected or bound (True), or `timeout` passes (False)."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self) -> None:
        """Close the socket and end the task."""
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass

    def handle(self, frames: Sequence[bytes]) -> None:
        """Check the sequence, decode, and deliver one message (synchronous: tests call it)."""
        s = self.stats
        try:
            batch = decode_frames(frames)
        except KvEventDecodeError as exc:
            s.decode_errors += 1
            log.warning("undecodable KV event message skipped", extra={"replica": self.replica, "error": str(exc)})
            return
        if s.last_seq is not None and batch.seq != s.last_seq + 1:
            reason = "restart" if batch.seq < s.last_seq else "gap"
            s.resyncs += 1
            log.warning("KV event stream broke; resync", extra={"replica": self.replica, "reason": reason, "expected": s.last_seq + 1, "got": batch.seq})
            self.sink.on_kv_resync(self.replica, reason)
        s.last_seq = batch.seq
        s.batches += 1
        s.block_events += batch.block_events
        self.sink.on_kv_batch(self.replica, batch)

    async def _run(self) -> None:
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        backoff = 0.1
        while True:
            sock = None
            try:
                sock = ctx.socket(zmq.SUB)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, 0)  # never drop on pylb's side; the publisher's HWM decides
                sock.setsockopt(zmq.SUBSCRIBE, self.topic)
                if self.bind:
                    sock.bind(self.endpoint)
                else:
                    sock.connect(self.endpoint)
                if self.stats.last_seq is not None:  # a new connection: whatever was missed is unknown
                    self.stats.last_seq = None
                    self.stats.resyncs += 1
                    self.sink.on_kv_resync(self.replica, "reconnect")
                self._ready.set()
                backoff = 0.1
                while True:
                    frames = await sock.recv_multipart()
                    self.handle(frames)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # zmq errors (bad endpoint, address in use), or a sink bug
                self.stats.connect_errors += 1
                log.warning("KV event subscriber failed; retrying", extra={"replica": self.replica, "endpoint": self.endpoint,
                                                                             "error": f"{type(exc).__name__}: {exc}", "retry_in_s": backoff})  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(self.backoff_max_s, backoff * 2)
            finally:
                if sock is not None:
                    sock.close(linger=0)


def endpoint_for(replica_url: str, endpoints: dict[str, str], port: int, scheme: str = "tcp") -> str | None:
    """The ZMQ endpoint of a replica: named in `endpoints` (by its base URL), else derived from
    its host and `port` (tcp://HOST:PORT; None when `port` is 0: no events for it)."""
    ep = endpoints.get(replica_url.rstrip("/"))
    if ep:
        return ep
    if port <= 0:
        return None
    from urllib.parse import urlsplit

    host = urlsplit(replica_url).hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"
