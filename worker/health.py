"""Health and metrics over HTTP, for the container runtime and Prometheus.

* ``GET /healthz``: 200 while the worker's event loop answers (liveness).
* ``GET /readyz``: 200 only when Redis answers a PING, a feed connection is up and, during market
  hours (IST, weekdays), the last tick is at most ``fresh_within`` seconds old; otherwise 503. The
  JSON body says which check failed and why.
* ``GET /metrics``: Prometheus text. Counters and gauges are read from the worker's own counters at
  scrape time (nothing is added to the per-tick path); the sink's writer task observes three
  histograms once per batch, and each feed connection observes its reconnect delays.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from datetime import datetime
from datetime import time as wall_time
from typing import TYPE_CHECKING, Any

import redis
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from worker import protocol as p
from worker.schema import MODE_NAMES
from worker.settings import IST

if TYPE_CHECKING:
    from worker.app import Worker

log = logging.getLogger(__name__)

SEGMENT_BY_EXCHANGE_TYPE = {int(t): segment for segment, t in p.EXCHANGE_TYPE_BY_SEGMENT.items()}
CONNECTION_STATES = ("idle", "connecting", "connected", "backoff", "closed")


def market_open(now: datetime, opens: wall_time, closes: wall_time) -> bool:
    """Monday to Friday, between ``opens`` and ``closes`` (``now`` in IST)."""
    return now.weekday() < 5 and opens <= now.time() < closes


class _WorkerCollector(Collector):
    """Everything that is a counter or a state in the worker, read when Prometheus scrapes."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    def collect(self) -> Iterator[Metric]:
        w = self.worker
        received = CounterMetricFamily(
            "angelstream_ticks_received", "Ticks decoded and normalized", labels=["exchange", "mode"]
        )
        for index, count in enumerate(w.normalizer.received):
            if count:
                exchange = SEGMENT_BY_EXCHANGE_TYPE.get(index // 8, str(index // 8))
                received.add_metric([exchange, MODE_NAMES.get(index % 8, str(index % 8))], count)
        yield received
        written = CounterMetricFamily("angelstream_ticks_written", "Ticks acknowledged by Redis", labels=["exchange"])
        by_exchange: dict[str, int] = {}
        # The writer adds streams on the event loop's thread. dict.copy() allocates before it copies, so the
        # collector (which may run a finalizer, and so let another thread in) cannot run in the middle of it.
        for stream, count in w.sink.written_by_stream.copy().items():
            exchange = stream.split(":")[1]
            by_exchange[exchange] = by_exchange.get(exchange, 0) + count
        for exchange, count in sorted(by_exchange.items()):
            written.add_metric([exchange], count)
        yield written
        stats = w.sink.stats
        yield CounterMetricFamily("angelstream_decode_errors", "Frames that could not be decoded", w.decode_errors)
        yield CounterMetricFamily("angelstream_ticks_dropped", "Ticks dropped from the full buffer", stats.dropped)
        yield CounterMetricFamily("angelstream_ticks_rejected", "Ticks Redis refused for good", stats.rejected)
        yield CounterMetricFamily(
            "angelstream_events_dropped", "Events dropped from their full queue", stats.events_dropped
        )
        yield CounterMetricFamily("angelstream_write_errors", "Failed XADD round trips (retried)", stats.write_errors)
        yield CounterMetricFamily("angelstream_repeats_skipped", "Exact repeats not written", w.normalizer.repeats)
        yield CounterMetricFamily("angelstream_logins", "Logins to Angel One", w.logins)
        yield GaugeMetricFamily("angelstream_buffered_ticks", "Ticks waiting for Redis", w.sink.buffered)
        yield GaugeMetricFamily("angelstream_redis_ok", "1 if the last Redis write worked", int(stats.redis_ok))
        causes = CounterMetricFamily(
            "angelstream_feed_disconnects", "Connections ended or failed, by cause", labels=["connection", "cause"]
        )
        states = GaugeMetricFamily("angelstream_feed_connection_state", "1 for the state each connection is in",
                                   labels=["connection", "state"])  # fmt: skip
        tokens = GaugeMetricFamily("angelstream_feed_tokens", "Tokens subscribed per connection", labels=["connection"])
        for conn in list(w.feed.connections):
            for cause, count in sorted(conn.causes.items()):
                causes.add_metric([conn.name, cause], count)
            for state in CONNECTION_STATES:
                states.add_metric([conn.name, state], int(conn.state == state))
            tokens.add_metric([conn.name], len(conn.desired))
        yield causes
        yield states
        yield tokens
        subscriptions = GaugeMetricFamily("angelstream_subscriptions", "Subscriptions by state", labels=["state"])
        counts: dict[str, int] = {}
        for symbol in w.status.states.values() if w.status is not None else ():
            counts[symbol.state] = counts.get(symbol.state, 0) + 1
        for name in ("pending", "live", "stale", "rejected"):
            subscriptions.add_metric([name], counts.get(name, 0))
        yield subscriptions
        control = w.control.stats if w.control is not None else None
        yield CounterMetricFamily("angelstream_control_commands", "Messages received on the command channel",
                                  control.commands if control else 0)  # fmt: skip
        yield CounterMetricFamily("angelstream_control_refused", "Commands refused (answered with command_error)",
                                  control.errors if control else 0)  # fmt: skip
        yield CounterMetricFamily("angelstream_control_rate_limited", "Commands refused over CONTROL_RATE",
                                  control.rate_limited if control else 0)  # fmt: skip
        last = max(w.last_seen.values(), default=None)
        age = time.time() - last / 1e6 if last is not None else float("nan")
        yield GaugeMetricFamily("angelstream_last_tick_age_seconds", "Seconds since the last tick (NaN: none)", age)


class Metrics:
    def __init__(self, worker: Worker) -> None:
        self.registry = CollectorRegistry()
        self.batch_size = Histogram(
            "angelstream_batch_size", "Entries per XADD pipeline",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000), registry=self.registry,
        )  # fmt: skip
        self.xadd_seconds = Histogram(
            "angelstream_xadd_seconds", "Round trip of one XADD pipeline",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5),
            registry=self.registry,
        )  # fmt: skip
        self.frame_to_xadd_seconds = Histogram(
            "angelstream_frame_to_xadd_seconds",
            "From the frame's arrival to Redis acknowledging its XADD (the oldest tick of each batch)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 30), registry=self.registry,
        )  # fmt: skip
        self.reconnect_delay = Histogram(
            "angelstream_feed_reconnect_delay_seconds",
            "Backoff before each reconnect attempt (exponential, capped, plus jitter)", labelnames=["connection"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64), registry=self.registry,
        )  # fmt: skip
        self.registry.register(_WorkerCollector(worker))

    def on_batch(self, size: int, seconds: float, oldest_ms: int | None) -> None:
        """Called by the sink's writer task after each batch's round trip."""
        self.batch_size.observe(size)
        self.xadd_seconds.observe(seconds)
        if oldest_ms is not None:
            self.frame_to_xadd_seconds.observe(max(0.0, time.time() - oldest_ms / 1000))

    def on_backoff(self, connection: str, delay: float) -> None:
        """Called by a feed connection before it waits ``delay`` seconds to reconnect."""
        self.reconnect_delay.labels(connection).observe(delay)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on ``host:port`` (port 0: any free port)."""

    def __init__(self, worker: Worker, metrics: Metrics, host: str, port: int) -> None:
        self.worker = worker
        self.metrics = metrics
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]
        log.info("health: %s/healthz, /readyz, /metrics", self.url)

    async def stop(self) -> None:
        assert self._runner is not None, "stop() follows a successful start()"
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, checks = await self.readiness()
        return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)

    async def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        w = self.worker
        s = w.settings
        checks: dict[str, dict[str, Any]] = {}
        try:
            assert w.redis is not None, "started before the health server"
            await w.redis.ping()
            checks["redis"] = {"ok": True}
        except (redis.RedisError, OSError) as exc:
            checks["redis"] = {"ok": False, "error": f"Redis does not answer: {type(exc).__name__}: {exc}"}
        connections = [{"name": c.name, "state": c.state, "last_error": c.last_error} for c in w.feed.connections]
        up = any(c["state"] == "connected" for c in connections)
        checks["feed"] = {"ok": up, "connections": connections}
        if not up:
            checks["feed"]["error"] = (
                "no feed connection is up" if connections else "no feed connection: nothing is subscribed"
            )
        now = datetime.now(IST)
        in_market = market_open(now, s.market_open, s.market_close)
        last = max(w.last_seen.values(), default=None)
        age = None if last is None else round(time.time() - last / 1e6, 3)
        fresh = not in_market or (age is not None and age <= s.fresh_within)
        checks["data"] = {"ok": fresh, "market_open": in_market, "last_tick_age_seconds": age}
        if not fresh:
            checks["data"]["error"] = f"market open and no tick for more than {s.fresh_within:g} s"
        return all(check["ok"] for check in checks.values()), checks
