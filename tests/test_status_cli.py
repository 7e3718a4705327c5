"""`angelstream status` (and the pass-through `angelstream candles`) against a real worker and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis

from tests.workerkit import wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.cli import main
from worker.client import get_status
from worker.localredis import LocalRedis
from worker.simulator import SimulatorThread


def test_status_shows_the_worker_its_connections_and_each_symbols_state(
    sim: SimulatorThread,
    redis_client: redis.Redis,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:NOPE-EQ", "ltp")
    with WorkerThread(worker_settings(sim, redis_server.url, status_interval=0.1)):
        wait_for(lambda: b'"live"' in (redis_client.hget(keys.STATE, "NSE:SBIN-EQ") or b""), what="SBIN live")
        assert main(["status"]) == 0
        out = capsys.readouterr().out
        assert main(["status", "--json"]) == 0
        body = json.loads(capsys.readouterr().out)
    assert "feed-1" in out
    assert "connected" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("NSE:")}
    assert "live" in lines["NSE:SBIN-EQ"]
    assert "quote" in lines["NSE:SBIN-EQ"]
    assert "rejected" in lines["NSE:NOPE-EQ"]
    assert "unknown symbol" in lines["NSE:NOPE-EQ"]
    assert "2 subscribed: 1 live, 0 pending, 0 stale, 1 rejected" in out
    assert body["heartbeat"]["connections"][0]["state"] == "connected"
    assert body["state"]["NSE:SBIN-EQ"]["state"] == "live"
    assert body["subscriptions"] == {"NSE:SBIN-EQ": "quote", "NSE:NOPE-EQ": "ltp"}


def test_without_a_worker_status_says_so_and_exits_1(
    redis_client: redis.Redis,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
    redis_client.hset(keys.STATE, "NSE:SBIN-EQ", "not json")  # a reader never fails on one bad value
    redis_client.hset(keys.STATE, "NSE:OLD-EQ", json.dumps({"state": "stale", "last_tick": 1, "since": 1}))
    assert main(["status"]) == 1
    out = capsys.readouterr().out
    assert "no worker is running" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip().startswith("NSE:")}
    assert "unknown" in lines["NSE:SBIN-EQ"]
    assert "min ago" in lines["NSE:OLD-EQ"]
    assert "1 subscribed" in out
    assert main(["status", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["heartbeat"] is None
    assert get_status(redis_client).states == {"NSE:OLD-EQ": {"state": "stale", "last_tick": 1, "since": 1}}
    redis_client.set(keys.HEARTBEAT, "[1]")
    assert get_status(redis_client).heartbeat == {}


def test_status_without_redis_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["status"]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("angelstream status: cannot reach Redis")


def test_candles_takes_its_own_options(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("CANDLE_INTERVALS", raising=False)
    assert main(["candles", "--intervals", "1fortnight"]) == 2
    assert "bad interval" in capsys.readouterr().err


def test_config_prints_every_setting_with_secrets_and_passwords_masked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("ANGEL_API_KEY", "ANGEL_CLIENT_CODE", "ANGEL_PIN", "ANGEL_TOTP_SECRET", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    assert main(["config"]) == 2
    assert "ANGEL_API_KEY is required" in capsys.readouterr().err
    monkeypatch.setenv("ANGEL_API_KEY", "key-1234")
    monkeypatch.setenv("ANGEL_CLIENT_CODE", "A1")
    monkeypatch.setenv("ANGEL_PIN", "4321")
    monkeypatch.setenv("ANGEL_TOTP_SECRET", "TOTPSECRETXYZ")
    monkeypatch.setenv("REDIS_URL", "redis://worker:hunter2@redis:6379/0")
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    assert "ANGEL_CLIENT_CODE=A1" in out
    assert "REDIS_URL=redis://***@redis:6379/0" in out
    assert "HEALTH_PORT=8000" in out
    for secret in ("key-1234", "4321", "TOTPSECRETXYZ", "hunter2"):
        assert secret not in out


def test_tail_takes_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tail", "nocolon"]) == 1
    assert "EXCHANGE:SYMBOL" in capsys.readouterr().err


def test_bench_takes_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["bench", "--help"])
    assert done.value.code == 0
    assert "--quick" in capsys.readouterr().out
