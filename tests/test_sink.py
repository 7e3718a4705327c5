"""worker.sink: the bounded hand-off to the writer thread, against a real redis-server."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.connection import Connection
from redis.retry import Retry

from worker import keys, sink
from worker.localredis import LocalRedis, free_port
from worker.normalize import Fields
from worker.sink import Sink

BASE_MS = 1_700_000_000_000  # a fixed receive time (2023), so entry IDs are predictable
STREAM = keys.ticks("NSE", "SBIN-EQ")
OTHER = keys.ticks("NSE", "INFY-EQ")

Entries = list[tuple[str, dict[str, str]]]


def us(ms: int) -> int:
    return ms * 1000 + 123  # the sub-millisecond part never reaches the ID


def tick(seq: int, **extra: str | int) -> Fields:
    fields: Fields = ("seq", seq, "ltp", f"{800 + seq}.05")
    for name, value in extra.items():
        fields += (name, value)
    return fields


def fast_client(url: str, cls: type[redis.Redis] = redis.Redis, **kwargs: Any) -> redis.Redis:
    """No client-side retries: a failure reaches the sink at once."""
    return cls.from_url(url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1, socket_timeout=5, **kwargs)


def factory(url: str, **kwargs: Any) -> Callable[[], redis.Redis]:
    return lambda: fast_client(url, **kwargs)


def wait_until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


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
    """A private server this test may stop, restart or starve of memory."""
    with LocalRedis() as srv:
        yield srv


class FlakyConnection(Connection):
    """A real connection; ``plan`` says how each XADD round trip goes: "ok", "before" (fails unsent),
    "after" (Redis ran every command, then the link broke before the replies were read)."""

    def __init__(self, *args: Any, plan: list[str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.broken = False

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        xadd = b"XADD" in b"".join(command)[:32]
        step = self.plan.pop(0) if xadd and self.plan else "ok"
        if step == "before":
            raise redis.ConnectionError("injected: connection lost before the commands were sent")
        super().send_packed_command(command, check_health)
        if step == "after":
            self.broken = True

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self.broken:
            self.broken = False
            self.disconnect()
            raise redis.ConnectionError("injected: connection lost after Redis ran the commands")
        return super().read_response(*args, **kwargs)


def flaky_factory(url: str, plan: list[str]) -> Callable[[], redis.Redis]:
    return lambda: fast_client(url, connection_class=FlakyConnection, plan=plan)


# ---------------------------------------------------------------------------------------------- IDs, batches


def test_ids_are_explicit_and_increase_per_stream(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    s = Sink(factory(redis_server.url), stream_maxlen=1000, events_maxlen=100, buffer_max=100)
    s.put(STREAM, tick(0), us(BASE_MS))
    s.put(STREAM, tick(1), us(BASE_MS))  # same millisecond: the sequence part counts up
    s.put(OTHER, tick(2), us(BASE_MS))  # another stream has its own sequence
    s.put(STREAM, tick(3), us(BASE_MS - 7))  # the clock stepped back: still after the last ID
    s.put(STREAM, tick(4), us(BASE_MS + 5))
    s.start()
    wait_until(lambda: s.stats.written == 5, "5 ticks written")
    assert s.stop(5.0) is True

    got = entries(redis_client, STREAM)
    assert [i for i, _ in got] == [f"{BASE_MS}-0", f"{BASE_MS}-1", f"{BASE_MS}-2", f"{BASE_MS + 5}-0"]
    assert [f["seq"] for _, f in got] == ["0", "1", "3", "4"]
    assert got[0][1] == {"seq": "0", "ltp": "800.05"}
    assert entries(redis_client, OTHER) == [(f"{BASE_MS}-0", {"seq": "2", "ltp": "802.05"})]
    assert s.stats.redis_ok is True
    assert s.stats.write_errors == 0
    assert s.stats.last_write_at > 0
    assert s.buffered == 0


def test_batches_are_bounded_by_batch_max_and_events_go_first(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    s = Sink(factory(redis_server.url), stream_maxlen=1000, events_maxlen=100, buffer_max=100, batch_max=4)
    for seq in range(10):
        s.put(STREAM, tick(seq), us(BASE_MS + seq))
    s.event("worker_started", instruments=3)
    s.start()
    wait_until(lambda: s.stats.written == 10, "10 ticks written")
    assert s.stop(5.0) is True
    # [event + 3 ticks], [4 ticks], [3 ticks]
    assert s.stats.batches == 3
    assert s.stats.last_batch == 3
    assert s.stats.events_written == 1
    assert seqs(redis_client, STREAM) == list(range(10))
    (started,) = events(redis_client)
    assert started["type"] == "worker_started"
    assert started["instruments"] == "3"
    assert abs(int(started["ts"]) - time.time() * 1000) < 60_000


def test_linger_gathers_ticks_into_one_batch(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    s = Sink(factory(redis_server.url), 1000, 100, buffer_max=100, batch_max=100, linger=0.5)
    s.start()
    for seq in range(5):
        s.put(STREAM, tick(seq), us(BASE_MS))
    wait_until(lambda: s.stats.written == 5, "5 ticks written")
    assert (s.stats.batches, s.stats.last_batch) == (1, 5)
    assert s.stop(5.0) is True
    assert seqs(redis_client, STREAM) == list(range(5))


def test_a_full_batch_does_not_wait_for_the_linger(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    s = Sink(factory(redis_server.url), 1000, 100, buffer_max=100, batch_max=3, linger=60.0)
    s.start()
    for seq in range(3):
        s.put(STREAM, tick(seq), us(BASE_MS))
    wait_until(lambda: s.stats.written == 3, "a full batch written long before the linger ends")
    assert (s.stats.batches, s.stats.last_batch) == (1, 3)
    assert s.stop(5.0) is True


def test_maxlen_trims_approximately(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    s = Sink(factory(redis_server.url), stream_maxlen=10, events_maxlen=100, buffer_max=2000)
    for seq in range(1000):
        s.put(STREAM, tick(seq), us(BASE_MS + seq))
    s.start()
    assert s.stop(10.0) is True
    assert s.stats.written == 1000
    kept = seqs(redis_client, STREAM)
    # "MAXLEN ~" drops whole radix-tree nodes only: at least 10 stay, more than an exact trim would keep.
    assert 10 < len(kept) < 1000
    assert kept == list(range(1000 - len(kept), 1000))  # the newest, in order


# ---------------------------------------------------------------------------------------------- bounds


def test_past_buffer_max_the_oldest_ticks_are_dropped_counted_and_reported(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    s = Sink(factory(redis_server.url), 1000, 100, buffer_max=5)
    for seq in range(8):
        s.put(STREAM, tick(seq), us(BASE_MS + seq))
    assert s.stats.dropped == 3
    assert s.buffered == 5
    s.start()
    assert s.stop(5.0) is True
    assert seqs(redis_client, STREAM) == [3, 4, 5, 6, 7]
    dropped = [e for e in events(redis_client) if e["type"] == "ticks_dropped"]
    assert len(dropped) == 1
    assert (dropped[0]["count"], dropped[0]["total"], dropped[0]["buffer_max"]) == ("3", "3", "5")


def test_events_have_their_own_bounded_queue(
    redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sink, "EVENTS_QUEUE_MAX", 3)
    s = Sink(factory(redis_server.url), 1000, 100, buffer_max=2)
    for n in range(5):
        s.event("feed_state", n=n)
    for seq in range(6):  # ticks overflow their own buffer, never the events'
        s.put(STREAM, tick(seq), us(BASE_MS + seq))
    assert (s.stats.events_dropped, s.stats.dropped) == (2, 4)
    s.start()
    assert s.stop(5.0) is True
    assert [(e["type"], e.get("n")) for e in events(redis_client)] == [
        ("feed_state", "2"),
        ("feed_state", "3"),
        ("feed_state", "4"),
        ("ticks_dropped", None),
    ]
    assert s.stats.events_written == 4
    assert seqs(redis_client, STREAM) == [4, 5]


# ---------------------------------------------------------------------------------------------- outages


def test_order_and_exactly_once_across_a_redis_restart(server: LocalRedis) -> None:
    s = Sink(factory(server.url), 1000, 100, buffer_max=10, retry_max=0.05)
    s.start()
    for seq in range(5):
        s.put(STREAM, tick(seq), us(BASE_MS + seq))
    wait_until(lambda: s.stats.written == 5, "the first ticks written")

    server.stop()
    s.put(STREAM, tick(5), us(BASE_MS + 5))
    wait_until(lambda: s.stats.write_errors >= 2, "the writer retrying")  # tick 5 is the batch in hand
    assert s.stats.redis_ok is False
    for seq in range(6, 26):  # 20 more into a buffer of 10: 6..15 are dropped
        s.put(STREAM, tick(seq), us(BASE_MS + seq))
    assert (s.stats.dropped, s.buffered) == (10, 10)

    server.start()  # same port, empty (the test server persists nothing)
    wait_until(lambda: s.stats.written == 16, "the buffer flushed")
    assert s.stop(5.0) is True
    client = fast_client(server.url)
    try:
        got = entries(client, STREAM)
        assert [int(f["seq"]) for _, f in got] == [5, *range(16, 26)]
        assert [i for i, _ in got] == [f"{BASE_MS + seq}-0" for seq in (5, *range(16, 26))]
        kinds = [(e["type"], e.get("buffered"), e.get("count")) for e in events(client)]
        assert kinds == [("redis_recovered", "10", None), ("ticks_dropped", None, "10")]
    finally:
        client.close()
    assert s.stats.redis_ok is True


def test_a_batch_written_before_the_connection_failed_is_not_written_twice(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    plan = ["after"]
    s = Sink(flaky_factory(redis_server.url, plan), 1000, 100, buffer_max=100, retry_max=0.05)
    for seq in range(5):
        s.put(STREAM, tick(seq), us(BASE_MS))
    s.start()
    wait_until(lambda: s.stats.written == 5, "the retried batch counted")
    s.put(STREAM, tick(5), us(BASE_MS))
    assert s.stop(5.0) is True
    assert s.stats.write_errors == 1
    assert s.stats.written == 6
    got = entries(redis_client, STREAM)
    assert [i for i, _ in got] == [f"{BASE_MS}-{n}" for n in range(6)]
    assert [int(f["seq"]) for _, f in got] == list(range(6))
    assert [e["type"] for e in events(redis_client)] == ["redis_recovered"]


def test_a_batch_that_failed_unsent_is_written_once(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    plan = ["before", "before"]
    s = Sink(flaky_factory(redis_server.url, plan), 1000, 100, buffer_max=100, retry_max=0.05)
    for seq in range(3):
        s.put(STREAM, tick(seq), us(BASE_MS))
    s.start()
    assert s.stop(5.0) is True
    assert s.stats.write_errors == 2
    assert seqs(redis_client, STREAM) == [0, 1, 2]


@pytest.mark.parametrize("decode_responses", [False, True])
def test_a_stream_ahead_of_our_ids_gets_the_entry_with_a_redis_id(
    redis_server: LocalRedis, redis_client: redis.Redis, decode_responses: bool
) -> None:
    ahead = f"{BASE_MS + 60_000}-4"  # e.g. written before a restart, by a clock that was ahead
    redis_client.xadd(STREAM, {"seq": "-1"}, id=ahead)
    s = Sink(factory(redis_server.url, decode_responses=decode_responses), 1000, 100, buffer_max=100)
    s.put(STREAM, tick(0), us(BASE_MS))
    s.put(STREAM, tick(1), us(BASE_MS + 1))
    s.start()
    wait_until(lambda: s.stats.written == 2, "both ticks written")
    s.put(STREAM, tick(2), us(BASE_MS + 2))  # takes up after the ID Redis chose
    assert s.stop(5.0) is True
    got = entries(redis_client, STREAM)
    assert [int(f["seq"]) for _, f in got] == [-1, 0, 1, 2]
    ids = [id_key(i) for i, _ in got]
    assert ids == sorted(set(ids))
    assert ids[0] == id_key(ahead)
    assert ids[3] == (ids[2][0], ids[2][1] + 1)
    assert s.stats.written == 3


def test_after_a_failed_attempt_a_stream_ahead_still_gets_its_tick(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    # On the retry both entries are refused as "equal or smaller": STREAM's because the failed attempt
    # wrote it, OTHER's because that stream is ahead. Only the second one still has to be written.
    redis_client.xadd(OTHER, {"seq": "-1"}, id=f"{BASE_MS + 60_000}-0")
    plan = ["after"]
    s = Sink(flaky_factory(redis_server.url, plan), 1000, 100, buffer_max=100, retry_max=0.05)
    s.put(STREAM, tick(0), us(BASE_MS))
    s.put(OTHER, tick(1), us(BASE_MS))
    s.start()
    wait_until(lambda: s.stats.written == 2, "both ticks written")
    assert s.stop(5.0) is True
    assert entries(redis_client, STREAM) == [(f"{BASE_MS}-0", {"seq": "0", "ltp": "800.05"})]
    assert seqs(redis_client, OTHER) == [-1, 1]
    assert s.stats.written == 2
    assert s.stats.write_errors == 1


def test_a_key_of_another_type_is_rejected_and_the_writer_goes_on(
    redis_server: LocalRedis, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    redis_client.set(OTHER, "not a stream")
    s = Sink(factory(redis_server.url), 1000, 100, buffer_max=100)
    s.put(OTHER, tick(0), us(BASE_MS))
    s.put(STREAM, tick(1), us(BASE_MS))
    s.start()
    wait_until(lambda: s.stats.written == 1, "the good tick written")
    s.put(STREAM, tick(2), us(BASE_MS))
    assert s.stop(5.0) is True
    assert s.stats.rejected == 1
    assert s.stats.written == 2
    assert seqs(redis_client, STREAM) == [1, 2]
    assert redis_client.get(OTHER) == b"not a stream"
    assert any("WRONGTYPE" in r.getMessage() and OTHER in r.getMessage() for r in caplog.records)


def _starve(server: LocalRedis) -> redis.Redis:
    admin = fast_client(server.url)
    admin.config_set("maxmemory-policy", "noeviction")
    admin.config_set("maxmemory", 1)
    return admin


def test_out_of_memory_is_retried_until_it_succeeds(server: LocalRedis) -> None:
    admin = _starve(server)
    try:
        s = Sink(factory(server.url), 1000, 100, buffer_max=100, retry_max=0.05)
        for seq in range(5):
            s.put(STREAM, tick(seq), us(BASE_MS))
        s.start()
        wait_until(lambda: s.stats.batches >= 3, "refused batches retried")
        assert s.stats.written == 0
        assert admin.xlen(STREAM) == 0
        admin.config_set("maxmemory", 0)
        wait_until(lambda: s.stats.written == 5, "the ticks written once memory is back")
        assert s.stop(5.0) is True
        got = entries(admin, STREAM)
        assert [i for i, _ in got] == [f"{BASE_MS}-{n}" for n in range(5)]
        assert [int(f["seq"]) for _, f in got] == list(range(5))
    finally:
        admin.close()


def test_stop_gives_up_at_the_deadline_while_redis_refuses_writes(
    server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    admin = _starve(server)
    try:
        s = Sink(factory(server.url), 1000, 100, buffer_max=100, retry_max=0.05)
        s.put(STREAM, tick(0), us(BASE_MS))
        s.start()
        wait_until(lambda: s.stats.batches >= 1, "a refused batch")
        with caplog.at_level(logging.ERROR, logger="worker.sink"):
            assert s.stop(0.3) is False
        assert "shutdown: 1 ticks could not be written" in caplog.messages  # the writer gave up, not the join
        admin.config_set("maxmemory", 0)
        assert admin.xlen(STREAM) == 0
        assert s.stats.written == 0
    finally:
        admin.close()


@pytest.mark.parametrize(("batch_max", "count"), [(200, 3), (2, 5)])
def test_stop_with_redis_down_returns_false(batch_max: int, count: int, caplog: pytest.LogCaptureFixture) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    s = Sink(factory(url), 1000, 100, buffer_max=100, batch_max=batch_max, retry_max=0.05)
    s.start()
    for seq in range(count):
        s.put(STREAM, tick(seq), us(BASE_MS))
    wait_until(lambda: s.stats.write_errors >= 1, "a failed write")
    with caplog.at_level(logging.ERROR, logger="worker.sink"):
        assert s.stop(0.3) is False
    assert s.stats.written == 0
    assert s.stats.redis_ok is False
    assert f"shutdown: {count} ticks could not be written" in caplog.messages


def test_a_long_outage_does_not_kill_the_writer() -> None:
    # Over 1024 consecutive failures: an uncapped 0.05 * 2**failures backoff overflows a float.
    port = free_port()
    s = Sink(factory(f"redis://127.0.0.1:{port}/0"), 1000, 100, buffer_max=100, retry_max=0.0001)
    s.put(STREAM, tick(0), us(BASE_MS))
    s.start()
    wait_until(lambda: s.stats.write_errors > 1100, "over 1100 failed writes", timeout=30)
    with LocalRedis(port=port) as server:
        wait_until(lambda: s.stats.written == 1, "the tick written after the outage")
        assert s.stop(5.0) is True
        client = fast_client(server.url)
        try:
            assert seqs(client, STREAM) == [0]
            assert [e["type"] for e in events(client)] == ["redis_recovered"]
        finally:
            client.close()


# ---------------------------------------------------------------------------------------------- producers


def test_concurrent_producers_lose_nothing_and_keep_their_order(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    producers, per_producer = 4, 300
    s = Sink(factory(redis_server.url), 10_000, 100, buffer_max=10_000, batch_max=50)
    s.start()
    go = threading.Barrier(producers)

    def produce(p: int) -> None:
        go.wait()
        for seq in range(per_producer):
            s.put(STREAM if p % 2 else OTHER, tick(seq, producer=p), time.time_ns() // 1000)

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert s.stop(10.0) is True
    assert s.stats.written == producers * per_producer
    assert s.stats.dropped == 0
    for stream, mine in ((OTHER, (0, 2)), (STREAM, (1, 3))):
        got = entries(redis_client, stream)
        assert len(got) == 2 * per_producer
        ids = [id_key(i) for i, _ in got]
        assert len(set(ids)) == len(ids)
        for p in mine:
            assert [int(f["seq"]) for _, f in got if f["producer"] == str(p)] == list(range(per_producer))
