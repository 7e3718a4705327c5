"""consumers.tail: JSON lines and the live table, from entries shaped like the worker's, against a real Redis."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from decimal import Decimal
from io import StringIO
from pathlib import Path
from typing import Any

import pytest
import redis
from rich.console import Console

from consumers import tail
from tests.workerkit import wait_for
from worker import keys
from worker.localredis import LocalRedis, free_port
from worker.schema import parse_entry

ROOT = Path(__file__).resolve().parent.parent
TS_MS = 1_718_000_000_123  # 2024-06-10 06:13:20.123 UTC = 11:43:20.123 IST

SBIN_LTP = {
    "v": "1", "token": "3045", "exchange": "NSE", "symbol": "SBIN-EQ", "mode": "ltp", "seq": "101",
    "exch_ts": str(TS_MS), "ltp": "812.40", "recv_ts": "1718000000125042",
}  # fmt: skip
INFY_QUOTE = {
    "v": "1", "token": "1594", "exchange": "NSE", "symbol": "INFY-EQ", "mode": "quote", "seq": "7",
    "exch_ts": str(TS_MS), "ltp": "1520.05", "recv_ts": "1718000000125999", "ltq": "25", "atp": "1518.33",
    "volume": "1234567", "open": "1510.00", "high": "1525.50", "low": "1505.10", "close": "1509.95",
    "total_buy_qty": "104230.0", "total_sell_qty": "98211.0",
}  # fmt: skip
USDINR_SNAP = {
    "v": "1", "token": "1151", "exchange": "CDS", "symbol": "USDINR29DEC26FUT", "mode": "snap_quote",
    "seq": "9007199254740993", "exch_ts": str(TS_MS), "ltp": "83.1234500", "recv_ts": "1718000000126000",
    "ltq": "1", "atp": "83.1200000", "volume": "90071992547409930", "open": "83.1000000", "high": "83.2000000",
    "low": "83.0500000", "close": "83.0900000", "total_buy_qty": "1.5e+20", "total_sell_qty": "0.0",
    "ltt": "1718000000000", "oi": "42", "oi_change_pct": "-1.25", "upper_circuit": "87.2700000",
    "lower_circuit": "78.9600000", "high_52w": "84.1000000", "low_52w": "81.7000000",
    "bids": "[[83.1225000,10,2],[83.1200000,5,1]]", "asks": "[[83.1250000,7,3]]", "venue": "future-field",
}  # fmt: skip


@pytest.fixture
def url(redis_server: LocalRedis, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> str:
    """REDIS_URL pointing at the private, flushed redis-server."""
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    return redis_server.url


def add(client: redis.Redis, fields: dict[str, str], **changes: str) -> str:
    entry = fields | changes
    entry_id = client.xadd(keys.ticks(entry["exchange"], entry["symbol"]), entry)  # type: ignore[arg-type]
    assert isinstance(entry_id, bytes)
    return entry_id.decode()


def lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def xreads(client: redis.Redis) -> int:
    """XREAD calls the server has answered so far."""
    return int(client.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def blocked_clients(client: redis.Redis) -> int:
    """Clients waiting in a blocking command now (a reader that has read its start positions)."""
    return int(client.info("clients")["blocked_clients"])


def wait_blocked(client: redis.Redis, before: int, what: str) -> None:
    """Until one more client than ``before`` waits in a blocking XREAD."""
    wait_for(lambda: blocked_clients(client) > before, what=what)


class Background:
    """``tail.main(argv)`` in a thread (output captured by capsys); ``wait()`` joins it, returns its code."""

    def __init__(self, argv: list[str], console: Console | None = None) -> None:
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, args=(argv, console))
        self.thread.start()

    def _run(self, argv: list[str], console: Console | None) -> None:
        self.code = tail.main(argv, console=console)

    def wait(self) -> int | None:
        self.thread.join(10)
        assert not self.thread.is_alive(), "the tail did not stop"
        return self.code


@pytest.fixture
def fast_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short blocking reads, so a test also sees XREAD time out with nothing (and read again)."""
    monkeypatch.setattr(tail, "BLOCK_MS", 30)


# --------------------------------------------------------------------------- --json


def test_json_prints_every_field_typed_exact_decimals_in_stream_order(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = [add(redis_client, SBIN_LTP), add(redis_client, INFY_QUOTE), add(redis_client, USDINR_SNAP)]
    ids.append(add(redis_client, SBIN_LTP, seq="102", ltp="812.45"))
    argv = ["--json", "--from-start", "--count", "4", "NSE:SBIN-EQ", "NSE:INFY-EQ", "CDS:USDINR29DEC26FUT"]
    assert tail.main(argv) == 0
    out = capsys.readouterr()
    assert out.err == ""
    got = lines(out.out)
    assert [g["id"] for g in got] == [ids[0], ids[3], ids[1], ids[2]]  # each stream in order, streams as asked
    sbin, sbin2, infy, usdinr = got
    assert sbin == {
        "id": ids[0], "v": "1", "token": "3045", "exchange": "NSE", "symbol": "SBIN-EQ", "mode": "ltp", "seq": 101,
        "exch_ts": TS_MS, "ltp": "812.40", "recv_ts": 1_718_000_000_125_042,
    }  # fmt: skip
    assert list(sbin) == ["id", *SBIN_LTP]  # the stream's field order
    assert sbin2["ltp"] == "812.45"
    assert infy["volume"] == 1_234_567
    assert infy["total_buy_qty"] == "104230.0"
    assert (infy["ltq"], infy["atp"], infy["close"]) == (25, "1518.33", "1509.95")
    assert usdinr["seq"] == 9_007_199_254_740_993  # beyond 2**53: still exact
    assert usdinr["volume"] == 90_071_992_547_409_930
    assert usdinr["ltp"] == "83.1234500"  # trailing zeros kept: the exact string the worker wrote
    assert usdinr["total_buy_qty"] == "1.5e+20"
    assert usdinr["bids"] == [
        {"price": "83.1225000", "qty": 10, "orders": 2},
        {"price": "83.1200000", "qty": 5, "orders": 1},
    ]
    assert usdinr["asks"] == [{"price": "83.1250000", "qty": 7, "orders": 3}]
    assert usdinr["venue"] == "future-field"  # unknown fields are kept, as strings
    written = [SBIN_LTP, {**SBIN_LTP, "seq": "102", "ltp": "812.45"}, INFY_QUOTE, USDINR_SNAP]
    for line, fields in zip(got, written, strict=True):
        tick = parse_entry(line["id"], fields)
        assert Decimal(line["ltp"]) == tick.ltp
        assert line["exch_ts"] == tick.exch_ts


def test_count_stops_after_n_ticks_in_all_even_when_one_read_returns_more(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    sbin = [add(redis_client, SBIN_LTP, seq=str(n)) for n in range(3)]
    infy = [add(redis_client, INFY_QUOTE, seq=str(n)) for n in range(3)]
    assert tail.main(["--json", "--from-start", "--count", "4", "NSE:SBIN-EQ", "NSE:INFY-EQ"]) == 0
    assert [g["id"] for g in lines(capsys.readouterr().out)] == [*sbin, infy[0]]


def test_without_from_start_only_new_ticks(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str], fast_blocks: None
) -> None:
    add(redis_client, SBIN_LTP, seq="1")
    add(redis_client, SBIN_LTP, seq="2")
    before = xreads(redis_client)
    run = Background(["--json", "--count", "2", "NSE:SBIN-EQ", "NSE:INFY-EQ"])
    wait_for(lambda: xreads(redis_client) >= before + 2, what="a read that timed out with nothing new")
    new = [add(redis_client, INFY_QUOTE, seq="3"), add(redis_client, SBIN_LTP, seq="4")]
    assert run.wait() == 0
    got = lines(capsys.readouterr().out)
    assert sorted(g["id"] for g in got) == sorted(new)
    assert {g["seq"] for g in got} == {3, 4}


def test_a_stream_that_does_not_exist_yet_is_read_from_its_first_entry(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str], fast_blocks: None
) -> None:
    before = blocked_clients(redis_client)
    run = Background(["--json", "--count", "1", "CDS:USDINR29DEC26FUT"])
    wait_blocked(redis_client, before, "the tail to wait")
    first = add(redis_client, USDINR_SNAP)
    assert run.wait() == 0
    assert [g["id"] for g in lines(capsys.readouterr().out)] == [first]


# --------------------------------------------------------------------------- the table


def terminal(width: int = 200) -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, force_terminal=True, color_system="standard", width=width), out


def shown(rows: list[tail.Row]) -> str:
    console, out = terminal()
    console.print(tail.render(rows))
    return out.getvalue()


def coloured(text: str, colour: str) -> str:
    """``text`` (padded to its cell) in ``colour``, as a regex."""
    code = {"green": "32", "red": "31"}[colour]
    return rf"\x1b\[{code}m\s*{re.escape(text)}\s*\x1b\[0m"


GREEN, RED = "\x1b[32m", "\x1b[31m"


def test_the_table_colours_the_last_price_against_the_previous_tick() -> None:
    row = tail.Row("NSE:SBIN-EQ")
    row.add(parse_entry("1-0", SBIN_LTP))
    first = shown([row])
    assert "812.40" in first
    assert GREEN not in first
    assert RED not in first, "the first tick has nothing to compare with"
    assert "+0.00 (+0.00 %)" in first

    row.add(parse_entry("2-0", {**SBIN_LTP, "ltp": "813.00"}))
    up = shown([row])
    assert re.search(coloured("813.00 ▲", "green"), up)
    assert re.search(coloured("+0.60 (+0.07 %)", "green"), up), "the change since the first tick"

    row.add(parse_entry("3-0", {**SBIN_LTP, "ltp": "800.00"}))
    down = shown([row])
    assert re.search(coloured("800.00 ▼", "red"), down)
    assert re.search(coloured("-12.40 (-1.53 %)", "red"), down)

    row.add(parse_entry("4-0", {**SBIN_LTP, "ltp": "800.00"}))
    same = shown([row])
    assert "800.00" in same
    assert not re.search(coloured("800.00", "green"), same)
    assert not re.search(coloured("800.00", "red"), same), "unchanged: no colour"
    assert re.search(r"│\s+4 │\n└", same), "ticks seen, the last column"


def test_the_table_shows_volume_best_bid_ask_and_ist_time_and_waits_for_silent_symbols() -> None:
    snap, quote, idle = tail.Row("CDS:USDINR29DEC26FUT"), tail.Row("NSE:INFY-EQ"), tail.Row("NSE:Nifty 50")
    snap.add(parse_entry("1-0", USDINR_SNAP))
    quote.add(parse_entry("1-0", INFY_QUOTE))
    text = shown([snap, quote, idle])
    assert "83.1225000 × 10" in text
    assert "83.1250000 × 7" in text
    assert "90,071,992,547,409,930" in text
    assert "1,234,567" in text
    assert "11:43:20.123" in text
    assert "waiting…" in text
    assert "snap_quote" in text
    assert tail.ist_time(0) == "05:30:00.000"


def test_a_zero_first_price_shows_no_percentage() -> None:
    row = tail.Row("NSE:X")
    row.add(parse_entry("1-0", {**SBIN_LTP, "ltp": "0.00"}))
    row.add(parse_entry("2-0", {**SBIN_LTP, "ltp": "0.05"}))
    text = shown([row])
    assert "+0.05" in text
    assert "%" not in text


def test_table_mode_follows_the_streams_until_count(url: str, redis_client: redis.Redis) -> None:
    add(redis_client, SBIN_LTP)
    add(redis_client, SBIN_LTP, ltp="812.50")
    add(redis_client, USDINR_SNAP)
    console, out = terminal()
    argv = ["--from-start", "--count", "3", "NSE:SBIN-EQ", "CDS:USDINR29DEC26FUT", "NSE:Nifty 50"]
    assert tail.main(argv, console=console) == 0
    text = out.getvalue()
    assert re.search(coloured("812.50 ▲", "green"), text)
    assert "83.1234500" in text
    assert "+0.0000000 (+0.00 %)" in text  # 7 decimals, no exponent
    assert "waiting…" in text  # NSE:Nifty 50 never ticked


# --------------------------------------------------------------------------- errors and usage


def test_a_malformed_symbol_is_one_line_and_exit_1(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert tail.main(["SBIN-EQ"]) == 1
    err = capsys.readouterr().err
    assert err == "tail: 'SBIN-EQ' is not EXCHANGE:SYMBOL (e.g. NSE:SBIN-EQ)\n"
    assert tail.main(["NSE:"]) == 1
    assert tail.main([":SBIN"]) == 1


@pytest.mark.parametrize("argv", [[], ["--count", "0", "NSE:X"], ["--count", "many", "NSE:X"], ["--bogus", "NSE:X"]])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert tail.main(argv) == 2
    assert "usage: angelstream tail" in capsys.readouterr().err


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert tail.main(["--help"]) == 0
    assert "--from-start" in capsys.readouterr().out


def test_unreachable_redis_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    assert tail.main(["--json", "NSE:SBIN-EQ"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tail: cannot reach Redis (")
    assert err.endswith("is it running, and is REDIS_URL right?\n")
    assert err.count("\n") == 1


def test_an_invalid_redis_url_is_one_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("REDIS_URL", "localhost:6379")
    assert tail.main(["NSE:SBIN-EQ"]) == 1
    assert capsys.readouterr().err.startswith("tail: REDIS_URL is invalid: ")


def test_a_key_of_the_wrong_type_is_one_line_and_exit_1(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_client.set(keys.ticks("NSE", "SBIN-EQ"), "not a stream")
    assert tail.main(["--json", "NSE:SBIN-EQ"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tail: Redis refused a request: ")
    assert "WRONGTYPE" in err


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq": "x"}, "is not a tick: malformed seq='x'"),
        ({"ltp": "12,5"}, "is not a tick: malformed ltp='12,5'"),
        ({"bids": "[[1.00,2]]"}, "is not a tick: malformed bids='[[1.00,2]]'"),
        ({"bids": "5"}, "is not a tick: malformed bids='5'"),
        ({"v": "2"}, "schema version '2' is not 1, the one this reader knows"),
    ],
)
def test_a_malformed_entry_names_the_entry_and_field_and_exits_1(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str], changes: dict[str, str], message: str
) -> None:
    entry_id = add(redis_client, USDINR_SNAP, **changes)
    assert tail.main(["--json", "--from-start", "CDS:USDINR29DEC26FUT"]) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.startswith(f"tail: ticks:CDS:USDINR29DEC26FUT entry {entry_id}")
    assert message in out.err
    assert out.err.count("\n") == 1


def test_a_missing_field_is_named(url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]) -> None:
    fields = {k: v for k, v in SBIN_LTP.items() if k != "exch_ts"}
    redis_client.xadd(keys.ticks("NSE", "SBIN-EQ"), fields)  # type: ignore[arg-type]
    console, _ = terminal()
    assert tail.main(["--from-start", "NSE:SBIN-EQ"], console=console) == 1
    assert "is not a tick: missing exch_ts\n" in capsys.readouterr().err


def test_with_an_instrument_index_unknown_symbols_are_refused(
    url: str, redis_client: redis.Redis, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_client.hset(keys.INSTRUMENTS, mapping={"NSE:SBIN-EQ": "{}", "NSE:INFY-EQ": "{}"})
    add(redis_client, SBIN_LTP, exchange="BSE")  # not in the master, but its stream exists: fine
    assert tail.main(["--json", "NSE:SBIN-EQ", "nse:infy-eq", "NSE:NOPE", "BSE:SBIN-EQ"]) == 1
    err = capsys.readouterr().err
    assert "not in the instrument master (angelstream:instruments) and no stream: nse:infy-eq, NSE:NOPE" in err
    add(redis_client, SBIN_LTP)
    assert tail.main(["--json", "--from-start", "--count", "2", "NSE:SBIN-EQ", "BSE:SBIN-EQ"]) == 0


# --------------------------------------------------------------------------- as a process: Ctrl-C, a closed pipe


@pytest.fixture
def process_env(redis_server: LocalRedis) -> dict[str, str]:
    return os.environ | {"REDIS_URL": redis_server.url, "PYTHONUNBUFFERED": "1"}


def test_ctrl_c_stops_the_table_and_exits_0(
    redis_client: redis.Redis, process_env: dict[str, str], tmp_path: Path
) -> None:
    add(redis_client, SBIN_LTP)
    before = blocked_clients(redis_client)
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.tail", "--from-start", "NSE:SBIN-EQ"],
        cwd=tmp_path,  # no .env there
        env=process_env | {"PYTHONPATH": str(ROOT), "COLUMNS": "160"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_blocked(redis_client, before, "the tail to wait for ticks")  # after the first batch
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert err == ""
    assert "NSE:SBIN-EQ" in out
    assert "812.40" in out


def test_a_reader_that_goes_away_ends_the_json_tail_quietly(
    redis_client: redis.Redis, process_env: dict[str, str], tmp_path: Path
) -> None:
    add(redis_client, SBIN_LTP)
    proc = subprocess.Popen(
        [sys.executable, "-m", "consumers.tail", "--json", "--from-start", "NSE:SBIN-EQ"],
        cwd=tmp_path,
        env=process_env | {"PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["ltp"] == "812.40"
        proc.stdout.close()  # like `| head -1`
        add(redis_client, SBIN_LTP, seq="102")
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    assert err == ""
