"""One SmartStream connection's whole life. Knows nothing about Redis.

* connects with the four auth headers (TLS verified for wss://);
* after every (re)connect, sends its full subscription set, ≤ 1000 tokens per request, grouped
  by (mode, exchangeType); changes while connected go out as incremental diffs;
* sends a text ``ping`` every ``heartbeat_interval``; reads every text frame (``pong``, ``E100x``);
* a stall watchdog: no frame at all (data or pong) for ``stall_timeout`` → close and reconnect;
* reconnects with tenacity (exponential backoff with jitter, capped, forever): the one and only
  retry owner. A connection that lived ``healthy_after`` seconds resets the backoff; shorter ones
  count as failures, so a flapping link cannot cause a reconnect storm. An upgrade refused with 401
  asks for a fresh login before the next attempt; a connection lost right after its upgrade, before
  any frame, is reported as what it most likely is: Angel closing a 4th connection of the client code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_exponential, wait_random
from tenacity.wait import wait_base

from worker import protocol as p

log = logging.getLogger(__name__)

Pair = tuple[int, int, str]  # (mode, exchange type, token)

#: Frames read in a row before the reader lets the loop run: ``receive()`` returns buffered frames
#: without suspending, and at the market open the socket is never empty, so without this the sink's
#: writer (same loop) would wait for the whole read buffer to be decoded before its next round trip.
YIELD_EVERY = 30


@dataclass(frozen=True)
class Credentials:
    jwt_token: str
    api_key: str
    client_code: str
    feed_token: str

    def headers(self) -> dict[str, str]:
        return {
            "Authorization": self.jwt_token,
            "x-api-key": self.api_key,
            "x-client-code": self.client_code,
            "x-feed-token": self.feed_token,
        }


@dataclass(frozen=True)
class FeedConfig:
    url: str
    heartbeat_interval: float = 10.0
    stall_timeout: float = 30.0
    reconnect_initial: float = 0.5
    reconnect_max: float = 30.0
    reconnect_jitter: float = 1.0
    healthy_after: float = 10.0
    connect_timeout: float = 10.0


def backoff(config: FeedConfig) -> wait_base:
    """Reconnect delays: ``reconnect_initial`` × 2^(n-1) up to ``reconnect_max``, plus 0..``reconnect_jitter``.

    The jitter is added after the cap (tenacity's ``wait_exponential_jitter`` caps the sum, so every
    capped delay would be exactly ``reconnect_max``: connections cut off together would come back in step).
    """
    return wait_exponential(multiplier=config.reconnect_initial, max=config.reconnect_max) + wait_random(
        0, config.reconnect_jitter
    )


class FeedError(Exception):
    """The connection could not be made or was lost; ``str()`` is the cause."""


class _Closing(Exception):
    pass


#: credentials(fresh): a login; ``fresh=True`` after a 401 or for the daily re-login.
CredentialsProvider = Callable[[bool], Awaitable[Credentials]]
FrameHandler = Callable[[bytes, int], None]  # (frame, receive time in epoch µs)
EventHandler = Callable[..., None]  # (kind, **fields)
BackoffHandler = Callable[[str, float], None]  # (connection name, seconds until the next attempt): metrics


class FeedConnection:
    def __init__(
        self,
        name: str,
        config: FeedConfig,
        credentials: CredentialsProvider,
        on_frame: FrameHandler,
        on_event: EventHandler,
        on_backoff: BackoffHandler | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._credentials = credentials
        self._on_frame = on_frame
        self._on_event = on_event
        self._on_backoff = on_backoff
        self.desired: dict[Pair, None] = {}
        self.state = "idle"  # idle, connecting, connected, backoff, closed
        self.connects = 0
        self.reconnects = 0
        self._last_us = 0  # epoch µs of the last frame of any kind (data, pong, error text)
        self._stalled = False
        self._stall_close: asyncio.Task[bool] | None = None
        self.last_error = ""
        self.causes: dict[str, int] = {}  # why connections ended or failed, by kind (metrics)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._fresh_login = False
        self._closing = False
        self._restart_cause = ""
        self._lock = asyncio.Lock()  # orders subscription requests against (re)subscribe

    # ------------------------------------------------------------------ subscriptions

    async def update(self, add: Iterable[Pair] = (), remove: Iterable[Pair] = ()) -> None:
        """Change the subscription set; a connected socket gets only the difference."""
        removed = [pair for pair in remove if pair in self.desired]
        added = [pair for pair in add if pair not in self.desired]
        for pair in removed:
            del self.desired[pair]
        for pair in added:
            self.desired[pair] = None
        async with self._lock:
            ws = self._ws
            if ws is None or ws.closed:
                return  # sent with the whole set at the next connect
            with contextlib.suppress(ConnectionError, aiohttp.ClientError):
                for request in p.build_requests(p.Action.UNSUBSCRIBE, removed, "unsub"):
                    await ws.send_str(request.to_json())
                for request in p.build_requests(p.Action.SUBSCRIBE, added, "sub"):
                    await ws.send_str(request.to_json())

    # ------------------------------------------------------------------ lifecycle

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Hold the connection until :meth:`close`."""
        while not self._closing:
            retrying = AsyncRetrying(
                wait=backoff(self.config),
                retry=retry_if_exception_type(FeedError),
                before_sleep=self._before_sleep,
                reraise=True,
            )
            try:
                async for attempt in retrying:
                    with attempt:
                        await self._session(session)
            except _Closing:
                break
        self.state = "closed"

    async def restart(self, cause: str) -> None:
        """Close the socket now; it reconnects at once (e.g. after the daily re-login)."""
        self._restart_cause = cause
        ws = self._ws
        if ws is not None:
            await ws.close(code=1000, message=cause.encode()[:120])

    async def close(self) -> None:
        """Stop for good: a close frame, no reconnect."""
        self._closing = True
        ws = self._ws
        if ws is not None:
            await ws.close(code=1000, message=b"angelstream shutting down")

    def _before_sleep(self, state: RetryCallState) -> None:
        self.state = "backoff"
        self.reconnects += 1
        delay = state.upcoming_sleep
        error = state.outcome.exception() if state.outcome else None
        self.last_error = str(error)
        log.warning("%s: %s; reconnecting in %.2f s (attempt %d)", self.name, error, delay, state.attempt_number)
        if self._on_backoff is not None:
            self._on_backoff(self.name, delay)
        self._on_event(
            "feed_reconnecting", connection=self.name, cause=str(error), delay=round(delay, 3),
            attempt=state.attempt_number,
        )  # fmt: skip

    async def _session(self, session: aiohttp.ClientSession) -> None:
        if self._closing:
            raise _Closing
        self.state = "connecting"
        fresh, self._fresh_login = self._fresh_login, False
        try:
            credentials = await self._credentials(fresh)
        except Exception as exc:
            self.causes["login"] = self.causes.get("login", 0) + 1
            raise FeedError(f"login failed: {exc}") from None
        try:
            ws = await session.ws_connect(
                self.config.url,
                headers=credentials.headers(),
                autoping=True,
                timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=1.0),
                max_msg_size=1 << 20,
                ssl=True,  # wss://: the certificate and host name are verified, always (unlike the SDK's socket)
            )
        except aiohttp.WSServerHandshakeError as exc:
            reason = exc.headers.get("x-error-message", exc.message) if exc.headers else exc.message
            if exc.status == 401:
                self._fresh_login = True
            kind = f"refused_{exc.status}"
            self.causes[kind] = self.causes.get(kind, 0) + 1
            raise FeedError(f"upgrade refused with HTTP {exc.status}: {reason}") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.causes["connect"] = self.causes.get("connect", 0) + 1
            raise FeedError(f"cannot connect to {self.config.url}: {type(exc).__name__} {exc}".rstrip()) from None
        started = time.monotonic()
        self.connects += 1
        self.state = "connected"
        upgraded_us = self._last_us = time.time_ns() // 1000
        self._stalled = False
        log.info("%s: connected to %s; subscribing %d tokens", self.name, self.config.url, len(self.desired))
        self._on_event("feed_connected", connection=self.name, tokens=len(self.desired))
        heartbeat = asyncio.get_running_loop().create_task(self._keepalive(ws))
        try:
            async with self._lock:
                self._ws = ws
                for request in p.build_requests(p.Action.SUBSCRIBE, self.desired, "resub"):
                    await ws.send_str(request.to_json())
            cause = await self._read(ws)
        except (ConnectionError, aiohttp.ClientError) as exc:
            cause = f"connection error: {type(exc).__name__}"
        finally:
            self._ws = None
            heartbeat.cancel()
            await ws.close()
        if self._closing:
            raise _Closing
        kind = "restart" if self._restart_cause else _kind(cause)
        if kind == "lost" and self._last_us == upgraded_us:  # not a single frame: how Angel refuses a 4th connection
            kind = "lost_at_upgrade"
            cause += " right after the upgrade, before any frame (Angel closes connections over 3 per client code)"
        cause = self._restart_cause or cause
        self._restart_cause = ""
        self.causes[kind] = self.causes.get(kind, 0) + 1
        self._on_event("feed_disconnected", connection=self.name, cause=cause)
        if time.monotonic() - started < self.config.healthy_after:
            raise FeedError(cause)
        log.warning("%s: %s; reconnecting", self.name, cause)

    @property
    def last_frame_at(self) -> float:
        """time.time() of the last frame of any kind."""
        return self._last_us / 1e6

    async def _keepalive(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Text pings every ``heartbeat_interval``; the stall watchdog closes a socket mute for ``stall_timeout``.

        Watching from here keeps the read loop free of a timer per message (aiohttp's receive
        timeout costs a TimerHandle per frame, a sixth of the loop's time under load).
        """
        heartbeat, stall = self.config.heartbeat_interval, self.config.stall_timeout
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + heartbeat
        with contextlib.suppress(ConnectionError, aiohttp.ClientError):
            while True:
                await asyncio.sleep(max(0.001, min(stall / 4, next_ping - loop.time())))
                if time.time_ns() // 1000 - self._last_us > stall * 1_000_000:
                    self._stalled = True  # the read loop sees the close and reports the stall
                    self._stall_close = loop.create_task(ws.close(code=1000, message=b"no frame: reconnecting"))
                    return
                if loop.time() >= next_ping:
                    await ws.send_str(p.PING)
                    next_ping = loop.time() + heartbeat

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Hand every frame on until the connection ends; returns why it ended."""
        on_frame = self._on_frame
        frames = 0
        while True:
            msg = await ws.receive()
            if msg.type == aiohttp.WSMsgType.BINARY:
                self._last_us = now_us = time.time_ns() // 1000
                on_frame(msg.data, now_us)
                frames += 1
                if frames % YIELD_EVERY == 0:  # buffered frames never suspend receive(): let the writer run
                    await asyncio.sleep(0)
            elif msg.type == aiohttp.WSMsgType.TEXT:
                self._last_us = time.time_ns() // 1000
                self._on_text(msg.data)
            elif self._stalled:
                return f"stalled: no frame for {self.config.stall_timeout:g} s"
            elif msg.type == aiohttp.WSMsgType.CLOSE:
                return f"closed by the server (code {msg.data}{': ' + msg.extra if msg.extra else ''})"
            else:  # CLOSING, CLOSED, ERROR: the link is gone
                return f"connection lost ({msg.type.name.lower()}{': ' + str(msg.data) if msg.data else ''})"

    def _on_text(self, text: str) -> None:
        message = p.parse_text(text)
        if isinstance(message, p.ServerError):
            log.warning("%s: server error %s %s (%s)", self.name, message.code, message.message, message.correlation_id)
            self._on_event(
                "feed_server_error", connection=self.name, code=message.code, message=message.message,
                correlation_id=message.correlation_id,
            )  # fmt: skip
        elif isinstance(message, p.UnknownText):
            self._on_event("feed_unknown_text", connection=self.name, text=message.text[:200])


async def cancel_all(tasks: Iterable[asyncio.Task[Any]], patience: float = 2.0) -> None:
    """Cancel ``tasks`` and wait for them, cancelling again while any is left.

    A library may swallow one CancelledError (redis-py's asyncio client can, inside a command),
    which would leave the task running for ever; a second cancel reaches its next await.
    """
    pending = set(tasks)
    deadline = asyncio.get_running_loop().time() + patience
    while pending and asyncio.get_running_loop().time() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    if pending:
        log.error("%d task(s) ignored cancellation: %s", len(pending), ", ".join(t.get_name() for t in pending))


def _kind(cause: str) -> str:
    """A disconnect's cause, as a metric label: closed, stalled or lost."""
    if cause.startswith("closed"):
        return "closed"
    return "stalled" if cause.startswith("stalled") else "lost"


class Feed:
    """All connections of one client code: places each token on a connection with room.

    At most ``max_connections`` sockets (Angel allows 3 per client code) of at most ``max_tokens``
    tokens (Angel's 1000). Connections are opened as the set grows; a token never moves between
    connections while it stays subscribed, and what does not fit is refused, never sent.
    """

    def __init__(
        self,
        config: FeedConfig,
        credentials: CredentialsProvider,
        on_frame: FrameHandler,
        on_event: EventHandler,
        max_connections: int = 3,
        max_tokens: int = p.MAX_TOKENS_PER_CONNECTION,
        on_backoff: BackoffHandler | None = None,
        watch: Callable[[asyncio.Task[None]], object] | None = None,
    ) -> None:
        self.config = config
        self.max_connections = max_connections
        self._watch = watch  # told of every connection task (the worker stops if one raises)
        self.max_tokens = max_tokens
        self._credentials = credentials
        self._on_frame = on_frame
        self._on_event = on_event
        self._on_backoff = on_backoff
        self.connections: list[FeedConnection] = []
        self.placement: dict[tuple[int, str], tuple[FeedConnection, int]] = {}  # (exch, token) → (conn, mode)
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def capacity(self) -> int:
        return self.max_connections * self.max_tokens

    def start(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        for conn in self.connections:
            self._spawn(conn)

    def _spawn(self, conn: FeedConnection) -> None:
        if self._session is not None:
            task = asyncio.get_running_loop().create_task(conn.run(self._session), name=conn.name)
            self._tasks.append(task)
            if self._watch is not None:
                self._watch(task)

    async def apply(self, want: dict[tuple[int, str], int]) -> list[tuple[int, str]]:
        """Make the subscriptions equal ``want`` ((exch, token) → mode) by diffs; returns what did not fit."""
        changes: dict[FeedConnection, tuple[list[Pair], list[Pair]]] = {}

        def change(conn: FeedConnection) -> tuple[list[Pair], list[Pair]]:
            return changes.setdefault(conn, ([], []))

        for wire, (conn, mode) in list(self.placement.items()):
            if want.get(wire) != mode:
                change(conn)[1].append((mode, *wire))
                del self.placement[wire]
                if wire in want:  # a mode change: same connection, new mode
                    change(conn)[0].append((want[wire], *wire))
                    self.placement[wire] = (conn, want[wire])
        load = {conn: len(conn.desired) - len(change(conn)[1]) + len(change(conn)[0]) for conn in self.connections}
        rejected: list[tuple[int, str]] = []
        for wire, mode in want.items():
            if wire in self.placement:
                continue
            room = next((c for c in self.connections if load[c] < self.max_tokens), None)
            if room is None and len(self.connections) < self.max_connections:
                room = FeedConnection(
                    f"feed-{len(self.connections) + 1}", self.config, self._credentials, self._on_frame,
                    self._on_event, self._on_backoff,
                )  # fmt: skip
                self.connections.append(room)
                load[room] = 0
                self._spawn(room)
            if room is None:
                rejected.append(wire)
                continue
            load[room] += 1
            change(room)[0].append((mode, *wire))
            self.placement[wire] = (room, mode)
        for conn, (add, remove) in changes.items():
            if add or remove:
                await conn.update(add=add, remove=remove)
        return rejected

    async def restart(self, cause: str) -> None:
        for conn in self.connections:
            await conn.restart(cause)

    async def close(self, timeout: float = 1.0) -> None:
        """Close frames on every socket at once; whatever is not done within ``timeout`` is cancelled."""
        loop = asyncio.get_running_loop()
        waiting = {loop.create_task(conn.close()) for conn in self.connections} | set(self._tasks)
        if waiting:
            _, pending = await asyncio.wait(waiting, timeout=timeout)
            await cancel_all(pending)
