"""The fleet: which replicas are in rotation, and what their /metrics say.

Design
------
`Fleet` owns one `FleetReplica` per configured backend (a static list; discovery can feed the
same object later) and two background tasks on the proxy's event loop, with their own small
aiohttp session (two connections per replica, so probes never wait behind data-path traffic):

Health, as a state machine per replica:

    unknown --first probe ok--> healthy          unknown --first probe fails--> unhealthy
    healthy --`unhealthy_threshold` consecutive failed probes--> unhealthy      (reason "probe")
    healthy --`eject_connect_errors` consecutive connection errors on requests--> unhealthy ("connect")
    healthy --`eject_5xx` consecutive answers in `eject_statuses` (502/503/504; the proxy reports
              only those: a 500 answers one request)--> unhealthy              (reason "5xx")
    unhealthy --`healthy_threshold` consecutive good probes, and at least `ejection_s` after a
                passive ejection--> healthy

  A probe is `GET <backend><health_path>`; 200 within `health_timeout_s` is good. Probes run for
  every replica every `health_interval_s`. A probe of a healthy replica that times out while the
  replica sent data on the request path within the last `health_interval_s + health_timeout_s`
  is not counted (`sent_data_within`; logged): a replica whose API server is slow to answer
  /health while its engine streams (seen on a 2-core CPU vLLM, BENCHMARKS.md) is busy, not hung;
  one that stops sending is ejected as before. The thresholds give hysteresis, so a flapping
  replica does not flap the membership; the ejection hold keeps a replica that answers /health
  but fails requests out for a while. Any request that succeeds resets the passive counters.

Membership: whenever the set of healthy replicas changes, `on_membership(list)` is called with
the healthy replicas in configuration order (the router's `on_membership`). `start()` runs one
probe round before returning, so the first membership reflects reality.

Scraping: every `scrape_interval_s`, each healthy replica's `/metrics` is fetched and parsed
(`pylb.fleet.scrape.parse_vllm_metrics`) and delivered to `on_metrics(replica, metrics)`. Each
replica is scraped on its own: a tick starts a scrape of every healthy replica whose previous
scrape has finished and does not wait for them, so a slow page delays only that replica's next
scrape, never the others', and never piles up. The timeout (`scrape_timeout_s`, 5 s) is
therefore generous: an idle vLLM replica on a busy CPU host measured here answered in 7 ms at the
median, 300 ms at p99, and past the old 1 s limit about once in 5 minutes -- a scrape that slow is
late, not failed. The fleet also keeps the increase of the replica's prefix-cache counters since
pylb started (for the observed hit rate), handling counter resets (a restarted replica).
With `scrape_filtered` (the default) the fleet asks for only the series it reads
(`/metrics/?name[]=...`, prometheus-client's filter, which vLLM serves): a seventh of the
replica's CPU per scrape on a CPU vLLM (`bench/scrape_cost.py`); a replica that answers that
request with 404 or 405, or with a page that is not vLLM's, is scraped whole from then on.

Both loops catch, log and count every failure (`pylb_background_errors_total`) and go on.

Discovery (`fleet.discovery` dns or k8s; `pylb.fleet.discovery`): the replica list is not fixed.
A discovery source calls `set_members({url: ready})` whenever what it sees changes: new URLs are
added and probed at once (health checks still gate them: a replica is in rotation only when it is
both offered ready and healthy), replicas offered with ready=False are *draining* (out of rotation
and no longer probed, so the router sends them nothing new, while requests already sent to them
finish over their open connections), and replicas no longer offered are removed (pylb never cuts
a request in flight; the replica's own shutdown may).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from pylb.config import FleetSettings
from pylb.observability.metrics import ProxyMetrics
from pylb.router.interface import ReplicaMetrics

from .discovery import Discovery, Members
from .scrape import FILTER_PARAMS, ScrapeError, filtered_metrics_path, parse_vllm_metrics

log = logging.getLogger("pylb.fleet")

_PROBE_BODY_BYTES = 64 * 1024
"""At most this much of a health probe's answer is read (its status is what counts)."""


async def _read_page(resp: aiohttp.ClientResponse, limit: int) -> str:
    """A /metrics answer as text; ScrapeError past `limit` bytes (checked while reading)."""
    if resp.content_length is not None and resp.content_length > limit:
        raise ScrapeError(f"metrics page of {resp.content_length} bytes, more than fleet.max_metrics_bytes ({limit})")
    data = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise ScrapeError(f"metrics page larger than fleet.max_metrics_bytes ({limit})")
    return data.decode("utf-8")


NOT_SERVED_STATUSES = (404, 405)
"""Answers to the filtered metrics request that mean the replica does not serve it."""


class _ErrorStatus(ScrapeError):
    """A metrics request answered with a status other than 200."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@dataclass(slots=True)
class FleetReplica:
    """What the fleet knows about one replica."""

    url: str
    healthy: bool = False
    probed: bool = False
    probe_ok: int = 0
    probe_fail: int = 0
    connect_errors: int = 0
    errors_5xx: int = 0
    held_until: float = 0.0
    last_error: str = ""
    metrics: ReplicaMetrics | None = None
    metrics_at: float | None = None
    observed_queries: int = 0
    observed_hits: int = 0
    _last_queries: int | None = None
    _last_hits: int | None = None
    scrape_failing: bool = False
    draining: bool = False
    # fleet.scrape_filtered: None until a filtered scrape was tried, then whether the replica serves it
    serves_filtered_page: bool | None = None


class Fleet:
    """Health and metrics of the configured replicas (see the module comment)."""

    def __init__(
        self,
        settings: FleetSettings,
        metrics: ProxyMetrics,
        on_membership: Callable[[list[str]], None],
        on_metrics: Callable[[str, ReplicaMetrics], None],
        clock: Callable[[], float] = time.monotonic,
        discovery: Discovery | None = None,
        on_removed: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._on_removed = on_removed
        self.metrics = metrics
        self._on_membership = on_membership
        self._on_metrics = on_metrics
        self._clock = clock
        self.replicas: dict[str, FleetReplica] = {url.rstrip("/"): FleetReplica(url.rstrip("/")) for url in settings.backends}
        self._healthy: list[str] = []
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._scrapes: dict[str, asyncio.Task[None]] = {}  # replica -> its scrape in flight
        self.discovery = discovery
        """The source of the replica list when it is dynamic (None: `settings.backends`, fixed)."""
        self.ssl: ssl.SSLContext | None = None
        """The TLS context for https:// replicas (None: the system's defaults); set before `start`."""
        self.on_eject: Callable[[str, str], None] | None = None
        """Called with (replica, reason) when a replica leaves rotation ("probe", "connect", "5xx")."""
        self.sent_data_within: Callable[[str, float], bool] | None = None
        """Asked (replica, window) when a probe of a healthy replica times out: True when the
        replica sent data on the request path within `window` seconds, so it is busy, not hung,
        and the probe is not counted (the proxy answers it from its connection pool)."""

    # ---- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the probe session, run one probe round, publish the membership, start the loops."""
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=2, keepalive_timeout=30, ssl=self.ssl if self.ssl is not None else True)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True)
        if self.discovery is not None:
            self._tasks.append(await self.discovery.start(self.set_members, lambda: self.metrics.count_background_error("discovery")))
        await asyncio.gather(*(self._probe(r) for r in self.replicas.values()))
        self._publish(force=True)
        # the baseline of the observed hit rate, and the router's first load signal
        await asyncio.gather(*(self._scrape_guarded(self.replicas[url]) for url in self._healthy))
        self._tasks += [
            asyncio.create_task(self._loop("health", self.settings.health_interval_s, self._probe_all), name="pylb-health"),
            asyncio.create_task(self._loop("scrape", self.settings.scrape_interval_s, self._start_scrapes), name="pylb-scrape"),
        ]

    async def stop(self) -> None:
        """Stop the loops and close the session."""
        tasks = [*self._tasks, *self._scrapes.values()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
        self._tasks = []
        self._scrapes = {}
        if self._session is not None:
            await self._session.close()
            self._session = None

    # ---- queries --------------------------------------------------------------------------------

    @property
    def healthy(self) -> Sequence[str]:
        """Replicas in rotation, in configuration order."""
        return self._healthy

    def __contains__(self, url: str) -> bool:
        return url in self.replicas

    # ---- passive health (called by the proxy) -------------------------------------------------------

    def report_success(self, url: str) -> None:
        """A request to `url` got an answer below 500: reset its passive counters."""
        r = self.replicas.get(url)
        if r is not None and (r.connect_errors or r.errors_5xx):
            r.connect_errors = r.errors_5xx = 0

    def report_connect_error(self, url: str, error: str) -> None:
        """A request to `url` failed to connect or lost its connection."""
        r = self.replicas.get(url)
        if r is None:
            return
        r.connect_errors += 1
        r.last_error = error
        if r.healthy and r.connect_errors >= self.settings.eject_connect_errors:
            self._eject(r, "connect")

    def report_5xx(self, url: str, status: int) -> None:
        """A request to `url` got a 5xx answer."""
        r = self.replicas.get(url)
        if r is None:
            return
        r.errors_5xx += 1
        r.last_error = f"HTTP {status}"
        if r.healthy and r.errors_5xx >= self.settings.eject_5xx:
            self._eject(r, "5xx")

    def _eject(self, r: FleetReplica, reason: str) -> None:
        r.healthy = False
        r.probe_ok = 0
        r.connect_errors = r.errors_5xx = 0
        if reason != "probe":
            r.held_until = self._clock() + self.settings.ejection_s
        self.metrics.count_ejection(r.url, reason)
        log.warning("replica out of rotation", extra={"replica": r.url, "reason": reason, "error": r.last_error})
        self._publish()
        if self.on_eject is not None:
            self.on_eject(r.url, reason)

    # ---- membership from discovery --------------------------------------------------------------------

    async def set_members(self, members: Members) -> None:
        """Apply what discovery sees: {base URL: ready}. New URLs are probed before they may join,
        ready=False drains a replica, a URL not listed is removed (see the module comment)."""
        to_probe = []
        for url in [u for u in self.replicas if u not in members]:
            del self.replicas[url]
            scrape = self._scrapes.pop(url, None)
            if scrape is not None:
                scrape.cancel()
            log.info("replica removed by discovery", extra={"replica": url})
            if self._on_removed is not None:
                self._on_removed(url)
        for url, ready in members.items():
            r = self.replicas.get(url)
            if r is None:
                r = self.replicas[url] = FleetReplica(url, draining=not ready)
                log.info("replica discovered", extra={"replica": url, "ready": ready})
            elif r.draining != ready:
                continue  # no change
            else:
                r.draining = not ready
                log.info("replica ready again" if ready else "replica draining", extra={"replica": url})
            if ready:  # new, or back from draining (not probed meanwhile): its probe decides
                r.healthy = r.probed = False
                to_probe.append(r)
        self._publish()  # removals and drains take effect before the probes below
        await asyncio.gather(*(self._probe(r) for r in to_probe))
        self._publish()

    def _publish(self, force: bool = False) -> None:
        healthy = [url for url, r in self.replicas.items() if r.healthy and not r.draining]
        if force or healthy != self._healthy:
            self._healthy = healthy
            self._on_membership(list(healthy))

    # ---- active probes ------------------------------------------------------------------------------

    async def _probe_all(self) -> None:
        await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values()) if not r.draining))
        self._publish()

    async def _probe(self, r: FleetReplica) -> None:
        assert self._session is not None
        s = self.settings
        ok = False
        try:
            timeout = aiohttp.ClientTimeout(total=s.health_timeout_s)
            async with self._session.get(r.url + s.health_path, timeout=timeout) as resp:
                await resp.content.read(_PROBE_BODY_BYTES)
                ok = resp.status == 200
                if not ok:
                    r.last_error = f"health probe: HTTP {resp.status}"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            r.last_error = f"health probe: {type(exc).__name__}: {exc}"
            if isinstance(exc, asyncio.TimeoutError) and self._busy(r):
                log.info("health probe timed out while the replica streams: busy, not counted", extra={"replica": r.url})
                return
        first = not r.probed
        r.probed = True
        if ok:
            r.probe_fail = 0
            r.probe_ok += 1
            if not r.healthy and (first or (r.probe_ok >= s.healthy_threshold and self._clock() >= r.held_until)):
                r.healthy = True
                r.connect_errors = r.errors_5xx = 0
                log.info("replica in rotation", extra={"replica": r.url})
        else:
            r.probe_ok = 0
            r.probe_fail += 1
            if r.healthy and r.probe_fail >= s.unhealthy_threshold:
                self._eject(r, "probe")
            elif first:
                log.warning("replica not healthy at start", extra={"replica": r.url, "error": r.last_error})

    def _busy(self, r: FleetReplica) -> bool:
        """A healthy replica that sent data on the request path within the last probe period."""
        window = self.settings.health_interval_s + self.settings.health_timeout_s
        return r.healthy and self.sent_data_within is not None and self.sent_data_within(r.url, window)

    # ---- scraping -----------------------------------------------------------------------------------

    def _start_scrapes(self) -> None:
        """Start a scrape of every healthy replica whose previous scrape has finished."""
        for url in self._healthy:
            running = self._scrapes.get(url)
            if running is None or running.done():
                self._scrapes[url] = asyncio.create_task(self._scrape_guarded(self.replicas[url]), name=f"pylb-scrape {url}")

    async def _scrape_guarded(self, r: FleetReplica) -> None:
        try:
            await self._scrape(r)
        except Exception:  # a bug, not a failed scrape (those are handled in _scrape)
            self.metrics.count_background_error("scrape")
            log.exception("background task failed; it goes on", extra={"task": "scrape", "replica": r.url})

    async def _scrape(self, r: FleetReplica) -> None:
        try:
            m = await self._fetch_metrics(r)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ScrapeError, UnicodeDecodeError) as exc:
            self.metrics.count_scrape_error(r.url)
            if not r.scrape_failing:
                r.scrape_failing = True
                log.warning("metrics scrape failed", extra={"replica": r.url, "error": f"{type(exc).__name__}: {exc}"})
            return
        r.scrape_failing = False
        self._update_observed(r, m)
        r.metrics = m
        r.metrics_at = self._clock()
        # it may have left rotation, started draining or been removed while the scrape was in flight
        if r.healthy and not r.draining and self.replicas.get(r.url) is r:
            self._on_metrics(r.url, m)

    async def _fetch_metrics(self, r: FleetReplica) -> ReplicaMetrics:
        """One scrape: the filtered page where the replica serves it (fleet.scrape_filtered), else
        the whole page. A filtered request answered 404 or 405, or with a page that is not vLLM's,
        on its first try means the replica does not serve it: the whole page is fetched at once
        and used from then on; where it had worked before, that fails this scrape and the filter
        is tried afresh next time (the replica may have been replaced). Any other error status
        (a 503 while the replica starts) is a failed scrape and proves nothing either way."""
        s = self.settings
        if s.scrape_filtered and r.serves_filtered_page is not False:
            try:
                m = await self._get_metrics(r, filtered_metrics_path(s.metrics_path), FILTER_PARAMS)
            except ScrapeError as exc:
                if isinstance(exc, _ErrorStatus) and exc.status not in NOT_SERVED_STATUSES:
                    raise
                if r.serves_filtered_page:
                    r.serves_filtered_page = None
                    raise
                r.serves_filtered_page = False
                log.info("replica has no filtered metrics page; scraping it whole", extra={"replica": r.url, "error": str(exc)})
            else:
                r.serves_filtered_page = True
                return m
        return await self._get_metrics(r, s.metrics_path, ())

    async def _get_metrics(self, r: FleetReplica, path: str, params: Sequence[tuple[str, str]]) -> ReplicaMetrics:
        """GET one metrics page of `r` and parse it (ScrapeError for an error status or a bad page)."""
        assert self._session is not None
        s = self.settings
        timeout = aiohttp.ClientTimeout(total=s.scrape_timeout_s)
        async with self._session.get(r.url + path, params=params, timeout=timeout) as resp:
            if resp.status != 200:
                raise _ErrorStatus(resp.status)
            text = await _read_page(resp, s.max_metrics_bytes)
        return parse_vllm_metrics(text)

    @staticmethod
    def _update_observed(r: FleetReplica, m: ReplicaMetrics) -> None:
        """Add the counters' increase since the last scrape (a decrease means a restart: the new
        value is the increase since then)."""
        if r._last_queries is not None and r._last_hits is not None:
            dq = m.prefix_cache_queries - r._last_queries
            dh = m.prefix_cache_hits - r._last_hits
            if dq < 0 or dh < 0:
                dq, dh = m.prefix_cache_queries, m.prefix_cache_hits
            r.observed_queries += dq
            r.observed_hits += dh
        r._last_queries = m.prefix_cache_queries
        r._last_hits = m.prefix_cache_hits

    # ---- loop ---------------------------------------------------------------------------------------

    async def _loop(self, name: str, interval: float, body: Callable[[], object]) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = max(next_at + interval, loop.time())
            try:
                result = body()
                if asyncio.iscoroutine(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.count_background_error(name)
                log.exception("background task failed; it goes on", extra={"task": name})
