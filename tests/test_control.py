"""worker.control: command validation, the subscriptions hash → the feed, and the pub/sub loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import fakeredis
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from worker import keys
from worker.control import (
    ACTIONS,
    CONTROL_BURST,
    CONTROL_RATE,
    MAX_COMMAND_BYTES,
    MAX_SYMBOLS_PER_COMMAND,
    Command,
    CommandError,
    Control,
    RateLimit,
    parse_command,
)
from worker.instruments import InstrumentIndex, bundled_master_path, load_master_file
from worker.localredis import LocalRedis, free_port
from worker.schema import MODES_BY_NAME
from worker.settings import Settings

INDEX = InstrumentIndex(load_master_file(bundled_master_path()))
Wire = tuple[int, str]
Want = dict[Wire, int]
Fields = dict[str, str | int | float]


def wire(key: str) -> Wire:
    inst = INDEX.get(key)
    assert inst is not None, key
    return inst.exchange_type, inst.token


SBIN, INFY, RELIANCE = wire("NSE:SBIN-EQ"), wire("NSE:INFY-EQ"), wire("NSE:RELIANCE-EQ")


def cmd(**body: object) -> str:
    return json.dumps(body)


# ---------------------------------------------------------------------------------------------- parse_command

GOOD: list[tuple[str | bytes, Command]] = [
    (
        cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], mode="quote", request_id="r1"),
        Command("subscribe", ("NSE:SBIN-EQ",), "quote", "r1"),
    ),
    (cmd(action="subscribe", symbols="NSE:SBIN-EQ"), Command("subscribe", ("NSE:SBIN-EQ",), "ltp", "")),
    (
        cmd(action="subscribe", symbols=["NSE:INFY-EQ", "NSE:SBIN-EQ", "NSE:INFY-EQ"], mode="snap_quote"),
        Command("subscribe", ("NSE:INFY-EQ", "NSE:SBIN-EQ"), "snap_quote", ""),
    ),
    (
        cmd(action="unsubscribe", symbols=["BSE:SBIN"], request_id="u").encode(),
        Command("unsubscribe", ("BSE:SBIN",), "ltp", "u"),
    ),
    (cmd(action="resync", symbols=42, mode="nonsense", request_id="x"), Command("resync", (), "ltp", "x")),
    (cmd(action="resync", request_id="é" * 200), Command("resync", request_id="é" * 200)),
    (
        cmd(action="subscribe", symbols=["NSE:SBIN-EQ"]).ljust(MAX_COMMAND_BYTES),  # exactly the limit
        Command("subscribe", ("NSE:SBIN-EQ",)),
    ),
]


@pytest.mark.parametrize(("raw", "expected"), GOOD)
def test_valid_commands_parse(raw: str | bytes, expected: Command) -> None:
    assert parse_command(raw) == expected


def test_as_many_symbols_as_the_limit_parse() -> None:
    symbols = [f"NSE:S{i}" for i in range(MAX_SYMBOLS_PER_COMMAND)]
    assert parse_command(cmd(action="subscribe", symbols=symbols)).symbols == tuple(symbols)


BAD: list[tuple[str | bytes, str, str]] = [  # raw, part of the message, request_id kept
    ("x" * (MAX_COMMAND_BYTES + 1), f"command is {MAX_COMMAND_BYTES + 1} bytes; the limit is {MAX_COMMAND_BYTES}", ""),
    ("subscribe NSE:SBIN-EQ", 'command is not JSON: send {"action": "subscribe"', ""),
    (b'{"action": "subscribe", "symbols": ["NSE:\xff"]}', "command is not JSON", ""),
    ("[" * 50_000, "command is not JSON", ""),  # nested too deep for the parser
    ("", "command is not JSON", ""),
    ("[]", "command must be a JSON object", ""),
    ('"subscribe"', "command must be a JSON object", ""),
    ("null", "command must be a JSON object", ""),
    (cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], request_id=7), "request_id must be a string", ""),
    (cmd(action="resync", request_id="r" * 201), "request_id must be a string of at most 200 characters", ""),
    (
        cmd(action="subcribe", request_id="r2"),
        "unknown action 'subcribe': use one of subscribe, unsubscribe, resync",
        "r2",
    ),
    (cmd(symbols=["NSE:SBIN-EQ"], request_id="r3"), "unknown action None", "r3"),
    (cmd(action=["subscribe"], request_id="r4"), "unknown action ['subscribe']", "r4"),
    (cmd(action="subscribe", request_id="s1"), "symbols must be a non-empty list", "s1"),
    (cmd(action="subscribe", symbols=[], request_id="s2"), "symbols must be a non-empty list", "s2"),
    (cmd(action="unsubscribe", symbols=["NSE:SBIN-EQ", 5], request_id="s3"), "symbols must be a non-empty list", "s3"),
    (cmd(action="subscribe", symbols=[""], request_id="s4"), 'of "EXCHANGE:SYMBOL" strings', "s4"),
    (cmd(action="subscribe", symbols={"NSE:SBIN-EQ": 1}, request_id="s5"), "symbols must be a non-empty list", "s5"),
    (cmd(action="subscribe", symbols=""), "symbols must be a non-empty list", ""),
    (
        cmd(action="subscribe", symbols=[f"NSE:S{i}" for i in range(MAX_SYMBOLS_PER_COMMAND + 1)], request_id="n"),
        f"{MAX_SYMBOLS_PER_COMMAND + 1} symbols in one command; the limit is {MAX_SYMBOLS_PER_COMMAND}",
        "n",
    ),
    (
        cmd(action="subscribe", symbols=["NSE:SBIN-EQ", "SBIN-EQ"], request_id="m"),
        "symbols must look like \"EXCHANGE:SYMBOL\" (e.g. NSE:SBIN-EQ); got ['SBIN-EQ']",
        "m",
    ),
    (cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], mode="full", request_id="q"), "unknown mode 'full'", "q"),
    (cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], mode="LTP"), "use ltp, quote or snap_quote", ""),
    (cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], mode=None), "unknown mode None", ""),
    (cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], mode=["ltp"]), "unknown mode ['ltp']", ""),
    (cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], mode={"ltp": 1}), "unknown mode {'ltp': 1}", ""),
]


@pytest.mark.parametrize(("raw", "message", "request_id"), BAD)
def test_invalid_commands_are_refused_with_a_reason(raw: str | bytes, message: str, request_id: str) -> None:
    with pytest.raises(CommandError) as caught:
        parse_command(raw)
    assert message in str(caught.value)
    assert caught.value.request_id == request_id


JSON: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
VALID_SYMBOLS = st.lists(st.sampled_from(["NSE:SBIN-EQ", "nse:infy-eq", "X:Y", ":"]), min_size=1, max_size=4)
SYMBOL = st.sampled_from(["NSE:SBIN-EQ", "nse:infy-eq", "SBIN-EQ", "", ":"]) | st.text(max_size=12)
COMMANDS = st.fixed_dictionaries(
    {},
    optional={
        "action": st.sampled_from(ACTIONS) | JSON,
        "symbols": VALID_SYMBOLS | st.lists(SYMBOL | JSON, max_size=6) | SYMBOL | JSON,
        "mode": st.sampled_from(list(MODES_BY_NAME)) | JSON,
        "request_id": st.text(max_size=210) | JSON,
    },
)


def check_parsed(raw: str | bytes) -> None:
    error: CommandError | None = None
    try:
        command = parse_command(raw)
    except CommandError as exc:
        error = exc
    if error is not None:
        assert str(error)
        assert isinstance(error.request_id, str)
        return
    assert command.action in ACTIONS
    assert len(command.request_id) <= 200
    if command.action == "resync":
        assert command.symbols == ()
        return
    assert 0 < len(command.symbols) <= MAX_SYMBOLS_PER_COMMAND
    assert len(set(command.symbols)) == len(command.symbols)
    assert all(isinstance(s, str) and ":" in s for s in command.symbols)
    if command.action == "subscribe":
        assert command.mode in MODES_BY_NAME


@given(st.one_of(st.text(), st.binary(), JSON.map(json.dumps), COMMANDS.map(json.dumps)))
def test_fuzz_any_input_parses_or_is_a_command_error(raw: str | bytes) -> None:
    check_parsed(raw)


@given(COMMANDS.map(lambda body: json.dumps(body).encode()))
def test_fuzz_command_shaped_bytes(raw: bytes) -> None:
    check_parsed(raw)


# ---------------------------------------------------------------------------------------------- Control


class FakeFeed:
    """Records every ``want``; wires in ``full`` do not fit."""

    def __init__(self) -> None:
        self.calls: list[Want] = []
        self.full: set[Wire] = set()

    async def apply(self, want: Want) -> list[Wire]:
        self.calls.append(dict(want))
        return [w for w in want if w in self.full]

    @property
    def want(self) -> Want:
        return self.calls[-1]


class Events:
    def __init__(self) -> None:
        self.items: list[tuple[str, Fields]] = []

    def __call__(self, kind: str, **fields: str | int | float) -> None:
        self.items.append((kind, dict(fields)))

    def of(self, kind: str) -> list[Fields]:
        return [fields for k, fields in self.items if k == kind]


def async_client(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, decode_responses=True, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1, socket_timeout=5
    )


async def subscriptions(client: aioredis.Redis) -> dict[str, str]:
    return cast(dict[str, str], await client.hgetall(keys.SUBSCRIPTIONS))


async def until(condition: Callable[[], object], what: str, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


Scenario = Callable[[Control, FakeFeed, Events, aioredis.Redis], Awaitable[None]]


def play(url: str, scenario: Scenario, capacity: int = 100) -> None:
    async def main() -> None:
        client = async_client(url)
        try:
            feed, events = FakeFeed(), Events()
            control = Control(client, INDEX, feed.apply, events, capacity, reconcile_interval=0.2)
            await scenario(control, feed, events, client)
        finally:
            await client.aclose()

    asyncio.run(main())


@contextlib.asynccontextmanager
async def running(control: Control, retry_max: float = 0.2) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(control.run(retry_max))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_reconcile_applies_the_hash_and_reports_a_bad_entry_once(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        await client.hset(
            keys.SUBSCRIPTIONS,
            mapping={"NSE:SBIN-EQ": "ltp", "nse:infy-eq": "quote", "NSE:NOPE-EQ": "ltp", "NSE:RELIANCE-EQ": "full"},
        )
        await control.reconcile()
        assert feed.want == {SBIN: 1, INFY: 2}
        assert set(control.live) == {"NSE:SBIN-EQ", "NSE:INFY-EQ"}
        rejected = {"NSE:NOPE-EQ": "unknown symbol", "NSE:RELIANCE-EQ": "unknown mode 'full'"}
        assert events.items == [("subscription_rejected", {"symbol": k, "reason": r}) for k, r in rejected.items()]
        assert control.stats.rejected == rejected

        await control.reconcile()  # the same bad entries: not reported again
        assert len(events.items) == 2
        assert control.stats.reconciles == 2

        await client.hset(keys.SUBSCRIPTIONS, "NSE:RELIANCE-EQ", "snap_quote")
        await control.reconcile()
        assert feed.want == {SBIN: 1, INFY: 2, RELIANCE: 3}
        assert control.stats.rejected == {"NSE:NOPE-EQ": "unknown symbol"}
        assert len(events.items) == 2

        await client.hset(keys.SUBSCRIPTIONS, "NSE:RELIANCE-EQ", "fast")
        await control.reconcile()  # bad again, for another reason: reported again
        assert events.items[2:] == [
            ("subscription_rejected", {"symbol": "NSE:RELIANCE-EQ", "reason": "unknown mode 'fast'"})
        ]

    play(redis_server.url, scenario)


def test_reconcile_reports_what_the_feed_could_not_fit(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        feed.full = {RELIANCE}
        await client.hset(keys.SUBSCRIPTIONS, mapping={"NSE:SBIN-EQ": "ltp", "NSE:RELIANCE-EQ": "quote"})
        await control.reconcile()
        await control.reconcile()
        assert feed.want == {SBIN: 1, RELIANCE: 2}
        assert set(control.live) == {"NSE:SBIN-EQ"}
        assert events.items == [("subscription_rejected", {"symbol": "NSE:RELIANCE-EQ", "reason": "capacity exceeded"})]

    play(redis_server.url, scenario)


def test_subscribe_unsubscribe_and_resync(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        await control.handle(
            cmd(action="subscribe", symbols=["nse:sbin-eq", "NSE:INFY-EQ"], mode="quote", request_id="r1")
        )
        assert await subscriptions(client) == {"NSE:SBIN-EQ": "quote", "NSE:INFY-EQ": "quote"}
        assert feed.want == {SBIN: 2, INFY: 2}
        assert events.items[-1] == (
            "command_accepted",
            {
                "request_id": "r1",
                "action": "subscribe",
                "symbols": json.dumps(["NSE:SBIN-EQ", "NSE:INFY-EQ"]),
                "tokens": json.dumps({"NSE:SBIN-EQ": "3045", "NSE:INFY-EQ": "1594"}),
                "mode": "quote",
            },
        )

        await control.handle(cmd(action="subscribe", symbols="NSE:SBIN-EQ", mode="snap_quote", request_id="r2"))
        assert await subscriptions(client) == {"NSE:SBIN-EQ": "snap_quote", "NSE:INFY-EQ": "quote"}
        assert feed.want == {SBIN: 3, INFY: 2}

        await control.handle(cmd(action="unsubscribe", symbols=["NSE:SBIN-EQ"], request_id="r3").encode())
        assert await subscriptions(client) == {"NSE:INFY-EQ": "quote"}
        assert feed.want == {INFY: 2}
        assert set(control.live) == {"NSE:INFY-EQ"}
        answer: Fields
        kind, answer = events.items[-1]
        assert (kind, answer["request_id"], answer["action"]) == ("command_accepted", "r3", "unsubscribe")
        assert json.loads(str(answer["tokens"])) == {"NSE:SBIN-EQ": "3045"}

        await client.hset(keys.SUBSCRIPTIONS, "BSE:SBIN", "ltp")  # written directly
        await control.handle(cmd(action="resync", request_id="r4"))
        assert feed.want == {INFY: 2, wire("BSE:SBIN"): 1}
        assert events.items[-1] == ("command_accepted", {"request_id": "r4", "action": "resync", "symbols": "2"})
        assert (control.stats.commands, control.stats.errors) == (4, 0)

    play(redis_server.url, scenario)


UNKNOWN: list[tuple[str, str]] = [
    (
        cmd(action="subscribe", symbols=["NSE:INFY-EQ", "NSE:SBIN-EQQ"], request_id="u1"),
        "not in the instrument master: NSE:SBIN-EQQ (did you mean NSE:SBIN-EQ",
    ),
    (cmd(action="unsubscribe", symbols=["NSE:ZZZZZZ"], request_id="u2"), "not in the instrument master: NSE:ZZZZZZ"),
    (
        cmd(action="subscribe", symbols=[f"QQQ:X{i}" for i in range(7)], request_id="u3"),
        "not in the instrument master: QQQ:X0; QQQ:X1; QQQ:X2; QQQ:X3; QQQ:X4",
    ),
]


def test_a_bad_command_is_answered_and_changes_nothing(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    cases = [(raw, message, rid) for raw, message, rid in BAD] + [
        (raw, message, json.loads(raw)["request_id"]) for raw, message in UNKNOWN
    ]

    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        await client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
        for raw, message, request_id in cases:
            await control.handle(raw)
            kind, answer = events.items[-1]
            assert kind == "command_error"
            assert answer["request_id"] == request_id
            assert message in str(answer["error"])
        assert "(did you mean" not in str(events.items[-2][1]["error"])  # nothing close to NSE:ZZZZZZ
        assert "QQQ:X5" not in str(events.items[-1][1]["error"])
        assert len(events.items) == len(cases)
        assert await subscriptions(client) == {"NSE:SBIN-EQ": "ltp"}
        assert feed.calls == []
        assert (control.stats.commands, control.stats.errors) == (len(cases), len(cases))

    play(redis_server.url, scenario)


def test_subscribing_past_the_capacity_is_refused(redis_server: LocalRedis, redis_client: redis.Redis) -> None:
    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        await control.handle(cmd(action="subscribe", symbols=["NSE:SBIN-EQ", "NSE:INFY-EQ"], request_id="c1"))
        await control.handle(cmd(action="subscribe", symbols=["NSE:RELIANCE-EQ"], request_id="c2"))
        kind, answer = events.items[-1]
        assert (kind, answer["request_id"]) == ("command_error", "c2")
        assert "capacity exceeded: 3 symbols would be subscribed; at most 2 fit" in str(answer["error"])
        assert await subscriptions(client) == {"NSE:SBIN-EQ": "ltp", "NSE:INFY-EQ": "ltp"}
        assert feed.want == {SBIN: 1, INFY: 1}

        # Changing the mode of a subscribed symbol adds nothing: accepted.
        await control.handle(cmd(action="subscribe", symbols=["NSE:INFY-EQ"], mode="quote", request_id="c3"))
        assert events.items[-1][0] == "command_accepted"
        assert feed.want == {SBIN: 1, INFY: 2}

    play(redis_server.url, scenario, capacity=2)


# ---------------------------------------------------------------------------------------------- run()


def test_run_obeys_published_commands_and_reconciles_periodically(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        async with running(control) as task:
            await until(lambda: control.stats.reconciles >= 1, "the first reconcile")
            assert feed.want == {}
            await client.publish(keys.CONTROL, cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], request_id="p1"))
            await until(lambda: events.of("command_accepted"), "the command answered")
            assert events.of("command_accepted")[0]["request_id"] == "p1"
            assert await subscriptions(client) == {"NSE:SBIN-EQ": "ltp"}
            assert feed.want == {SBIN: 1}

            await client.publish(keys.CONTROL, "not json")
            await until(lambda: events.of("command_error"), "the bad command answered")

            await client.hset(keys.SUBSCRIPTIONS, "NSE:INFY-EQ", "quote")  # no command
            await until(lambda: feed.want == {SBIN: 1, INFY: 2}, "a periodic reconcile")

            # A busy channel (a message every 50 ms, so the wait never times out) still gets reconciled.
            await client.hset(keys.SUBSCRIPTIONS, "NSE:TCS-EQ", "ltp")
            deadline = asyncio.get_running_loop().time() + 15
            while feed.want != {SBIN: 1, INFY: 2, wire("NSE:TCS-EQ"): 1}:
                assert asyncio.get_running_loop().time() < deadline, "no reconcile while commands keep coming"
                await client.publish(keys.CONTROL, cmd(action="noise"))
                await asyncio.sleep(0.05)
            assert not task.done()
            assert control.stats.pubsub_reconnects == 0

    play(redis_server.url, scenario)


def test_run_rides_out_a_redis_outage() -> None:
    with LocalRedis() as server:

        async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
            async with running(control, retry_max=0.1) as task:
                await until(lambda: control.stats.reconciles >= 1, "the first reconcile")
                await asyncio.to_thread(server.stop)
                await until(lambda: control.stats.pubsub_reconnects >= 2, "run() retrying")
                reconciles = control.stats.reconciles
                await asyncio.to_thread(server.start)
                await until(lambda: control.stats.reconciles > reconciles, "a reconcile after the outage")
                await client.publish(keys.CONTROL, cmd(action="subscribe", symbols="NSE:TCS-EQ", request_id="back"))
                await until(lambda: events.of("command_accepted"), "a command after the outage")
                assert await subscriptions(client) == {"NSE:TCS-EQ": "ltp"}
                assert feed.want == {wire("NSE:TCS-EQ"): 1}
                assert not task.done()

        play(server.url, scenario)


def test_run_survives_a_long_outage() -> None:
    # Over 1024 consecutive failures: an uncapped 0.1 * 2**failures delay overflows a float.
    port = free_port()

    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        async with running(control, retry_max=0.0001) as task:
            await until(lambda: control.stats.pubsub_reconnects > 1100, "over 1100 failed attempts", timeout=30)
            assert control.stats.reconciles == 0
            server = LocalRedis(port=port)
            await asyncio.to_thread(server.start)
            try:
                await until(lambda: control.stats.reconciles >= 1, "a reconcile once Redis is up")
                assert not task.done()
            finally:
                await asyncio.to_thread(server.__exit__)

    play(f"redis://127.0.0.1:{port}/0", scenario)


# ---------------------------------------------------------------------------------------------- the rate limit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_bucket_lets_a_burst_through_then_the_rate() -> None:
    clock = Clock()
    bucket = RateLimit(2.0, 3, clock)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    clock.now += 0.25  # half a token
    assert not bucket.take()
    clock.now += 0.25  # one
    assert [bucket.take(), bucket.take()] == [True, False]
    clock.now += 3600  # a long quiet spell refills the burst, no more
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_the_rate_limit_error_says_what_and_how_to_fix_it() -> None:
    error = RateLimit(2.5, 7).error("r9")
    assert error.request_id == "r9"
    assert str(error) == (
        "rate limited: more than 2.5 commands/s (bursts of 7), so this one was not applied: "
        f"batch symbols into one command (up to {MAX_SYMBOLS_PER_COMMAND}) or raise CONTROL_RATE"
    )


def test_a_control_plane_is_rate_limited_by_default_as_the_settings_say() -> None:
    control = Control(cast(aioredis.Redis, None), INDEX, FakeFeed().apply, Events(), 10)  # never used here
    assert (control.limit.rate, control.limit.burst) == (CONTROL_RATE, CONTROL_BURST)
    assert Settings.model_fields["control_rate"].default == CONTROL_RATE
    assert Settings.model_fields["control_burst"].default == CONTROL_BURST


def test_commands_over_the_rate_are_answered_counted_and_not_applied(
    redis_server: LocalRedis, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()

    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        control.limit = RateLimit(1.0, 2, clock)
        await control.handle(cmd(action="subscribe", symbols=["NSE:SBIN-EQ"], request_id="a1"))
        await control.handle(cmd(action="subscribe", symbols=["NSE:INFY-EQ"], request_id="a2"))
        with caplog.at_level(logging.INFO, logger="worker.control"):
            await control.handle(cmd(action="subscribe", symbols=["NSE:TCS-EQ"], request_id="a3"))
            await control.handle(cmd(action="unsubscribe", symbols=["NSE:SBIN-EQ"], request_id="a4"))
            await control.handle("not json")  # over the limit, whatever it says
            await control.handle(cmd(action="subcribe", request_id="a5"))
        assert [(kind, answer["request_id"]) for kind, answer in events.items] == [
            ("command_accepted", "a1"), ("command_accepted", "a2"), ("command_error", "a3"),
            ("command_error", "a4"), ("command_error", ""), ("command_error", "a5"),
        ]  # fmt: skip
        for _, answer in events.items[2:]:
            assert answer["error"] == str(control.limit.error(str(answer["request_id"])))
        assert await subscriptions(client) == {"NSE:SBIN-EQ": "ltp", "NSE:INFY-EQ": "ltp"}
        assert feed.want == {SBIN: 1, INFY: 1}
        assert (control.stats.commands, control.stats.errors, control.stats.rate_limited) == (6, 4, 4)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert [r.getMessage() for r in warnings] == [
            f"control: {control.limit.error('a3')} (each refusal is answered and counted; not logged again)"
        ]
        assert not [r for r in caplog.records if r.levelno == logging.INFO]  # no line per refused command

        caplog.clear()
        clock.now += 1.0  # one token back
        with caplog.at_level(logging.INFO, logger="worker.control"):
            await control.handle(cmd(action="subscribe", symbols=["NSE:TCS-EQ"], request_id="b1"))
            await control.handle(cmd(action="subscribe", symbols=["NSE:RELIANCE-EQ"], request_id="b2"))
        assert events.items[-2][0] == "command_accepted"
        assert events.items[-1][1]["error"] == str(control.limit.error("b2"))
        assert await subscriptions(client) == {"NSE:SBIN-EQ": "ltp", "NSE:INFY-EQ": "ltp", "NSE:TCS-EQ": "ltp"}
        assert [r.getMessage() for r in caplog.records] == [
            "control: accepting commands again after 4 refused over the rate limit",
            f"control: {control.limit.error('b2')} (each refusal is answered and counted; not logged again)",
        ]
        assert control.stats.rate_limited == 5

        clock.now += 1.0  # a bad command within the budget gets its own error, not the rate's
        await control.handle(cmd(action="subcribe", request_id="c1"))
        assert "unknown action 'subcribe'" in str(events.items[-1][1]["error"])
        assert (control.stats.errors, control.stats.rate_limited) == (6, 5)

    play(redis_server.url, scenario)


# ---------------------------------------------------------------------------------------------- keys

#: Symbols that are not in the master, each shaped to be harmful if it ever became (part of) a key.
HOSTILE = [
    "ticks:NSE:SBIN-EQ", "NSE:SBIN-EQ\r\nFLUSHALL", "*:*", "angelstream:subscriptions", "NSE:../../etc/passwd",
    "NSE:SBIN-EQ\x00x", "{NSE}:SBIN-EQ", "NSE:SBIN-EQ:staging", "candles:1m:NSE:SBIN-EQ", "NSE:" + "A" * 5000,
]  # fmt: skip


def spy_on(client: aioredis.Redis) -> list[tuple[Any, ...]]:
    """Every command ``client`` sends from now on (name and arguments)."""
    sent: list[tuple[Any, ...]] = []
    real = client.execute_command

    async def spy(*args: Any, **options: Any) -> Any:
        sent.append(args)
        return await real(*args, **options)

    client.execute_command = spy  # type: ignore[method-assign]
    return sent


def test_an_unknown_symbol_is_refused_before_any_key_is_touched_and_keys_come_from_keys_py(
    redis_server: LocalRedis, redis_client: redis.Redis
) -> None:
    async def scenario(control: Control, feed: FakeFeed, events: Events, client: aioredis.Redis) -> None:
        sent = spy_on(client)
        for action in ("subscribe", "unsubscribe"):
            for n, symbol in enumerate(HOSTILE):
                await control.handle(cmd(action=action, symbols=["NSE:SBIN-EQ", symbol], request_id=f"h{n}"))
                kind, answer = events.items[-1]
                assert (kind, answer["request_id"]) == ("command_error", f"h{n}")
                assert str(answer["error"]).startswith("not in the instrument master: ")
        assert sent == [], "refused before a single Redis command"
        assert redis_client.keys("*") == []

        # Accepted symbols are written as the master spells them, never as the command did.
        await control.handle(cmd(action="subscribe", symbols=[" nse:sbin-eq", "NSE:INFY-EQ "], request_id="ticks:*"))
        assert events.items[-1][0] == "command_accepted"
        assert {args[1] for args in sent} == {keys.SUBSCRIPTIONS}
        [hset] = [args for args in sent if args[0] == "HSET"]
        assert hset[2::2] == ("NSE:SBIN-EQ", "NSE:INFY-EQ")
        assert redis_client.keys("*") == [keys.SUBSCRIPTIONS.encode()]

    play(redis_server.url, scenario)


KNOWN = ["NSE:SBIN-EQ", "nse:infy-eq", "BSE:SBIN", " NSE:TCS-EQ"]
HOSTILE_SYMBOLS = st.sampled_from([*HOSTILE, *KNOWN]) | st.text(max_size=30).map(lambda s: "NSE:" + s)


@given(
    st.lists(
        st.fixed_dictionaries(
            {"action": st.sampled_from(ACTIONS), "symbols": st.lists(HOSTILE_SYMBOLS, min_size=1, max_size=4)},
            optional={"mode": st.sampled_from([*MODES_BY_NAME, "ticks:*"]), "request_id": st.text(max_size=20)},
        ),
        min_size=1,
        max_size=5,
    )
)
def test_fuzz_commands_write_only_our_hash_with_master_symbols(bodies: list[dict[str, Any]]) -> None:
    async def main() -> None:
        client = fakeredis.FakeAsyncRedis(decode_responses=True)
        sent = spy_on(client)
        control = Control(client, INDEX, FakeFeed().apply, Events(), capacity=100)
        for body in bodies:
            before = await subscriptions(client)
            await control.handle(json.dumps(body))
            if any(INDEX.resolve(s) is None for s in body["symbols"]):
                assert await subscriptions(client) == before
        assert {args[1] for args in sent} <= {keys.SUBSCRIPTIONS}
        assert set(await client.keys("*")) <= {keys.SUBSCRIPTIONS}
        assert all(key in INDEX.by_key for key in await subscriptions(client))
        await client.aclose()

    asyncio.run(main())
