"""The live proxy's KV-events feed: subscribers per replica, engine keys per request, metrics.

Design (issue 12)
-----------------
Used when `router.cache_state` is "events". It joins three things to the router core:

  subscribers   one `KvEventSubscriber` per replica in rotation (`sync`, called on every
                membership change), its endpoint from `kv_events.endpoints` or the replica's host
                and `kv_events.port`. Each decoded event about the GPU prefix cache goes to the
                router as `on_kv_event(replica, "stored" | "removed" | "cleared", keys, now)`; a
                resync (gap, restart, reconnect) as "cleared".
  keys          `annotate(kind, payload, request)` runs the keyer (tokenize + engine-exact hash)
                in a thread pool of `kv_events.tokenizer_threads` (the event loop never
                tokenizes), and sets the request's `engine_keys`, `engine_block_size` and its true
                prompt token count. Bounded cost: a body over `kv_events.max_prompt_bytes` is
                not tokenized; a request the keyer cannot reproduce (images, a template error)
                gets no keys. Either way it is routed on the predicted mirror, never refused.
  metrics       `KV_SERIES` below, registered in the proxy's registry only in this mode.

Keyers: `EngineKeyer` (a real model's tokenizer.json and chat template: vLLM's sha256_cbor
hashes) or, with `kv_events.tokenizer: sim`, `SimKeyer`, which reproduces what `pylb
sim-replicas` hashes (4 bytes of text per simulated token, its fixed chat rendering, XXH3 block
hashes), so the fake fleet, the tests and the demo exercise the same path with the same frames.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pylb import native
from pylb.config import Settings
from pylb.observability.metrics import DECISION_BUCKETS, Hist
from pylb.router.engine_keys import EngineKeyer, EngineKeys
from pylb.router.interface import BYTES_PER_TOKEN, Router, RoutingRequest

from .kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch, KvEventSink, KvEventSubscriber, endpoint_for

log = logging.getLogger("pylb.kv_events")

KV_SERIES: dict[str, str] = {
    "pylb_kv_events_batches_total": "KV event batches received from the replica",
    "pylb_kv_events_blocks_total": "block events (stored + removed) received from the replica",
    "pylb_kv_events_resyncs_total": "times the replica's event stream broke (gap, restart, reconnect) and its mirror was dropped",
    "pylb_kv_events_errors_total": "undecodable messages (kind=decode) and failed socket set-ups (kind=connect), by replica",
    "pylb_kv_mirror_cached_tokens": "tokens the replica holds by each mirror (mirror=predicted: pylb's guess; mirror=events: the engine's events)",
    "pylb_kv_dispatch_prompt_tokens_total": "prompt tokens of keyed requests dispatched to the replica",
    "pylb_kv_dispatch_cached_tokens_total": "of those, tokens each mirror said were cached at dispatch (mirror=predicted|events)",
    "pylb_kv_predicted_hit_rate": "per replica and mirror: cached / prompt tokens of keyed dispatches (compare pylb_observed_prefix_cache_hit_rate)",
    "pylb_kv_keyed_requests_total": "requests by keying result (keyed, unkeyable, too_large)",
    "pylb_kv_keying_seconds": "time to tokenize and hash one request (in the thread pool)",
    "pylb_kv_tokenizer_chunks_total": "prompt chunks (whole lines) by outcome: cached (tokenized before, taken from the line cache) or tokenized",
}
"""The series of the KV-events feed (present only with router.cache_state: events)."""


class Keyer(Protocol):
    """What the feed needs of a keyer."""

    block_size: int

    def keys_for(self, kind: str, body: Mapping[str, Any]) -> EngineKeys | None: ...


class SimKeyer:
    """The keys `pylb sim-replicas` gives a prompt: its engine hashes text in blocks of
    4 * block_size bytes (one simulated token = 4 bytes) and token ids as uint32 values, and
    renders chat with its fixed template (`pylb.sim.server.render_chat`)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size

    def keys_for(self, kind: str, body: Mapping[str, Any]) -> EngineKeys | None:
        """Keys of a completions or chat body as the fake engine computes them, or None."""
        from pylb.sim.server import ApiError, render_chat

        if kind == "chat":
            try:
                data = render_chat(body.get("messages")).encode("utf-8")
            except ApiError:
                return None
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
                prompt = prompt[0]
            if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**32 for t in prompt):
                ids = np.asarray(prompt, dtype=np.uint32)
                return EngineKeys(len(ids), native.block_hashes(ids, self.block_size), self.block_size)
            if not isinstance(prompt, str) or not prompt:
                return None
            data = prompt.encode("utf-8")
        return EngineKeys(-(-len(data) // BYTES_PER_TOKEN), native.block_hashes(data, BYTES_PER_TOKEN * self.block_size), self.block_size)


def make_keyer(settings: Settings) -> Keyer:
    """The keyer `kv_events.tokenizer` names ("sim", or a tokenizer.json / model folder)."""
    k = settings.kv_events
    if k.tokenizer == "sim":
        return SimKeyer(k.block_size)
    return EngineKeyer(k.tokenizer, k.block_size, k.chat_template or None, k.hash_seed, k.line_cache_tokens)


class KvFeed(KvEventSink):
    """Subscribers, keys and metrics of the events mirror (see the module comment).

    Args:
        settings: pylb's settings (`kv_events` section).
        router: the router (its `on_kv_event` is called; a `CoreRouter` also exports its mirrors).
        deliver: how an event reaches the router (the dispatcher's `on_kv_event`, which serialises
            it with the other router calls and counts failures).
        registry: the Prometheus registry to add `KV_SERIES` to (None: no metrics).
    """

    def __init__(self, settings: Settings, router: Router, deliver: Any, registry: Any = None) -> None:
        self.settings = settings.kv_events
        self.router = router
        self.deliver = deliver
        self.keyer = make_keyer(settings)
        self._pool = ThreadPoolExecutor(self.settings.tokenizer_threads, thread_name_prefix="pylb-keyer")
        self._endpoints = dict(str(e).split("=", 1) for e in self.settings.endpoints)
        self._endpoints = {u.rstrip("/"): ep for u, ep in self._endpoints.items()}
        self.subscribers: dict[str, KvEventSubscriber] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self.keyed: dict[str, int] = {"keyed": 0, "unkeyable": 0, "too_large": 0}
        self.keying_seconds = Hist("pylb_kv_keying_seconds", KV_SERIES["pylb_kv_keying_seconds"], [], DECISION_BUCKETS)
        if registry is not None:
            registry.register(_KvCollector(self))

    # ---- subscribers ---------------------------------------------------------------------------

    def sync(self, replicas: Sequence[str]) -> None:
        """Subscribe to every replica in `replicas` (starting new subscribers), close the others."""
        keep = set(replicas)
        for url in [u for u in self.subscribers if u not in keep]:
            sub = self.subscribers.pop(url)
            t = asyncio.ensure_future(sub.stop())
            self._stopping.add(t)
            t.add_done_callback(self._stopping.discard)
        for url in replicas:
            if url in self.subscribers:
                continue
            ep = endpoint_for(url, self._endpoints, self.settings.port)
            if ep is None:
                continue
            sub = KvEventSubscriber(url, ep, self, bind=self.settings.bind, topic=self.settings.topic, backoff_max_s=self.settings.backoff_max_s)
            self.subscribers[url] = sub
            sub.start()
            log.info("subscribed to KV events", extra={"replica": url, "endpoint": ep, "bind": self.settings.bind})

    async def stop(self) -> None:
        """Close every subscriber and the keyer threads."""
        subs, self.subscribers = list(self.subscribers.values()), {}
        await asyncio.gather(*(s.stop() for s in subs), *self._stopping)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def on_kv_batch(self, replica: str, batch: KvEventBatch) -> None:
        """Deliver a batch's GPU-cache events to the router, in order."""
        for e in batch.events:
            if not e.applies:
                continue
            if isinstance(e, BlockStored):
                self.deliver(replica, "stored", e.keys)
            elif isinstance(e, BlockRemoved):
                self.deliver(replica, "removed", e.keys)
            elif isinstance(e, AllBlocksCleared):
                self.deliver(replica, "cleared", np.empty(0, np.uint64))

    def on_kv_resync(self, replica: str, reason: str) -> None:
        """The replica's stream broke: its events mirror starts over."""
        self.deliver(replica, "cleared", np.empty(0, np.uint64))

    # ---- keys ----------------------------------------------------------------------------------

    async def annotate(self, kind: str, payload: Mapping[str, Any], body_bytes: int, request: RoutingRequest) -> None:
        """Give `request` its engine keys (tokenized and hashed in the thread pool), if it can have them."""
        if body_bytes > self.settings.max_prompt_bytes:
            self.keyed["too_large"] += 1
            return
        keys, seconds = await asyncio.get_running_loop().run_in_executor(self._pool, self._keys, kind, payload)
        self.keying_seconds.observe(seconds)
        if keys is None:
            self.keyed["unkeyable"] += 1
            return
        self.keyed["keyed"] += 1
        request.engine_keys = keys.keys
        request.engine_block_size = keys.block_size
        request.prompt_tokens = max(1, keys.prompt_tokens)

    def _keys(self, kind: str, payload: Mapping[str, Any]) -> tuple[EngineKeys | None, float]:
        t0 = time.perf_counter()
        try:
            keys = self.keyer.keys_for(kind, payload)
        except Exception:  # a keyer bug must not fail the request: it is routed without keys
            log.exception("keying a request failed; routing it on the predicted mirror")
            keys = None
        return keys, time.perf_counter() - t0


class _KvCollector(Collector):
    """Exports `KV_SERIES` from the feed's and the router's state at scrape time."""

    def __init__(self, feed: KvFeed) -> None:
        self.feed = feed

    def collect(self) -> Iterator[Metric]:
        f = self.feed

        def fam(name: str, labels: Sequence[str], counter: bool = False) -> Any:
            cls = CounterMetricFamily if counter else GaugeMetricFamily
            return cls(name.removesuffix("_total") if counter else name, KV_SERIES[name], labels=list(labels))

        batches = fam("pylb_kv_events_batches_total", ["replica"], True)
        blocks = fam("pylb_kv_events_blocks_total", ["replica"], True)
        resyncs = fam("pylb_kv_events_resyncs_total", ["replica"], True)
        errors = fam("pylb_kv_events_errors_total", ["replica", "kind"], True)
        for url, sub in f.subscribers.items():
            s = sub.stats
            batches.add_metric([url], s.batches)
            blocks.add_metric([url], s.block_events)
            resyncs.add_metric([url], s.resyncs)
            errors.add_metric([url, "decode"], s.decode_errors)
            errors.add_metric([url, "connect"], s.connect_errors)
        yield from (batches, blocks, resyncs, errors)
        mirror = fam("pylb_kv_mirror_cached_tokens", ["replica", "mirror"])
        prompt = fam("pylb_kv_dispatch_prompt_tokens_total", ["replica"], True)
        cached = fam("pylb_kv_dispatch_cached_tokens_total", ["replica", "mirror"], True)
        rate = fam("pylb_kv_predicted_hit_rate", ["replica", "mirror"])
        router: Any = f.router
        events = getattr(router, "events", None)
        predicted = getattr(router, "mirror", None)  # a CoreRouter's; other routers have none
        opts = router.view.options
        for s in router.view.replicas:
            if predicted is not None:
                mirror.add_metric([s.name, "predicted"], int(predicted.size(s.index) * opts.tokens_per_block))
            if events is not None:
                mirror.add_metric([s.name, "events"], events.blocks(s.index) * f.keyer.block_size)
        for name, c in getattr(router, "cache_comparison", {}).items():
            prompt.add_metric([name], c.prompt_tokens)
            cached.add_metric([name, "predicted"], c.predicted_tokens)
            cached.add_metric([name, "events"], c.events_tokens)
            if c.prompt_tokens:
                rate.add_metric([name, "predicted"], c.predicted_tokens / c.prompt_tokens)
                rate.add_metric([name, "events"], c.events_tokens / c.prompt_tokens)
        yield from (mirror, prompt, cached, rate)
        keyed = fam("pylb_kv_keyed_requests_total", ["result"], True)
        for k, v in f.keyed.items():
            keyed.add_metric([k], v)
        yield keyed
        yield f.keying_seconds.family()
        chunks = fam("pylb_kv_tokenizer_chunks_total", ["outcome"], True)
        lines = getattr(f.keyer, "lines", None)  # an EngineKeyer's line cache; SimKeyer does not tokenize
        seen, tokenized = (lines.chunks_seen, lines.chunks_encoded) if lines is not None else (0, 0)
        chunks.add_metric(["cached"], seen - tokenized)
        chunks.add_metric(["tokenized"], tokenized)
        yield chunks
