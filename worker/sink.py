"""The writer: a bounded queue on the event loop, drained by one task that pipelines XADDs to Redis.

Everything here runs on the worker's event loop: :meth:`Sink.put` queues a tick (the feed calls it
for every decoded frame) and the writer task sends what is queued on a connection of its own. There
is no thread and no lock: an earlier writer thread spent its time waiting for the GIL held by the
loop (bench/README.md has the figures).

* **Pipelined.** Batches of at most ``batch_max`` XADDs are written at once (each command is the
  stream's head, packed once, the entry's ID and its fields as the normalizer encoded them); their
  replies are parsed in bulk by a ``hiredis.Reader`` as they arrive
  (:class:`Link`). With nothing in flight, what is queued goes at once (a lone tick is written at
  once, or after ``linger`` if set); while a batch is in flight, only full batches follow it (at
  most ``PIPELINE_DEPTH`` in flight), so under load a batch holds what arrived during a round trip.
* **Exactly once.** Every tick gets an explicit, increasing stream ID ``<receive ms>-<n>`` when it
  is taken. When a connection fails, or Redis refuses entries for now (out of memory), the writer
  stops pipelining, waits for what is in flight, and retries those entries in order, one batch at a
  time, with backoff, under the same IDs: Redis refuses an ID it already holds, and an ``XRANGE``
  tells "written by the failed attempt" from "the stream is ahead of our clock" (then Redis picks
  the ID). A retry never writes a tick twice.
* **Bounded.** While Redis is down or slow the queue grows to ``buffer_max`` ticks (plus what is in
  flight); past that the oldest tick is dropped, every drop is counted, and an event says so.
  Events (command answers, feed state) have their own small queue, so they never push ticks out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from hiredis import ReplyError, pack_command
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker import keys
from worker.normalize import Fields, encode_fields

log = logging.getLogger(__name__)

EVENTS_QUEUE_MAX = 10_000
PIPELINE_DEPTH = 8  # batches in flight at most
WRITE_BUFFER_HIGH = 1 << 22  # bytes the transport may hold before the writer stops sending
_ALREADY_WRITTEN = "equal or smaller than the target stream top item"
HEADS_MAX = 1 << 16  # streams whose XADD head is remembered; full, the memory starts over

#: Opens the writer's connection, authenticated and on the right database; the sink then drives its
#: transport itself (:class:`Link`).
Opener = Callable[[], Awaitable[asyncio.StreamWriter]]


def redis_opener(url: str, timeout: float) -> Opener:
    """Connections to ``url`` made by redis-py's asyncio client, so that every URL form it accepts
    (TLS, ACL user, unix socket, database) means the same here; the sink then talks on the connected
    transport itself and redis-py's parser is never used."""

    async def open_link() -> asyncio.StreamWriter:
        pool = aioredis.ConnectionPool.from_url(url, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
        conn = pool.make_connection()  # type: ignore[no-untyped-call]
        await conn.connect()
        writer = conn._writer
        assert writer is not None, "set by connect()"
        # The sink owns the connection now: redis-py's connection object closes the streams it still
        # holds when the garbage collector frees it (under load, within seconds).
        conn._reader = conn._writer = None
        stream: asyncio.StreamWriter = writer
        return stream

    return open_link


class WriteError(Exception):
    """The connection to Redis failed (closed, unreadable, or no reply in time)."""


class Link(asyncio.Protocol):
    """The writer's connection: requests are written at once; replies are parsed in bulk as they
    arrive and handed, in order, to each request's future."""

    def __init__(self, stream: asyncio.StreamWriter, on_change: Callable[[], None]) -> None:
        self._on_change = on_change
        self._parser = hiredis.Reader()
        self._pending: deque[tuple[int, list[Any], asyncio.Future[list[Any]]]] = deque()
        self.lost: Exception | None = None
        self.paused = False
        self._stream = stream  # kept: a stream writer closes its transport when it is freed
        transport = stream.transport
        transport.set_protocol(self)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._transport = transport

    def request(self, commands: list[bytes]) -> asyncio.Future[list[Any]]:
        """Send packed ``commands``; the future gets their replies (an error reply as a ``ReplyError``)."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.lost is not None:
            future.set_exception(self.lost)
        else:
            self._transport.write(b"".join(commands))
            self._pending.append((len(commands), [], future))
        return future

    @property
    def writable(self) -> bool:
        return self.lost is None and not self.paused

    def close(self, error: Exception) -> None:
        self._fail(error)
        self._transport.abort()

    # asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._parser.feed(data)
        pending, parser, done = self._pending, self._parser, False
        try:
            while pending:
                wanted, replies, future = pending[0]
                while len(replies) < wanted:
                    reply = parser.gets()
                    if reply is False:
                        return
                    replies.append(reply)
                pending.popleft()
                future.set_result(replies)
                done = True
        except hiredis.ProtocolError as exc:
            self.close(WriteError(f"unreadable reply from redis ({exc})"))
        finally:
            if done:
                self._on_change()

    def eof_received(self) -> None:
        return None  # the transport closes itself: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or WriteError("redis closed the connection"))

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._on_change()

    def _fail(self, error: Exception) -> None:
        if self.lost is None:
            self.lost = error
        while self._pending:
            self._pending.popleft()[2].set_exception(self.lost)
        self._on_change()


@dataclass(slots=True)
class Entry:
    stream: str
    fields: Fields
    maxlen: int
    us: int  # receive (or event) time, epoch µs: its milliseconds are the basis of the entry ID
    id: bytes = b"*"


@dataclass(slots=True)
class Sent:
    entries: list[Entry]
    replies: asyncio.Future[list[Any]]
    at: float  # time.perf_counter() when sent


@dataclass
class SinkStats:
    written: int = 0  # ticks written
    dropped: int = 0  # ticks dropped from the full buffer (oldest first)
    rejected: int = 0  # ticks Redis refused for good (e.g. the key holds another type)
    batches: int = 0
    write_errors: int = 0  # failed round trips, or batches Redis refused entries of (each retried)
    events_written: int = 0
    events_dropped: int = 0
    last_batch: int = 0
    redis_ok: bool = True
    last_write_at: float = field(default=0.0)  # time.time() of the last successful write


_FAILURES = (WriteError, OSError, TimeoutError, redis.RedisError)


class Sink:
    def __init__(
        self,
        opener: Opener,
        stream_maxlen: int,
        events_maxlen: int,
        buffer_max: int,
        batch_max: int = 200,
        linger: float = 0.0,
        retry_max: float = 5.0,
        timeout: float = 5.0,
    ) -> None:
        self._open = opener
        self.stream_maxlen = stream_maxlen
        self.events_maxlen = events_maxlen
        self.buffer_max = buffer_max
        self.batch_max = batch_max
        self.linger = linger
        self.retry_max = retry_max
        self.timeout = timeout  # for connecting, and for the oldest batch in flight to be answered
        self.stats = SinkStats()
        self._ticks: deque[Entry] = deque()
        self._events: deque[Entry] = deque()
        self._again: deque[Entry] = deque()  # taken, not written yet: retried (in order) before the rest
        self._inflight: deque[Sent] = deque()
        self._link: Link | None = None
        self._wake = asyncio.Event()  # queued, answered, writable again, or stop() was called
        self._stopping = False
        self._deadline = float("inf")
        self._failures = 0
        self._last_ids: dict[str, tuple[int, int]] = {}
        self._heads: dict[str, bytes] = {}  # stream → "$4\r\nXADD\r\n<stream>MAXLEN ~ <maxlen>" in RESP
        self._dropped_unreported = 0
        self.written_by_stream: dict[str, int] = {}  # ticks written per stream (metrics)
        #: on_batch(size, XADD round trip in s, receive ms of the batch's oldest tick or None): the metrics' hook
        self.on_batch: Callable[[int, float, int | None], None] | None = None
        self._unwritten = 0  # entries given up at the stop deadline
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ producer side (the event loop)

    def put(self, stream: str, fields: Fields, recv_us: int) -> None:
        """Queue one tick; never blocks. Past ``buffer_max`` the oldest queued tick is dropped."""
        ticks = self._ticks
        if len(ticks) >= self.buffer_max:
            ticks.popleft()
            self.stats.dropped += 1
            self._dropped_unreported += 1
        ticks.append(Entry(stream, fields, self.stream_maxlen, recv_us))
        self._wake.set()

    def event(self, kind: str, **fields: str | int | float) -> None:
        """Queue an event for ``angelstream:events`` (``type``, ``ts`` in epoch ms, then ``fields``)."""
        now_ms = int(time.time() * 1000)
        flat: tuple[str | int | float, ...] = ("type", kind, "ts", now_ms)
        for name, value in fields.items():
            flat += (name, value)
        if len(self._events) >= EVENTS_QUEUE_MAX:
            self._events.popleft()
            self.stats.events_dropped += 1
        entry = Entry(keys.EVENTS, encode_fields(flat), self.events_maxlen, now_ms * 1000)
        self._events.append(entry)  # explicit IDs: never twice
        self._wake.set()

    @property
    def buffered(self) -> int:
        """Ticks queued (not counting those taken: in flight, or being retried)."""
        return len(self._ticks)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> asyncio.Task[None]:
        """Start the writer task on the running event loop. It ends only after stop(), or on a bug."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="writer")
        return self._task

    async def stop(self, timeout: float) -> bool:
        """Flush what is queued (for at most ``timeout`` seconds) and stop. True if all was written."""
        self._stopping = True
        self._deadline = time.monotonic() + timeout
        self._wake.set()
        task = self._task
        if task is None:
            return False
        done, _ = await asyncio.wait([task], timeout=timeout + 0.5)
        if not done:  # stuck connecting past the deadline
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._give_up()
        return not (self._ticks or self._events or self._again or self._inflight or self._unwritten)

    # ------------------------------------------------------------------ the writer task

    async def _run(self) -> None:
        try:
            while True:
                self._settle()
                if self._inflight:
                    if not await self._pipeline():
                        break
                elif self._again:
                    if not await self._retry():
                        break
                elif self._ticks or self._events:
                    await self._linger()
                    await self._send(self._take())
                elif self._stopping:
                    break
                else:
                    await self._woken(None)
        finally:
            if self._link is not None:
                self._link.close(WriteError("the writer stopped"))
            for sent in self._inflight:  # given up: their replies will never be read
                sent.replies.exception()

    async def _linger(self) -> None:
        deadline = time.monotonic() + self.linger
        while len(self._ticks) < self.batch_max and not self._stopping and time.monotonic() < deadline:
            await self._woken(deadline - time.monotonic())

    def _take(self) -> list[Entry]:
        """The next batch (events first), IDs assigned."""
        events, ticks = self._events, self._ticks
        batch = [events.popleft() for _ in range(min(len(events), self.batch_max))]
        batch += [ticks.popleft() for _ in range(min(len(ticks), self.batch_max - len(batch)))]
        for entry in batch:
            entry.id = self._next_id(entry.stream, entry.us // 1000)
        if self._dropped_unreported:
            dropped, self._dropped_unreported = self._dropped_unreported, 0
            self.event("ticks_dropped", count=dropped, total=self.stats.dropped, buffer_max=self.buffer_max)
        return batch

    def _next_id(self, stream: str, ms: int) -> bytes:
        last_ms, last_n = self._last_ids.get(stream, (0, -1))
        if ms > last_ms:
            n = 0
        else:
            ms, n = last_ms, last_n + 1
        self._last_ids[stream] = (ms, n)
        return b"%d-%d" % (ms, n)

    async def _connected(self) -> Link:
        if self._link is None or self._link.lost is not None:
            self._link = Link(await asyncio.wait_for(self._open(), self.timeout), self._wake.set)
        return self._link

    async def _send(self, batch: list[Entry]) -> None:
        """Send ``batch`` on the pipeline (the first batch after an idle spell: it may have to connect)."""
        try:
            link = await self._connected()
        except _FAILURES as exc:
            self._failed(exc)
            self._again.extend(batch)
            return
        except asyncio.CancelledError:  # stop() gave up on the connection: the batch counts as unwritten
            self._again.extend(batch)
            raise
        self._inflight.append(Sent(batch, link.request(self._xadds(batch)), time.perf_counter()))

    async def _pipeline(self) -> bool:
        """Send the full batches queued while the link takes them, then wait for replies; False: gave up
        (stopping). A partial batch waits for the pipeline to empty: under load batches grow with the
        round trip instead of going out a few ticks at a time (a send is a system call)."""
        link = self._link
        assert link is not None, "batches are in flight on it"
        inflight = self._inflight
        while (
            len(self._ticks) + len(self._events) >= self.batch_max
            and len(inflight) < PIPELINE_DEPTH
            and link.writable
            and not self._again
        ):
            batch = self._take()
            inflight.append(Sent(batch, link.request(self._xadds(batch)), time.perf_counter()))
        oldest = inflight[0]  # not answered yet (_settle ran just before)
        now = time.monotonic()
        if now >= self._deadline:
            self._give_up()
            return False
        waited = time.perf_counter() - oldest.at
        if waited >= self.timeout:
            link.close(WriteError(f"no reply from redis in {self.timeout:g} s"))
            return True
        await self._woken(min(self.timeout - waited, self._deadline - now))
        return True

    def _settle(self) -> None:
        """Account for the answered batches at the head of the pipeline, in order."""
        inflight = self._inflight
        while inflight and inflight[0].replies.done():
            sent = inflight.popleft()
            error = sent.replies.exception()
            if error is not None:
                self._failed(error)
                self._again.extend(sent.entries)
                continue
            self._observe(sent)
            again = self._apply(sent.entries, sent.replies.result(), held=())
            if again:
                if any(entry.id != b"*" for entry in again):  # refused for now, not just a stream ahead of us
                    self._failed(None)
                self._again.extend(again)

    async def _retry(self) -> bool:
        """One batch of the entries to write again, alone on the link; False: gave up (stopping)."""
        batch = [self._again.popleft() for _ in range(min(len(self._again), self.batch_max))]
        try:
            link = await self._connected()
            sent = Sent(batch, link.request(self._xadds(batch)), time.perf_counter())
            results = await self._answer(link, sent.replies)
            self._observe(sent)
            # A refused ID was written by the failed attempt if the stream holds it; else the stream is ahead.
            doubtful = [i for i, r in enumerate(results) if isinstance(r, ReplyError) and _ALREADY_WRITTEN in str(r)]
            held: set[int] = set()
            if doubtful:
                found = await self._answer(link, link.request([_xrange(batch[i]) for i in doubtful]))
                held = {i for i, entries in zip(doubtful, found, strict=True) if entries}
            again = self._apply(batch, results, held)
        except _FAILURES as exc:
            self._failed(exc)
            again = batch
        except asyncio.CancelledError:  # stop() gave up on the connection: the batch counts as unwritten
            self._again.extendleft(reversed(batch))
            raise
        if not again:
            self._failures = 0
            if not self.stats.redis_ok:
                self.stats.redis_ok = True
                log.info("redis writes recovered; %d ticks still buffered", len(self._ticks) + len(self._again))
                self.event("redis_recovered", buffered=len(self._ticks), dropped=self.stats.dropped)
            return True
        self._again.extendleft(reversed(again))
        self._failures += 1
        if time.monotonic() >= self._deadline:
            self._give_up()
            return False
        backoff = 0.05 * 2 ** min(self._failures, 30)  # capped exponent: 2**1024 overflows a float
        await self._pause(min(self.retry_max, backoff))
        return True

    async def _answer(self, link: Link, replies: asyncio.Future[list[Any]]) -> list[Any]:
        """The replies, or the link's failure; no reply within ``timeout`` closes the link."""
        await asyncio.wait([replies], timeout=self.timeout)
        if not replies.done():
            link.close(WriteError(f"no reply from redis in {self.timeout:g} s"))
        return replies.result()

    def _apply(self, batch: list[Entry], results: list[Any], held: Iterable[int]) -> list[Entry]:
        """Count what Redis wrote; returns the entries to write again (``held``: refused IDs it holds)."""
        again: list[Entry] = []
        for i, (entry, result) in enumerate(zip(batch, results, strict=True)):
            if not isinstance(result, ReplyError):
                self._count(entry)
                if entry.id == b"*":  # adopt the ID Redis chose
                    ms, _, n = result.partition(b"-")
                    self._last_ids[entry.stream] = (int(ms), int(n))
            elif _ALREADY_WRITTEN in str(result):
                if i in held:
                    self._count(entry)  # the failed attempt had written it
                else:  # the stream is ahead of our clock (a restart, or the clock stepped back)
                    entry.id = b"*"
                    again.append(entry)
            elif str(result).startswith("WRONGTYPE"):
                self.stats.rejected += 1
                log.error("cannot XADD to %s: %s", entry.stream, result)
            else:
                again.append(entry)
        self.stats.batches += 1
        self.stats.last_batch = len(batch)
        self.stats.last_write_at = time.time()
        return again

    def _observe(self, sent: Sent) -> None:
        if self.on_batch is not None:
            # Events go first in a batch, then ticks in the order received: the first tick is the oldest.
            oldest = next((e.us for e in sent.entries if e.stream != keys.EVENTS), None)
            self.on_batch(len(sent.entries), time.perf_counter() - sent.at, None if oldest is None else oldest // 1000)

    def _failed(self, error: BaseException | None) -> None:
        self.stats.write_errors += 1
        if self.stats.redis_ok:
            self.stats.redis_ok = False
            why = "Redis refused entries" if error is None else f"{type(error).__name__}: {error}"
            log.warning("redis write failed (%s); buffering and retrying", why)

    def _give_up(self) -> None:
        self._unwritten = len(self._again) + sum(len(s.entries) for s in self._inflight)
        log.error("shutdown: %d ticks could not be written", self._unwritten + len(self._ticks))

    async def _pause(self, seconds: float) -> None:
        """Back off for ``seconds``, cut short by stop() (the shutdown deadline then bounds it)."""
        end = time.monotonic() + seconds
        while (left := min(end, self._deadline) - time.monotonic()) > 0:
            await self._woken(left)

    async def _woken(self, seconds: float | None) -> None:
        """Wait until something happens (see ``_wake``) or ``seconds`` pass: a timer, not a cancellation,
        so nothing is thrown into the writer's frames."""
        self._wake.clear()
        timer = None if seconds is None else asyncio.get_running_loop().call_later(seconds, self._wake.set)
        await self._wake.wait()
        if timer is not None:
            timer.cancel()

    def _xadds(self, batch: list[Entry]) -> list[bytes]:
        """The batch's XADD commands: ``*<n>``, the stream's head (packed once), the ID, the fields."""
        heads = self._heads
        commands = []
        for entry in batch:
            head = heads.get(entry.stream)
            if head is None:
                if len(heads) >= HEADS_MAX:
                    heads.clear()
                packed: bytes = pack_command(("XADD", entry.stream, "MAXLEN", "~", entry.maxlen))  # type: ignore[arg-type]
                head = heads[entry.stream] = packed[packed.index(b"\n") + 1 :]
            count, body = entry.fields
            commands.append(b"*%d\r\n%b$%d\r\n%b\r\n%b" % (count + 6, head, len(entry.id), entry.id, body))
        return commands

    def _count(self, entry: Entry) -> None:
        if entry.stream == keys.EVENTS:
            self.stats.events_written += 1
        else:
            self.stats.written += 1
            self.written_by_stream[entry.stream] = self.written_by_stream.get(entry.stream, 0) + 1


def _xrange(entry: Entry) -> bytes:
    return pack_command(("XRANGE", entry.stream, entry.id, entry.id, "COUNT", 1))  # type: ignore[arg-type,no-any-return]
