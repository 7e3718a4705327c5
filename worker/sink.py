"""The writer: a bounded hand-off from the feed to one thread that XADDs in pipelined batches.

Threads meet in exactly one place, :meth:`Sink.put` (called on the event loop) and the writer
thread's :meth:`Sink._take`, both under one condition variable.

* Batches are size-bounded (``batch_max``) and time-bounded (``linger``): a lone tick is written as
  soon as the writer is free; under load, ticks accumulate while a pipeline is in flight.
* Every tick gets an explicit, increasing stream ID ``<receive ms>-<n>`` when it is taken. A batch
  that failed is resent with the same IDs, and Redis refuses an ID it already holds, so a retry
  never writes a tick twice.
* While Redis is down or slow the buffer grows to ``buffer_max`` ticks (plus the batch in
  flight); past that the oldest tick is dropped, every drop is counted, and an event says so.
* Events (command answers, feed state) have their own small queue, so they never push ticks out.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from hiredis import pack_command
from redis.connection import Connection

from worker import keys
from worker.normalize import Fields

log = logging.getLogger(__name__)

EVENTS_QUEUE_MAX = 10_000
_ALREADY_WRITTEN = "equal or smaller than the target stream top item"


@dataclass(slots=True)
class Entry:
    stream: str
    fields: Fields
    maxlen: int
    ms: int  # receive (or event) time, ms: the basis of the entry ID
    id: str = "*"


@dataclass
class SinkStats:
    written: int = 0  # ticks written
    dropped: int = 0  # ticks dropped from the full buffer (oldest first)
    rejected: int = 0  # ticks Redis refused for good (e.g. the key holds another type)
    batches: int = 0
    write_errors: int = 0  # failed pipelines (each retried)
    events_written: int = 0
    events_dropped: int = 0
    last_batch: int = 0
    redis_ok: bool = True
    last_write_at: float = field(default=0.0)  # time.time() of the last successful write


class Sink:
    def __init__(
        self,
        client_factory: Callable[[], redis.Redis],
        stream_maxlen: int,
        events_maxlen: int,
        buffer_max: int,
        batch_max: int = 200,
        linger: float = 0.0,
        retry_max: float = 5.0,
    ) -> None:
        self._client_factory = client_factory
        self.stream_maxlen = stream_maxlen
        self.events_maxlen = events_maxlen
        self.buffer_max = buffer_max
        self.batch_max = batch_max
        self.linger = linger
        self.retry_max = retry_max
        self.stats = SinkStats()
        self._ticks: deque[Entry] = deque()
        self._events: deque[Entry] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._deadline = float("inf")
        self._last_ids: dict[str, tuple[int, int]] = {}
        self._dropped_unreported = 0
        self._conn: Connection | None = None  # the writer's own connection (the writer thread only)
        self.written_by_stream: dict[str, int] = {}  # ticks written per stream (metrics)
        #: on_batch(size, XADD round trip in s, receive ms of the batch's oldest tick or None): the metrics' hook
        self.on_batch: Callable[[int, float, int | None], None] | None = None
        self._unwritten = 0  # entries given up at the stop deadline (the batch in hand)
        self._thread = threading.Thread(target=self._run, name="angelstream-writer", daemon=True)

    # ------------------------------------------------------------------ producer side (any thread)

    def put(self, stream: str, fields: Fields, recv_us: int) -> None:
        """Queue one tick; never blocks. Past ``buffer_max`` the oldest queued tick is dropped."""
        entry = Entry(stream, fields, self.stream_maxlen, recv_us // 1000)
        with self._cond:
            if len(self._ticks) >= self.buffer_max:
                self._ticks.popleft()
                self.stats.dropped += 1
                self._dropped_unreported += 1
            self._ticks.append(entry)
            self._cond.notify()

    def event(self, kind: str, **fields: str | int | float) -> None:
        """Queue an event for ``angelstream:events`` (``type``, ``ts`` in epoch ms, then ``fields``)."""
        now_ms = int(time.time() * 1000)
        flat: Fields = ("type", kind, "ts", now_ms)
        for name, value in fields.items():
            flat += (name, value)
        with self._cond:
            if len(self._events) >= EVENTS_QUEUE_MAX:
                self._events.popleft()
                self.stats.events_dropped += 1
            self._events.append(Entry(keys.EVENTS, flat, self.events_maxlen, now_ms))  # explicit IDs: never twice
            self._cond.notify()

    @property
    def buffered(self) -> int:
        return len(self._ticks)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Flush what is queued (for at most ``timeout`` seconds) and stop. True if all was written."""
        with self._cond:
            self._stopping = True
            self._deadline = time.monotonic() + timeout
            self._cond.notify()
        self._thread.join(timeout + 0.5)
        return not self._thread.is_alive() and not self._ticks and not self._events and not self._unwritten

    # ------------------------------------------------------------------ writer thread

    def _take(self) -> list[Entry]:
        """The next batch (events first), IDs assigned; [] when stopping with nothing left."""
        with self._cond:
            while not self._ticks and not self._events:
                if self._stopping:
                    return []
                self._cond.wait()
            if self.linger and len(self._ticks) < self.batch_max and not self._stopping:
                self._cond.wait_for(lambda: len(self._ticks) >= self.batch_max, self.linger)
            batch = [self._events.popleft() for _ in range(min(len(self._events), self.batch_max))]
            batch += [self._ticks.popleft() for _ in range(min(len(self._ticks), self.batch_max - len(batch)))]
            dropped, self._dropped_unreported = self._dropped_unreported, 0
        for entry in batch:
            entry.id = self._next_id(entry.stream, entry.ms)
        if dropped:
            self.event("ticks_dropped", count=dropped, total=self.stats.dropped, buffer_max=self.buffer_max)
        return batch

    def _next_id(self, stream: str, ms: int) -> str:
        last_ms, last_n = self._last_ids.get(stream, (0, -1))
        if ms > last_ms:
            n = 0
        else:
            ms, n = last_ms, last_n + 1
        self._last_ids[stream] = (ms, n)
        return f"{ms}-{n}"

    def _run(self) -> None:
        client = self._client_factory()
        batch: list[Entry] = []
        retry = False  # True when ``batch`` failed before: IDs Redis already holds were written then
        failures = 0
        while True:
            if not batch:
                batch, retry = self._take(), False
                if not batch:
                    break
            try:
                batch = self._write(client, batch, retry)
            except redis.RedisError as exc:
                self.stats.write_errors += 1
                if self.stats.redis_ok:
                    self.stats.redis_ok = False
                    log.warning("redis write failed (%s); buffering and retrying", type(exc).__name__)
            if batch:  # the pipeline failed, or Redis refused some entries for now (e.g. OOM): retry those
                retry = True
                failures += 1
                if time.monotonic() >= self._deadline:
                    self._unwritten = len(batch)
                    log.error("shutdown: %d ticks could not be written", len(self._ticks) + len(batch))
                    break
                backoff = 0.05 * 2 ** min(failures, 30)  # capped exponent: 2**1024 overflows a float
                time.sleep(min(self.retry_max, backoff, max(0.0, self._deadline - time.monotonic())))
                continue
            failures = 0
            if not self.stats.redis_ok:
                self.stats.redis_ok = True
                log.info("redis writes recovered; %d ticks still buffered", len(self._ticks))
                self.event("redis_recovered", buffered=len(self._ticks), dropped=self.stats.dropped)
        if self._conn is not None:
            client.connection_pool.release(self._conn)
        client.close()

    def _write(self, client: redis.Redis, batch: list[Entry], retry: bool) -> list[Entry]:
        """Send one pipeline; returns the entries to try again."""
        began = time.perf_counter()
        results = self._roundtrip(client, batch)
        if self.on_batch is not None:
            oldest = min((e.ms for e in batch if e.stream != keys.EVENTS), default=None)
            self.on_batch(len(batch), time.perf_counter() - began, oldest)
        held: set[int] = set()
        if retry:  # a refused ID was written by the failed attempt only if the stream holds it; else it is ahead
            doubtful = [
                i for i, r in enumerate(results) if isinstance(r, redis.ResponseError) and _ALREADY_WRITTEN in str(r)
            ]
            if doubtful:
                check = client.pipeline(transaction=False)
                for i in doubtful:
                    check.xrange(batch[i].stream, batch[i].id, batch[i].id, count=1)
                held = {i for i, found in zip(doubtful, check.execute(), strict=True) if found}
        again: list[Entry] = []
        for i, (entry, result) in enumerate(zip(batch, results, strict=True)):
            if not isinstance(result, redis.ResponseError):
                self._count(entry)
                if entry.id == "*":  # adopt the ID Redis chose
                    ms, _, n = (result.decode() if isinstance(result, bytes) else str(result)).partition("-")
                    self._last_ids[entry.stream] = (int(ms), int(n))
            elif _ALREADY_WRITTEN in str(result):
                if i in held:
                    self._count(entry)  # the failed attempt had written it
                else:  # the stream is ahead of our clock (a restart, or the clock stepped back)
                    entry.id = "*"
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

    def _roundtrip(self, client: redis.Redis, batch: list[Entry]) -> list[Any]:
        """One round trip, non-transactional: every XADD packed in C (hiredis), one write, then the replies
        in order (an error reply is returned, not raised). redis-py's pipeline packs and parses in Python:
        under load it cost the writer most of its time, with the event loop's thread holding the GIL."""
        conn = self._conn
        if conn is None:
            conn = self._conn = client.connection_pool.get_connection()
        packed = b"".join(
            [pack_command(("XADD", e.stream, "MAXLEN", "~", e.maxlen, e.id, *e.fields)) for e in batch]  # type: ignore[arg-type]
        )
        try:
            conn.send_packed_command([packed], check_health=False)  # type: ignore[no-untyped-call]
            return [_reply(conn) for _ in batch]
        except Exception:  # the connection's state is unknown: the next round trip reconnects
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise

    def _count(self, entry: Entry) -> None:
        if entry.stream == keys.EVENTS:
            self.stats.events_written += 1
        else:
            self.stats.written += 1
            self.written_by_stream[entry.stream] = self.written_by_stream.get(entry.stream, 0) + 1


def _reply(conn: Connection) -> Any:
    try:
        return conn.read_response()
    except redis.ResponseError as exc:  # this entry's answer; the ones after it are still to be read
        return exc
