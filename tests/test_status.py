"""Subscription state (pending → live → stale, rejected) and the worker heartbeat, read from Redis."""

from __future__ import annotations

import json
from typing import Any

import redis
from hypothesis import given
from hypothesis import strategies as st

from tests.workerkit import wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.instruments import Instrument, InstrumentIndex, bundled_master_path, load_master_file
from worker.localredis import LocalRedis
from worker.simulator import SimulatorThread
from worker.status import STATES, SymbolState

GHOST = Instrument("999999", "GHOST-EQ", "NSE", 1, "GHOST")  # in the worker's master, unknown to the exchange


def state(client: redis.Redis, key: str) -> dict[str, Any]:
    raw = client.hget(keys.STATE, key)
    return json.loads(raw) if isinstance(raw, bytes) else {}


def heartbeat(client: redis.Redis) -> dict[str, Any]:
    raw = client.get(keys.HEARTBEAT)
    return json.loads(raw) if isinstance(raw, bytes) else {}


def test_each_subscription_shows_whether_it_is_live_and_the_worker_beats(
    sim: SimulatorThread, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    index = InstrumentIndex([*load_master_file(bundled_master_path()), GHOST])
    want = {"NSE:SBIN-EQ": "quote", "NSE:GHOST-EQ": "ltp", "NSE:NOPE-EQ": "ltp", "NSE:INFY-EQ": "turbo"}
    for key, mode in want.items():
        redis_client.hset(keys.SUBSCRIPTIONS, key, mode)
    settings = worker_settings(sim, redis_server.url, status_interval=0.1, stale_after=0.5)
    redis_client.hset(keys.STATE, "NSE:OLD-EQ", "{}")  # a previous worker's leftovers
    with WorkerThread(settings, index):
        wait_for(lambda: state(redis_client, "NSE:SBIN-EQ").get("state") == "live", what="SBIN live")
        sbin = state(redis_client, "NSE:SBIN-EQ")
        assert sbin["mode"] == "quote"
        assert sbin["token"] == "3045"
        assert sbin["last_tick"] % 10_000 == 0  # to the 10 s: rewritten every 10 s, not every interval
        assert sbin["last_tick"] > sbin["since"] - 10_000
        ghost = state(redis_client, "NSE:GHOST-EQ")
        assert ghost["state"] == "pending"
        assert "last_tick" not in ghost
        nope = state(redis_client, "NSE:NOPE-EQ")
        assert nope["state"] == "rejected"
        assert nope["reason"] == "unknown symbol"
        assert state(redis_client, "NSE:INFY-EQ")["reason"] == "unknown mode 'turbo'"
        assert not redis_client.hexists(keys.STATE, "NSE:OLD-EQ")

        beat = heartbeat(redis_client)
        assert 0 < redis_client.ttl(keys.HEARTBEAT) <= 3
        assert beat["subscriptions"] == {"live": 1, "pending": 1, "stale": 0, "rejected": 2}
        [conn] = beat["connections"]
        assert conn["state"] == "connected"
        assert conn["tokens"] == 2
        assert beat["ticks_written"] > 0
        assert beat["last_tick"] is not None
        assert beat["redis_ok"] is True
        assert (beat["ticks_dropped"], beat["ticks_rejected"], beat["events_dropped"]) == (0, 0, 0)

        sim.sim.set_silent(True)
        wait_for(lambda: state(redis_client, "NSE:SBIN-EQ").get("state") == "stale", what="SBIN stale")
        sim.sim.set_silent(False)
        wait_for(lambda: state(redis_client, "NSE:SBIN-EQ").get("state") == "live", what="SBIN live again")

        redis_client.hdel(keys.SUBSCRIPTIONS, "NSE:GHOST-EQ", "NSE:NOPE-EQ")
        redis_client.publish(keys.CONTROL, json.dumps({"action": "resync", "request_id": "r"}))
        wait_for(lambda: not redis_client.hexists(keys.STATE, "NSE:GHOST-EQ"), what="GHOST gone from the state")
        assert not redis_client.hexists(keys.STATE, "NSE:NOPE-EQ")
    assert not redis_client.exists(keys.HEARTBEAT), "a stopped worker takes its heartbeat with it"


def test_the_state_is_written_again_after_a_redis_restart(sim: SimulatorThread) -> None:
    with LocalRedis() as own:
        client = redis.Redis.from_url(own.url)
        client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
        with WorkerThread(worker_settings(sim, own.url, status_interval=0.1, reconcile_interval=0.2)):
            wait_for(lambda: state(client, "NSE:SBIN-EQ").get("state") == "live", what="SBIN live")
            own.stop()
            own.start()  # an empty Redis: the worker writes its state and heartbeat again
            client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
            wait_for(lambda: state(client, "NSE:SBIN-EQ").get("state") == "live", timeout=15, what="state rewritten")
            wait_for(lambda: heartbeat(client), what="heartbeat rewritten")
        client.close()


symbol_states = st.builds(
    SymbolState,
    state=st.sampled_from(STATES),
    mode=st.sampled_from(["", "ltp", "quote", "snap_quote"]),
    token=st.sampled_from(["", "3045", "1594"]),
    since=st.integers(0, 2_000_000_000_000),
    last_tick=st.none() | st.integers(1_700_000_000_000, 1_700_000_060_000),
    reason=st.sampled_from(["", 'unknown mode "turbo"', "no such symbol"]),
)


@given(symbol_states, symbol_states)
def test_equal_signatures_mean_equal_json_so_the_json_can_be_reused(a: SymbolState, b: SymbolState) -> None:
    """The state hash reuses a symbol's JSON while its signature stays the same (publish's memo)."""
    assert (a.signature() == b.signature()) == (a.to_json() == b.to_json())
    decoded = json.loads(a.to_json())
    assert decoded["state"] == a.state
    assert decoded.get("last_tick") == a.signature()[4]
