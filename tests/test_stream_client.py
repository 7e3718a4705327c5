"""worker.client.WebSocketDataStream: subscribe through the real worker, follow its streams, deliver ticks.

The worker (against the simulator) answers the subscribe and unsubscribe commands and writes the
ticks. Where a test needs to know exactly what is in a stream, it stops the worker first and then
writes entries itself, so that nothing else writes to that stream.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import pytest
import redis

from tests.workerkit import wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.client import (
    ClientError,
    CommandRejected,
    NoWorkerError,
    RedisUnavailableError,
    WebSocketDataStream,
    get_latest_ticks,
    send_command,
)
from worker.localredis import LocalRedis, free_port
from worker.schema import Tick, parse_entry
from worker.simulator import SimulatorThread

SBIN, INFY, RELIANCE = ("SBIN-EQ", "NSE"), ("INFY-EQ", "NSE"), ("RELIANCE-EQ", "NSE")
TS_MS = 1_735_201_464_000


def key_of(symbol: tuple[str, str]) -> str:
    return f"{symbol[1]}:{symbol[0]}"


class Recorder:
    """An on_tick_callback that keeps what it got (thread-safe); ``fail`` may make it raise."""

    def __init__(self, fail: Callable[[Tick], bool] = lambda tick: False) -> None:
        self.lock = threading.Lock()
        self.ticks: list[Tick] = []
        self.raised = 0
        self.fail = fail
        self.gate = threading.Event()  # cleared: the next callback waits (the reader falls behind)
        self.gate.set()
        self.waiting = threading.Event()

    def __call__(self, tick: Tick) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            assert self.gate.wait(10)
        with self.lock:
            self.ticks.append(tick)
            if self.fail(tick):
                self.raised += 1
                raise ValueError(f"the callback fails on {tick.id}")

    def of(self, symbol: tuple[str, str]) -> list[Tick]:
        with self.lock:
            return [t for t in self.ticks if t.key == key_of(symbol)]


@contextmanager
def running_worker(sim: SimulatorThread, url: str, client: redis.Redis) -> Iterator[WorkerThread]:
    with WorkerThread(worker_settings(sim, url)) as worker:
        wait_for(lambda: client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker to listen for commands")
        yield worker
    assert worker.error is None


@pytest.fixture
def streams() -> Iterator[Callable[..., WebSocketDataStream]]:
    """Makes WebSocketDataStreams, and disconnects every one at the end."""
    made: list[WebSocketDataStream] = []

    def make(*args: Any, **kwargs: Any) -> WebSocketDataStream:
        kwargs.setdefault("block_ms", 50)
        stream = WebSocketDataStream(*args, **kwargs)
        made.append(stream)
        return stream

    yield make
    for stream in made:
        stream.disconnect()


def id_order(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n)


def last_id(client: redis.Redis, symbol: tuple[str, str]) -> str:
    newest = cast(list[tuple[bytes, Any]], client.xrevrange(keys.ticks(symbol[1], symbol[0]), count=1))
    return newest[0][0].decode() if newest else "0-0"


def stream_ticks(client: redis.Redis, symbol: tuple[str, str]) -> list[Tick]:
    entries = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(keys.ticks(symbol[1], symbol[0])))
    return [parse_entry(i, f) for i, f in entries]


def add_ticks(client: redis.Redis, symbol: tuple[str, str], n: int) -> list[str]:
    """``n`` LTP entries written here (no worker may be writing to this stream); their ids."""
    ids = []
    for seq in range(n):
        fields = {
            "v": "1", "token": "1", "exchange": symbol[1], "symbol": symbol[0], "mode": "ltp", "seq": seq,
            "exch_ts": TS_MS + seq, "ltp": f"{800 + seq}.05", "recv_ts": seq,
        }  # fmt: skip
        ids.append(cast(bytes, client.xadd(keys.ticks(symbol[1], symbol[0]), fields)).decode())  # type: ignore[arg-type]
    return ids


def caught_up(rec: Recorder, client: redis.Redis, symbol: tuple[str, str]) -> Callable[[], bool]:
    """True once the callback got the stream's newest entry."""
    return lambda: bool(rec.of(symbol)) and rec.of(symbol)[-1].id == last_id(client, symbol)


def assert_exactly_the_new_ticks(
    client: redis.Redis, symbol: tuple[str, str], got: list[Tick], before: str, after: str
) -> None:
    """``got`` is every entry of the stream from its first one on, once each, in order, field by field;
    and the first is new: written after ``before`` (the newest id just before subscribe was called),
    right after an entry that was there by ``after`` (the newest id when subscribe returned)."""
    everything = stream_ticks(client, symbol)
    first = [t.id for t in everything].index(got[0].id)
    assert got == everything[first:]
    assert id_order(got[0].id) > id_order(before), "a tick from before subscribe was delivered"
    assert first == 0 or id_order(everything[first - 1].id) <= id_order(after), "a new tick was skipped"


# --------------------------------------------------------------------------- delivery


def test_the_callback_gets_every_new_tick_once_in_stream_order_across_symbols(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    rec = Recorder()
    symbols = (SBIN, INFY, RELIANCE)
    with running_worker(sim, redis_server.url, redis_client):
        send_command(redis_client, "subscribe", [key_of(SBIN)])
        wait_for(lambda: redis_client.xlen(keys.ticks("NSE", "SBIN-EQ")) >= 3, what="old SBIN ticks")
        stream = streams(redis_server.url, rec).connect()
        before = {s: last_id(redis_client, s) for s in symbols}
        answer = stream.subscribe([SBIN, INFY])
        assert answer["type"] == "command_accepted"
        stream.subscribe([RELIANCE], mode="quote")
        after = {s: last_id(redis_client, s) for s in symbols}
        assert stream.subscriptions == {"NSE:SBIN-EQ", "NSE:INFY-EQ", "NSE:RELIANCE-EQ"}
        wait_for(lambda: all(len(rec.of(s)) >= 10 for s in symbols), what="10 ticks of each")
        # Subscribing a followed symbol again keeps its place: with the reader behind, nothing is skipped.
        rec.gate.clear()
        assert rec.waiting.wait(10)
        behind = redis_client.xlen(keys.ticks("NSE", "SBIN-EQ"))
        stream.subscribe([SBIN], mode="quote")
        wait_for(lambda: redis_client.xlen(keys.ticks("NSE", "SBIN-EQ")) >= behind + 5, what="ticks meanwhile")
        rec.gate.set()
        n = len(rec.of(SBIN))
        wait_for(lambda: len(rec.of(SBIN)) >= n + 10, what="more SBIN ticks")
    for s in symbols:  # the worker has stopped: the streams no longer grow
        wait_for(caught_up(rec, redis_client, s), what=f"every {key_of(s)} tick")
        assert_exactly_the_new_ticks(redis_client, s, rec.of(s), before[s], after[s])
    assert {t.mode for t in rec.of(RELIANCE)} == {"quote"}
    assert stream.delivered == len(rec.ticks)
    assert (stream.callback_errors, stream.bad_entries, stream.redis_errors) == (0, 0, 0)


def test_unsubscribe_stops_the_callbacks_of_that_symbol(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    rec = Recorder()
    with running_worker(sim, redis_server.url, redis_client):
        stream = streams(redis_server.url, rec).connect()
        stream.subscribe([SBIN, INFY])
        wait_for(lambda: len(rec.of(SBIN)) >= 3 and len(rec.of(INFY)) >= 3, what="ticks of both")
        answer = stream.unsubscribe([("infy-eq", "nse")])  # any case, as the worker accepts it
        cut = last_id(redis_client, INFY)
        assert (answer["action"], answer["symbols"]) == ("unsubscribe", '["NSE:INFY-EQ"]')
        assert stream.subscriptions == {"NSE:SBIN-EQ"}
        assert redis_client.hkeys(keys.SUBSCRIPTIONS) == [b"NSE:SBIN-EQ"]
    [marker] = add_ticks(redis_client, INFY, 1)
    add_ticks(redis_client, SBIN, 3)
    wait_for(caught_up(rec, redis_client, SBIN), what="the SBIN ticks written after the INFY one")
    assert all(id_order(t.id) <= id_order(cut) for t in rec.of(INFY)), "an INFY tick written after unsubscribe"
    assert marker not in [t.id for t in rec.of(INFY)]


def test_a_callback_that_unsubscribes_stops_the_rest_of_the_batch(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    got: list[Tick] = []

    def callback(tick: Tick) -> None:
        got.append(tick)
        if tick.symbol == "INFY-EQ":
            stream.unsubscribe([INFY])  # stops delivery at once, then tells the worker (gone: raises)

    stream = streams(redis_server.url, callback)
    with running_worker(sim, redis_server.url, redis_client):
        stream.subscribe([SBIN, INFY])
    add_ticks(redis_client, INFY, 5)  # with the worker's, all there before the reader's first read
    stream.connect()
    wait_for(lambda: stream.delivered >= 1 and stream.callback_errors == 1, what="the INFY callback to fail")
    add_ticks(redis_client, SBIN, 1)  # read after that callback returned
    wait_for(lambda: got and got[-1].id == last_id(redis_client, SBIN), what="the last SBIN tick")
    assert len([t for t in got if t.symbol == "INFY-EQ"]) == 1
    assert stream.subscriptions == {"NSE:SBIN-EQ"}


def test_the_callback_may_disconnect(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    got: list[Tick] = []

    def callback(tick: Tick) -> None:
        got.append(tick)
        stream.disconnect()  # on the reader thread: it stops after this callback, it cannot join itself

    stream = streams(redis_server.url, callback)
    with running_worker(sim, redis_server.url, redis_client):
        stream.subscribe([SBIN])
    add_ticks(redis_client, SBIN, 5)  # with the worker's, all there before the reader's first read
    stream.connect()
    wait_for(lambda: stream.delivered == 1, what="the first callback to return")
    wait_for(lambda: "angelstream-stream" not in [t.name for t in threading.enumerate()], what="the reader to end")
    assert len(got) == 1
    assert not stream.connected
    assert stream.callback_errors == 0


def test_a_raising_callback_does_not_stop_delivery(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any, caplog: Any
) -> None:
    rec = Recorder(fail=lambda tick: tick.seq % 2 == 0)
    caplog.set_level(logging.ERROR, logger="worker.client")
    with running_worker(sim, redis_server.url, redis_client):
        stream = streams(redis_server.url, rec).connect()
        before = last_id(redis_client, SBIN)
        stream.subscribe([SBIN])
        after = last_id(redis_client, SBIN)
        wait_for(lambda: rec.raised >= 3 and len(rec.of(SBIN)) - rec.raised >= 3, what="failing and passing calls")
    wait_for(caught_up(rec, redis_client, SBIN), what="every SBIN tick")
    assert_exactly_the_new_ticks(redis_client, SBIN, rec.of(SBIN), before, after)
    wait_for(lambda: stream.delivered == len(rec.ticks), what="the last callback to return")
    assert stream.callback_errors == rec.raised
    assert sum("on_tick_callback raised for NSE:SBIN-EQ" in r.getMessage() for r in caplog.records) == rec.raised


def test_an_entry_that_is_not_a_tick_is_skipped_and_counted(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    rec = Recorder()
    with running_worker(sim, redis_server.url, redis_client):
        stream = streams(redis_server.url, rec).connect()
        stream.subscribe([SBIN])
    wait_for(caught_up(rec, redis_client, SBIN), what="the worker's ticks")
    bad_price = {**stream_fields(redis_client, SBIN), "ltp": "not a number"}
    bad_levels = {**bad_price, "ltp": "1.00", "bids": "5"}
    redis_client.xadd(keys.ticks("NSE", "SBIN-EQ"), {"junk": "1"})
    redis_client.xadd(keys.ticks("NSE", "SBIN-EQ"), bad_price)  # type: ignore[arg-type]
    redis_client.xadd(keys.ticks("NSE", "SBIN-EQ"), bad_levels)  # type: ignore[arg-type]
    [good] = add_ticks(redis_client, SBIN, 1)
    wait_for(lambda: rec.of(SBIN)[-1].id == good, what="the good tick after the junk")
    assert stream.bad_entries == 3
    assert stream.callback_errors == 0


def stream_fields(client: redis.Redis, symbol: tuple[str, str]) -> dict[str, str]:
    newest = cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(keys.ticks(symbol[1], symbol[0]), count=1))
    return {k.decode(): v.decode() for k, v in newest[0][1].items()}


def test_resumes_after_a_redis_restart_without_loss_or_repeats(sim: SimulatorThread, streams: Any) -> None:
    rec = Recorder()
    with LocalRedis("--appendonly", "yes") as server:
        client = redis.Redis.from_url(server.url)
        try:
            with running_worker(sim, server.url, client):
                stream = streams(server.url, rec).connect()
                before = last_id(client, SBIN)
                stream.subscribe([SBIN])
                after = last_id(client, SBIN)
                wait_for(lambda: len(rec.of(SBIN)) >= 3, what="ticks before the restart")
            wait_for(caught_up(rec, client, SBIN), what="every tick of the worker")
            add_ticks(client, SBIN, 3)
            wait_for(caught_up(rec, client, SBIN), what="the ticks written before the restart")
            stream.retry_initial = 0.3  # the reader is still waiting when the new ticks are written
            server.stop()
            wait_for(lambda: stream.redis_errors >= 1, what="the reader to notice")
            server.start()
            written_while_away = add_ticks(client, SBIN, 5)
            wait_for(caught_up(rec, client, SBIN), what="the ticks written after the restart")
            assert [t.id for t in rec.of(SBIN)][-5:] == written_while_away
            assert_exactly_the_new_ticks(client, SBIN, rec.of(SBIN), before, after)
            add_ticks(client, SBIN, 2)  # and it goes on
            wait_for(caught_up(rec, client, SBIN), what="the ticks written later")
            assert_exactly_the_new_ticks(client, SBIN, rec.of(SBIN), before, after)
        finally:
            client.close()


# --------------------------------------------------------------------------- from many threads


def test_subscribe_and_read_from_many_threads_at_once(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    rec = Recorder()
    symbols = [(s, "NSE") for s in ("SBIN-EQ", "RELIANCE-EQ", "INFY-EQ", "TCS-EQ", "HDFCBANK-EQ", "ITC-EQ", "LT-EQ")]
    stream = streams(redis_server.url, rec)
    barrier = threading.Barrier(len(symbols))
    errors: list[BaseException] = []

    def work(symbol: tuple[str, str]) -> None:
        try:
            barrier.wait(5)
            stream.connect()
            stream.subscribe([symbol], mode="quote")
            for _ in range(5):
                stream.get_latest_ticks(*symbol, count=3)
                assert key_of(symbol) in stream.subscriptions
        except BaseException as exc:  # reported below
            errors.append(exc)

    with running_worker(sim, redis_server.url, redis_client):
        threads = [threading.Thread(target=work, args=(s,)) for s in symbols]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert stream.subscriptions == {key_of(s) for s in symbols}
        assert set(redis_client.hgetall(keys.SUBSCRIPTIONS).items()) == {
            (key_of(s).encode(), b"quote") for s in symbols
        }
        assert [t.name for t in threading.enumerate()].count("angelstream-stream") == 1
        wait_for(lambda: all(rec.of(s) for s in symbols), what="ticks of every symbol")


# --------------------------------------------------------------------------- subscribe and unsubscribe


def test_subscribe_names_symbols_as_the_master_does(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    rec = Recorder()
    with running_worker(sim, redis_server.url, redis_client):
        send_command(redis_client, "subscribe", [key_of(SBIN)])
        wait_for(lambda: redis_client.xlen(keys.ticks("NSE", "SBIN-EQ")) >= 3, what="old SBIN ticks")
        stream = streams(redis_server.url, rec).connect()
        before = {s: last_id(redis_client, s) for s in (SBIN, INFY)}
        stream.subscribe([("sbin-eq", "nse"), ("INFY-EQ", "NSE")])
        after = {s: last_id(redis_client, s) for s in (SBIN, INFY)}
        assert stream.subscriptions == {"NSE:SBIN-EQ", "NSE:INFY-EQ"}
        wait_for(lambda: rec.of(SBIN) and rec.of(INFY), what="ticks of both")
    for s in (SBIN, INFY):
        wait_for(caught_up(rec, redis_client, s), what=f"every {key_of(s)} tick")
        assert_exactly_the_new_ticks(redis_client, s, rec.of(s), before[s], after[s])


def test_a_refused_subscribe_raises_and_follows_nothing(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    stream = streams(redis_server.url)
    with running_worker(sim, redis_server.url, redis_client):
        with pytest.raises(CommandRejected, match="NSE:NOSUCH-EQ"):
            stream.subscribe([SBIN, ("NOSUCH-EQ", "NSE")])
        assert stream.subscriptions == frozenset()
        with pytest.raises(CommandRejected, match="unknown mode"):
            stream.subscribe([SBIN], mode="depth")
        with pytest.raises(CommandRejected, match="not in the instrument master: NSE:NOSUCH-EQ"):
            stream.unsubscribe([("NOSUCH-EQ", "NSE")])
    with pytest.raises(NoWorkerError, match="no worker is listening"):
        stream.subscribe([SBIN])
    assert stream.subscriptions == frozenset()


def test_without_a_callback_ticks_are_only_counted(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    stream = streams(client=redis_client, mode="snap_quote").connect()
    with running_worker(sim, redis_server.url, redis_client):
        stream.subscribe([SBIN])
        assert redis_client.hget(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ") == b"snap_quote"
        wait_for(lambda: stream.delivered >= 3, what="three ticks")
    assert stream.callback_errors == 0


# --------------------------------------------------------------------------- reading, life


def test_get_latest_ticks_newest_first(redis_client: redis.Redis, streams: Any) -> None:
    ids = add_ticks(redis_client, SBIN, 5)
    stream = streams(client=redis_client)
    latest = stream.get_latest_ticks("SBIN-EQ", "NSE", count=3)
    assert [t.id for t in latest] == ids[:-4:-1]
    assert latest == get_latest_ticks("SBIN-EQ", "NSE", 3, client=redis_client)
    assert len(stream.get_latest_ticks("SBIN-EQ", "NSE")) == 5
    assert stream.get_latest_ticks("INFY-EQ", "NSE") == []


def connections(client: redis.Redis) -> int:
    return len(client.client_list())


def test_connect_once_disconnect_joins_and_closes_and_connect_again(
    sim: SimulatorThread, redis_server: LocalRedis, redis_client: redis.Redis, streams: Any
) -> None:
    rec = Recorder()
    baseline = connections(redis_client)
    with streams(redis_server.url, rec) as stream:
        assert stream.connected
        assert stream.connect() is stream  # already running: no second reader
        [reader] = [t for t in threading.enumerate() if t.name == "angelstream-stream"]
        with running_worker(sim, redis_server.url, redis_client):
            stream.subscribe([SBIN])
            wait_for(lambda: rec.of(SBIN), what="a tick")
    assert not reader.is_alive()
    assert not stream.connected
    wait_for(lambda: connections(redis_client) == baseline, what="its connections to close")

    delivered = len(rec.of(SBIN))
    [after_break] = add_ticks(redis_client, SBIN, 1)  # written while disconnected: delivered on reconnect
    stream.connect()
    wait_for(lambda: rec.of(SBIN)[-1].id == after_break, what="the tick written while disconnected")
    assert len(rec.of(SBIN)) == delivered + 1
    stream.disconnect()
    stream.disconnect()  # twice is harmless
    assert not stream.connected


def test_a_given_client_is_borrowed_not_closed(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    mine = redis.Redis.from_url(redis_server.url)
    try:
        stream = WebSocketDataStream(client=mine, block_ms=20).connect()
        stream.disconnect()
        assert mine.ping() is True
        never_connected = WebSocketDataStream(client=mine)
        never_connected.disconnect()
        assert mine.ping() is True
    finally:
        mine.close()


def test_an_unreachable_redis_is_a_clear_error_and_starts_nothing(streams: Any) -> None:
    stream = streams(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisUnavailableError, match=r"^cannot reach Redis \(.*\): is it running"):
        stream.connect()
    assert not stream.connected
    assert "angelstream-stream" not in [t.name for t in threading.enumerate()]


def test_bad_arguments(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="block_ms must be positive, got 0"):
        WebSocketDataStream("redis://127.0.0.1:6379/0", block_ms=0)
    with pytest.raises(ClientError, match="REDIS_URL is invalid"):
        WebSocketDataStream("http://127.0.0.1:6379/0")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", "ftp://nowhere")  # the default is REDIS_URL
    with pytest.raises(ClientError, match="REDIS_URL is invalid"):
        WebSocketDataStream()
