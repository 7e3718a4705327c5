"""The candle builder: the fold against an independent computation, then the service on real Redis."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from consumers.candles import (
    CandleConfig,
    CandleConfigError,
    CandleService,
    SymbolCandles,
    bucket_start,
    intervals_of,
    main,
    parse_interval,
    parse_sessions,
)
from tests.workerkit import entries, wait_for
from worker import keys
from worker.localredis import LocalRedis
from worker.schema import Tick

KOLKATA = ZoneInfo("Asia/Kolkata")
MINUTE = 60_000


def ist(day: int, hh: int, mm: int, ss: float = 0.0) -> int:
    """Epoch ms of 2026-11-<day> hh:mm:ss in India."""
    whole = int(ss)
    moment = datetime(2026, 11, day, hh, mm, whole, round((ss - whole) * 1e6), tzinfo=KOLKATA)
    return int(moment.timestamp() * 1000)


@dataclass
class T:
    ts: int  # exchange time, epoch ms
    price: str
    cum: int | None  # cumulative day volume; None for an LTP-mode tick


def tick(n: int, t: T, key: str = "NSE:SBIN-EQ") -> Tick:
    exchange, _, symbol = key.partition(":")
    return Tick(
        id=f"{1_800_000_000_000 + n}-0", v="1", token="3045", exchange=exchange, symbol=symbol,
        mode="ltp" if t.cum is None else "quote", seq=n, exch_ts=t.ts, ltp=Decimal(t.price), recv_ts=0, volume=t.cum,
    )  # fmt: skip


def expected(ticks: list[T], minutes: int, session_minute: int = 9 * 60 + 15) -> tuple[list[dict[str, Any]], int]:
    """Candles computed here, independently: by walking from the day's session start; and the late count."""
    candles: list[dict[str, Any]] = []
    closed_until = 0
    last_cum: int | None = None
    last_day = None
    late = 0
    for t in ticks:
        moment = datetime.fromtimestamp(t.ts / 1000, KOLKATA)
        start = int(moment.replace(hour=0, minute=0, second=0, microsecond=0).timestamp() * 1000)
        start += session_minute * MINUTE
        while start > t.ts:
            start -= minutes * MINUTE
        while start + minutes * MINUTE <= t.ts:
            start += minutes * MINUTE
        share = None
        if t.cum is not None:
            if last_cum is None:
                share = 0
            elif t.cum >= last_cum:
                share = t.cum - last_cum
            elif moment.date() != last_day:
                share = t.cum
            else:
                share = 0
            if last_cum is None or t.cum >= last_cum or moment.date() != last_day:
                last_cum, last_day = t.cum, moment.date()
        if start < closed_until:
            late += 1
            continue
        if candles and candles[-1]["start"] == start:
            c = candles[-1]
            c["high"], c["low"] = max(c["high"], Decimal(t.price)), min(c["low"], Decimal(t.price))
            if t.ts < c["first"]:  # open and close follow exchange time, not arrival
                c["open"], c["first"] = t.price, t.ts
            if t.ts >= c["last"]:
                c["close"], c["last"] = t.price, t.ts
            c["ticks"] += 1
        else:
            if candles:
                closed_until = candles[-1]["start"] + minutes * MINUTE
            c = {"start": start, "open": t.price, "high": Decimal(t.price), "low": Decimal(t.price), "close": t.price}
            c |= {"volume": 0, "has_volume": False, "ticks": 1, "first": t.ts, "last": t.ts}
            candles.append(c)
        if share is not None:
            c["volume"] += share
            c["has_volume"] = True
    return candles, late


def as_fields(c: dict[str, Any], minutes: int) -> dict[str, str]:
    return {
        "start": str(c["start"]), "end": str(c["start"] + minutes * MINUTE), "open": c["open"], "high": str(c["high"]),
        "low": str(c["low"]), "close": c["close"], "volume": str(c["volume"]),
        "has_volume": "1" if c["has_volume"] else "0", "ticks": str(c["ticks"]),
    }  # fmt: skip


SEQUENCE = [
    T(ist(23, 9, 15, 5), "100.00", 1000),  # the first tick ever: a baseline
    T(ist(23, 9, 15, 30), "101.50", 1200),
    T(ist(23, 9, 15, 59.999), "99.75", 1300),
    T(ist(23, 9, 15, 1), "100.50", 1250),  # out of order inside its minute: becomes the open, adds no volume
    T(ist(23, 9, 16, 0), "100.25", 1350),
    T(ist(23, 9, 19, 10), "102.00", 1500),  # a gap: no candles for 09:17 and 09:18
    T(ist(23, 9, 20, 1), "101.00", 1600),
    T(ist(23, 9, 18, 0), "50.00", 1400),  # late: its candles are closed
    T(ist(23, 9, 20, 30), "101.10", None),  # LTP mode: a price, no volume
    T(ist(23, 15, 29, 59), "101.20", None),
    T(ist(24, 9, 15, 1), "103.00", 10),  # the next day: the volume counter restarted
    T(ist(24, 9, 15, 2), "104.00", 25),
    T(ist(24, 9, 15, 3), "104.00", 20),  # out of order within the day: adds nothing
]


def fold_all(ticks: list[T], intervals: str, n0: int = 0) -> tuple[dict[str, list[dict[str, str]]], SymbolCandles]:
    state = SymbolCandles(intervals_of(intervals.split(",")), parse_sessions("")["NSE"])
    out: dict[str, list[dict[str, str]]] = {name: [] for name in state.intervals}
    for n, t in enumerate(ticks, n0):
        for name, candle in state.fold(tick(n, t)):
            out[name].append(candle.fields("NSE", "SBIN-EQ", name))
    for name, candle in state.expire(ist(30, 0, 0), 0):
        out[name].append(candle.fields("NSE", "SBIN-EQ", name))
    return out, state


def core(fields: dict[str, str]) -> dict[str, str]:
    return {k: fields[k] for k in ("start", "end", "open", "high", "low", "close", "volume", "has_volume", "ticks")}


@pytest.mark.parametrize("minutes", [1, 5, 60, 1440])
def test_candles_equal_an_independent_computation(minutes: int) -> None:
    name = {1: "1m", 5: "5m", 60: "1h", 1440: "1d"}[minutes]
    got, state = fold_all(SEQUENCE, name)
    want, late = expected(SEQUENCE, minutes)
    assert [core(c) for c in got[name]] == [as_fields(c, minutes) for c in want]
    assert state.late == late
    assert all(c["v"] == "1" and c["interval"] == name and c["symbol"] == "SBIN-EQ" for c in got[name])


def test_the_worked_example() -> None:
    got, state = fold_all(SEQUENCE, "1m,1d")
    first = got["1m"][0]
    assert (first["open"], first["high"], first["low"], first["close"]) == ("100.50", "101.50", "99.75", "99.75")
    assert first["volume"] == "300"  # 1000 is only the baseline
    assert [c["start"] for c in got["1m"]][:3] == [str(ist(23, 9, 15)), str(ist(23, 9, 16)), str(ist(23, 9, 19))]
    ltp_only = next(c for c in got["1m"] if c["start"] == str(ist(23, 15, 29)))
    assert ltp_only["has_volume"] == "0"
    day1, day2 = got["1d"]
    assert day1["start"] == str(ist(23, 9, 15))
    assert day1["volume"] == "600"  # 1600 - 1000
    assert day2["volume"] == "25"  # the new day's counter, from zero
    assert state.late == 1


@given(
    st.lists(
        st.tuples(st.integers(1, 400_000), st.integers(9_000, 11_000), st.integers(0, 500), st.booleans()),
        min_size=1,
        max_size=60,
    )
)
def test_in_order_ticks_fold_like_grouping_by_bucket(steps: list[tuple[int, int, int, bool]]) -> None:
    ts, cum, ticks = ist(23, 9, 0), 0, []
    for gap, paise, traded, ltp_only in steps:
        ts, cum = ts + gap, cum + traded
        ticks.append(T(ts, f"{paise / 100:.2f}", None if ltp_only else cum))
    for minutes, name in ((1, "1m"), (15, "15m")):
        got, _ = fold_all(ticks, name)
        want, late = expected(ticks, minutes)
        assert late == 0
        assert [core(c) for c in got[name]] == [as_fields(c, minutes) for c in want]


def test_a_redelivered_tick_is_folded_once() -> None:
    state = SymbolCandles(intervals_of(["1m"]), parse_sessions("")["NSE"])
    first = tick(1, SEQUENCE[0])
    state.fold(first)
    state.fold(tick(2, SEQUENCE[1]))
    state.fold(first)
    assert state.forming["1m"].ticks == 2
    again = SymbolCandles.load(state.dump(), state.intervals, state.session)
    assert again.dump() == state.dump()
    assert SymbolCandles.load(state.dump(), intervals_of(["5m"]), state.session).forming == {}


def test_intervals_and_sessions_are_validated() -> None:
    assert parse_interval("15m") == 15 * MINUTE
    assert parse_interval(" 1d ") == 86_400_000
    assert parse_interval("30s") == 30_000
    for bad in ("", "5", "0m", "1w", "m5"):
        with pytest.raises(CandleConfigError, match=r"e\.g\. 1m"):
            parse_interval(bad)
    with pytest.raises(CandleConfigError, match="no interval"):
        intervals_of([" ", ""])
    sessions = parse_sessions("mcx=08:45, NSE=09:00")
    assert sessions["MCX"].hour == 8
    assert sessions["NSE"].minute == 0
    assert sessions["CDS"].hour == 9
    with pytest.raises(CandleConfigError, match="EXCHANGE=HH:MM"):
        parse_sessions("MCX=late")
    # a session at 09:15 puts 09:14:59 in the candle that started the day before for a 1d interval
    assert bucket_start(ist(24, 9, 14, 59), 86_400_000, sessions["BSE"]) == ist(23, 9, 15)


# --------------------------------------------------------------------------- the service on real Redis


def xadd(client: redis.Redis, key: str, n: int, t: T) -> None:
    exchange, _, symbol = key.partition(":")
    fields = {"v": "1", "token": "1", "exchange": exchange, "symbol": symbol, "mode": "ltp", "seq": str(n)}
    fields |= {"exch_ts": str(t.ts), "ltp": t.price, "recv_ts": "0"}
    if t.cum is not None:
        fields |= {"mode": "quote", "volume": str(t.cum)}
    client.xadd(keys.ticks_for(key), fields, id=f"{1_800_000_000_000 + n}-0")  # type: ignore[arg-type]


def candles_in(client: redis.Redis, name: str, key: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries(client, keys.candles(name, key))
    ]


def forming(client: redis.Redis, name: str, key: str) -> dict[str, str]:
    raw = cast(dict[bytes, bytes], client.hgetall(keys.forming(name, key)))
    return {k.decode(): v.decode() for k, v in raw.items()}


def spin(svc: CandleService, done: Callable[[], object], what: str) -> None:
    """Step the service until ``done``."""

    def check() -> object:
        svc.step()
        return done()

    wait_for(check, what=what)


def service(url: str, name: str, **config: Any) -> CandleService:
    client = redis.Redis.from_url(url, decode_responses=True)
    values: dict[str, Any] = {"intervals": intervals_of(["1m", "5m"]), "name": name, "block_ms": 50}
    values |= {"grace_ms": 10**12, "lease_ms": 2000, "discover_every": 0.05}
    return CandleService(client, CandleConfig(**(values | config)))


def test_the_service_writes_closed_candles_keeps_the_forming_one_and_acknowledges(
    redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    for n, t in enumerate(SEQUENCE):
        xadd(redis_client, "NSE:SBIN-EQ", n, t)
    svc = service(redis_server.url, "solo")
    spin(svc, lambda: svc.stats.ticks == len(SEQUENCE), "every tick folded")
    want, _ = expected(SEQUENCE, 1)
    got = candles_in(redis_client, "1m", "NSE:SBIN-EQ")
    assert [core(c) for c in got] == [as_fields(c, 1) for c in want[:-1]]
    assert forming(redis_client, "1m", "NSE:SBIN-EQ")["close"] == want[-1]["close"]
    assert redis_client.xpending(keys.ticks_for("NSE:SBIN-EQ"), keys.CANDLE_GROUP)["pending"] == 0
    ids = [entry_id for entry_id, _ in entries(redis_client, keys.candles("1m", "NSE:SBIN-EQ"))]
    assert ids == [f"{c['start']}-0".encode() for c in want[:-1]]
    assert svc.stats.late == 1
    stopped = threading.Event()
    stopped.set()
    svc.run(stopped)  # a stopped run gives its leases back
    assert not redis_client.exists(keys.candle_owner("NSE:SBIN-EQ"))


def test_a_quiet_symbol_still_closes_on_the_timer(redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    now = int(time.time() * 1000)
    xadd(redis_client, "MCX:GOLD05FEB27FUT", 1, T(now - 5 * MINUTE, "70000.00", 5))
    svc = service(redis_server.url, "timer", grace_ms=1000)
    spin(svc, lambda: redis_client.xlen(keys.candles("5m", "MCX:GOLD05FEB27FUT")) == 1, "timer close")
    assert redis_client.xlen(keys.candles("1m", "MCX:GOLD05FEB27FUT")) == 1
    assert not redis_client.exists(keys.forming("1m", "MCX:GOLD05FEB27FUT"))


def test_two_replicas_share_the_symbols_and_fold_each_tick_once(
    redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    symbols = [f"NSE:S{n}-EQ" for n in range(6)]
    for key in symbols:
        for n, t in enumerate(SEQUENCE):
            xadd(redis_client, key, n, t)
    a, b = service(redis_server.url, "a"), service(redis_server.url, "b")
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,)) for s in (a, b)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: a.stats.ticks + b.stats.ticks == len(symbols) * len(SEQUENCE), what="all folded")
        wait_for(lambda: a.owned and b.owned, what="both replicas to hold symbols")
    finally:
        stop.set()
        for thread in threads:
            thread.join(10)
    want, _ = expected(SEQUENCE, 1)
    for key in symbols:
        assert [core(c) for c in candles_in(redis_client, "1m", key)] == [as_fields(c, 1) for c in want[:-1]]
    assert a.stats.duplicates + b.stats.duplicates == 0


def test_a_killed_builder_restarts_without_losing_or_duplicating_a_candle(
    redis_client: redis.Redis, redis_server: LocalRedis, tmp_path: Path
) -> None:
    key = "NSE:INFY-EQ"
    day = [T(ist(23, 9, 15) + n * 7_000, f"{1500 + (n * 37) % 90}.05", 1000 + n * 10) for n in range(120)]
    env = os.environ | {"REDIS_URL": redis_server.url, "CANDLE_INTERVALS": "1m,5m", "CANDLE_GRACE": "100000000"}
    command = [sys.executable, "-m", "consumers.candles", "--name", "builder-1"]
    for n, t in enumerate(day[:60]):
        xadd(redis_client, key, n, t)
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: redis_client.xlen(keys.candles("1m", key)) >= 5, timeout=20, what="the first candles")
        for n, t in enumerate(day[60:90], 60):
            xadd(redis_client, key, n, t)
        first.send_signal(signal.SIGKILL)  # somewhere in the middle of a minute
        first.wait(5)
        for n, t in enumerate(day[90:], 90):
            xadd(redis_client, key, n, t)
        second = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        try:
            want, _ = expected(day, 1)
            wait_for(
                lambda: redis_client.xlen(keys.candles("1m", key)) == len(want) - 1, timeout=20, what="all candles"
            )
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(10) == 0
    finally:
        first.kill()
    assert [core(c) for c in candles_in(redis_client, "1m", key)] == [as_fields(c, 1) for c in want[:-1]]
    want5, _ = expected(day, 5)
    assert [core(c) for c in candles_in(redis_client, "5m", key)] == [as_fields(c, 5) for c in want5[:-1]]
    assert forming(redis_client, "1m", key)["ticks"] == str(want[-1]["ticks"])


def test_bad_settings_exit_2_with_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CANDLE_INTERVALS", "1fortnight")
    assert main([]) == 2
    assert "bad interval '1fortnight'" in capsys.readouterr().err
    monkeypatch.setenv("CANDLE_GRACE", "-1")
    assert main(["--intervals", "1m"]) == 2
    assert "CANDLE_GRACE is invalid" in capsys.readouterr().err


def test_reprocessing_everything_never_duplicates_a_candle(redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    for n, t in enumerate(SEQUENCE):
        xadd(redis_client, "NSE:SBIN-EQ", n, t)
    first = service(redis_server.url, "one")
    spin(first, lambda: first.stats.ticks == len(SEQUENCE), "every tick folded")
    written = candles_in(redis_client, "1m", "NSE:SBIN-EQ")
    redis_client.delete(keys.candle_state("NSE:SBIN-EQ"))  # the state is lost: fold from the start again
    redis_client.xgroup_setid(keys.ticks_for("NSE:SBIN-EQ"), keys.CANDLE_GROUP, "0")
    again = service(redis_server.url, "one")
    spin(again, lambda: again.stats.ticks == len(SEQUENCE), "every tick folded again")
    assert candles_in(redis_client, "1m", "NSE:SBIN-EQ") == written
    assert again.stats.duplicates == len(written) + len(candles_in(redis_client, "5m", "NSE:SBIN-EQ"))
    assert again.stats.candles == 0


def test_a_replica_gives_back_what_exceeds_its_share_and_drops_what_it_lost(
    redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    symbols = [f"NSE:S{n}-EQ" for n in range(4)]
    for key in symbols:
        xadd(redis_client, key, 1, SEQUENCE[0])
    svc = service(redis_server.url, "greedy")
    svc.discover()
    assert len(svc.owned) == 4
    redis_client.zadd(keys.CANDLE_REPLICAS, {"other": int(time.time() * 1000)})
    svc.discover()
    assert len(svc.owned) == 2, "half for each of two live replicas"
    assert sum(bool(redis_client.exists(keys.candle_owner(k))) for k in symbols) == 2
    [kept, *_] = svc.owned
    redis_client.set(keys.candle_owner(keys.symbol_of(kept)), "someone else")
    svc.renew()
    assert kept not in svc.owned
    svc.discover()  # takes a free one back up to its share, skipping what it holds and what is taken
    assert len(svc.owned) == 2
    assert kept not in svc.owned


def test_a_new_owner_folds_what_a_dead_replica_read_but_never_acknowledged(
    redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    for n, t in enumerate(SEQUENCE):
        xadd(redis_client, "NSE:SBIN-EQ", n, t)
    stream = keys.ticks_for("NSE:SBIN-EQ")
    redis_client.xgroup_create(stream, keys.CANDLE_GROUP, id="0")
    redis_client.xreadgroup(keys.CANDLE_GROUP, "dead", {stream: ">"}, count=5)  # read, never acknowledged
    svc = service(redis_server.url, "heir", batch=2)
    svc.discover()  # the lease is free: the dead replica's 5 pending ticks are claimed, 2 at a time
    assert svc.stats.ticks == 5
    spin(svc, lambda: svc.stats.ticks == len(SEQUENCE), "the rest")
    want, _ = expected(SEQUENCE, 1)
    assert [core(c) for c in candles_in(redis_client, "1m", "NSE:SBIN-EQ")] == [as_fields(c, 1) for c in want[:-1]]


def test_with_nothing_to_do_a_step_just_waits(redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    svc = service(redis_server.url, "idle", block_ms=20)
    began = time.monotonic()
    svc.step()
    assert time.monotonic() - began >= 0.02
    assert svc.owned == {}


def test_a_redis_outage_is_waited_out(redis_client: redis.Redis) -> None:
    with LocalRedis("--appendonly", "yes") as own:
        client = redis.Redis.from_url(own.url)
        for n, t in enumerate(SEQUENCE[:4]):
            xadd(client, "NSE:SBIN-EQ", n, t)
        svc = service(own.url, "patient")
        stop = threading.Event()
        runner = threading.Thread(target=svc.run, args=(stop,))
        runner.start()
        try:
            wait_for(lambda: svc.stats.ticks == 4, what="the first ticks")
            own.stop()
            wait_for(lambda: not svc.owned, what="the outage noticed")
            own.start()
            client = redis.Redis.from_url(own.url)
            for n, t in enumerate(SEQUENCE[4:], 4):
                xadd(client, "NSE:SBIN-EQ", n, t)
            wait_for(lambda: svc.stats.ticks == len(SEQUENCE), what="the rest after the outage")
        finally:
            stop.set()
            runner.join(10)
        want, _ = expected(SEQUENCE, 1)
        assert [core(c) for c in candles_in(client, "1m", "NSE:SBIN-EQ")] == [as_fields(c, 1) for c in want[:-1]]
        client.close()
