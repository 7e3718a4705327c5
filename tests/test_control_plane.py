"""Steering a running worker through Redis: commands, hash-only writers, restarts, limits, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.workerkit import (
    assert_tick_is,
    events,
    metric,
    record_fault,
    scrape,
    sent_to,
    ticks,
    wait_for,
    worker_settings,
)
from worker import keys
from worker.app import WorkerThread
from worker.client import CommandRejected, send_command
from worker.instruments import InstrumentIndex, bundled_master_path, generate_master, load_master_file
from worker.localredis import LocalRedis
from worker.simulator import SimConfig, SimulatorThread

INDEX = InstrumentIndex(load_master_file(bundled_master_path()))


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(rate_per_token=20.0, record=True)) as thread:
        yield thread


def on_wire(sim: SimulatorThread) -> set[tuple[int, int, str]]:
    return {pair for conn in list(sim.sim.connections) for pair in conn.subscriptions}


def send(client: redis.Redis, body: dict[str, object] | str) -> None:
    wait_for(lambda: client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker to listen")
    client.publish(keys.CONTROL, body if isinstance(body, str) else json.dumps(body))


def answer(client: redis.Redis, request_id: str) -> dict[str, str]:
    def answers() -> list[dict[str, str]]:
        return [e for e in events(client) if e.get("request_id") == request_id]

    wait_for(answers, what=f"the answer to {request_id}")
    return answers()[0]


def assert_continuous(sim: SimulatorThread, client: redis.Redis, key: str) -> None:
    """Every tick sent for ``key`` is in its stream, once, in order: it never missed one."""
    inst = INDEX.by_key[key]
    got, sent = ticks(client, key), sent_to(sim, inst)
    assert len(got) == len(sent), key
    for tick, s in zip(got, sent, strict=True):
        assert_tick_is(tick, s.packet, inst)


def settle(sim: SimulatorThread, client: redis.Redis, worker: WorkerThread, symbols: list[str]) -> None:
    sim.sim.set_silent(True)

    def done() -> bool:
        return worker.worker.sink.buffered == 0 and all(
            client.xlen(keys.ticks_for(k)) == len(sent_to(sim, INDEX.by_key[k])) for k in symbols
        )

    wait_for(done, what="the last ticks written")


def test_changes_while_streaming_touch_only_the_symbols_named(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    steady = ["NSE:SBIN-EQ", "NFO:NIFTY29DEC26FUT", "CDS:USDINR29DEC26FUT"]
    for key in steady:
        redis_client.hset(keys.SUBSCRIPTIONS, key, "snap_quote")
    with WorkerThread(worker_settings(sim, redis_server.url)) as worker:
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) > 3 for k in steady), what="steady ticks")
        send(
            redis_client,
            {"action": "subscribe", "symbols": ["NSE:INFY-EQ", "BSE:SENSEX"], "mode": "quote", "request_id": "a"},
        )
        assert answer(redis_client, "a")["type"] == "command_accepted"
        wait_for(lambda: redis_client.xlen("ticks:NSE:INFY-EQ") > 3, what="INFY ticks")
        send(redis_client, {"action": "subscribe", "symbols": ["NSE:INFY-EQ"], "mode": "ltp", "request_id": "b"})
        answer(redis_client, "b")
        wait_for(lambda: (1, 1, "1594") in on_wire(sim), what="INFY in LTP mode")
        send(redis_client, {"action": "unsubscribe", "symbols": ["BSE:SENSEX"], "request_id": "c"})
        answer(redis_client, "c")
        wait_for(lambda: not any(t == "99919000" for _, _, t in on_wire(sim)), what="SENSEX gone")
        stopped_at = redis_client.xlen("ticks:BSE:SENSEX")
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 20, what="more steady ticks")
        settle(sim, redis_client, worker, steady)
        for key in steady:
            assert_continuous(sim, redis_client, key)
        assert redis_client.xlen("ticks:BSE:SENSEX") == stopped_at
        assert {t.mode for t in ticks(redis_client, "NSE:INFY-EQ")} == {"quote", "ltp"}
        assert [c.connects for c in worker.worker.feed.connections] == [1]


def test_a_subscription_written_only_to_the_hash_is_picked_up(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with WorkerThread(worker_settings(sim, redis_server.url, reconcile_interval=0.2)):
        wait_for(lambda: redis_client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker")
        redis_client.hset(keys.SUBSCRIPTIONS, "MCX:GOLD05FEB27FUT", "quote")
        wait_for(lambda: redis_client.xlen("ticks:MCX:GOLD05FEB27FUT") > 2, what="GOLD ticks without a command")
        redis_client.hdel(keys.SUBSCRIPTIONS, "MCX:GOLD05FEB27FUT")
        wait_for(lambda: not on_wire(sim), what="GOLD unsubscribed without a command")


@pytest.mark.faults
def test_a_killed_worker_resumes_every_subscription_from_the_hash(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis, tmp_path: Path
) -> None:
    want = {"NSE:SBIN-EQ": "quote", "NSE:INFY-EQ": "ltp", "MCX:CRUDEOIL19DEC26FUT": "snap_quote"}
    for key, mode in want.items():
        redis_client.hset(keys.SUBSCRIPTIONS, key, mode)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANGEL_", "REDIS_"))}
    env |= sim.sim.worker_env() | {"REDIS_URL": redis_server.url, "INSTRUMENTS_CACHE": "", "HEALTH_PORT": "0"}
    command = [sys.executable, "-m", "worker", "run"]
    first = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) > 2 for k in want), timeout=20, what="ticks")
        wire = on_wire(sim)
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        wait_for(lambda: not sim.sim.connections, what="the dead worker's socket to close")
        counts = {k: redis_client.xlen(keys.ticks_for(k)) for k in want}
        began = time.monotonic()
        second = subprocess.Popen(command, cwd=tmp_path, env=env, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: on_wire(sim) == wire, timeout=20, what="every subscription restored")
            wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) > counts[k] for k in want), timeout=20)
            record_fault("process: SIGKILL, restart", sim, redis_client, [], time.monotonic() - began)
            wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) > counts[k] + 2 for k in want), timeout=20)
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(10) == 0
    finally:
        first.kill()
    for key in want:
        ids = [t.id for t in ticks(redis_client, key)]
        assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-")))), "one ordered stream across the restart"


def test_three_thousand_symbols_fill_three_connections_and_the_next_is_refused(
    redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    master = generate_master(3002)
    wanted, spare = master[:3001], master[3001]
    with SimulatorThread(SimConfig(instruments=master, rate_per_token=0.5, max_rate=3000)) as sim:
        redis_client.hset(keys.SUBSCRIPTIONS, mapping={i.key: "ltp" for i in wanted})
        with WorkerThread(worker_settings(sim, redis_server.url)) as worker:
            wait_for(lambda: sorted(len(c.subscriptions) for c in sim.sim.connections) == [1000] * 3, timeout=20)
            wait_for(lambda: events(redis_client, "subscription_rejected"), what="the refusal")
            [refused] = events(redis_client, "subscription_rejected")
            assert refused["reason"] == "capacity exceeded"
            assert refused["symbol"] == sorted(i.key for i in wanted)[-1]
            assert [len(c.desired) for c in worker.worker.feed.connections] == [1000] * 3
            send(redis_client, {"action": "subscribe", "symbols": [spare.key], "request_id": "more"})
            assert "capacity exceeded" in answer(redis_client, "more")["error"]
            assert not any(e["code"] == "E1002" for e in events(redis_client, "feed_server_error"))


BAD_COMMANDS: list[tuple[str, str]] = [
    ("not json", "not JSON"),
    ('["a list"]', "JSON object"),
    ('{"action": "explode", "symbols": ["NSE:SBIN-EQ"], "request_id": "x1"}', "unknown action"),
    ('{"action": "subscribe", "symbols": [], "request_id": "x2"}', "non-empty list"),
    ('{"action": "subscribe", "symbols": ["SBIN-EQ"], "request_id": "x3"}', "EXCHANGE:SYMBOL"),
    ('{"action": "subscribe", "symbols": ["NSE:SBIN-EQ"], "mode": "turbo", "request_id": "x4"}', "unknown mode"),
    ('{"action": "subscribe", "symbols": ["NSE:SBI-EQ"], "request_id": "x5"}', "did you mean NSE:SBIN-EQ"),
    ('{"action": "subscribe", "symbols": ["NSE:SBIN-EQ"], "request_id": 7}', "request_id"),
    ('{"action": "subscribe", "symbols": ["NSE:' + "A" * 70_000 + '"], "request_id": "x6"}', "limit"),
    ("[" * 5000, "not JSON"),
]


def test_bad_commands_each_get_their_error_while_the_set_keeps_streaming(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
    with WorkerThread(worker_settings(sim, redis_server.url)) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 3, what="SBIN ticks")
        for body, _ in BAD_COMMANDS:
            send(redis_client, body)
        wait_for(lambda: len(events(redis_client, "command_error")) == len(BAD_COMMANDS), what="every answer")
        errors = [e["error"] for e in events(redis_client, "command_error")]
        for (_, expected), error in zip(BAD_COMMANDS, errors, strict=True):
            assert expected in error, (expected, error)
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"quote"}
        # Valid, with a request_id that is not valid Unicode: answered (escaped), never a crash.
        send(redis_client, '{"action": "resync", "request_id": "odd\\ud800"}')
        assert answer(redis_client, "odd\\ud800")["type"] == "command_accepted"
        settle(sim, redis_client, worker, ["NSE:SBIN-EQ"])
        assert_continuous(sim, redis_client, "NSE:SBIN-EQ")
        assert worker.worker.failed is None


def test_a_flood_of_commands_is_rate_limited_and_the_worker_streams_on(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    redis_client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
    others = sorted(k for k in INDEX.by_key if k.startswith("NSE:") and k.endswith("-EQ") and k != "NSE:SBIN-EQ")
    flood = others[:10]
    with WorkerThread(worker_settings(sim, redis_server.url, control_rate=0.01, control_burst=3)) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > 3, what="SBIN ticks")
        for n, symbol in enumerate(flood):
            send(redis_client, {"action": "subscribe", "symbols": [symbol], "request_id": f"f{n}"})
        answers = [answer(redis_client, f"f{n}") for n in range(len(flood))]
        assert [a["type"] for a in answers] == ["command_accepted"] * 3 + ["command_error"] * 7
        for refused in answers[3:]:
            assert refused["error"].startswith("rate limited: more than 0.01 commands/s (bursts of 3), so this one ")
        with pytest.raises(CommandRejected, match=r"^rate limited: .*: batch symbols into one command"):
            send_command(redis_client, "subscribe", [flood[-1]])
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {
            k.encode(): m for k, m in [("NSE:SBIN-EQ", b"quote")] + [(k, b"ltp") for k in flood[:3]]
        }
        assert worker.worker.health is not None
        metrics = scrape(worker.worker.health.url)
        assert metric(metrics, "angelstream_control_commands_total") == 11
        assert metric(metrics, "angelstream_control_refused_total") == 8
        assert metric(metrics, "angelstream_control_rate_limited_total") == 8
        settle(sim, redis_client, worker, ["NSE:SBIN-EQ", *flood[:3]])
        for key in ["NSE:SBIN-EQ", *flood[:3]]:
            assert_continuous(sim, redis_client, key)
        assert [c.connects for c in worker.worker.feed.connections] == [1]
