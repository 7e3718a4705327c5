"""``angelstream subscribe | unsubscribe | latest | search``, in-process, against a real Redis and the real worker."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from tests.workerkit import events, wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.cli import main
from worker.client import send_command
from worker.instruments import InstrumentIndex, bundled_master_path, load_master_file
from worker.localredis import LocalRedis, free_port
from worker.schema import parse_entry
from worker.simulator import SimulatorThread

BUNDLED = load_master_file(bundled_master_path())
INDEX = InstrumentIndex(BUNDLED)
IST = timezone(timedelta(hours=5, minutes=30))
INTS = {"seq", "exch_ts", "recv_ts", "ltq", "volume", "ltt", "oi"}


@pytest.fixture
def env(
    redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> LocalRedis:
    """REDIS_URL points at the test Redis (emptied); no .env is read; tables are 100 columns wide."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    monkeypatch.setenv("COLUMNS", "100")
    return redis_server


@contextmanager
def running_worker(sim: SimulatorThread, url: str, client: redis.Redis) -> Iterator[WorkerThread]:
    with WorkerThread(worker_settings(sim, url)) as worker:
        wait_for(lambda: client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker to listen for commands")
        yield worker
    assert worker.error is None


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, command: str, text: str) -> None:
    assert err.startswith(f"angelstream {command}: "), err
    assert text in err, err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- subscribe, unsubscribe


def test_subscribe_and_unsubscribe_print_what_the_worker_accepted(
    env: LocalRedis, sim: SimulatorThread, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    sbin, infy = INDEX.by_key["NSE:SBIN-EQ"], INDEX.by_key["NSE:INFY-EQ"]
    with running_worker(sim, env.url, redis_client):
        code, out, err = run(capsys, "subscribe", "NSE:SBIN-EQ", "nse:infy-eq", "--mode", "quote", "--timeout", "5")
        assert (code, err) == (0, "")
        assert out.splitlines() == [
            "subscribed (quote): 2 symbols",
            f"  NSE:SBIN-EQ  token {sbin.token}",
            f"  NSE:INFY-EQ  token {infy.token}",
        ]
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"quote", b"NSE:INFY-EQ": b"quote"}

        code, out, err = run(capsys, "unsubscribe", "NSE:INFY-EQ")
        assert (code, err) == (0, "")
        assert out.splitlines() == ["unsubscribed: 1 symbol", f"  NSE:INFY-EQ  token {infy.token}"]
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"quote"}

        code, out, _ = run(capsys, "subscribe", "NSE:INFY-EQ")  # ltp by default
        assert code == 0
        assert out.splitlines()[0] == "subscribed (ltp): 1 symbol"
        assert redis_client.hget(keys.SUBSCRIPTIONS, "NSE:INFY-EQ") == b"ltp"


@pytest.mark.parametrize("action", ["subscribe", "unsubscribe"])
def test_a_refusal_prints_the_workers_reason_and_exits_1(
    env: LocalRedis, sim: SimulatorThread, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    with running_worker(sim, env.url, redis_client):
        code, out, err = run(capsys, action, "NSE:SBIN-EQ", "NSE:NOSUCH-EQ")
        [refusal] = events(redis_client, "command_error")
    assert (code, out) == (1, "")
    assert err == f"angelstream {action}: {refusal['error']}\n"
    assert_one_line_error(err, action, "not in the instrument master: NSE:NOSUCH-EQ")
    assert redis_client.hlen(keys.SUBSCRIPTIONS) == 0


def test_no_worker_listening_exits_1(env: LocalRedis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "subscribe", "NSE:SBIN-EQ")
    assert (code, out) == (1, "")
    assert err == "angelstream subscribe: no worker is listening on angelstream:control: start `angelstream run`\n"


def test_no_answer_in_time_exits_1(
    env: LocalRedis, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    pubsub = redis_client.pubsub()
    pubsub.subscribe(keys.CONTROL)  # listens, never answers
    try:
        wait_for(lambda: redis_client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the silent listener")
        code, out, err = run(capsys, "unsubscribe", "NSE:SBIN-EQ", "--timeout", "0.2")
    finally:
        pubsub.close()
    assert (code, out) == (1, "")
    assert_one_line_error(err, "unsubscribe", "no answer from the worker within 0.2 s")


# --------------------------------------------------------------------------- latest


def worker_ticks(sim: SimulatorThread, env: LocalRedis, client: redis.Redis, key: str, mode: str, n: int) -> None:
    """At least ``n`` ticks of ``key`` in ``mode``, written by the worker (stopped on return)."""
    with running_worker(sim, env.url, client):
        send_command(client, "subscribe", [key], mode=mode)
        wait_for(lambda: client.xlen(keys.ticks_for(key)) >= n, what=f"{n} ticks")


def newest(client: redis.Redis, key: str, n: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
    return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrevrange(keys.ticks_for(key), count=n))


def test_latest_prints_a_table_newest_first(
    env: LocalRedis, sim: SimulatorThread, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_ticks(sim, env, redis_client, "NSE:SBIN-EQ", "snap_quote", 6)
    code, out, err = run(capsys, "latest", "NSE:SBIN-EQ", "-n", "4")
    assert (code, err) == (0, "")
    ticks = [parse_entry(i, f) for i, f in newest(redis_client, "NSE:SBIN-EQ", 4)]
    assert "NSE:SBIN-EQ, newest first" in out
    for header in ("time", "ltp", "ltq", "volume", "best bid", "best ask", "mode"):
        assert header in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d\d:\d\d:\d\d\.\d{3}\s", line)]
    assert len(rows) == 4
    for row, tick in zip(rows, ticks, strict=True):
        assert tick.bids is not None
        assert tick.asks is not None
        when = datetime.fromtimestamp(tick.exch_ts / 1000, IST).strftime("%H:%M:%S.%f")[:-3]
        cells = row.split()
        assert cells[:4] == [when, str(tick.ltp), str(tick.ltq), str(tick.volume)]
        assert cells[4:] == [
            f"{tick.bids[0][0]}×{tick.bids[0][1]}",
            f"{tick.asks[0][0]}×{tick.asks[0][1]}",
            "snap_quote",
        ]


def test_latest_leaves_out_columns_the_mode_does_not_carry(
    env: LocalRedis, sim: SimulatorThread, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_ticks(sim, env, redis_client, "NSE:INFY-EQ", "ltp", 3)
    code, out, _ = run(capsys, "latest", "NSE:INFY-EQ")  # 10 by default: all there are, if fewer
    assert code == 0
    count = min(10, redis_client.xlen(keys.ticks("NSE", "INFY-EQ")))
    assert len([line for line in out.splitlines() if line.rstrip().endswith(" ltp")]) == count
    for header in ("ltq", "volume", "best bid", "best ask"):
        assert header not in out


def test_latest_json_prints_every_field_one_object_per_line(
    env: LocalRedis, sim: SimulatorThread, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    worker_ticks(sim, env, redis_client, "NSE:SBIN-EQ", "snap_quote", 4)
    code, out, err = run(capsys, "latest", "NSE:SBIN-EQ", "-n", "3", "--json")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert len(lines) == 3
    for line, (entry_id, raw) in zip(lines, newest(redis_client, "NSE:SBIN-EQ", 3), strict=True):
        expected: dict[str, Any] = {"id": entry_id.decode()}
        for name, value in ((k.decode(), v.decode()) for k, v in raw.items()):
            if name in INTS:
                expected[name] = int(value)
            elif name in ("bids", "asks"):
                expected[name] = json.loads(value, parse_float=str)
            else:
                expected[name] = value  # strings, and decimals as their exact text ("3397.50")
        assert json.loads(line) == expected


def test_latest_without_ticks_says_so_and_exits_1(env: LocalRedis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "latest", "NSE:SBIN-EQ", "--json")
    assert (code, out) == (1, "")
    assert_one_line_error(err, "latest", "no ticks in ticks:NSE:SBIN-EQ: is it subscribed?")


# --------------------------------------------------------------------------- search


@pytest.fixture
def indexed(env: LocalRedis, redis_client: redis.Redis) -> redis.Redis:
    """The instrument index as the worker writes it: EXCHANGE:SYMBOL → the master's JSON row."""
    redis_client.hset(keys.INSTRUMENTS, mapping={i.key: json.dumps(i.to_row()) for i in BUNDLED})
    return redis_client


def test_search_prints_matches_exact_symbol_first(indexed: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "search", "SBIN")
    assert (code, err) == (0, "")
    assert [line.split() for line in out.splitlines()] == [
        ["BSE:SBIN", "500112", "SBIN", "-", "1"],
        ["NSE:SBIN-EQ", "3045", "SBIN", "-", "1"],
        ["NFO:SBIN29DEC26FUT", "35003", "SBIN", "29DEC2026", "750"],
    ]
    lines = out.splitlines()
    assert len({line.index(token) for line, token in zip(lines, ("500112", "3045", "35003"), strict=True)}) == 1
    assert len({line.index(name) for line, name in zip(lines, ("SBIN  -", "SBIN  -", "SBIN  29DEC"), strict=True)}) == 1


def test_search_limits_and_says_how_many_more(indexed: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "search", "nifty", "-n", "2")
    total = len([i for i in BUNDLED if "nifty" in i.symbol.casefold() or "nifty" in i.name.casefold()])
    assert code == 0
    lines = out.splitlines()
    assert len(lines) == 3
    assert lines[2] == f"… and {total - 2} more (show them with -n {total})"


def test_search_on_one_exchange(indexed: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "search", "sbin", "--exchange", "NSE")
    assert code == 0
    assert out.split() == ["NSE:SBIN-EQ", "3045", "SBIN", "-", "1"]


def test_search_without_a_match_exits_1(indexed: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "search", "zzz")
    assert (code, out) == (1, "")
    assert err == "angelstream search: no instrument has 'zzz' in its symbol or name\n"
    code, out, err = run(capsys, "search", "sbin", "--exchange", "MCX")
    assert (code, out) == (1, "")
    assert err == "angelstream search: no instrument on MCX has 'sbin' in its symbol or name\n"


def test_search_before_the_worker_indexed_the_master_exits_1(
    env: LocalRedis, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "search", "sbin")
    assert (code, out) == (1, "")
    assert_one_line_error(err, "search", "the worker has not indexed the instrument master yet")


# --------------------------------------------------------------------------- every command: Redis, arguments


COMMANDS = [["subscribe", "NSE:SBIN-EQ"], ["unsubscribe", "NSE:SBIN-EQ"], ["latest", "NSE:SBIN-EQ"], ["search", "x"]]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[0])
def test_an_unreachable_redis_is_one_line_and_exit_1(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    assert_one_line_error(err, argv[0], "cannot reach Redis (")


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: argv[0])
def test_a_bad_redis_url_is_one_line_and_exit_1(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REDIS_URL", "http://127.0.0.1:6379")
    code, _, err = run(capsys, *argv)
    assert code == 1
    assert_one_line_error(err, argv[0], "REDIS_URL is invalid")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["subscribe", "SBIN-EQ"], "'SBIN-EQ': write EXCHANGE:SYMBOL, e.g. NSE:SBIN-EQ"),
        (["unsubscribe", "NSE:"], "'NSE:': write EXCHANGE:SYMBOL"),
        (["latest", ":SBIN-EQ"], "':SBIN-EQ': write EXCHANGE:SYMBOL"),
        (["subscribe", "NSE:SBIN-EQ", "--mode", "depth"], "invalid choice: 'depth'"),
        (["subscribe", "NSE:SBIN-EQ", "--timeout", "0"], "'0' must be positive"),
        (["latest", "NSE:SBIN-EQ", "-n", "0"], "'0' must be positive"),
        (["search", "sbin", "-n", "x"], "'x' is not a whole number"),
        (["subscribe"], "the following arguments are required: EXCHANGE:SYMBOL"),
    ],
)
def test_bad_arguments_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", ["subscribe", "unsubscribe", "latest", "search"])
def test_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: angelstream {command} ")
    assert keys.ticks("EXCHANGE", "SYMBOL") in out or keys.CONTROL in out or keys.INSTRUMENTS in out


def test_commands_are_listed_in_the_main_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("subscribe", "unsubscribe", "latest", "search"):
        assert command in out
