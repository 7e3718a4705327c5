"""The worker, wired: settings → login → instruments → feed → decode → normalize → sink → Redis.

The data path runs top to bottom in :meth:`Worker.on_frame` on the event loop and ends in the
sink's bounded queue; the sink's writer task (same loop, no thread) does the XADDs. The control
plane (commands, the hash) runs beside it on the same loop and talks to the feed only through
``Feed.apply``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from datetime import datetime, timedelta
from datetime import time as wall_time
from typing import Any

import aiohttp
import redis
import redis.asyncio as aioredis

from worker import angel, keys
from worker import protocol as p
from worker.control import Control, RateLimit
from worker.feed import Credentials, Feed, FeedConfig, cancel_all
from worker.health import HealthServer, Metrics
from worker.instruments import InstrumentError, InstrumentIndex, load_instruments, publish_index
from worker.normalize import Normalizer
from worker.settings import IST, Settings, plaintext_warnings, redact_url
from worker.sink import Sink, redis_opener
from worker.status import Status

log = logging.getLogger(__name__)


class WorkerFailed(Exception):
    """A task the worker cannot run without (the writer, the control plane, …) failed: it stopped."""


DECODE_ERROR_EVENT_EVERY = 5.0  # seconds between decode-error events (each error is counted)


def next_relogin(now: datetime, at: wall_time) -> float:
    """Seconds from ``now`` to the next ``at`` (Asia/Kolkata wall time)."""
    local = now.astimezone(IST)
    target = local.replace(hour=at.hour, minute=at.minute, second=at.second, microsecond=0)
    if target <= local:
        target += timedelta(days=1)
    return (target - local).total_seconds()


class Worker:
    def __init__(self, settings: Settings, index: InstrumentIndex | None = None) -> None:
        self.settings = settings
        self.index = index
        self.normalizer = Normalizer()
        self.sink = Sink(
            redis_opener(settings.redis_url, timeout=5.0),
            stream_maxlen=settings.stream_maxlen,
            events_maxlen=settings.events_maxlen,
            buffer_max=settings.buffer_max,
            batch_max=settings.batch_max,
            linger=settings.batch_linger_ms / 1000,
            retry_max=settings.redis_retry_max,
        )
        self.metrics = Metrics(self)
        self.sink.on_batch = self.metrics.on_batch
        self.feed = Feed(
            FeedConfig(
                url=settings.angel_ws_url,
                heartbeat_interval=settings.heartbeat_interval,
                stall_timeout=settings.stall_timeout,
                reconnect_initial=settings.reconnect_initial,
                reconnect_max=settings.reconnect_max,
                reconnect_jitter=settings.reconnect_jitter,
                healthy_after=settings.healthy_after,
                connect_timeout=settings.connect_timeout,
            ),
            self.credentials,
            self.on_frame,
            self.sink.event,
            max_connections=settings.angel_max_connections,
            on_backoff=self.metrics.on_backoff,
            watch=self.watch,
        )
        self.session: angel.Session | None = None
        self.logins = 0
        self.decode_errors = 0
        self.last_seen: dict[tuple[int, str], int] = {}  # (exchange type, token) → last receive time, epoch µs
        self._last_decode_event = 0.0
        self._login_lock = asyncio.Lock()
        self.control: Control | None = None
        self.status: Status | None = None
        self.redis: aioredis.Redis | None = None  # the control plane's client (also the readiness probe's)
        self.health: HealthServer | None = None
        self.started = asyncio.Event()
        self.failed: asyncio.Task[Any] | None = None  # the first essential task that raised
        self._stop = asyncio.Event()  # run()'s, once it runs

    # ------------------------------------------------------------------ the data path

    def on_frame(self, frame: bytes, recv_us: int) -> None:
        """One binary frame: decode → normalize → the writer's queue."""
        try:
            packet = p.decode(frame)
        except p.DecodeError as exc:
            self.decode_errors += 1
            now = time.monotonic()
            if now - self._last_decode_event >= DECODE_ERROR_EVENT_EVERY:
                self._last_decode_event = now
                log.warning("undecodable frame (%d so far): %s", self.decode_errors, exc)
                self.sink.event("decode_error", error=str(exc), total=self.decode_errors)
            return
        self.last_seen[(packet.exchange_type, packet.token)] = recv_us
        entry = self.normalizer.entry(packet, recv_us)
        if entry is not None:
            self.sink.put(entry[0], entry[1], recv_us)

    # ------------------------------------------------------------------ login

    async def credentials(self, fresh: bool) -> Credentials:
        """The current login, or a new one when ``fresh`` (after a 401, or the daily re-login)."""
        s = self.settings
        async with self._login_lock:
            if self.session is None or fresh:
                try:
                    self.session = await asyncio.to_thread(
                        angel.login,
                        s.angel_api_url,
                        s.angel_api_key.get_secret_value(),
                        s.angel_client_code,
                        s.angel_pin.get_secret_value(),
                        s.angel_totp_secret.get_secret_value(),
                        s.connect_timeout,
                    )
                except angel.LoginError as exc:
                    self.sink.event("login_failed", error=str(exc))
                    raise
                self.logins += 1
                log.info("logged in as %s (login %d)", s.angel_client_code, self.logins)
                self.sink.event("login", client_code=s.angel_client_code, count=self.logins)
            return Credentials(
                self.session.jwt_token, s.angel_api_key.get_secret_value(), s.angel_client_code, self.session.feed_token
            )

    # ------------------------------------------------------------------ the instrument master

    def use_index(self, index: InstrumentIndex) -> None:
        """Serve ``index`` from now on: new instruments known, vanished ones forgotten."""
        old = self.index
        self.index = index
        if old is not None:
            for inst in old:
                if index.by_wire(inst.exchange_type, inst.token) != inst:
                    self.normalizer.remove(inst)
        for inst in index:
            self.normalizer.add(inst)
        if self.control is not None:
            self.control.index = index

    async def publish_instruments(self, client: aioredis.Redis) -> None:
        """Index the master in Redis for every consumer; retried until Redis takes it."""
        assert self.index is not None, "loaded before the worker starts its tasks"
        failures = 0
        while True:
            try:
                await publish_index(client, self.index)
            except (redis.RedisError, OSError) as exc:
                failures += 1
                delay = min(self.settings.redis_retry_max, 0.1 * 2 ** min(failures, 30))
                log.warning("cannot index the instrument master in redis (%s); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            log.info("instrument master indexed in redis: %d instruments", len(self.index))
            return

    async def refresh_instruments(self, client: aioredis.Redis) -> None:
        """Load the master again (new contracts appear every day) and apply it."""
        s = self.settings
        try:
            index = await load_instruments(s.angel_instruments_url, s.connect_timeout, s.instruments_cache)
        except InstrumentError as exc:
            log.warning("instrument master refresh failed: %s", exc)
            self.sink.event("instruments_refresh_failed", error=str(exc))
            return
        self.use_index(index)
        self.sink.event("instruments_refreshed", instruments=len(index))
        if self.control is not None:
            with contextlib.suppress(redis.RedisError, OSError):  # the periodic reconcile catches up
                await self.control.reconcile()
        await self.publish_instruments(client)

    async def daily(self, client: aioredis.Redis) -> None:
        """Every morning before the market opens: a fresh master, a fresh login, the sockets reconnected."""
        while True:
            await asyncio.sleep(next_relogin(datetime.now(IST), self.settings.angel_relogin_time))
            await self.refresh_instruments(client)
            try:
                await self.credentials(fresh=True)
            except angel.LoginError:
                continue  # each connection logs in again itself as it reconnects
            await self.feed.restart("daily re-login")

    # ------------------------------------------------------------------ life

    def watch(self, task: asyncio.Task[Any]) -> asyncio.Task[Any]:
        """If ``task`` raises (a bug: the tasks handle what they expect), the worker stops, loudly,
        rather than run on reading ticks it no longer writes (or steering a feed it no longer reads)."""
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        if self._stop.is_set():  # stopping already (asked to, or after a first failure): logged, not fatal
            log.error("the %s task failed while the worker stops: %r", task.get_name(), task.exception(),
                      exc_info=task.exception())  # fmt: skip
            return
        self.failed = task
        log.critical("the %s task failed, the worker stops: %r", task.get_name(), task.exception(),
                     exc_info=task.exception())  # fmt: skip
        self._stop.set()

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        self._stop = stop
        for warning in plaintext_warnings(s):
            log.warning("%s", warning)
        index = self.index or await load_instruments(s.angel_instruments_url, s.connect_timeout, s.instruments_cache)
        self.use_index(index)
        self.watch(self.sink.start())
        self.sink.event("worker_started", instruments=len(index))
        log.info("worker started: %d instruments, redis %s", len(index), redact_url(s.redis_url))
        control_client = aioredis.Redis.from_url(
            s.redis_url, decode_responses=True, encoding_errors="replace", socket_timeout=5
        )
        self.redis = control_client
        health = HealthServer(self, self.metrics, s.health_host, s.health_port)
        try:
            await health.start()
            self.health = health
        except OSError as exc:  # the data path matters more than the probes: keep going, loudly
            log.error("health: cannot listen on %s:%d (%s); /healthz, /readyz, /metrics are OFF",
                      s.health_host, s.health_port, exc.strerror)  # fmt: skip
            self.sink.event("health_unavailable", error=f"cannot listen on {s.health_host}:{s.health_port}")
        control = Control(
            control_client, index, self.feed.apply, self.sink.event, self.feed.capacity, s.reconcile_interval,
            RateLimit(s.control_rate, s.control_burst),
        )  # fmt: skip
        self.control = control
        timeout = aiohttp.ClientTimeout(total=None, connect=s.connect_timeout, sock_connect=s.connect_timeout)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            self.feed.start(http)
            status = self.status = Status(control_client, self, s.status_interval, s.stale_after)
            tasks = [
                self.watch(asyncio.create_task(control.run(s.redis_retry_max), name="control")),
                self.watch(asyncio.create_task(self.daily(control_client), name="daily")),
                self.watch(asyncio.create_task(status.run(), name="status")),
                self.watch(asyncio.create_task(self.publish_instruments(control_client), name="instruments")),
            ]
            self.started.set()
            await stop.wait()
            # One budget for the whole shutdown: close frames first (a quarter, at most 1 s), then the flush.
            deadline = asyncio.get_running_loop().time() + s.shutdown_timeout
            log.info("stopping: closing the feed, flushing %d buffered ticks", self.sink.buffered)
            await cancel_all(tasks)
            await self.feed.close(timeout=min(1.0, s.shutdown_timeout / 4))
        with contextlib.suppress(redis.RedisError, OSError):
            await control_client.delete(keys.HEARTBEAT)  # stopped: `angelstream status` says so at once
        if self.health is not None:
            await self.health.stop()
        await control_client.aclose()
        self.sink.event("worker_stopped", written=self.sink.stats.written, dropped=self.sink.stats.dropped)
        budget = max(0.1, deadline - asyncio.get_running_loop().time())
        flushed = await self.sink.stop(budget)
        log.info("stopped: %d ticks written, %s", self.sink.stats.written, "all flushed" if flushed else "NOT flushed")
        if self.failed is not None:
            error = self.failed.exception()
            raise WorkerFailed(
                f"the {self.failed.get_name()} task failed ({type(error).__name__}: {error}); restart it"
            )


class WorkerThread:
    """Runs a :class:`Worker` on its own event loop in a thread (the demo and the tests)."""

    def __init__(self, settings: Settings, index: InstrumentIndex | None = None) -> None:
        self.worker = Worker(settings, index)
        self.loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="angelstream-worker", daemon=True)

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self.worker.run(self._stop))
        except BaseException as exc:  # reported to the owner through .error
            self.error = exc
        finally:
            self.loop.close()

    def start(self, timeout: float = 30.0) -> WorkerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.worker.started.is_set():
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()  # never leave a half-started worker running
                raise RuntimeError(f"the worker did not start: {self.error!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the worker thread did not stop within %.0f s", timeout)

    def __enter__(self) -> WorkerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
