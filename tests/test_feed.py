"""The feed on its own: token placement over connections, and the edges of a connection's life."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from tenacity import AsyncRetrying, RetryCallState

from tests.simclient import sim_login
from worker import protocol as p
from worker.feed import Credentials, Feed, FeedConfig, FeedConnection, backoff, cancel_all
from worker.simulator import SimConfig, SimulatorThread

Events = list[tuple[str, dict[str, Any]]]


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(rate_per_token=20.0, max_tokens=2)) as thread:
        yield thread


def config(url: str, **overrides: Any) -> FeedConfig:
    values: dict[str, Any] = {
        "url": url,
        "heartbeat_interval": 0.2,
        "reconnect_initial": 0.05,
        "reconnect_max": 0.2,
        "reconnect_jitter": 0.01,
        "healthy_after": 0.2,
    }
    return FeedConfig(**(values | overrides))


def credentials_for(sim: SimulatorThread) -> Callable[[bool], Awaitable[Credentials]]:
    session = sim_login(sim)
    cfg = sim.sim.config

    async def credentials(fresh: bool) -> Credentials:
        return Credentials(session.jwt_token, cfg.api_key, cfg.client_code, session.feed_token)

    return credentials


def recorder() -> tuple[Events, Callable[..., None]]:
    seen: Events = []
    return seen, lambda kind, **fields: seen.append((kind, fields))


async def until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def on_sim(sim: SimulatorThread) -> list[set[tuple[int, int, str]]]:
    return [set(conn.subscriptions) for conn in sim.sim.connections]


def test_tokens_are_packed_onto_connections_and_what_does_not_fit_is_refused(sim: SimulatorThread) -> None:
    """2 connections × 2 tokens: the fifth token is refused, never sent; a mode change stays in place."""
    credentials = credentials_for(sim)
    frames: list[bytes] = []
    seen, event = recorder()
    wires = [(1, "3045"), (1, "2885"), (1, "1594"), (1, "11536"), (1, "1333")]

    async def main() -> None:
        feed = Feed(config(sim.sim.ws_url), credentials, lambda f, _: frames.append(f), event, 2, 2)
        assert feed.capacity == 4
        rejected = await feed.apply(dict.fromkeys(wires[:3], 1))  # before start: placed, sent on connect
        assert rejected == []
        async with aiohttp.ClientSession() as session:
            feed.start(session)
            await until(lambda: sorted(map(len, on_sim(sim))) == [1, 2])
            rejected = await feed.apply(dict.fromkeys(wires, 1))
            assert rejected == [(1, "1333")]
            await until(lambda: on_sim(sim) and sorted(map(len, on_sim(sim))) == [2, 2])
            assert all(pair[2] != "1333" for subs in on_sim(sim) for pair in subs)
            placed = feed.placement[(1, "3045")][0]
            await feed.apply(dict.fromkeys(wires[:4], 1) | {(1, "3045"): 3})  # a mode change
            await until(lambda: (3, 1, "3045") in set().union(*on_sim(sim)))
            assert feed.placement[(1, "3045")] == (placed, 3)
            assert (1, 1, "3045") not in set().union(*on_sim(sim))
            assert await feed.apply(dict.fromkeys(wires[1:], 1)) == [], "room freed by the unsubscribe"
            await until(lambda: len(frames) > 20)
            assert [c.connects for c in feed.connections] == [1, 1]
            await feed.close()
        assert [c.state for c in feed.connections] == ["closed", "closed"]

    asyncio.run(main())
    assert not [e for e in seen if e[0] == "feed_server_error"], "never a 1001st token, never an E1002"


def test_closing_before_running_and_cancelling_a_connection_waiting_to_retry() -> None:
    seen, event = recorder()

    async def never(fresh: bool) -> Credentials:
        raise RuntimeError("no account")

    async def main() -> None:
        conn = FeedConnection("early", config("ws://127.0.0.1:1/x"), never, lambda f, t: None, event)
        await conn.close()
        await Feed(config("ws://127.0.0.1:1/x"), never, lambda f, t: None, event).close()  # never started
        async with aiohttp.ClientSession() as session:
            await conn.run(session)  # closed already: returns at once
            assert conn.state == "closed"
            feed = Feed(config("ws://127.0.0.1:1/x", reconnect_initial=30.0), never, lambda f, t: None, event)
            feed.start(session)
            await feed.apply({(1, "3045"): 1})
            await until(lambda: feed.connections[0].state == "backoff")
            await feed.restart("nothing to restart while waiting")
            await feed.close(timeout=0.1)  # the 30 s backoff is cancelled, not waited for
        assert seen[0][1]["cause"] == "login failed: no account"

    asyncio.run(main())


def test_a_send_failing_mid_subscribe_is_a_reconnect_not_a_crash(
    sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    credentials = credentials_for(sim)
    seen, event = recorder()
    real_send = aiohttp.ClientWebSocketResponse.send_str
    failures = [1]

    async def flaky_send(self: aiohttp.ClientWebSocketResponse, data: str, compress: int | None = None) -> None:
        if failures and data != p.PING:
            failures.pop()
            raise ConnectionResetError("Cannot write to closing transport")
        await real_send(self, data, compress)

    monkeypatch.setattr(aiohttp.ClientWebSocketResponse, "send_str", flaky_send)

    async def main() -> None:
        conn = FeedConnection("flaky", config(sim.sim.ws_url), credentials, lambda f, t: None, event)
        await conn.update(add=[(1, 1, "3045")])
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(conn.run(session))
            await until(lambda: conn.connects == 2 and on_sim(sim) == [{(1, 1, "3045")}])
            await conn.close()
            await task

    asyncio.run(main())
    causes = [fields["cause"] for kind, fields in seen if kind == "feed_disconnected"]
    # before any frame, right after the upgrade: reported as a likely 4th connection
    assert causes[0].startswith("connection error: ConnectionResetError right after the upgrade"), causes


def test_reconnect_delays_double_up_to_the_cap_and_keep_their_jitter_there() -> None:
    """initial × 2^(n-1) up to reconnect_max, plus 0..jitter on every delay: capped ones are jittered too,
    so clients cut off together do not come back in step."""
    wait = backoff(config("ws://127.0.0.1:1/x", reconnect_initial=0.5, reconnect_max=4.0, reconnect_jitter=1.0))
    state = RetryCallState(AsyncRetrying(), None, (), {})
    for attempt in range(1, 10):
        state.attempt_number = attempt
        floor = min(0.5 * 2 ** (attempt - 1), 4.0)
        delays = {wait(state) for _ in range(20)}
        assert all(floor <= d <= floor + 1.0 for d in delays), (attempt, delays)
        assert len(delays) > 1, f"attempt {attempt}: no jitter in {delays}"


def test_unknown_text_from_the_server_is_reported() -> None:
    seen, event = recorder()

    async def never(fresh: bool) -> Credentials:
        raise AssertionError("not called")

    conn = FeedConnection("c", config("ws://127.0.0.1:1/x"), never, lambda f, t: None, event)
    conn._on_text(p.PONG)
    conn._on_text("maintenance at 18:00")
    assert seen == [("feed_unknown_text", {"connection": "c", "text": "maintenance at 18:00"})]


def test_cancel_all_insists_on_tasks_that_swallow_a_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    async def stubborn(limit: list[int]) -> None:
        ignored = 0
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                ignored += 1
                if ignored > limit[0]:
                    raise

    async def main() -> None:
        once = asyncio.create_task(stubborn([1]), name="swallows-one")
        await asyncio.sleep(0)
        await cancel_all([once])
        assert once.cancelled()
        limit = [10**9]
        mule = asyncio.create_task(stubborn(limit), name="mule")
        await asyncio.sleep(0)
        await cancel_all([mule], patience=0.25)
        assert not mule.done()
        limit[0] = 0
        await cancel_all([mule])
        assert mule.cancelled()

    asyncio.run(main())
    assert "1 task(s) ignored cancellation: mule" in caplog.text
