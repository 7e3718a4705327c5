"""worker.client: get_latest_ticks, send_command (against the real worker), search_instruments, open_redis."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.workerkit import events, wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.client import (
    ClientError,
    CommandRejected,
    CommandTimeoutError,
    NotIndexedError,
    NoWorkerError,
    RedisCommandError,
    RedisUnavailableError,
    get_latest_ticks,
    open_redis,
    search_instruments,
    send_command,
)
from worker.instruments import InstrumentIndex, bundled_master_path, generate_master, load_master_file
from worker.localredis import LocalRedis, free_port
from worker.normalize import Normalizer, decode_fields
from worker.protocol import LtpPacket, SnapQuotePacket
from worker.schema import Tick
from worker.simulator import SimConfig, SimulatorThread

TS_MS = 1_735_201_464_000
BUNDLED = load_master_file(bundled_master_path())
INDEX = InstrumentIndex(BUNDLED)


def add_ticks(conn: redis.Redis, exchange: str, symbol: str, n: int, first_paise: int = 80_000) -> list[str]:
    """``n`` LTP entries with seq 0..n-1 and ltp first_paise + seq; their ids, oldest first."""
    ids = []
    for seq in range(n):
        entry_id = conn.xadd(
            keys.ticks(exchange, symbol),
            {
                "v": "1", "token": "3045", "exchange": exchange, "symbol": symbol, "mode": "ltp", "seq": seq,
                "exch_ts": TS_MS + seq, "ltp": f"{Decimal(first_paise + seq) / 100:.2f}", "recv_ts": seq * 1000,
            },
        )  # fmt: skip
        assert isinstance(entry_id, bytes)
        ids.append(entry_id.decode())
    return ids


class SpyRedis(redis.Redis):
    """Counts close() calls, to tell whether get_latest_ticks closed a connection.

    Every instance is kept alive in ``made``, so that ``__del__`` (which closes too) does not count.
    """

    closed: ClassVar[int] = 0
    made: ClassVar[list[SpyRedis]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        SpyRedis.made.append(self)

    def close(self) -> None:
        SpyRedis.closed += 1
        super().close()


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[SpyRedis]]:
    monkeypatch.setattr(SpyRedis, "closed", 0)
    monkeypatch.setattr(SpyRedis, "made", [])
    monkeypatch.setattr(redis, "Redis", SpyRedis)
    yield SpyRedis
    for conn in SpyRedis.made:
        conn.close()


def test_newest_first_and_typed(redis_client: redis.Redis) -> None:
    ids = add_ticks(redis_client, "NSE", "SBIN-EQ", 5)
    add_ticks(redis_client, "NSE", "RELIANCE-EQ", 3, first_paise=250_000)  # another stream: not mixed in
    ticks = get_latest_ticks("SBIN-EQ", "NSE", count=3, client=redis_client)
    assert [t.id for t in ticks] == ids[:-4:-1]
    assert [t.seq for t in ticks] == [4, 3, 2]
    assert all(isinstance(t, Tick) for t in ticks)
    assert ticks[0].ltp == Decimal(80_004) / 100
    assert isinstance(ticks[0].ltp, Decimal)
    assert ticks[0].key == "NSE:SBIN-EQ"
    assert ticks[0].exch_ts == TS_MS + 4
    assert ticks[0].recv_ts == 4000
    assert ticks[0].volume is None


def test_default_count_is_ten_and_a_short_stream_gives_all(redis_client: redis.Redis) -> None:
    add_ticks(redis_client, "NSE", "SBIN-EQ", 12)
    assert [t.seq for t in get_latest_ticks("SBIN-EQ", "NSE", client=redis_client)] == list(range(11, 1, -1))
    assert len(get_latest_ticks("SBIN-EQ", "NSE", count=100, client=redis_client)) == 12
    assert [t.seq for t in get_latest_ticks("SBIN-EQ", "NSE", count=1, client=redis_client)] == [11]


def test_empty_or_missing_stream_gives_an_empty_list(redis_client: redis.Redis) -> None:
    assert get_latest_ticks("SBIN-EQ", "NSE", client=redis_client) == []
    add_ticks(redis_client, "NSE", "SBIN-EQ", 1)
    redis_client.xtrim(keys.ticks("NSE", "SBIN-EQ"), maxlen=0, approximate=False)
    assert redis_client.exists(keys.ticks("NSE", "SBIN-EQ")) == 1  # the stream exists, empty
    assert get_latest_ticks("SBIN-EQ", "NSE", client=redis_client) == []


@pytest.mark.parametrize("count", [0, -1])
def test_count_must_be_positive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, count: int) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens: proves no connection is tried
    with pytest.raises(ValueError, match=f"count must be positive, got {count}"):
        get_latest_ticks("SBIN-EQ", "NSE", count=count)


def test_symbol_and_exchange_select_the_stream(redis_client: redis.Redis) -> None:
    add_ticks(redis_client, "BSE", "SBIN", 2, first_paise=80_100)
    assert get_latest_ticks("SBIN", "NSE", client=redis_client) == []
    assert [t.exchange for t in get_latest_ticks("SBIN", "BSE", client=redis_client)] == ["BSE", "BSE"]


def test_a_client_decoding_responses_works_too(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    add_ticks(redis_client, "NSE", "SBIN-EQ", 2)
    as_bytes = get_latest_ticks("SBIN-EQ", "NSE", client=redis_client)
    text_client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert get_latest_ticks("SBIN-EQ", "NSE", client=text_client) == as_bytes
    finally:
        text_client.close()


def test_without_a_client_it_reads_redis_url_and_closes_its_connection(
    redis_server: LocalRedis,
    redis_client: redis.Redis,
    spy: type[SpyRedis],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(tmp_path)  # no .env
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    ids = add_ticks(redis_client, "NSE", "SBIN-EQ", 3)
    ticks = get_latest_ticks("SBIN-EQ", "NSE", count=2)
    assert [t.id for t in ticks] == [ids[2], ids[1]]
    assert len(spy.made) == 1
    assert spy.made[0].get_connection_kwargs()["port"] == redis_server.port
    assert spy.closed == 1


def test_without_a_client_redis_url_may_come_from_dotenv(
    redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.delenv("redis_url", raising=False)
    (tmp_path / ".env").write_text(f"REDIS_URL={redis_server.url}\n", encoding="utf-8")
    add_ticks(redis_client, "NSE", "SBIN-EQ", 1)
    assert [t.seq for t in get_latest_ticks("SBIN-EQ", "NSE")] == [0]


def test_a_given_client_is_left_open(redis_server: LocalRedis, redis_client: redis.Redis, spy: type[SpyRedis]) -> None:
    add_ticks(redis_client, "NSE", "SBIN-EQ", 1)
    mine = SpyRedis.from_url(redis_server.url)
    try:
        assert len(get_latest_ticks("SBIN-EQ", "NSE", client=mine)) == 1
        assert spy.closed == 0
    finally:
        mine.close()


def test_a_failing_read_still_closes_the_connection(
    spy: type[SpyRedis], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    with pytest.raises(redis.ConnectionError):
        get_latest_ticks("SBIN-EQ", "NSE")
    assert spy.closed == 1


def test_reads_what_the_normalizer_writes(redis_client: redis.Redis) -> None:
    usdinr = next(i for i in load_master_file(bundled_master_path()) if i.symbol == "USDINR29DEC26FUT")
    n = Normalizer()
    n.add(usdinr)
    written: list[Any] = []
    for seq, units in enumerate((835_012_500, 835_025_000)):
        out = n.entry(LtpPacket(1, usdinr.exchange_type, usdinr.token, seq, TS_MS, units), 1)
        assert out is not None
        stream, fields = out
        flat = decode_fields(fields)
        written.append(redis_client.xadd(stream, dict(zip(flat[::2], flat[1::2], strict=True))))
    levels = ((10, 835_000_000, 1),) * 5
    snap = SnapQuotePacket(
        3, usdinr.exchange_type, usdinr.token, 2, TS_MS, 835_030_000, 1, 1, 1, 1.5, 2.5, 1, 1, 1, 1,
        1_735_201_463, 7, 0.25, levels, levels, 1, 1, 1, 1,
    )  # fmt: skip
    out = n.entry(snap, 2)
    assert out is not None
    flat = decode_fields(out[1])
    redis_client.xadd(out[0], dict(zip(flat[::2], flat[1::2], strict=True)))
    latest = get_latest_ticks("USDINR29DEC26FUT", "CDS", count=5, client=redis_client)
    assert [t.mode for t in latest] == ["snap_quote", "ltp", "ltp"]
    assert [t.ltp for t in latest] == [Decimal(u) / 10**7 for u in (835_030_000, 835_025_000, 835_012_500)]
    assert latest[0].bids == ((Decimal("83.5"), 10, 1),) * 5
    assert latest[0].ltt == 1_735_201_463_000
    assert latest[0].oi_change_pct == Decimal("0.25")


def test_a_failing_read_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(RedisUnavailableError, match=r"^cannot reach Redis \(.*\): is it running") as info:
        get_latest_ticks("SBIN-EQ", "NSE")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ClientError)


def test_a_key_of_the_wrong_type_is_a_one_line_client_error(redis_client: redis.Redis) -> None:
    redis_client.set(keys.ticks("NSE", "SBIN-EQ"), "not a stream")
    with pytest.raises(RedisCommandError, match=r"^Redis refused the request: WRONGTYPE"):
        get_latest_ticks("SBIN-EQ", "NSE", client=redis_client)


# --------------------------------------------------------------------------- open_redis


def test_open_redis_gives_a_client_that_answered(redis_server: LocalRedis) -> None:
    with open_redis(redis_server.url) as conn:
        assert conn.ping() is True
        assert conn.get_connection_kwargs()["port"] == redis_server.port


def test_open_redis_reads_redis_url(redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    with open_redis() as conn:
        assert conn.get_connection_kwargs()["port"] == redis_server.port


def test_open_redis_closes_the_client_when_redis_is_unreachable(spy: type[SpyRedis]) -> None:
    with pytest.raises(RedisUnavailableError, match="cannot reach Redis"):
        open_redis(f"redis://127.0.0.1:{free_port()}/0")
    assert len(spy.made) == 1
    assert spy.closed == 1


def test_open_redis_rejects_a_url_that_is_not_redis() -> None:
    with pytest.raises(ClientError, match=r"^REDIS_URL is invalid: .*redis://"):
        open_redis("http://127.0.0.1:6379")


# --------------------------------------------------------------------------- send_command


def unreachable() -> redis.Redis:
    """A client of a port nothing listens on, that gives up at once."""
    return redis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))


@contextmanager
def real_worker(redis_server: LocalRedis, client: redis.Redis) -> Iterator[WorkerThread]:
    """The real worker against the simulator, listening for commands."""
    with (
        SimulatorThread(SimConfig(rate_per_token=50.0)) as sim,
        WorkerThread(worker_settings(sim, redis_server.url)) as worker,
    ):
        wait_for(lambda: client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker to listen for commands")
        yield worker
    assert worker.error is None


@contextmanager
def listener(url: str, answer: Callable[[dict[str, Any]], list[dict[str, str]]]) -> Iterator[list[dict[str, Any]]]:
    """A stand-in on the control channel: records each command and XADDs ``answer(command)`` to the events."""
    conn = redis.Redis.from_url(url)
    pubsub = conn.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.CONTROL)
    wait_for(lambda: conn.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the listener to subscribe")
    received: list[dict[str, Any]] = []
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.02)
            if message is not None:
                command = json.loads(message["data"])
                received.append(command)
                for event in answer(command):
                    conn.xadd(keys.EVENTS, event)  # type: ignore[arg-type]

    thread = threading.Thread(target=run)
    thread.start()
    try:
        yield received
    finally:
        stop.set()
        thread.join()
        pubsub.close()
        conn.close()


def test_send_command_returns_the_workers_acceptance(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    with real_worker(redis_server, redis_client):
        answer = send_command(redis_client, "subscribe", ["NSE:SBIN-EQ", "nse:infy-eq"], mode="quote")
        assert answer["type"] == "command_accepted"
        assert uuid.UUID(answer["request_id"]).version == 4
        assert (answer["action"], answer["mode"]) == ("subscribe", "quote")
        assert json.loads(answer["symbols"]) == ["NSE:SBIN-EQ", "NSE:INFY-EQ"]
        sbin, infy = INDEX.by_key["NSE:SBIN-EQ"], INDEX.by_key["NSE:INFY-EQ"]
        assert json.loads(answer["tokens"]) == {"NSE:SBIN-EQ": sbin.token, "NSE:INFY-EQ": infy.token}
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"quote", b"NSE:INFY-EQ": b"quote"}
        # the answer is the worker's own event, and it is the only one for this request
        assert [e for e in events(redis_client) if e.get("request_id") == answer["request_id"]] == [answer]
        wait_for(lambda: redis_client.xlen(keys.ticks("NSE", "INFY-EQ")) > 0, what="INFY ticks")

        again = send_command(redis_client, "unsubscribe", ["NSE:INFY-EQ"])
        assert again["request_id"] != answer["request_id"]
        assert (again["type"], again["action"], json.loads(again["symbols"])) == (
            "command_accepted", "unsubscribe", ["NSE:INFY-EQ"],
        )  # fmt: skip
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"quote"}


def test_send_command_raises_the_workers_refusal(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    with real_worker(redis_server, redis_client):
        with pytest.raises(CommandRejected, match=r"not in the instrument master: NSE:NOSUCH-EQ") as info:
            send_command(redis_client, "subscribe", ["NSE:SBIN-EQ", "NSE:NOSUCH-EQ"])
        [error] = events(redis_client, "command_error")
        assert error["request_id"] == info.value.request_id
        assert str(info.value) == error["error"]
        assert redis_client.hlen(keys.SUBSCRIPTIONS) == 0  # a refused command changes nothing
        with pytest.raises(CommandRejected, match="unknown mode 'fast'"):
            send_command(redis_client, "subscribe", ["NSE:SBIN-EQ"], mode="fast")


def test_send_command_without_a_worker_fails_at_once(redis_client: redis.Redis) -> None:
    with pytest.raises(NoWorkerError) as info:
        send_command(redis_client, "subscribe", ["NSE:SBIN-EQ"], timeout=60)
    assert type(info.value) is NoWorkerError
    assert str(info.value) == "no worker is listening on angelstream:control: start `angelstream run`"


def test_send_command_times_out_when_nobody_answers(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    with listener(redis_server.url, lambda command: []) as received:
        with pytest.raises(CommandTimeoutError, match=r"no answer from the worker within 0.3 s \(request ") as info:
            send_command(redis_client, "subscribe", ["NSE:SBIN-EQ", "NSE:INFY-EQ"], mode="snap_quote", timeout=0.3)
        assert isinstance(info.value, NoWorkerError)
        wait_for(lambda: received, what="the command to reach the listener")
    [command] = received
    assert set(command) == {"action", "symbols", "mode", "request_id"}
    assert (command["action"], command["symbols"], command["mode"]) == (
        "subscribe", ["NSE:SBIN-EQ", "NSE:INFY-EQ"], "snap_quote",
    )  # fmt: skip
    assert uuid.UUID(command["request_id"]).version == 4
    assert command["request_id"] in str(info.value)


def test_send_command_counts_only_its_own_answer_written_after_it(
    redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    rid = uuid.UUID("8f4c1a52-7a3e-4a7c-9d3e-0c2b5b6d1e77")
    monkeypatch.setattr(uuid, "uuid4", lambda: rid)
    # an old answer with the same request_id: written before the command, so not its answer
    redis_client.xadd(keys.EVENTS, {"type": "command_error", "request_id": str(rid), "error": "stale"})

    def answer(command: dict[str, Any]) -> list[dict[str, str]]:
        return [
            {"type": "command_error", "request_id": "someone-else", "error": "not yours"},
            {"type": "feed_connected", "request_id": command["request_id"]},  # not an answer type
            {"type": "command_accepted", "request_id": command["request_id"], "symbols": "[]", "tokens": "{}"},
        ]

    text_client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        with listener(redis_server.url, answer):
            got = send_command(text_client, "subscribe", ["NSE:SBIN-EQ"])
    finally:
        text_client.close()
    assert got["type"] == "command_accepted"
    assert got["request_id"] == str(rid)


def test_send_command_reports_an_unreachable_redis() -> None:
    conn = unreachable()
    try:
        with pytest.raises(RedisUnavailableError, match="cannot reach Redis"):
            send_command(conn, "subscribe", ["NSE:SBIN-EQ"])
    finally:
        conn.close()


def test_send_command_reports_a_refusing_redis(redis_client: redis.Redis) -> None:
    redis_client.set(keys.EVENTS, "not a stream")
    with pytest.raises(RedisCommandError, match="WRONGTYPE"):
        send_command(redis_client, "subscribe", ["NSE:SBIN-EQ"])


# --------------------------------------------------------------------------- search_instruments


def index_master(client: redis.Redis, instruments: list[Any]) -> None:
    """The instrument index as the worker writes it: EXCHANGE:SYMBOL → the master's JSON row."""
    client.hset(keys.INSTRUMENTS, mapping={inst.key: json.dumps(inst.to_row()) for inst in instruments})


def test_search_finds_symbol_and_name_matches_exact_symbol_first(redis_client: redis.Redis) -> None:
    index_master(redis_client, BUNDLED)
    found = search_instruments(redis_client, "sbin")
    assert [key for key, _ in found] == ["BSE:SBIN", "NSE:SBIN-EQ", "NFO:SBIN29DEC26FUT"]
    assert found[1][1] == INDEX.by_key["NSE:SBIN-EQ"].to_row()
    # "BANKNIFTY" is the name of the index whose symbol is "Nifty Bank"; symbols starting with it come first
    assert [key for key, _ in search_instruments(redis_client, "BankNifty")] == [
        "NFO:BANKNIFTY29DEC26FUT", "NSE:Nifty Bank",
    ]  # fmt: skip
    expected = {i.key for i in BUNDLED if "nifty" in i.symbol.casefold() or "nifty" in i.name.casefold()}
    assert {key for key, _ in search_instruments(redis_client, " NIFTY ")} == expected
    assert search_instruments(redis_client, "nifty 50")[0][0] == "NSE:Nifty 50"


def test_search_keeps_one_exchange(redis_client: redis.Redis) -> None:
    index_master(redis_client, BUNDLED)
    assert [key for key, _ in search_instruments(redis_client, "sbin", exchange="nse")] == ["NSE:SBIN-EQ"]
    assert [key for key, _ in search_instruments(redis_client, "INFY", exchange="BSE")] == ["BSE:INFY"]
    assert search_instruments(redis_client, "sbin", exchange="MCX") == []


def test_search_reads_a_large_index_in_chunks(redis_client: redis.Redis) -> None:
    generated = generate_master(3000)
    index_master(redis_client, generated)
    found = search_instruments(redis_client, "SYM021")
    assert len(found) == 100  # SYM02100 … SYM02199
    assert {key for key, _ in found} == {i.key for i in generated if "SYM021" in i.symbol}
    assert len(search_instruments(redis_client, "-eq")) == 3000


def test_search_skips_rows_that_are_not_json_objects(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    index_master(redis_client, BUNDLED)
    redis_client.hset(keys.INSTRUMENTS, mapping={"NSE:SBIN-BE": "{not json", "NSE:SBIN-BL": '["SBIN"]'})
    text_client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        found = search_instruments(text_client, "sbin")
    finally:
        text_client.close()
    assert [key for key, _ in found] == ["BSE:SBIN", "NSE:SBIN-EQ", "NFO:SBIN29DEC26FUT"]
    assert search_instruments(redis_client, "no such thing") == []


def test_search_says_when_the_worker_has_not_indexed_the_master(redis_client: redis.Redis) -> None:
    with pytest.raises(NotIndexedError, match="has not indexed the instrument master yet"):
        search_instruments(redis_client, "sbin")


def test_search_reports_an_unreachable_redis() -> None:
    conn = unreachable()
    try:
        with pytest.raises(RedisUnavailableError):
            search_instruments(conn, "sbin")
    finally:
        conn.close()
