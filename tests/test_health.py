"""/healthz, /readyz and /metrics served by a real worker against the simulator and real Redis; logs."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Iterator
from datetime import datetime
from datetime import time as wall_time
from typing import Any

import pytest
import redis
import requests

from tests.workerkit import events, metric, scrape, wait_for, worker_settings
from worker import keys
from worker.app import Worker, WorkerThread
from worker.health import market_open
from worker.localredis import LocalRedis
from worker.logs import JsonFormatter, KeyValueFormatter, configure
from worker.settings import IST
from worker.simulator import SimulatorThread

ALWAYS_OPEN = {"market_open": wall_time(0, 0), "market_close": wall_time(23, 59, 59, 999999)}


def get(url: str) -> tuple[int, dict[str, Any]]:
    response = requests.get(url, timeout=5)
    return response.status_code, response.json()


def test_readiness_follows_the_feed_the_data_and_redis(sim: SimulatorThread) -> None:
    with LocalRedis() as own:
        client = redis.Redis.from_url(own.url)
        client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
        settings = worker_settings(sim, own.url, fresh_within=0.5, stall_timeout=30.0, **ALWAYS_OPEN)
        with WorkerThread(settings) as worker:
            assert worker.worker.health is not None
            url = worker.worker.health.url
            assert get(url + "/healthz") == (200, {"status": "alive"})
            wait_for(lambda: get(url + "/readyz")[0] == 200, what="ready")
            body = get(url + "/readyz")[1]
            assert body["ready"] is True
            assert body["checks"]["data"]["market_open"] is True

            sim.sim.set_silent(True)  # connected, but mute: the data check fails
            wait_for(lambda: get(url + "/readyz")[0] == 503, what="not ready while mute")
            data = get(url + "/readyz")[1]["checks"]["data"]
            assert "no tick for more than 0.5 s" in data["error"]
            sim.sim.set_silent(False)
            wait_for(lambda: get(url + "/readyz")[0] == 200, what="ready again")

            sim.inject("refuse", count="1000", status="429")  # the feed is cut and stays cut
            sim.inject("drop")
            wait_for(lambda: get(url + "/readyz")[0] == 503, what="not ready without a feed")
            feed = get(url + "/readyz")[1]["checks"]["feed"]
            assert feed["error"] == "no feed connection is up"
            assert "HTTP 429" in feed["connections"][0]["last_error"]
            sim.sim._refuse.clear()
            wait_for(lambda: get(url + "/readyz")[0] == 200, timeout=15, what="ready after the feed is back")

            own.stop()
            status, body = get(url + "/readyz")
            assert status == 503
            assert "Redis does not answer" in body["checks"]["redis"]["error"]
            assert get(url + "/healthz")[0] == 200, "alive all the same"
            own.start()
            wait_for(lambda: get(url + "/readyz")[0] == 200, timeout=15, what="ready after Redis is back")
        client.close()


def test_without_subscriptions_the_worker_is_not_ready_and_says_why(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with WorkerThread(
        worker_settings(sim, redis_server.url, market_open=wall_time(0, 0), market_close=wall_time(0, 0))
    ) as w:
        assert w.worker.health is not None
        status, body = get(w.worker.health.url + "/readyz")
    assert status == 503
    assert body["checks"]["feed"]["error"] == "no feed connection: nothing is subscribed"
    assert body["checks"]["data"] == {"ok": True, "market_open": False, "last_tick_age_seconds": None}


def test_metrics_move_as_ticks_flow(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
    redis_client.hset(keys.SUBSCRIPTIONS, "CDS:USDINR29DEC26FUT", "ltp")
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:NOPE-EQ", "ltp")
    with WorkerThread(worker_settings(sim, redis_server.url, status_interval=0.1)) as worker:
        assert worker.worker.health is not None
        url = worker.worker.health.url
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 3, what="ticks")
        sim.inject("garbage")
        first = scrape(url)
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 10, what="more ticks")
        sim.inject("close")
        wait_for(lambda: worker.worker.feed.connections[0].connects == 2, what="a reconnect")
        wait_for(lambda: "live" in str(redis_client.hget(keys.STATE, "NSE:SBIN-EQ")), what="live")
        second = scrape(url)
    assert metric(second, "angelstream_ticks_received_total", exchange="NSE", mode="quote") > metric(
        first, "angelstream_ticks_received_total", exchange="NSE", mode="quote"
    )
    assert metric(second, "angelstream_ticks_received_total", exchange="CDS", mode="ltp") > 0
    assert metric(second, "angelstream_ticks_written_total", exchange="NSE") > metric(
        first, "angelstream_ticks_written_total", exchange="NSE"
    )
    assert metric(second, "angelstream_decode_errors_total") == 1
    assert metric(second, "angelstream_feed_disconnects_total", connection="feed-1", cause="closed") == 1
    assert metric(second, "angelstream_feed_connection_state", connection="feed-1", state="connected") == 1
    assert metric(second, "angelstream_feed_tokens", connection="feed-1") == 2
    assert metric(second, "angelstream_subscriptions", state="rejected") == 1
    assert metric(second, "angelstream_batch_size_count") > 0
    assert metric(second, "angelstream_xadd_seconds_count") > 0
    assert metric(second, "angelstream_frame_to_xadd_seconds_count") > 0
    assert metric(second, "angelstream_ticks_dropped_total") == 0
    assert metric(second, "angelstream_events_dropped_total") == 0
    assert metric(second, "angelstream_redis_ok") == 1
    assert 0 <= metric(second, "angelstream_last_tick_age_seconds") < 5


def test_reconnect_delays_are_a_histogram_per_connection(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    sim.inject("refuse", count="3", status="429")
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
    with WorkerThread(worker_settings(sim, redis_server.url)) as worker:
        assert worker.worker.health is not None
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 0, what="ticks after three refused upgrades")
        text = scrape(worker.worker.health.url)
    delays = [float(e["delay"]) for e in events(redis_client, "feed_reconnecting")]
    assert len(delays) == 3
    name = "angelstream_feed_reconnect_delay_seconds"
    assert metric(text, name + "_count", connection="feed-1") == 3
    assert metric(text, name + "_sum", connection="feed-1") == pytest.approx(sum(delays), abs=0.003)
    # 0.05 s, 0.1 s, 0.2 s (FAST settings) plus up to 0.02 s of jitter each
    assert metric(text, name + "_bucket", connection="feed-1", le="0.1") == 1
    assert metric(text, name + "_bucket", connection="feed-1", le="0.25") == 3


def test_a_taken_health_port_is_reported_and_the_worker_streams_on(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
        with WorkerThread(worker_settings(sim, redis_server.url, health_port=port)) as worker:
            wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 3, what="ticks without the health server")
            assert worker.worker.health is None
    assert f"cannot listen on 127.0.0.1:{port}" in events(redis_client, "health_unavailable")[0]["error"]


def test_market_hours_are_weekdays_between_open_and_close() -> None:
    opens, closes = wall_time(9, 15), wall_time(15, 30)
    assert market_open(datetime(2026, 11, 24, 9, 15, tzinfo=IST), opens, closes)  # a Tuesday
    assert not market_open(datetime(2026, 11, 24, 9, 14, 59, tzinfo=IST), opens, closes)
    assert not market_open(datetime(2026, 11, 24, 15, 30, tzinfo=IST), opens, closes)
    assert not market_open(datetime(2026, 11, 28, 11, 0, tzinfo=IST), opens, closes)  # a Saturday


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("root_logging")
def test_log_lines_are_key_value_or_json(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("angelstream.test")
    configure("INFO", "json")  # a test runner's handlers are there: left alone
    log.info("not ours to print")
    assert capsys.readouterr().err == ""
    configure("INFO", "json", force=True)
    log.info('feed-1: "connected"')
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    log.debug("not shown")
    configure("INFO", "text")  # ours already: switched to text
    log.warning("reconnecting in 0.5 s")
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = json.loads(lines[0]), json.loads(lines[1])
    assert first["level"] == "info"
    assert first["logger"] == "angelstream.test"
    assert first["msg"] == 'feed-1: "connected"'
    assert first["ts"].endswith("Z")
    assert "ValueError: boom" in second["exc"]
    assert lines[-1].split(" ", 1)[1] == 'level=warning logger=angelstream.test msg="reconnecting in 0.5 s"'
    record = logging.LogRecord("x", logging.ERROR, "f", 1, "oops", None, (ValueError, ValueError("v"), None))
    assert "\n" not in KeyValueFormatter().format(record)
    assert json.loads(JsonFormatter().format(record))["exc"] == "ValueError: v"


def test_metrics_of_a_worker_not_yet_running_read_zero_commands(sim: SimulatorThread) -> None:
    worker = Worker(worker_settings(sim, "redis://127.0.0.1:1/0"))
    assert worker.control is None
    assert worker.status is None
    text = worker.metrics.render().decode()
    for name in ("commands", "refused", "rate_limited"):
        assert metric(text, f"angelstream_control_{name}_total") == 0
    assert metric(text, "angelstream_subscriptions", state="live") == 0
