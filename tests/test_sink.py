"""worker.sink: the bounded queue and its writer task, against a real redis-server."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable, Coroutine, Iterator
from types import SimpleNamespace
from typing import Any, cast

import hiredis
import pytest
import redis

from worker import keys, sink
from worker.localredis import LocalRedis, free_port
from worker.normalize import Fields, decode_fields, encode_fields
from worker.sink import Link, Opener, Sink, WriteError, redis_opener

BASE_MS = 1_700_000_000_000  # a fixed receive time (2023), so entry IDs are predictable
STREAM = keys.ticks("NSE", "SBIN-EQ")
OTHER = keys.ticks("NSE", "INFY-EQ")

Entries = list[tuple[str, dict[str, str]]]


def us(ms: int) -> int:
    return ms * 1000 + 123  # the sub-millisecond part never reaches the ID


def tick(seq: int, **extra: str | int) -> Fields:
    flat: tuple[str | int, ...] = ("seq", seq, "ltp", f"{800 + seq}.05")
    for name, value in extra.items():
        flat += (name, value)
    return encode_fields(flat)


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(scenario())


def opener(url: str) -> Opener:
    return redis_opener(url, timeout=1.0)


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def client_for(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=5)


def entries(client: redis.Redis, stream: str) -> Entries:
    raw = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))
    return [(i.decode(), {k.decode(): v.decode() for k, v in f.items()}) for i, f in raw]


def seqs(client: redis.Redis, stream: str) -> list[int]:
    return [int(fields["seq"]) for _, fields in entries(client, stream)]


def events(client: redis.Redis) -> list[dict[str, str]]:
    return [fields for _, fields in entries(client, keys.EVENTS)]


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n)


@pytest.fixture
def server() -> Iterator[LocalRedis]:
    """A private server this test may stop, restart, pause or starve of memory."""
    with LocalRedis() as srv:
        yield srv


class FlakyLink:
    """Opens real connections; ``plan`` says how each XADD round trip goes: "ok", "before" (the link
    breaks before anything is sent), "after" (Redis ran every command, then the link broke before the
    sink read the replies)."""

    def __init__(self, url: str, plan: list[str]) -> None:
        self.open = opener(url)
        self.plan = plan
        self.opened = 0

    async def __call__(self) -> asyncio.StreamWriter:
        self.opened += 1
        stream = await self.open()
        flaky = _FlakyTransport(stream.transport, self.plan)
        return cast(asyncio.StreamWriter, SimpleNamespace(transport=flaky, real=stream))


class _FlakyTransport:
    """Sits between the sink's protocol and a real transport (only what the sink uses)."""

    def __init__(self, real: asyncio.WriteTransport, plan: list[str]) -> None:
        self.real, self.plan = real, plan
        self.protocol: Any = None
        self.swallow = 0  # replies to read and throw away before the link "breaks"
        self.parser = hiredis.Reader()

    # the transport the sink sees
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol
        self.real.set_protocol(cast(asyncio.BaseProtocol, self))

    def set_write_buffer_limits(self, high: int) -> None:
        self.real.set_write_buffer_limits(high=high)

    def write(self, data: bytes) -> None:
        xadds = data.count(b"\r\nXADD\r\n")
        step = self.plan.pop(0) if xadds and self.plan else "ok"
        if step == "before":
            self.real.abort()
            return
        self.real.write(data)
        if step == "after":
            self.swallow = xadds

    def abort(self) -> None:
        self.real.abort()

    # the protocol the real transport sees
    def data_received(self, data: bytes) -> None:
        if not self.swallow:
            self.protocol.data_received(data)
            return
        self.parser.feed(data)
        while self.swallow and self.parser.gets() is not False:
            self.swallow -= 1
        if not self.swallow:  # every reply is back: Redis ran every command
            self.real.abort()

    def eof_received(self) -> None:
        self.protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


# ---------------------------------------------------------------------------------------------- IDs, batches


def test_ids_are_explicit_and_increase_per_stream(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), stream_maxlen=1000, events_maxlen=100, buffer_max=100)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.put(STREAM, tick(1), us(BASE_MS))  # same millisecond: the sequence part counts up
        s.put(OTHER, tick(2), us(BASE_MS))  # another stream has its own sequence
        s.put(STREAM, tick(3), us(BASE_MS - 7))  # the clock stepped back: still after the last ID
        s.put(STREAM, tick(4), us(BASE_MS + 5))
        s.start()
        await until(lambda: s.stats.written == 5, "5 ticks written")
        assert await s.stop(5.0) is True
        assert s.stats.redis_ok is True
        assert s.stats.write_errors == 0
        assert s.stats.last_write_at > 0
        assert s.buffered == 0
        assert s.written_by_stream == {STREAM: 4, OTHER: 1}

    run(scenario)
    got = entries(redis_client, STREAM)
    assert [i for i, _ in got] == [f"{BASE_MS}-0", f"{BASE_MS}-1", f"{BASE_MS}-2", f"{BASE_MS + 5}-0"]
    assert [f["seq"] for _, f in got] == ["0", "1", "3", "4"]
    assert got[0][1] == {"seq": "0", "ltp": "800.05"}
    assert entries(redis_client, OTHER) == [(f"{BASE_MS}-0", {"seq": "2", "ltp": "802.05"})]


def test_each_xadd_is_what_pack_command_makes_with_the_stream_s_maxlen_and_heads_are_packed_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    packed: list[tuple[Any, ...]] = []

    def counting(args: tuple[Any, ...]) -> bytes:
        packed.append(args)
        return hiredis.pack_command(args)  # type: ignore[no-any-return]

    monkeypatch.setattr(sink, "pack_command", counting)
    s = Sink(opener("redis://127.0.0.1:1"), stream_maxlen=1000, events_maxlen=50, buffer_max=100)
    for round_ in range(2):
        s.put(STREAM, tick(round_, note="M&M 100% ₹"), us(BASE_MS))
        s.event("probe", round=round_)
        batch = s._take()
        event, entry = batch  # events first
        assert entry.id == f"{BASE_MS}-{round_}".encode()
        assert decode_fields(entry.fields) == ("seq", str(round_), "ltp", f"{800 + round_}.05", "note", "M&M 100% ₹")
        expected = [
            hiredis.pack_command(("XADD", keys.EVENTS, "MAXLEN", "~", 50, event.id, *decode_fields(event.fields))),  # type: ignore[arg-type]
            hiredis.pack_command(("XADD", STREAM, "MAXLEN", "~", 1000, entry.id, *decode_fields(entry.fields))),  # type: ignore[arg-type]
        ]
        assert s._xadds(batch) == expected
    heads = [args for args in packed if args[0] == "XADD"]
    assert heads == [("XADD", keys.EVENTS, "MAXLEN", "~", 50), ("XADD", STREAM, "MAXLEN", "~", 1000)]  # once each


def test_stream_heads_memory_is_bounded(
    redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink, "HEADS_MAX", 2)
    streams = [keys.ticks("NSE", f"S{i}-EQ") for i in range(5)]

    async def scenario() -> None:
        s = Sink(opener(redis_server.url), stream_maxlen=1000, events_maxlen=100, buffer_max=100)
        for seq in range(20):  # five streams, a head memory of two: it starts over, and over
            s.put(streams[seq % 5], tick(seq), us(BASE_MS + seq))
        s.start()
        await until(lambda: s.stats.written == 20, "20 ticks written")
        assert await s.stop(5.0) is True
        assert len(s._heads) <= 2

    run(scenario)
    for i, stream in enumerate(streams):
        assert seqs(redis_client, stream) == [i, i + 5, i + 10, i + 15]


def test_batches_are_bounded_by_batch_max_and_events_go_first(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    batches: list[tuple[int, int | None]] = []

    async def scenario() -> None:
        s = Sink(opener(redis_server.url), stream_maxlen=1000, events_maxlen=100, buffer_max=100, batch_max=4)
        s.on_batch = lambda size, seconds, oldest: batches.append((size, oldest))
        for seq in range(10):
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        s.event("worker_started", instruments=3)
        s.start()
        assert await s.stop(5.0) is True
        assert s.stats.batches == 3
        assert s.stats.last_batch == 3
        assert s.stats.events_written == 1
        assert s.stats.written == 10

    run(scenario)
    # [event + 3 ticks], [4 ticks], [3 ticks]; the hook gets each batch's oldest tick's receive ms
    assert batches == [(4, BASE_MS), (4, BASE_MS + 3), (3, BASE_MS + 7)]
    assert seqs(redis_client, STREAM) == list(range(10))
    (started,) = events(redis_client)
    assert started["type"] == "worker_started"
    assert started["instruments"] == "3"
    assert abs(int(started["ts"]) - time.time() * 1000) < 60_000


def test_a_batch_of_events_only_reports_no_tick_age(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    batches: list[tuple[int, int | None]] = []

    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=100)
        s.on_batch = lambda size, seconds, oldest: batches.append((size, oldest))
        s.event("login", count=1)
        s.start()
        assert await s.stop(5.0) is True

    run(scenario)
    assert batches == [(1, None)]
    assert [e["type"] for e in events(redis_client)] == ["login"]


def test_ticks_queued_while_a_batch_is_in_flight_follow_it_in_order(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 10_000, 100, buffer_max=10_000, batch_max=50)
        s.start()
        for seq in range(2000):
            s.put(STREAM if seq % 2 else OTHER, tick(seq), time.time_ns() // 1000)
            if seq % 97 == 0:
                await asyncio.sleep(0)  # let the writer take a batch mid-way
        assert await s.stop(10.0) is True
        assert (s.stats.written, s.stats.dropped) == (2000, 0)
        assert s.stats.batches >= 40

    run(scenario)
    for stream, parity in ((OTHER, 0), (STREAM, 1)):
        got = entries(redis_client, stream)
        assert [int(f["seq"]) for _, f in got] == list(range(parity, 2000, 2))
        ids = [id_key(i) for i, _ in got]
        assert ids == sorted(set(ids))


def test_linger_gathers_ticks_into_one_batch(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=100, batch_max=100, linger=0.3)
        s.start()
        for seq in range(5):
            s.put(STREAM, tick(seq), us(BASE_MS))
            await asyncio.sleep(0.01)
        await until(lambda: s.stats.written == 5, "5 ticks written")
        assert (s.stats.batches, s.stats.last_batch) == (1, 5)
        assert await s.stop(5.0) is True

    run(scenario)
    assert seqs(redis_client, STREAM) == list(range(5))


def test_a_full_batch_does_not_wait_for_the_linger(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=100, batch_max=3, linger=60.0)
        s.start()
        s.put(STREAM, tick(0), us(BASE_MS))
        await asyncio.sleep(0.05)  # the writer lingers for more
        s.put(STREAM, tick(1), us(BASE_MS))
        s.put(STREAM, tick(2), us(BASE_MS))
        await until(lambda: s.stats.written == 3, "a full batch written long before the linger ends")
        assert (s.stats.batches, s.stats.last_batch) == (1, 3)
        assert await s.stop(5.0) is True

    run(scenario)


def test_stop_cuts_the_linger_short(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=100, batch_max=100, linger=60.0)
        s.start()
        s.put(STREAM, tick(0), us(BASE_MS))
        await asyncio.sleep(0.05)
        began = time.monotonic()
        assert await s.stop(5.0) is True
        assert time.monotonic() - began < 5.0
        assert s.stats.written == 1

    run(scenario)


def test_maxlen_trims_approximately(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), stream_maxlen=10, events_maxlen=100, buffer_max=2000)
        for seq in range(1000):
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        s.start()
        assert await s.stop(10.0) is True
        assert s.stats.written == 1000

    run(scenario)
    kept = seqs(redis_client, STREAM)
    # "MAXLEN ~" drops whole radix-tree nodes only: at least 10 stay, more than an exact trim would keep.
    assert 10 < len(kept) < 1000
    assert kept == list(range(1000 - len(kept), 1000))  # the newest, in order


# ---------------------------------------------------------------------------------------------- bounds


def test_past_buffer_max_the_oldest_ticks_are_dropped_counted_and_reported(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=5)
        for seq in range(8):
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        assert s.stats.dropped == 3
        assert s.buffered == 5
        s.start()
        assert await s.stop(5.0) is True

    run(scenario)
    assert seqs(redis_client, STREAM) == [3, 4, 5, 6, 7]
    dropped = [e for e in events(redis_client) if e["type"] == "ticks_dropped"]
    assert len(dropped) == 1
    assert (dropped[0]["count"], dropped[0]["total"], dropped[0]["buffer_max"]) == ("3", "3", "5")


def test_events_have_their_own_bounded_queue(
    redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink, "EVENTS_QUEUE_MAX", 3)

    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=2)
        for n in range(5):
            s.event("feed_state", n=n)
        for seq in range(6):  # ticks overflow their own buffer, never the events'
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        assert (s.stats.events_dropped, s.stats.dropped) == (2, 4)
        s.start()
        assert await s.stop(5.0) is True
        assert s.stats.events_written == 4

    run(scenario)
    assert [(e["type"], e.get("n")) for e in events(redis_client)] == [
        ("feed_state", "2"),
        ("feed_state", "3"),
        ("feed_state", "4"),
        ("ticks_dropped", None),
    ]
    assert seqs(redis_client, STREAM) == [4, 5]


# ---------------------------------------------------------------------------------------------- outages


def test_order_and_exactly_once_across_a_redis_restart(server: LocalRedis) -> None:
    async def scenario() -> None:
        s = Sink(opener(server.url), 1000, 100, buffer_max=10, retry_max=0.05)
        s.start()
        for seq in range(5):
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        await until(lambda: s.stats.written == 5, "the first ticks written")

        await asyncio.to_thread(server.stop)
        s.put(STREAM, tick(5), us(BASE_MS + 5))
        await until(lambda: s.stats.write_errors >= 2, "the writer retrying")  # tick 5 is the batch in hand
        assert s.stats.redis_ok is False
        for seq in range(6, 26):  # 20 more into a buffer of 10: 6..15 are dropped
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        assert (s.stats.dropped, s.buffered) == (10, 10)

        await asyncio.to_thread(server.start)  # same port, empty (the test server persists nothing)
        await until(lambda: s.stats.written == 16, "the buffer flushed")
        assert await s.stop(5.0) is True
        assert s.stats.redis_ok is True

    run(scenario)
    client = client_for(server.url)
    try:
        got = entries(client, STREAM)
        assert [int(f["seq"]) for _, f in got] == [5, *range(16, 26)]
        assert [i for i, _ in got] == [f"{BASE_MS + seq}-0" for seq in (5, *range(16, 26))]
        kinds = [(e["type"], e.get("buffered"), e.get("count")) for e in events(client)]
        assert kinds == [("redis_recovered", "10", None), ("ticks_dropped", None, "10")]
    finally:
        client.close()


def test_a_batch_written_before_the_connection_failed_is_not_written_twice(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    link = FlakyLink(redis_server.url, ["after"])

    async def scenario() -> None:
        s = Sink(link, 1000, 100, buffer_max=100, retry_max=0.05)
        for seq in range(5):
            s.put(STREAM, tick(seq), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.written == 5, "the retried batch counted")
        s.put(STREAM, tick(5), us(BASE_MS))
        assert await s.stop(5.0) is True
        assert s.stats.write_errors == 1
        assert s.stats.written == 6

    run(scenario)
    assert link.opened == 2
    got = entries(redis_client, STREAM)
    assert [i for i, _ in got] == [f"{BASE_MS}-{n}" for n in range(6)]
    assert [int(f["seq"]) for _, f in got] == list(range(6))
    assert [e["type"] for e in events(redis_client)] == ["redis_recovered"]


def test_a_batch_that_failed_unsent_is_written_once(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario() -> None:
        s = Sink(FlakyLink(redis_server.url, ["before", "before"]), 1000, 100, buffer_max=100, retry_max=0.05)
        for seq in range(3):
            s.put(STREAM, tick(seq), us(BASE_MS))
        s.start()
        assert await s.stop(5.0) is True
        assert s.stats.write_errors == 2

    run(scenario)
    assert seqs(redis_client, STREAM) == [0, 1, 2]


def test_a_round_trip_that_outlives_the_timeout_is_retried_once_redis_answers(
    server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    admin = client_for(server.url)

    async def scenario() -> None:
        s = Sink(opener(server.url), 1000, 100, buffer_max=100, retry_max=0.05, timeout=0.2)
        s.start()
        admin.execute_command("CLIENT", "PAUSE", 1000, "WRITE")  # Redis holds writes: no reply
        for seq in range(4):
            s.put(STREAM, tick(seq), us(BASE_MS))
        await until(lambda: s.stats.write_errors >= 1, "a round trip timed out")
        await until(lambda: s.stats.written == 4, "the ticks written once Redis answers")
        assert await s.stop(5.0) is True

    with caplog.at_level(logging.WARNING, logger="worker.sink"):
        run(scenario)
    try:
        assert seqs(admin, STREAM) == [0, 1, 2, 3]
        assert [i for i, _ in entries(admin, STREAM)] == [f"{BASE_MS}-{n}" for n in range(4)]
        assert any("redis write failed (WriteError: no reply from redis in 0.2 s)" in m for m in caplog.messages)
    finally:
        admin.close()


def test_a_stream_ahead_of_our_ids_gets_the_entry_with_a_redis_id(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    ahead = f"{BASE_MS + 60_000}-4"  # e.g. written before a restart, by a clock that was ahead
    redis_client.xadd(STREAM, {"seq": "-1"}, id=ahead)

    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=100)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.put(STREAM, tick(1), us(BASE_MS + 1))
        s.start()
        await until(lambda: s.stats.written == 2, "both ticks written")
        s.put(STREAM, tick(2), us(BASE_MS + 2))  # takes up after the ID Redis chose
        assert await s.stop(5.0) is True
        assert s.stats.written == 3

    run(scenario)
    got = entries(redis_client, STREAM)
    assert [int(f["seq"]) for _, f in got] == [-1, 0, 1, 2]
    ids = [id_key(i) for i, _ in got]
    assert ids == sorted(set(ids))
    assert ids[0] == id_key(ahead)
    assert ids[3] == (ids[2][0], ids[2][1] + 1)


def test_after_a_failed_attempt_a_stream_ahead_still_gets_its_tick(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    # On the retry both entries are refused as "equal or smaller": STREAM's because the failed attempt
    # wrote it, OTHER's because that stream is ahead. Only the second one still has to be written.
    redis_client.xadd(OTHER, {"seq": "-1"}, id=f"{BASE_MS + 60_000}-0")

    async def scenario() -> None:
        s = Sink(FlakyLink(redis_server.url, ["after"]), 1000, 100, buffer_max=100, retry_max=0.05)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.put(OTHER, tick(1), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.written == 2, "both ticks written")
        assert await s.stop(5.0) is True
        assert s.stats.written == 2
        assert s.stats.write_errors == 1

    run(scenario)
    assert entries(redis_client, STREAM) == [(f"{BASE_MS}-0", {"seq": "0", "ltp": "800.05"})]
    assert seqs(redis_client, OTHER) == [-1, 1]


def test_a_key_of_another_type_is_rejected_and_the_writer_goes_on(
    redis_server: LocalRedis, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(OTHER, "not a stream")

    async def scenario() -> None:
        s = Sink(opener(redis_server.url), 1000, 100, buffer_max=100)
        s.put(OTHER, tick(0), us(BASE_MS))
        s.put(STREAM, tick(1), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.written == 1, "the good tick written")
        s.put(STREAM, tick(2), us(BASE_MS))
        assert await s.stop(5.0) is True
        assert s.stats.rejected == 1
        assert s.stats.written == 2

    run(scenario)
    assert seqs(redis_client, STREAM) == [1, 2]
    assert redis_client.get(OTHER) == b"not a stream"
    assert any("WRONGTYPE" in r.getMessage() and OTHER in r.getMessage() for r in caplog.records)


def _starve(server: LocalRedis) -> redis.Redis:
    admin = client_for(server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    return admin


def test_out_of_memory_is_retried_until_it_succeeds(server: LocalRedis) -> None:
    admin = _starve(server)

    async def scenario() -> None:
        s = Sink(opener(server.url), 1000, 100, buffer_max=100, retry_max=0.05)
        for seq in range(5):
            s.put(STREAM, tick(seq), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.batches >= 3, "refused batches retried")
        assert s.stats.written == 0
        assert admin.xlen(STREAM) == 0
        admin.config_set("maxmemory", 0)
        await until(lambda: s.stats.written == 5, "the ticks written once memory is back")
        assert await s.stop(5.0) is True

    try:
        run(scenario)
        got = entries(admin, STREAM)
        assert [i for i, _ in got] == [f"{BASE_MS}-{n}" for n in range(5)]
        assert [int(f["seq"]) for _, f in got] == list(range(5))
    finally:
        admin.close()


def test_stop_gives_up_at_the_deadline_while_redis_refuses_writes(
    server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    admin = _starve(server)

    async def scenario() -> None:
        s = Sink(opener(server.url), 1000, 100, buffer_max=100, retry_max=5.0)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.batches >= 1, "a refused batch")
        began = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="worker.sink"):
            assert await s.stop(0.3) is False  # the writer's 0.1 s backoff is cut short by the deadline
        assert time.monotonic() - began < 1.0
        assert s.stats.written == 0

    try:
        run(scenario)
        assert "shutdown: 1 ticks could not be written" in caplog.messages  # the writer gave up, not stop()
        admin.config_set("maxmemory", 0)
        assert admin.xlen(STREAM) == 0
    finally:
        admin.close()


def test_stop_gives_up_on_batches_redis_does_not_answer_by_the_deadline(
    server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    admin = client_for(server.url)

    async def scenario() -> None:
        s = Sink(opener(server.url), 1000, 100, buffer_max=100, batch_max=2, timeout=10.0)
        s.start()
        admin.execute_command("CLIENT", "PAUSE", 3000, "WRITE")
        for seq in range(3):
            s.put(STREAM, tick(seq), us(BASE_MS))
        await asyncio.sleep(0.1)  # two batches in flight, unanswered
        s.put(STREAM, tick(3), us(BASE_MS))
        began = time.monotonic()
        with caplog.at_level(logging.ERROR, logger="worker.sink"):
            assert await s.stop(0.2) is False
        assert time.monotonic() - began < 0.5  # the writer gave up at the deadline; stop() did not cancel it
        assert s.stats.written == 0

    try:
        run(scenario)
        assert "shutdown: 4 ticks could not be written" in caplog.messages
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()


@pytest.mark.parametrize("refusals", [0, 1], ids=["hangs", "refused-then-hangs"])
def test_stop_cancels_a_writer_stuck_connecting(refusals: int, caplog: pytest.LogCaptureFixture) -> None:
    attempts = 0

    async def never_connects() -> asyncio.StreamWriter:
        nonlocal attempts
        attempts += 1
        if attempts <= refusals:
            raise ConnectionRefusedError("injected")
        await asyncio.sleep(60)
        raise AssertionError("cancelled long before")

    async def scenario() -> None:
        s = Sink(never_connects, 1000, 100, buffer_max=100, timeout=30.0)
        s.start()
        s.put(STREAM, tick(0), us(BASE_MS))
        s.put(STREAM, tick(1), us(BASE_MS))
        await until(lambda: attempts == refusals + 1, "the hanging connection attempt")
        s.put(STREAM, tick(2), us(BASE_MS))
        with caplog.at_level(logging.ERROR, logger="worker.sink"):
            assert await s.stop(0.1) is False
        assert s.stats.write_errors == refusals

    run(scenario)
    assert caplog.messages[-1] == "shutdown: 3 ticks could not be written"


@pytest.mark.parametrize(("batch_max", "count"), [(200, 3), (2, 5)])
def test_stop_with_redis_down_returns_false(batch_max: int, count: int, caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there

    async def scenario() -> None:
        s = Sink(opener(url), 1000, 100, buffer_max=100, batch_max=batch_max, retry_max=0.05)
        s.start()
        for seq in range(count):
            s.put(STREAM, tick(seq), us(BASE_MS))
        await until(lambda: s.stats.write_errors >= 1, "a failed write")
        with caplog.at_level(logging.ERROR, logger="worker.sink"):
            assert await s.stop(0.3) is False
        assert s.stats.written == 0
        assert s.stats.redis_ok is False

    run(scenario)
    assert f"shutdown: {count} ticks could not be written" in caplog.messages


def test_stop_before_start_says_nothing_was_written() -> None:
    async def scenario() -> None:
        s = Sink(opener(f"redis://127.0.0.1:{free_port()}/0"), 1000, 100, buffer_max=100)
        s.put(STREAM, tick(0), us(BASE_MS))
        assert await s.stop(0.1) is False

    run(scenario)


def test_a_long_outage_does_not_kill_the_writer() -> None:
    # Over 1024 consecutive failures: an uncapped 0.05 * 2**failures backoff overflows a float.
    port = free_port()

    async def scenario() -> None:
        s = Sink(opener(f"redis://127.0.0.1:{port}/0"), 1000, 100, buffer_max=100, retry_max=0.0001)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.write_errors > 1100, "over 1100 failed writes", timeout=30)
        with LocalRedis(port=port) as server:
            await until(lambda: s.stats.written == 1, "the tick written after the outage")
            assert await s.stop(5.0) is True
            client = client_for(server.url)
            try:
                assert seqs(client, STREAM) == [0]
                assert [e["type"] for e in events(client)] == ["redis_recovered"]
            finally:
                client.close()

    run(scenario)


async def _bad_server(reply: bytes) -> tuple[asyncio.Server, int]:
    """A server that answers anything with ``reply`` (and then hangs up if that is b"")."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1 << 16)
        writer.write(reply)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("reply", "error"),
    [(b"", "WriteError: redis closed the connection"), (b"?not resp\r\n", "WriteError: unreadable reply from redis")],
    ids=["hung-up", "garbage"],
)
def test_a_server_that_hangs_up_or_answers_garbage_is_a_failed_write(
    redis_server: LocalRedis, redis_client: redis.Redis, reply: bytes, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        bad, port = await _bad_server(reply)
        real = opener(redis_server.url)
        bad_links = [port]

        async def first_bad_then_real() -> asyncio.StreamWriter:
            if bad_links:
                _, writer = await asyncio.open_connection("127.0.0.1", bad_links.pop())
                return writer
            return await real()

        s = Sink(first_bad_then_real, 1000, 100, buffer_max=100, retry_max=0.05)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.written == 1, "the tick written on a good connection")
        assert await s.stop(5.0) is True
        assert s.stats.write_errors == 1
        bad.close()
        await bad.wait_closed()

    with caplog.at_level(logging.WARNING, logger="worker.sink"):
        run(scenario)
    assert any(error in m for m in caplog.messages), caplog.messages
    assert seqs(redis_client, STREAM) == [0]


def test_the_opened_link_outlives_redis_py_s_connection_object(redis_server: LocalRedis) -> None:
    async def scenario() -> None:
        stream = await opener(redis_server.url)()
        gc.collect()  # frees the redis-py connection that made the link (it sits in a reference cycle)
        link = Link(stream, lambda: None)
        del stream
        gc.collect()  # the link keeps the stream writer, which would close the transport when freed
        assert await link.request([hiredis.pack_command(("PING",))]) == [b"PONG"]
        link.close(WriteError("done"))

    run(scenario)


class _RecordingTransport:
    """A transport that keeps what is written: the replies are fed to the link by the test."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def set_write_buffer_limits(self, high: int) -> None:
        self.high = high

    def write(self, data: bytes) -> None:
        self.written.append(data)


def test_replies_split_across_reads_are_handed_out_in_order_when_complete() -> None:
    async def scenario() -> None:
        transport = _RecordingTransport()
        link = Link(cast(asyncio.StreamWriter, SimpleNamespace(transport=transport)), lambda: None)
        ping = hiredis.pack_command(("PING",))
        first, second = link.request([ping, ping]), link.request([ping])
        assert transport.written == [ping + ping, ping]
        link.data_received(b"+PONG\r\n+PO")
        assert not first.done()
        link.data_received(b"NG\r\n-ERR no\r\n")
        assert first.result() == [b"PONG", b"PONG"]
        [error] = second.result()
        assert isinstance(error, hiredis.ReplyError)
        assert str(error) == "ERR no"

    run(scenario)


def test_a_closed_link_fails_new_requests_at_once(redis_server: LocalRedis) -> None:
    changes: list[str] = []

    async def scenario() -> None:
        link = Link(await opener(redis_server.url)(), lambda: changes.append("change"))
        link.close(WriteError("closed by the test"))
        assert not link.writable
        with pytest.raises(WriteError, match="closed by the test"):
            await link.request([hiredis.pack_command(("PING",))])

    run(scenario)
    assert changes


def test_while_the_transport_is_full_the_pipeline_holds_back_and_loses_nothing(server: LocalRedis) -> None:
    """The transport says "full" (pause_writing: its buffer passed the high-water mark) while a batch
    waits for Redis: nothing more is sent until it says "writable" again."""
    admin = client_for(server.url)

    async def scenario() -> None:
        s = Sink(opener(server.url), 1000, 100, buffer_max=100, batch_max=2)
        s.put(OTHER, tick(-1), us(BASE_MS))
        s.start()
        await until(lambda: s.stats.written == 1, "the link up")
        link = s._link
        assert link is not None
        admin.execute_command("CLIENT", "PAUSE", 300, "WRITE")  # the next batch waits for its replies
        s.put(STREAM, tick(0), us(BASE_MS))
        await until(lambda: len(s._inflight) == 1, "a batch in flight")
        link.pause_writing()
        for seq in range(1, 6):
            s.put(STREAM, tick(seq), us(BASE_MS + seq))
        await asyncio.sleep(0.05)
        assert (len(s._inflight), s.buffered) == (1, 5)
        link.resume_writing()
        await until(lambda: len(s._inflight) == 3, "the full batches sent behind the first one")
        await until(lambda: s.stats.written == 7, "all written once Redis answers")
        assert await s.stop(5.0) is True
        assert s.stats.write_errors == 0

    try:
        run(scenario)
        assert seqs(admin, STREAM) == list(range(6))
    finally:
        admin.close()


def test_the_opener_speaks_to_the_url_s_database_as_its_user(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    admin = client_for(redis_server.url)
    admin.acl_setuser("sinker", enabled=True, passwords=["+s3cret"], keys=["ticks:*"], commands=["+xadd", "+select"])
    url = redis_server.url.rsplit("/", 1)[0].replace("redis://", "redis://sinker:s3cret@") + "/3"

    async def scenario() -> None:
        s = Sink(opener(url), 1000, 100, buffer_max=100)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.start()
        assert await s.stop(5.0) is True

    try:
        run(scenario)
        db3 = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/3")
        try:
            assert seqs(db3, STREAM) == [0]
            assert admin.exists(STREAM) == 0
            db3.flushdb()
        finally:
            db3.close()
    finally:
        admin.acl_deluser("sinker")
        admin.close()
