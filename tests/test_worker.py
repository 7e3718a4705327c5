"""The worker end to end: simulator → worker → a private redis-server, with the simulator's faults.

Every test runs the real worker (its own event loop in a thread) against the real simulator and a
real Redis, and checks the streams' content against what the simulator recorded sending.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from tests.simclient import open_stream
from tests.workerkit import (
    assert_tick_is,
    events,
    is_subsequence,
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
from worker.client import get_latest_ticks
from worker.instruments import Instrument, InstrumentIndex, bundled_master_path, generate_master, load_master_file
from worker.localredis import LocalRedis
from worker.simulator import SimConfig, SimulatorThread

BUNDLED = load_master_file(bundled_master_path())
INDEX = InstrumentIndex(BUNDLED + generate_master(30))
SBIN, INFY, RELIANCE = (INDEX.by_key[k] for k in ("NSE:SBIN-EQ", "NSE:INFY-EQ", "NSE:RELIANCE-EQ"))
USDINR = INDEX.by_key["CDS:USDINR29DEC26FUT"]


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(instruments=list(INDEX), rate_per_token=20.0, record=True)) as thread:
        yield thread


def start(sim: SimulatorThread, client: redis.Redis, url: str, want: dict[str, str], **settings: Any) -> WorkerThread:
    """A worker for ``sim`` and the Redis at ``url``, ``want`` already in the hash; ``with`` runs it."""
    for key, mode in want.items():
        client.hset(keys.SUBSCRIPTIONS, key, mode)
    return WorkerThread(worker_settings(sim, url, **settings))


def command(client: redis.Redis, action: str, symbols: list[str], mode: str = "ltp", request_id: str = "r") -> None:
    body = {"action": action, "symbols": symbols, "mode": mode, "request_id": request_id}
    wait_for(lambda: client.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker to listen for commands")
    assert client.publish(keys.CONTROL, json.dumps(body)) == 1, "the worker listens on the control channel"


def answered(client: redis.Redis, request_id: str) -> dict[str, str]:
    found: list[dict[str, str]] = []

    def answer() -> bool:
        found[:] = [e for e in events(client) if e.get("request_id") == request_id]
        return bool(found)

    wait_for(answer, what=f"an answer to {request_id}")
    return found[0]


def subscribed_on_sim(sim: SimulatorThread) -> set[tuple[int, int, str]]:
    return {pair for conn in list(sim.sim.connections) for pair in conn.subscriptions}


def connected_again(worker: WorkerThread) -> Callable[[], bool]:
    conn = worker.worker.feed.connections[0]
    before = conn.connects if conn.state == "connected" else conn.connects - 1
    return lambda: conn.state == "connected" and conn.connects > before


def recovered(client: redis.Redis, key: str, began: float) -> float:
    """Seconds from ``began`` until a tick arrives in ``key`` after the worker is connected again."""
    n = client.xlen(keys.ticks_for(key))
    wait_for(lambda: client.xlen(keys.ticks_for(key)) > n, timeout=15, what=f"a tick in {key} after the fault")
    seconds = time.monotonic() - began
    wait_for(lambda: client.xlen(keys.ticks_for(key)) > n + 3, what=f"ticks flowing in {key}")
    return seconds


def settle(
    sim: SimulatorThread, worker: WorkerThread, client: redis.Redis, symbols: list[Instrument], dropped: int = 0
) -> None:
    """Silence the simulator and wait until the worker wrote everything it was sent (but ``dropped``)."""
    sim.sim.set_silent(True)
    time.sleep(0.1)  # frames in flight arrive

    def flushed() -> bool:
        written = sum(client.xlen(keys.ticks_for(inst.key)) for inst in symbols)
        return worker.worker.sink.buffered == 0 and written + dropped == sum(len(sent_to(sim, i)) for i in symbols)

    wait_for(flushed, what="every sent tick in Redis")


def assert_exactly_sent(sim: SimulatorThread, client: redis.Redis, inst: Instrument) -> None:
    """The stream holds exactly the ticks sent for ``inst``, once each, in order, field by field."""
    got = ticks(client, inst.key)
    sent = sent_to(sim, inst)
    assert len(got) == len(sent) > 0, inst.key
    for tick, s in zip(got, sent, strict=True):
        assert_tick_is(tick, s.packet, inst)


def assert_no_loss_outside(
    sim: SimulatorThread, client: redis.Redis, inst: Instrument, outage: tuple[float, float]
) -> None:
    """In order, no duplicates, nothing lost except what was sent inside ``outage`` (monotonic times)."""
    got = ticks(client, inst.key)
    sent = sent_to(sim, inst)
    by_seq = [(t.seq, t.exch_ts, t.ltp) for t in got]
    assert len(set(by_seq)) == len(by_seq), "a tick was written twice"
    keyed = [(s.packet.sequence_number, s.packet.exchange_timestamp) for s in sent]
    assert is_subsequence([(t.seq, t.exch_ts) for t in got], keyed), "ticks out of order or never sent"
    written = {(t.seq, t.exch_ts) for t in got}
    lost = [s for s in sent if (s.packet.sequence_number, s.packet.exchange_timestamp) not in written]
    assert all(outage[0] <= s.at <= outage[1] for s in lost), f"{len(lost)} ticks lost outside the outage"


# --------------------------------------------------------------------------- end to end


def test_every_tick_arrives_once_in_order_with_every_field_across_three_modes_and_60_symbols(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    chosen = [i for i in INDEX if i.exchange in ("NSE", "NFO", "BSE", "MCX", "CDS")][:60]
    modes = ("ltp", "quote", "snap_quote")
    want = {inst.key: modes[n % 3] for n, inst in enumerate(chosen)}
    with start(sim, redis_client, redis_server.url, want) as worker:
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(i.key)) >= 5 for i in chosen), what="5 ticks each")
        settle(sim, worker, redis_client, chosen)
        for inst in chosen:
            assert_exactly_sent(sim, redis_client, inst)
            assert {t.mode for t in ticks(redis_client, inst.key)} == {want[inst.key]}
    assert worker.error is None


def test_connect_success(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}) as worker:
        wait_for(lambda: events(redis_client, "feed_connected"), what="feed_connected")
        [conn] = worker.worker.feed.connections
        assert conn.state == "connected"
        assert conn.connects == 1
        assert sim.sim.logins == 1
        assert worker.worker.logins == 1
        assert events(redis_client, "login")[0]["client_code"] == sim.sim.config.client_code
    kinds = [e["type"] for e in events(redis_client)]
    assert kinds[0] == "worker_started"
    assert kinds[-1] == "worker_stopped"


def test_connect_failure(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    """A refused login is an error event and a retry with backoff; never a crash, never a hammering."""
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}, angel_pin="0000") as worker:
        wait_for(lambda: len(events(redis_client, "login_failed")) >= 3, what="three refused logins")
        failed = events(redis_client, "login_failed")
        assert "0000" not in json.dumps(failed)
        assert sim.sim.config.totp_secret not in json.dumps(failed)
        delays = [float(e["delay"]) for e in events(redis_client, "feed_reconnecting")]
        assert delays[2] > delays[0], "the backoff grows"
        assert "login failed" in events(redis_client, "feed_reconnecting")[0]["cause"]
        assert worker.worker.feed.connections[0].connects == 0
        assert sim.sim.upgrades == 0, "no stream upgrade without a login"
    assert worker.error is None


def test_an_unreachable_stream_is_retried_with_backoff(redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    with SimulatorThread(SimConfig(instruments=list(INDEX))) as sim:
        url = sim.sim.ws_url.replace(str(sim.sim.port), "1")  # nothing listens on port 1
        with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}, angel_ws_url=url):
            wait_for(lambda: len(events(redis_client, "feed_reconnecting")) >= 2, what="reconnect attempts")
    assert "cannot connect" in events(redis_client, "feed_reconnecting")[0]["cause"]


def test_subscribe_symbols(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    with start(sim, redis_client, redis_server.url, {}) as worker:
        command(redis_client, "subscribe", ["NSE:SBIN-EQ"], "quote", "sub-1")
        answer = answered(redis_client, "sub-1")
        assert answer["type"] == "command_accepted"
        assert json.loads(answer["tokens"]) == {"NSE:SBIN-EQ": "3045"}
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"quote"}
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="SBIN ticks")
        assert subscribed_on_sim(sim) == {(2, 1, "3045")}
        settle(sim, worker, redis_client, [SBIN])
        assert_exactly_sent(sim, redis_client, SBIN)


def test_unsubscribe_symbols(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp", "NSE:INFY-EQ": "ltp"}) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:INFY-EQ") >= 2, what="INFY ticks")
        command(redis_client, "unsubscribe", ["NSE:INFY-EQ"], request_id="unsub-1")
        assert answered(redis_client, "unsub-1")["type"] == "command_accepted"
        wait_for(lambda: subscribed_on_sim(sim) == {(1, 1, "3045")}, what="INFY unsubscribed on the wire")
        assert redis_client.hkeys(keys.SUBSCRIPTIONS) == [b"NSE:SBIN-EQ"]
        time.sleep(0.2)
        frozen = redis_client.xlen("ticks:NSE:INFY-EQ")
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 10, what="SBIN keeps ticking")
        assert redis_client.xlen("ticks:NSE:INFY-EQ") == frozen
        assert worker.worker.feed.connections[0].connects == 1, "a diff, never a reconnect"


def test_subscribe_multiple(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    symbols = ["NSE:SBIN-EQ", "NFO:NIFTY29DEC26FUT", "BSE:SENSEX", "MCX:GOLD05FEB27FUT", "CDS:USDINR29DEC26FUT"]
    with start(sim, redis_client, redis_server.url, {}) as worker:
        command(redis_client, "subscribe", symbols, "snap_quote", "many")
        assert json.loads(answered(redis_client, "many")["symbols"]) == symbols
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(s)) >= 2 for s in symbols), what="every symbol")
        assert {mode for mode, _, _ in subscribed_on_sim(sim)} == {3}
        settle(sim, worker, redis_client, [INDEX.by_key[s] for s in symbols])
        for symbol in symbols:
            assert_exactly_sent(sim, redis_client, INDEX.by_key[symbol])


def test_a_mode_change_moves_the_token_without_a_reconnect(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 2, what="LTP ticks")
        command(redis_client, "subscribe", ["NSE:SBIN-EQ"], "snap_quote", "mode")
        answered(redis_client, "mode")
        wait_for(lambda: subscribed_on_sim(sim) == {(3, 1, "3045")}, what="SnapQuote on the wire")
        wait_for(lambda: ticks(redis_client, "NSE:SBIN-EQ")[-1].mode == "snap_quote", what="SnapQuote ticks")
        assert worker.worker.feed.connections[0].connects == 1


def test_bad_commands_are_answered_and_change_nothing(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}):
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 2, what="SBIN ticks")
        command(redis_client, "subscribe", ["NSE:SBIN"], request_id="typo")
        assert "NSE:SBIN-EQ" in answered(redis_client, "typo")["error"]
        assert redis_client.publish(keys.CONTROL, b"\xff not json") == 1
        command(redis_client, "explode", ["NSE:SBIN-EQ"], request_id="bad-action")
        assert "unknown action" in answered(redis_client, "bad-action")["error"]
        before = redis_client.xlen("ticks:NSE:SBIN-EQ")
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > before + 3, what="SBIN still ticking")
        assert redis_client.hgetall(keys.SUBSCRIPTIONS) == {b"NSE:SBIN-EQ": b"ltp"}
        assert len(events(redis_client, "command_error")) == 3


def test_receive_tick_data(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:RELIANCE-EQ": "snap_quote"}):
        wait_for(lambda: redis_client.xlen("ticks:NSE:RELIANCE-EQ") >= 5, what="RELIANCE ticks")
        latest = get_latest_ticks("RELIANCE-EQ", "NSE", 3, client=redis_client)
    assert len(latest) == 3
    assert [t.id for t in latest] == sorted((t.id for t in latest), reverse=True), "newest first"
    sent = {(s.packet.sequence_number, s.packet.exchange_timestamp): s.packet for s in sent_to(sim, RELIANCE)}
    for tick in latest:
        assert_tick_is(tick, sent[(tick.seq, tick.exch_ts)], RELIANCE)


def test_tick_normalization(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    """Currency prices keep 7 decimals, equity prices 2, all exact; names come from the master."""
    want = {USDINR.key: "snap_quote", SBIN.key: "snap_quote", "NSE:Nifty 50": "quote"}
    with start(sim, redis_client, redis_server.url, want):
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) >= 3 for k in want), what="ticks")
    assert ticks(redis_client, USDINR.key)[-1].ltp.as_tuple().exponent == -7  # written with 7 decimals
    assert ticks(redis_client, SBIN.key)[-1].ltp.as_tuple().exponent == -2
    for key in want:
        inst = INDEX.by_key[key]
        sent = {(s.packet.sequence_number, s.packet.exchange_timestamp): s.packet for s in sent_to(sim, inst)}
        for tick in ticks(redis_client, key):
            assert_tick_is(tick, sent[(tick.seq, tick.exch_ts)], inst)


# --------------------------------------------------------------------------- the feed's faults


@pytest.mark.faults
def test_reconnect_on_disconnect(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    """A clean close loses nothing: every frame before the close frame arrives."""
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "quote", "NSE:INFY-EQ": "ltp"}) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
        began = time.monotonic()
        sim.inject("close")
        wait_for(lambda: worker.worker.feed.connections[0].connects == 2, what="a reconnect")
        assert "closed by the server" in events(redis_client, "feed_disconnected")[0]["cause"]
        recovery = recovered(redis_client, "NSE:SBIN-EQ", began)
        settle(sim, worker, redis_client, [SBIN, INFY])
        assert_exactly_sent(sim, redis_client, SBIN)
        assert_exactly_sent(sim, redis_client, INFY)
        record_fault("feed: clean close", sim, redis_client, [SBIN, INFY], recovery)


@pytest.mark.faults
def test_resubscribe_after_reconnect(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    """A TCP drop: reconnected, the full set resubscribed, nothing lost outside the outage."""
    want = {"NSE:SBIN-EQ": "snap_quote", "NSE:INFY-EQ": "quote", "CDS:USDINR29DEC26FUT": "ltp"}
    with start(sim, redis_client, redis_server.url, want) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
        before = subscribed_on_sim(sim)
        began = time.monotonic()
        sim.inject("drop")
        wait_for(lambda: worker.worker.feed.connections[0].connects == 2, what="a reconnect")
        wait_for(lambda: subscribed_on_sim(sim) == before, what="the full set resubscribed")
        ended = time.monotonic()
        recovery = recovered(redis_client, "NSE:INFY-EQ", began)
        settle(sim, worker, redis_client, [SBIN, INFY, USDINR])
        for inst in (SBIN, INFY, USDINR):
            assert_no_loss_outside(sim, redis_client, inst, (began - 0.05, ended))
        record_fault("feed: TCP drop", sim, redis_client, [SBIN, INFY, USDINR], recovery)
    assert len(before) == 3


@pytest.mark.faults
def test_a_silent_socket_is_detected_by_the_watchdog(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}, stall_timeout=0.6) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
        began = time.monotonic()
        sim.inject("silence", seconds="1.0")
        wait_for(
            lambda: any("stalled" in e["cause"] for e in events(redis_client, "feed_disconnected")), what="watchdog"
        )
        wait_for(lambda: not sim.sim.silent, what="the silence to end")
        wait_for(lambda: worker.worker.feed.connections[0].state == "connected", what="reconnected")
        recovery = recovered(redis_client, "NSE:SBIN-EQ", began)
        ended = time.monotonic()
        settle(sim, worker, redis_client, [SBIN])
        assert_no_loss_outside(sim, redis_client, SBIN, (began, ended))
        record_fault("feed: silent socket (watchdog)", sim, redis_client, [SBIN], recovery)


@pytest.mark.faults
@pytest.mark.parametrize("fault", ["truncate", "garbage"])
def test_bad_frames_are_counted_and_the_connection_kept(
    fault: str, sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "quote"}) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
        sim.inject(fault)
        sim.inject(fault)
        wait_for(lambda: worker.worker.decode_errors == 2, what="two decode errors")
        wait_for(lambda: events(redis_client, "decode_error"), what="the decode error event")
        [event] = events(redis_client, "decode_error")  # rate-limited: one event, every error counted
        assert event["total"] == "1"
        n = redis_client.xlen("ticks:NSE:SBIN-EQ")
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > n + 3, what="ticks after the bad frames")
        assert worker.worker.feed.connections[0].connects == 1
        settle(sim, worker, redis_client, [SBIN])
        assert_exactly_sent(sim, redis_client, SBIN)
        record_fault(f"feed: {fault} frames", sim, redis_client, [SBIN], None)


@pytest.mark.faults
def test_server_error_text_becomes_an_event(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 1, what="ticks")
        sim.inject("error", code="E1002")
        wait_for(lambda: events(redis_client, "feed_server_error"), what="the error event")
        assert events(redis_client, "feed_server_error")[0]["code"] == "E1002"
        assert worker.worker.feed.connections[0].connects == 1


@pytest.mark.faults
def test_a_rotated_feed_token_means_a_fresh_login(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    """The rollover closes the socket; the next upgrade is refused with 401; the worker logs in again."""
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
        began = time.monotonic()
        sim.inject("rotate")
        wait_for(lambda: worker.worker.logins == 2, what="a fresh login")
        wait_for(lambda: worker.worker.feed.connections[0].state == "connected", what="reconnected")
        causes = [e["cause"] for e in events(redis_client, "feed_reconnecting")]
        assert any("HTTP 401" in c for c in causes), causes
        recovery = recovered(redis_client, "NSE:SBIN-EQ", began)
        settle(sim, worker, redis_client, [SBIN])
        assert_exactly_sent(sim, redis_client, SBIN)  # the close frame came first: nothing in flight was lost
        record_fault("feed: token rotated, 401, re-login", sim, redis_client, [SBIN], recovery)
    assert sim.sim.logins == 2


@pytest.mark.faults
def test_refused_upgrades_back_off_then_recover(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    sim.inject("refuse", count="4", status="429")
    began = time.monotonic()
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}, reconnect_max=2.0) as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 1, what="ticks after the refusals")
        record_fault("feed: 4 upgrades refused (429)", sim, redis_client, [], time.monotonic() - began)
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="more ticks")
        reconnecting = events(redis_client, "feed_reconnecting")
        assert [e["attempt"] for e in reconnecting] == ["1", "2", "3", "4"]
        assert all("HTTP 429" in e["cause"] for e in reconnecting)
        delays = [float(e["delay"]) for e in reconnecting]
        assert delays[3] > delays[0] * 3, f"backoff grows: {delays}"
        assert worker.worker.logins == 1, "a 429 is not a reason to log in again"
    assert sim.sim.upgrades == 5


@pytest.mark.faults
def test_a_flapping_link_backs_off_instead_of_storming(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    """Connections that die young count as failures, so the delays keep growing."""
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}, healthy_after=5.0) as worker:
        wait_for(lambda: worker.worker.feed.connections, what="a feed connection")
        for _ in range(4):
            wait_for(connected_again(worker), what="a connection")
            sim.inject("drop")
    delays = [float(e["delay"]) for e in events(redis_client, "feed_reconnecting")]
    assert len(delays) >= 3, delays
    assert delays[-1] > delays[0] * 3, delays


def backoff_floor(delays: int, initial: float, cap: float) -> float:
    """The least time ``delays`` successive reconnect delays take (jitter only adds to each)."""
    return sum(min(initial * 2.0**k, cap) for k in range(delays))


def most_upgrades(seconds: float, initial: float, cap: float) -> int:
    """The most upgrade attempts a backoff that never resets allows in ``seconds``: one, then one per delay."""
    delays = 0
    while backoff_floor(delays + 1, initial, cap) <= seconds:
        delays += 1
    return delays + 1


def schedule(sim: SimulatorThread, fault: str, every: float, times: int) -> asyncio.Task[None]:
    """Fault ``fault`` every ``every`` seconds, ``times`` times; the task is done after the last one."""

    async def scheduled() -> asyncio.Task[None]:
        return sim.sim.schedule_fault(fault, every, times)

    task: asyncio.Task[None] = sim.call(scheduled())
    return task


#: The flapping run: production's jitter and healthy_after (so a 3 s connection is a failure), a 4 s cap.
FLAPPING = {"reconnect_initial": 0.5, "reconnect_max": 4.0, "reconnect_jitter": 1.0, "healthy_after": 10.0}


@pytest.mark.faults
def test_a_link_flapping_for_a_minute_backs_off_with_jitter_and_loses_nothing(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    """The TCP link dropped every 3 s for 60 s: upgrades stay within what the backoff allows, the delays grow
    to the cap and are jittered there too (in the events and in /metrics), and every tick sent is written once.
    """
    initial, cap, jitter = FLAPPING["reconnect_initial"], FLAPPING["reconnect_max"], FLAPPING["reconnect_jitter"]
    want = {"NSE:SBIN-EQ": "quote", "NSE:INFY-EQ": "ltp"}
    with start(sim, redis_client, redis_server.url, want, **FLAPPING) as worker:
        assert worker.worker.health is not None
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
        upgrades, began = sim.sim.upgrades, time.monotonic()
        flapping = schedule(sim, "drop", 3.0, times=20)
        wait_for(flapping.done, timeout=75, what="20 drops, 3 s apart")
        ended = time.monotonic()
        attempts = sim.sim.upgrades - upgrades
        recovery = recovered(redis_client, "NSE:SBIN-EQ", ended)
        settle(sim, worker, redis_client, [SBIN, INFY])
        metrics = scrape(worker.worker.health.url)
        [conn] = worker.worker.feed.connections
        assert_exactly_sent(sim, redis_client, SBIN)
        assert_exactly_sent(sim, redis_client, INFY)
        figures = record_fault("feed: flapping link, 60 s", sim, redis_client, [SBIN, INFY], recovery)
    assert (figures.lost, figures.duplicates) == (0, 0)
    # No storm: at most what the delays allow (18 in 60 s; reconnecting at once after each drop would be 20).
    bound = most_upgrades(ended - began, initial, cap)
    assert 6 <= attempts <= bound, f"{attempts} upgrade attempts in {ended - began:.1f} s; the backoff allows {bound}"
    assert conn.causes.get("lost", 0) >= 6, conn.causes
    reconnecting = events(redis_client, "feed_reconnecting")
    assert [int(e["attempt"]) for e in reconnecting] == list(range(1, len(reconnecting) + 1)), "never reset"
    delays = [float(e["delay"]) for e in reconnecting]
    for k, delay in enumerate(delays):  # the schedule: initial × 2^k up to the cap, plus 0..jitter
        floor = min(initial * 2**k, cap)
        assert floor <= delay <= floor + jitter + 0.001, (k, delays)
    capped = delays[3:]
    assert delays[0] < delays[2] < min(capped), f"the delays grow: {delays}"
    assert len(capped) >= 3, delays
    assert len(set(capped)) > 1, f"jittered at the cap too: {delays}"
    # /metrics shows the same: one observation per delay, and their sum above the jitterless schedule.
    name = "angelstream_feed_reconnect_delay_seconds"
    assert metric(metrics, name + "_count", connection="feed-1") == len(delays)
    total = metric(metrics, name + "_sum", connection="feed-1")
    assert total == pytest.approx(sum(delays), abs=0.001 * len(delays))
    assert 0 < total - backoff_floor(len(delays), initial, cap) <= jitter * len(delays)
    assert metric(metrics, name + "_bucket", connection="feed-1", le="2.0") == 2, "short delays first"
    assert metric(metrics, name + "_bucket", connection="feed-1", le="4.0") == 3, "capped ones jittered above 4 s"


@pytest.mark.faults
def test_a_4th_connection_closed_by_the_server_backs_off_until_another_app_lets_go(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    """Angel allows 3 connections per client code across all apps and closes the extra one (spec §1.2).

    Another app with the same client code holds 2; the worker holds 1 and needs a second (one token per
    connection here), which is the 4th. It is retried with backoff and a cause that says why, the first
    connection's ticks flow untouched, and once the other app lets one go the second connection comes up
    with its subscription and every tick of both arrives once.
    """
    initial, cap = 0.25, 2.0
    backoff = {"reconnect_initial": initial, "reconnect_max": cap, "reconnect_jitter": 0.5, "healthy_after": 10.0}
    runner = start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "quote"}, **backoff)
    runner.worker.feed.max_tokens = 1  # one token per connection: INFY will need a second one
    with runner as worker:
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks on the first connection")
        other_app = [open_stream(sim) for _ in range(2)]  # the same client code: 3 connections in use
        wait_for(lambda: len(sim.sim.connections) == 3, what="the other app's two connections")
        upgrades, began = sim.sim.upgrades, time.monotonic()
        command(redis_client, "subscribe", ["NSE:INFY-EQ"], "ltp", "infy")
        assert answered(redis_client, "infy")["type"] == "command_accepted"
        wait_for(lambda: len(worker.worker.feed.connections) == 2, what="a second connection")
        first, second = worker.worker.feed.connections
        wait_for(lambda: second.reconnects >= 5, timeout=20, what="five attempts closed by the server")
        attempts, held = sim.sim.upgrades - upgrades, time.monotonic() - began
        n = redis_client.xlen("ticks:NSE:SBIN-EQ")
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > n + 3, what="SBIN ticks meanwhile")
        assert len(sim.sim.connections) == 3, "the server let no 4th connection in"
        assert redis_client.xlen("ticks:NSE:INFY-EQ") == 0
        released = time.monotonic()
        other_app.pop().close()
        wait_for(lambda: (1, 1, INFY.token) in subscribed_on_sim(sim), timeout=10, what="INFY on the second")
        recovery = recovered(redis_client, "NSE:INFY-EQ", released)
        settle(sim, worker, redis_client, [SBIN, INFY])
        assert_exactly_sent(sim, redis_client, SBIN)
        assert_exactly_sent(sim, redis_client, INFY)
        figures = record_fault("feed: 4th connection closed by the server", sim, redis_client, [SBIN, INFY], recovery)
        assert (first.connects, first.state, second.state) == (1, "connected", "connected")
        other_app.pop().close()
    assert (figures.lost, figures.duplicates) == (0, 0)
    bound = most_upgrades(held, initial, cap)
    assert attempts <= bound, f"{attempts} upgrade attempts in {held:.1f} s; the backoff allows {bound}"
    reconnecting = events(redis_client, "feed_reconnecting")
    assert {e["connection"] for e in reconnecting} == {"feed-2"}, "only the refused connection reconnects"
    for event in reconnecting:
        assert "right after the upgrade" in event["cause"], event
        assert "3 per client code" in event["cause"], event
    delays = [float(e["delay"]) for e in reconnecting]
    assert delays[2] > delays[0], f"the delays grow: {delays}"
    assert second.causes == {"lost_at_upgrade": len(reconnecting)}


def test_the_daily_relogin_restarts_the_feed_with_a_fresh_session(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    from datetime import datetime, timedelta

    from worker.settings import IST

    soon = (datetime.now(IST) + timedelta(seconds=2)).time().replace(microsecond=0)
    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "ltp"}, angel_relogin_time=soon) as worker:
        wait_for(lambda: worker.worker.logins == 2, timeout=5, what="the daily re-login")
        wait_for(lambda: any("daily re-login" in e["cause"] for e in events(redis_client, "feed_disconnected")))
        n = redis_client.xlen("ticks:NSE:SBIN-EQ")
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") > n + 3, what="ticks after the re-login")


# --------------------------------------------------------------------------- Redis faults, buffering, threads


@pytest.mark.faults
def test_tick_buffering(sim: SimulatorThread, redis_client: redis.Redis) -> None:
    """Redis restarts mid-stream: the worker keeps the feed, buffers, and writes everything in order."""
    with LocalRedis("--appendonly", "yes") as own:  # persistent, as deployed: the restart keeps the streams
        client = redis.Redis.from_url(own.url)
        with start(sim, client, own.url, {"NSE:SBIN-EQ": "quote", "NSE:INFY-EQ": "snap_quote"}) as worker:
            wait_for(lambda: client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
            own.stop()
            began = time.monotonic()
            wait_for(lambda: worker.worker.sink.buffered >= 20, what="ticks buffered while Redis is down")
            assert not worker.worker.sink.stats.redis_ok
            own.start()
            client = redis.Redis.from_url(own.url)
            wait_for(lambda: worker.worker.sink.stats.redis_ok, what="the writer to recover")
            recovery = time.monotonic() - began
            settle(sim, worker, client, [SBIN, INFY])
            assert_exactly_sent(sim, client, SBIN)
            assert_exactly_sent(sim, client, INFY)
            assert worker.worker.sink.stats.dropped == 0
            assert worker.worker.feed.connections[0].connects == 1, "Redis trouble never touches the feed"
            assert events(client, "redis_recovered")
            record_fault("redis: restart mid-stream", sim, client, [SBIN, INFY], recovery)
        client.close()


def test_concurrent_tick_access(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    """Readers in several threads see a consistent, growing, newest-first view while the worker writes."""
    errors: list[BaseException] = []
    seen: list[int] = []

    def reader() -> None:
        client = redis.Redis.from_url(redis_server.url)
        last = ""
        try:
            for _ in range(40):
                latest = get_latest_ticks("SBIN-EQ", "NSE", 5, client=client)
                ids = [t.id for t in latest]
                assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))), reverse=True)
                if latest:
                    newest = tuple(map(int, latest[0].id.split("-")))
                    assert not last or newest >= tuple(map(int, last.split("-")))
                    last = latest[0].id
                seen.append(len(latest))
                time.sleep(0.01)
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
        finally:
            client.close()

    with start(sim, redis_client, redis_server.url, {"NSE:SBIN-EQ": "quote"}):
        wait_for(lambda: redis_client.xlen("ticks:NSE:SBIN-EQ") >= 5, what="five ticks")
        readers = [threading.Thread(target=reader) for _ in range(6)]
        for t in readers:
            t.start()
        for t in readers:
            t.join()
    assert not errors, errors
    assert len(seen) == 240
    assert max(seen) == 5


def test_concurrent_subscribe(sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    """Commands from many clients at once: each answered, none lost, the wire matches the hash."""
    groups = [[inst.key for inst in list(INDEX)[n : n + 3]] for n in range(0, 30, 3)]
    with start(sim, redis_client, redis_server.url, {}) as worker:

        def send(n: int) -> None:
            client = redis.Redis.from_url(redis_server.url)
            command(client, "subscribe", groups[n], "quote", f"c{n}")
            client.close()

        threads = [threading.Thread(target=send, args=(n,)) for n in range(len(groups))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for n in range(len(groups)):
            assert answered(redis_client, f"c{n}")["type"] == "command_accepted"
        everything = [k for group in groups for k in group]
        assert sorted(redis_client.hkeys(keys.SUBSCRIPTIONS)) == sorted(k.encode() for k in everything)
        wire = {(2, INDEX.by_key[k].exchange_type, INDEX.by_key[k].token) for k in everything}
        wait_for(lambda: subscribed_on_sim(sim) == wire, what="all 30 on the wire")
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) >= 1 for k in everything), what="ticks for all")
        assert worker.worker.feed.connections[0].connects == 1


@pytest.mark.faults
def test_a_paused_redis_fills_the_bounded_buffer_drops_the_oldest_and_says_so(sim: SimulatorThread) -> None:
    """CLIENT PAUSE (a stuck Redis): memory stays bounded; every drop is counted and reported; the rest is written."""
    with LocalRedis() as own:
        client = redis.Redis.from_url(own.url)
        want = {"NSE:SBIN-EQ": "quote", "NSE:INFY-EQ": "quote"}
        with start(sim, client, own.url, want, buffer_max=30) as worker:
            wait_for(lambda: client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
            began = time.monotonic()
            client.execute_command("CLIENT", "PAUSE", "2500", "WRITE")
            wait_for(lambda: worker.worker.sink.stats.dropped > 0, what="the buffer to overflow")
            assert worker.worker.sink.buffered <= 30
            wait_for(lambda: worker.worker.sink.stats.redis_ok and worker.worker.sink.buffered == 0, what="drained")
            recovery = time.monotonic() - began
            settle(sim, worker, client, [SBIN, INFY], dropped=worker.worker.sink.stats.dropped)
            figures = record_fault("redis: paused 2.5 s, buffer of 30", sim, client, [SBIN, INFY], recovery)
            assert figures.lost == worker.worker.sink.stats.dropped, "exactly the dropped ticks are missing"
            assert figures.duplicates == 0
            dropped = events(client, "ticks_dropped")
            assert sum(int(e["count"]) for e in dropped) == worker.worker.sink.stats.dropped
        client.close()


@pytest.mark.faults
def test_a_full_redis_refuses_writes_until_there_is_room_and_nothing_is_lost(sim: SimulatorThread) -> None:
    with LocalRedis("--maxmemory-policy", "noeviction") as own:
        client = redis.Redis.from_url(own.url)
        with start(sim, client, own.url, {"NSE:SBIN-EQ": "snap_quote"}) as worker:
            wait_for(lambda: client.xlen("ticks:NSE:SBIN-EQ") >= 3, what="ticks")
            began = time.monotonic()
            client.config_set("maxmemory", 1)  # full: every XADD answers OOM
            wait_for(lambda: worker.worker.sink.buffered > 5, what="ticks held while Redis is full")
            client.config_set("maxmemory", 0)
            wait_for(lambda: worker.worker.sink.buffered == 0, what="the backlog written")
            recovery = time.monotonic() - began
            settle(sim, worker, client, [SBIN])
            assert_exactly_sent(sim, client, SBIN)
            record_fault("redis: maxmemory reached", sim, client, [SBIN], recovery)
        client.close()


@pytest.mark.faults
def test_a_worker_started_before_redis_waits_for_it(sim: SimulatorThread) -> None:
    server = LocalRedis()  # not started: connection refused
    with start(sim, redis.Redis(), server.url, {}) as worker:
        began = time.monotonic()
        time.sleep(0.5)
        assert worker.worker.control is not None
        assert worker.worker.control.stats.pubsub_reconnects > 0
        server.start()
        client = redis.Redis.from_url(server.url)
        client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
        client.publish(keys.CONTROL, json.dumps({"action": "resync", "request_id": "r"}))
        wait_for(lambda: client.xlen("ticks:NSE:SBIN-EQ") > 0, timeout=15, what="ticks once Redis is there")
        record_fault("redis: refused at start", sim, client, [], time.monotonic() - began)
    server.stop()
    client.close()
