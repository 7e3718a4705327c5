"""worker.client.get_latest_ticks: newest first, typed, against a real Redis."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

from worker import keys
from worker.client import get_latest_ticks
from worker.instruments import bundled_master_path, load_master_file
from worker.localredis import LocalRedis
from worker.normalize import Normalizer
from worker.protocol import LtpPacket, SnapQuotePacket
from worker.schema import Tick

TS_MS = 1_735_201_464_000


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
        written.append(redis_client.xadd(stream, dict(zip(fields[::2], fields[1::2], strict=True))))
    levels = ((10, 835_000_000, 1),) * 5
    snap = SnapQuotePacket(
        3, usdinr.exchange_type, usdinr.token, 2, TS_MS, 835_030_000, 1, 1, 1, 1.5, 2.5, 1, 1, 1, 1,
        1_735_201_463, 7, 0.25, levels, levels, 1, 1, 1, 1,
    )  # fmt: skip
    out = n.entry(snap, 2)
    assert out is not None
    redis_client.xadd(out[0], dict(zip(out[1][::2], out[1][1::2], strict=True)))
    latest = get_latest_ticks("USDINR29DEC26FUT", "CDS", count=5, client=redis_client)
    assert [t.mode for t in latest] == ["snap_quote", "ltp", "ltp"]
    assert [t.ltp for t in latest] == [Decimal(u) / 10**7 for u in (835_030_000, 835_025_000, 835_012_500)]
    assert latest[0].bids == ((Decimal("83.5"), 10, 1),) * 5
    assert latest[0].ltt == 1_735_201_463_000
    assert latest[0].oi_change_pct == Decimal("0.25")
