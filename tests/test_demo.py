"""`angelstream demo`: the live table, the Redis it picks, and a clean stop on Ctrl-C."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from rich.console import Console

from tests.workerkit import wait_for
from worker import keys
from worker.demo import DEMO_SYMBOLS, run_demo, table
from worker.localredis import LocalRedis


def render(client: redis.Redis, symbols: list[str]) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system="truecolor", force_terminal=True).print(table(client, symbols))
    return out.getvalue()


def add(client: redis.Redis, key: str, ltp: str, **extra: str) -> None:
    exchange, _, symbol = key.partition(":")
    fields = {"v": "1", "token": "1", "exchange": exchange, "symbol": symbol, "mode": "ltp", "seq": "1"}
    fields |= {"exch_ts": "1764000000000", "ltp": ltp, "recv_ts": str(time.time_ns() // 1000)} | extra
    client.xadd(keys.ticks_for(key), fields)  # type: ignore[arg-type]


def test_the_table_shows_each_symbols_latest_tick_and_colours_the_change(redis_client: redis.Redis) -> None:
    add(redis_client, "NSE:UP", "100.00")
    add(redis_client, "NSE:UP", "100.05")
    add(redis_client, "NSE:DOWN", "99.00")
    add(redis_client, "NSE:DOWN", "98.95")
    add(redis_client, "NSE:FLAT", "5.00")
    add(redis_client, "NSE:FLAT", "5.00")
    add(redis_client, "NSE:ONE", "7.10", mode="snap_quote", volume="1234567", bids="[[7.05,10,2]]", asks="[]")
    candle = {"open": "7.00", "high": "7.20", "low": "6.90", "close": "7.10", "has_volume": "1", "volume": "12345"}
    redis_client.hset(keys.forming("1m", "NSE:ONE"), mapping=candle)  # type: ignore[arg-type]
    redis_client.hset(keys.forming("1m", "NSE:UP"), mapping=candle | {"has_volume": "0"})  # type: ignore[arg-type]
    text = render(redis_client, ["NSE:UP", "NSE:DOWN", "NSE:FLAT", "NSE:ONE", "NSE:NONE"])
    lines = {line.split()[1]: line for line in text.splitlines() if line.startswith("│ NSE:")}
    assert "100.05 ▲" in lines["NSE:UP"]
    assert "\x1b[32m" in lines["NSE:UP"]  # green
    assert "98.95 ▼" in lines["NSE:DOWN"]
    assert "\x1b[31m" in lines["NSE:DOWN"]  # red
    assert "▲" not in lines["NSE:FLAT"]
    assert "▼" not in lines["NSE:FLAT"]
    assert "1,234,567" in lines["NSE:ONE"]
    assert "7.00 7.20 6.90 7.10 12,345" in lines["NSE:ONE"]  # the forming 1m candle
    assert "7.00 7.20 6.90 7.10" in lines["NSE:UP"]
    assert "12,345" not in lines["NSE:UP"]  # a candle of LTP ticks only has no volume
    assert "7.05 × 10" in lines["NSE:ONE"]
    assert "21:30:00" in lines["NSE:ONE"]  # 16:00 UTC, shown in IST
    assert "waiting…" in lines["NSE:NONE"]


def test_the_demo_uses_a_reachable_redis_and_fills_its_streams(
    redis_client: redis.Redis, redis_server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    out = io.StringIO()
    with caplog.at_level(logging.INFO, logger="worker.demo"):
        assert run_demo(redis_server.url, rate=20.0, duration=1.5, console=Console(file=out, width=200)) == 0
    assert f"using the Redis at REDIS_URL {redis_server.url}" in caplog.text
    for key in DEMO_SYMBOLS:
        assert redis_client.xlen(keys.ticks_for(key)) > 0, key
        assert redis_client.exists(keys.forming("1m", key)), f"the demo builds candles too: {key}"
        assert key in out.getvalue()
    assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {k.encode(): v.encode() for k, v in DEMO_SYMBOLS.items()}


def test_without_redis_the_demo_starts_its_own_and_stops_cleanly_on_ctrl_c() -> None:
    env = os.environ | {"REDIS_URL": "redis://127.0.0.1:1/0", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "demo", "--rate", "10"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        stream = proc.stderr
        lines: list[str] = []

        def logged_in() -> bool:
            lines.append(stream.readline())
            return "logged in" in lines[-1]

        wait_for(logged_in, timeout=30, what="login")
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert "no Redis at REDIS_URL redis://127.0.0.1:1/0; started a private redis-server" in "".join(lines)
    assert "stopped" in stdout
    assert "NSE:SBIN-EQ" in stdout
    assert "all flushed" in stderr
