"""A local, protocol-faithful simulator of Angel One's SmartAPI servers.

One HTTP server on loopback plays both of Angel's hosts:

* REST (``SmartConnect(api_key, root=<sim url>)``): ``loginByPassword`` (client code, PIN and a
  real TOTP), ``getProfile``, ``generateTokens``, ``logout``, and the instrument master at
  ``/OpenAPI_File/files/OpenAPIScripMaster.json``;
* SmartStream at ``/smart-stream`` (spec §8): header (or query) auth at the upgrade with HTTP 401 +
  ``x-error-message``, text ``ping`` → ``pong``, control pings answered, subscribe/unsubscribe JSON
  with ``E1001``/``E1002``, unknown exchange types and duplicates silently ignored, 1000 tokens per
  connection, 3 connections per client code (the extra one is reset), and full-length binary
  packets built with the shared codec from a seeded random walk.

Fault knobs (methods here, ``POST /sim/faults/<name>`` at run time, ``--fault`` on the command
line): close, drop, silence, truncate, garbage, error, rotate, refuse.

Blast mode (``SimConfig(blast=True)`` or :meth:`Simulator.set_blast`), for the benchmark: instead of
the random walk, each connection cycles through pre-encoded, pre-framed packets of its
subscriptions (:data:`BLAST_VARIANTS` distinct packets each, so no packet ever repeats the previous
one of its token and mode) as fast as the socket drains, or at ``blast_rate`` frames per second;
``blast_frames`` counts what was written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import secrets
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pyotp
from aiohttp import WSMsgType, web

from worker import protocol as p
from worker.instruments import Instrument, InstrumentIndex, bundled_master_path, dump_master, load_master_file

log = logging.getLogger(__name__)

STREAM_PATH = "/smart-stream"
MASTER_PATH = "/OpenAPI_File/files/OpenAPIScripMaster.json"
LOGIN_PATH = "/rest/auth/angelbroking/user/v1/loginByPassword"
TOKENS_PATH = "/rest/auth/angelbroking/jwt/v1/generateTokens"
PROFILE_PATH = "/rest/secure/angelbroking/user/v1/getProfile"
LOGOUT_PATH = "/rest/secure/angelbroking/user/v1/logout"

#: The simulator's default account; ``.env.example`` uses the same values for the demo.
DEFAULT_API_KEY = "sim-api-key"
DEFAULT_CLIENT_CODE = "S1234567"
DEFAULT_PIN = "1234"
DEFAULT_TOTP_SECRET = "ANGELSTREAMSIMULATORTOTPSECRETAB"

FAULTS = ("close", "drop", "silence", "truncate", "garbage", "error", "rotate", "refuse")

#: Blast mode: distinct packets per subscription in a connection's cycle.
BLAST_VARIANTS = 4
#: Blast mode at full speed: bytes handed to the socket per write, and the unsent bytes at which it waits.
BLAST_CHUNK = 64 * 1024
BLAST_BUFFER = 256 * 1024
#: Blast mode at a fixed rate: past this many unsent bytes, frames that fall due are skipped (not counted).
BLAST_BACKLOG_MAX = 4 * 1024 * 1024
#: Blast mode: seconds between writes at a fixed rate, and between checks while idle.
BLAST_TICK = 0.001
BLAST_IDLE = 0.01


@dataclass
class SimConfig:
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    api_key: str = DEFAULT_API_KEY
    client_code: str = DEFAULT_CLIENT_CODE
    pin: str = DEFAULT_PIN
    totp_secret: str = DEFAULT_TOTP_SECRET
    instruments: list[Instrument] = field(default_factory=lambda: load_master_file(bundled_master_path()))
    seed: int = 7
    rate_per_token: float = 2.0  # events per second per subscribed instrument
    max_rate: float = 20_000.0  # events per second over all instruments
    max_connections: int = 3  # per client code
    max_tokens: int = p.MAX_TOKENS_PER_CONNECTION  # per connection
    strict_auth: bool = True  # also require the JWT and API key at the upgrade (the documented rule)
    depth20: bool = True  # False: Depth-20 is deprecated (subscriptions accepted, no data)
    record: bool = False  # keep every packet sent, for tests
    blast: bool = False  # start in blast mode (pre-encoded frames in a tight loop; no random walk)
    blast_rate: float = 0.0  # blast mode: frames per second per connection; 0: as fast as the socket drains
    tls: ssl.SSLContext | None = None  # serve https:// and wss:// with this server context (tests of verification)


# --------------------------------------------------------------------------- market model


class Market:
    """One seeded random walk per instrument; every event fans out to all its subscribers."""

    def __init__(self, inst: Instrument, seed: int) -> None:
        self.inst = inst
        self.rng = random.Random(f"{seed}:{inst.exchange_type}:{inst.token}")
        divisor = p.price_divisor(inst.exchange_type)
        self.tick = max(1, int(inst.tick_size * divisor / 100))
        self.is_index = inst.instrument_type == "AMXIDX"
        self.is_derivative = inst.exchange not in ("NSE", "BSE")
        low, high = self._price_band()
        self.close = self._round(Decimal(str(self.rng.uniform(low, high))) * divisor)
        self.ltp = self.open = self.high = self.low = self.close
        self.seq = 0 if self.is_index else self.rng.randint(1_000_000, 9_000_000)
        self.volume = self.turnover = self.ltq = 0
        self.oi = self.oi_open = self.rng.randint(1, 500) * inst.lot_size * 100 if self.is_derivative else 0
        self.exch_ts = 0
        self._packets: dict[int, p.Packet] = {}  # per mode, until the next step
        self.step()

    def _price_band(self) -> tuple[float, float]:
        if self.inst.exchange == "CDS":
            return (70.0, 100.0)
        if self.is_index or self.inst.instrument_type.startswith("FUT"):
            return (5_000.0, 60_000.0)
        if self.inst.instrument_type.startswith("OPT"):
            return (5.0, 500.0)
        return (50.0, 5_000.0)

    def _round(self, units: Decimal) -> int:
        return max(self.tick, int(units) // self.tick * self.tick)

    def step(self) -> None:
        """One trade: price, quantity, cumulative volume, OI, timestamps move on."""
        rng = self.rng
        self.ltp = max(self.tick, self.ltp + self.tick * rng.randint(-3, 3))
        self.high, self.low = max(self.high, self.ltp), min(self.low, self.ltp)
        if not self.is_index:
            self.seq += 1
            self.ltq = self.inst.lot_size * rng.randint(1, 20)
            self.volume += self.ltq
            self.turnover += self.ltp * self.ltq
        if self.is_derivative:
            self.oi = max(0, self.oi + self.inst.lot_size * rng.randint(-5, 5))
        self.exch_ts = max(self.exch_ts, int(time.time() * 1000))
        self._packets.clear()

    def packet(self, mode: int) -> p.Packet:
        """The current state in ``mode``; the same packet until the next step (so a snapshot repeats it)."""
        packet = self._packets.get(mode)
        if packet is None:
            packet = self._packets[mode] = self._build(mode)
        return packet

    def _build(self, mode: int) -> p.Packet:
        atp = self.turnover // self.volume if self.volume else 0
        head = (mode, self.inst.exchange_type, self.inst.token)
        if mode == p.Mode.LTP:
            return p.LtpPacket(*head, self.seq, self.exch_ts, self.ltp)
        rng = self.rng
        quote = (
            self.seq, self.exch_ts, self.ltp, self.ltq, atp, self.volume,
            float(rng.randint(0, 500_000)), float(rng.randint(0, 500_000)),
            self.open, self.high, self.low, self.close,
        )  # fmt: skip
        if mode == p.Mode.QUOTE:
            return p.QuotePacket._make((*head, *quote))
        if mode == p.Mode.SNAP_QUOTE:
            oi_pct = (self.oi - self.oi_open) / self.oi_open * 100 if self.oi_open else 0.0
            close = Decimal(self.close)
            return p.SnapQuotePacket._make(
                (
                    *head, *quote, self.exch_ts // 1000, self.oi, oi_pct,
                    self._levels(5, -1, 2**62), self._levels(5, 1, 2**62),
                    self._round(close * Decimal("1.2")), self._round(close * Decimal("0.8")),
                    max(self.high, self._round(close * Decimal("1.3"))),
                    min(self.low, self._round(close * Decimal("0.7"))),
                )
            )  # fmt: skip
        cap = 2**31 - 1
        return p.Depth20Packet(
            *head, self.exch_ts, int(time.time() * 1000), self._levels(20, -1, cap), self._levels(20, 1, cap)
        )

    def _levels(self, count: int, side: int, cap: int) -> tuple[p.DepthLevel, ...]:
        rng = self.rng
        return tuple(
            p.DepthLevel(
                quantity=self.inst.lot_size * rng.randint(1, 200),
                price=min(cap, max(self.tick, self.ltp + side * k * self.tick)),
                orders=rng.randint(1, 40),
            )
            for k in range(1, count + 1)
        )


# --------------------------------------------------------------------------- connections


@dataclass(eq=False)
class SimConnection:
    id: int
    client_code: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport
    subscriptions: dict[tuple[int, int, str], None] = field(default_factory=dict)  # (mode, exch, token)
    version: int = 0  # bumped by every subscribe/unsubscribe request (blast mode rebuilds its cycle)


@dataclass(frozen=True)
class Sent:
    """One packet the simulator sent (kept when ``SimConfig.record`` is on)."""

    connection: int
    packet: p.Packet
    snapshot: bool  # True: the current state re-sent on subscribe, not a new event
    at: float  # time.monotonic() when it was handed to the socket


class Simulator:
    """Angel's REST + SmartStream servers in one asyncio application."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = config or SimConfig()
        self.index = InstrumentIndex(self.config.instruments)
        self.markets: dict[tuple[int, str], Market] = {}
        self.connections: list[SimConnection] = []
        self.sent: list[Sent] = []
        self.silent = False
        self.feed_token = self._new_token()
        self.jwts: set[str] = set()
        self.refresh_tokens: set[str] = set()
        self.logins = 0
        self.upgrades = 0  # upgrade attempts seen, accepted or not
        self._refuse: list[int] = []  # HTTP statuses for the next refused upgrades
        self._next_id = 0
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.blasting = self.config.blast
        self.blast_rate = self.config.blast_rate
        self.blast_frames = 0  # frames written in blast mode, all connections
        self._blast_epoch = 0  # bumped by set_blast: each connection restarts its pacing
        self._blast_cache: dict[tuple[int, int, str], tuple[bytes, ...]] = {}

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"{'https' if self.config.tls else 'http'}://{self.config.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.config.tls else 'ws'}://{self.config.host}:{self.port}{STREAM_PATH}"

    def worker_env(self) -> dict[str, str]:
        """The worker's ``ANGEL_*`` settings that point it at this simulator (as environment variables)."""
        cfg = self.config
        return {
            "ANGEL_API_KEY": cfg.api_key,
            "ANGEL_CLIENT_CODE": cfg.client_code,
            "ANGEL_PIN": cfg.pin,
            "ANGEL_TOTP_SECRET": cfg.totp_secret,
            "ANGEL_API_URL": self.url,
            "ANGEL_WS_URL": self.ws_url,
            "ANGEL_INSTRUMENTS_URL": self.url + MASTER_PATH,
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get(STREAM_PATH, self._stream)
        app.router.add_post(LOGIN_PATH, self._login)
        app.router.add_post(TOKENS_PATH, self._generate_tokens)
        app.router.add_get(PROFILE_PATH, self._profile)
        app.router.add_post(LOGOUT_PATH, self._logout)
        app.router.add_get(MASTER_PATH, self._master)
        app.router.add_get("/sim/state", self._state)
        app.router.add_post("/sim/faults/{name}", self._fault)
        return app

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app(), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=self.config.tls)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._spawn(self._pump())
        log.info("simulator listening on %s (stream %s)", self.url, self.ws_url)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for conn in list(self.connections):
            await conn.ws.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def schedule_fault(self, name: str, every: float, times: int = 0) -> asyncio.Task[None]:
        """Inject fault ``name`` every ``every`` seconds, ``times`` times (0: until stopped; ``--fault NAME:SECONDS``).

        The task returned is done after the last one.
        """

        async def repeat() -> None:
            done = 0
            while not times or done < times:
                await asyncio.sleep(every)
                await self.inject(name)
                done += 1

        return self._spawn(repeat())

    # ------------------------------------------------------------------ streaming

    def market(self, inst: Instrument) -> Market:
        key = (inst.exchange_type, inst.token)
        market = self.markets.get(key)
        if market is None:
            market = self.markets[key] = Market(inst, self.config.seed)
        return market

    async def _pump(self) -> None:
        """Every 1/rate seconds, one event for each subscribed instrument (capped by max_rate)."""
        interval = 1.0 / self.config.rate_per_token
        budget = max(1, int(self.config.max_rate * interval))
        start = 0
        while True:
            began = time.monotonic()
            if not self.silent and not self.blasting:
                subscribers: dict[tuple[int, str], list[tuple[SimConnection, int]]] = {}
                for conn in self.connections:
                    for mode, exchange_type, token in conn.subscriptions:
                        if mode != p.Mode.DEPTH_20 or self.config.depth20:
                            subscribers.setdefault((exchange_type, token), []).append((conn, mode))
                keys = [k for k in subscribers if k in self.index.by_token]
                if keys:
                    start %= len(keys)
                    chosen = (keys[start:] + keys[:start])[:budget]
                    start += len(chosen)
                    for key in chosen:
                        market = self.market(self.index.by_token[key])
                        market.step()
                        for conn, mode in subscribers[key]:
                            await self._send_packet(conn, market.packet(mode), snapshot=False)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def _send_packet(self, conn: SimConnection, packet: p.Packet, snapshot: bool) -> None:
        if conn.ws.closed:
            return
        with contextlib.suppress(ConnectionError):
            await conn.ws.send_bytes(p.encode(packet))
            if self.config.record:
                self.sent.append(Sent(conn.id, packet, snapshot, time.monotonic()))

    # ------------------------------------------------------------------ blast mode

    def set_blast(self, enabled: bool, rate: float | None = None) -> None:
        """Blast mode on or off; ``rate``: frames per second per connection (0: as fast as possible)."""
        self.blasting = enabled
        if rate is not None:
            self.blast_rate = rate
        self._blast_epoch += 1

    def blast_frames_for(self, mode: int, exchange_type: int, token: str) -> tuple[bytes, ...]:
        """The :data:`BLAST_VARIANTS` WebSocket frames cycled for one subscription (built once, then kept)."""
        key = (mode, exchange_type, token)
        frames = self._blast_cache.get(key)
        if frames is None:
            market = self.market(self.index.by_token[(exchange_type, token)])
            stamp = int(time.time() * 1000)
            built = []
            for variant in range(BLAST_VARIANTS):
                market.step()
                packet = market.packet(mode)  # a distinct exchange timestamp: never equal to its neighbours
                built.append(ws_binary_frame(p.encode(packet._replace(exchange_timestamp=stamp + variant))))
            frames = self._blast_cache[key] = tuple(built)
        return frames

    def _blast_cycle(self, conn: SimConnection) -> tuple[bytes, list[int]]:
        """All of ``conn``'s blast frames back to back, and where each starts (plus the end)."""
        wanted = [
            pair
            for pair in conn.subscriptions
            if (pair[1], pair[2]) in self.index.by_token and (pair[0] != p.Mode.DEPTH_20 or self.config.depth20)
        ]
        per_pair = [self.blast_frames_for(*pair) for pair in wanted]
        frames = [variants[v] for v in range(BLAST_VARIANTS) for variants in per_pair]
        offsets = [0]
        for frame in frames:
            offsets.append(offsets[-1] + len(frame))
        return b"".join(frames), offsets

    async def _blast(self, conn: SimConnection) -> None:
        """One connection's blast loop (cancelled when the connection ends); idle while off or silent."""
        transport = conn.transport
        version, epoch = -1, -1
        cycle, offsets = b"", [0]
        position = sent = 0
        started = 0.0
        while True:
            if not self.blasting or self.silent or transport.is_closing():
                epoch = -1
                await asyncio.sleep(BLAST_IDLE)
                continue
            if conn.version != version:
                version = conn.version
                cycle, offsets = self._blast_cycle(conn)
                position = 0
            count = len(offsets) - 1
            if not count:
                await asyncio.sleep(BLAST_IDLE)
                continue
            if epoch != self._blast_epoch:
                epoch, started, sent = self._blast_epoch, time.monotonic(), 0
            backlog = transport.get_write_buffer_size()
            if self.blast_rate > 0:  # what is due by now; skipped (not counted) if the reader is far behind
                due = min(count, int((time.monotonic() - started) * self.blast_rate) - sent)
                sent += due
                if backlog >= BLAST_BACKLOG_MAX:
                    due = 0
                pause = BLAST_TICK
            elif backlog < BLAST_BUFFER:
                due, pause = max(1, BLAST_CHUNK * count // len(cycle)), 0.0
            else:
                due, pause = 0, BLAST_TICK
            self.blast_frames += due
            view = memoryview(cycle)
            while due > 0:
                end = min(count, position + due)
                transport.write(view[offsets[position] : offsets[end]])
                due -= end - position
                position = end % count
            await asyncio.sleep(pause)

    # ------------------------------------------------------------------ the socket

    def _auth_error(self, request: web.Request) -> tuple[str, str]:
        """(client code, reason) — reason is empty when the upgrade may proceed."""
        headers, query = request.headers, request.query
        if "x-client-code" in headers:
            client_code = headers.get("x-client-code", "")
            feed_token = headers.get("x-feed-token", "")
            api_key = headers.get("x-api-key", "")
            jwt = headers.get("Authorization", "").removeprefix("Bearer ").strip()
            check_jwt = self.config.strict_auth
        else:  # the browser form: ?clientCode=…&feedToken=…&apiKey=…
            client_code = query.get("clientCode", "")
            feed_token = query.get("feedToken", "")
            api_key = query.get("apiKey", "")
            jwt, check_jwt = "", False
        if client_code != self.config.client_code:
            return client_code, "Invalid Client Code"
        if check_jwt and jwt not in self.jwts:
            return client_code, "Invalid Auth token"
        if self.config.strict_auth and api_key != self.config.api_key:
            return client_code, "Invalid API Key"
        if feed_token != self.feed_token:
            return client_code, "Invalid Feed Token"
        return client_code, ""

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        if self._refuse:
            status = self._refuse.pop(0)
            reason = "Too Many Requests" if status == 429 else "Invalid Feed Token"
            return web.Response(status=status, text=reason, headers={"x-error-message": reason})
        client_code, reason = self._auth_error(request)
        if reason:
            return web.Response(status=401, text=reason, headers={"x-error-message": reason})
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        transport = request.transport
        assert transport is not None, "aiohttp gives a prepared request its transport"
        if sum(c.client_code == client_code for c in self.connections) >= self.config.max_connections:
            # Angel closes the extra connection; users see a TCP reset (spec §1.2).
            transport.abort()
            return ws
        self._next_id += 1
        conn = SimConnection(self._next_id, client_code, ws, transport)
        self.connections.append(conn)
        blaster = self._spawn(self._blast(conn))
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_text(conn, msg.data)
                elif msg.type == WSMsgType.PING and not self.silent:
                    await ws.pong(msg.data)
        finally:
            blaster.cancel()
            self.connections.remove(conn)
        return ws

    async def _on_text(self, conn: SimConnection, text: str) -> None:
        if text == p.PING:
            if not self.silent:
                await conn.ws.send_str(p.PONG)
            return
        try:
            request = p.parse_request(text)
        except p.RequestError:
            await conn.ws.send_str(p.ServerError(p.E1001, "Invalid Request Payload", _correlation(text)).to_json())
            return
        pairs = [
            (int(request.mode), ex, token)
            for ex, tokens in request.token_list
            if ex in p.ExchangeType._value2member_map_  # unknown exchange types: silently ignored
            for token in tokens
        ]
        if request.mode == p.Mode.DEPTH_20 and (
            any(ex != p.ExchangeType.NSE_CM for ex, _ in request.token_list)
            or request.token_count > p.MAX_DEPTH_20_TOKENS_PER_REQUEST
        ):
            await conn.ws.send_str(p.ServerError(p.E1001, "Invalid Request Payload", request.correlation_id).to_json())
            return
        if request.action == p.Action.UNSUBSCRIBE:
            for pair in pairs:
                conn.subscriptions.pop(pair, None)
            conn.version += 1
            return
        new = [pair for pair in dict.fromkeys(pairs) if pair not in conn.subscriptions]
        if len(conn.subscriptions) + len(new) > self.config.max_tokens:
            await conn.ws.send_str(
                p.ServerError(p.E1002, "Invalid Request. Subscription Limit Exceeded", request.correlation_id).to_json()
            )
            return
        for pair in new:
            conn.subscriptions[pair] = None
        conn.version += 1
        # Angel answers a subscription with the instrument's current state (a snapshot).
        for mode, ex, token in new:
            inst = self.index.by_wire(ex, token)
            if inst is not None and not self.silent and (mode != p.Mode.DEPTH_20 or self.config.depth20):
                await self._send_packet(conn, self.market(inst).packet(mode), snapshot=True)

    # ------------------------------------------------------------------ faults

    async def close_connections(self, code: int = 1000) -> None:
        """Close every stream connection with a close frame."""
        for conn in list(self.connections):
            await conn.ws.close(code=code, message=b"simulator: closed")

    def drop_connections(self) -> None:
        """Drop every stream connection's TCP link without a close frame."""
        for conn in list(self.connections):
            conn.transport.abort()

    def set_silent(self, silent: bool) -> None:
        """Silent: no data, no pong (text or control), TCP kept open."""
        self.silent = silent

    async def send_raw(self, data: bytes) -> None:
        for conn in list(self.connections):
            with contextlib.suppress(ConnectionError):
                await conn.ws.send_bytes(data)

    async def send_truncated(self) -> None:
        """A SnapQuote frame cut short, as a broken server would send it."""
        inst = next(iter(self.index))
        await self.send_raw(p.encode(self.market(inst).packet(p.Mode.SNAP_QUOTE))[:100])

    async def send_garbage(self) -> None:
        await self.send_raw(bytes([0xEE]) + secrets.token_bytes(50))

    async def send_error(self, code: str = p.E1001, message: str = "Invalid Request Payload") -> None:
        for conn in list(self.connections):
            with contextlib.suppress(ConnectionError):
                await conn.ws.send_str(p.ServerError(code, message).to_json())

    def refuse_upgrades(self, count: int, status: int = 429) -> None:
        """Refuse the next ``count`` upgrades with HTTP ``status`` (401 or 429)."""
        self._refuse.extend([status] * count)

    async def rotate_feed_token(self, disconnect: bool = True) -> None:
        """Daily rollover: the feed token changes; JWTs die; open sockets are closed if asked."""
        self.feed_token = self._new_token()
        self.jwts.clear()
        if disconnect:
            await self.close_connections()

    async def inject(self, name: str, **params: str) -> None:
        """Run fault ``name`` (one of :data:`FAULTS`) with string parameters."""
        actions: dict[str, Callable[[], Awaitable[None] | None]] = {
            "close": lambda: self.close_connections(int(params.get("code", 1000))),
            "drop": self.drop_connections,
            "silence": lambda: self._silence(float(params.get("seconds", 0))),
            "truncate": self.send_truncated,
            "garbage": self.send_garbage,
            "error": lambda: self.send_error(params.get("code", p.E1001)),
            "rotate": lambda: self.rotate_feed_token(params.get("disconnect", "1") != "0"),
            "refuse": lambda: self.refuse_upgrades(int(params.get("count", 1)), int(params.get("status", 429))),
        }
        if name not in actions:
            raise ValueError(f"unknown fault {name!r}; choose one of {', '.join(FAULTS)}")
        result = actions[name]()
        if result is not None:
            await result

    async def _silence(self, seconds: float) -> None:
        """Silent for ``seconds`` (0: until ``set_silent(False)``)."""
        self.set_silent(True)
        if seconds > 0:

            async def end() -> None:
                await asyncio.sleep(seconds)
                self.set_silent(False)

            self._spawn(end())

    # ------------------------------------------------------------------ REST

    @staticmethod
    def _new_token() -> str:
        return secrets.token_urlsafe(24)

    def _new_jwt(self) -> str:
        header = base64.urlsafe_b64encode(b'{"alg":"HS512"}').rstrip(b"=").decode()
        claims = {"username": self.config.client_code, "iat": int(time.time()), "sim": secrets.token_hex(4)}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        jwt = f"{header}.{payload}.{secrets.token_urlsafe(32)}"
        self.jwts.add(jwt)
        return jwt

    def _tokens(self) -> dict[str, str]:
        refresh = self._new_token()
        self.refresh_tokens.add(refresh)
        return {"jwtToken": self._new_jwt(), "refreshToken": refresh, "feedToken": self.feed_token}

    @staticmethod
    def _ok(data: Any) -> web.Response:
        return web.json_response({"status": True, "message": "SUCCESS", "errorcode": "", "data": data})

    @staticmethod
    def _fail(message: str, code: str, status: int = 200) -> web.Response:
        return web.json_response({"status": False, "message": message, "errorcode": code, "data": None}, status=status)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            return {}
        return body if isinstance(body, dict) else {}

    async def _login(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if request.headers.get("X-PrivateKey") != self.config.api_key:
            return self._fail("Invalid API Key", "AG8004")
        if body.get("clientcode") != self.config.client_code or body.get("password") != self.config.pin:
            return self._fail("Invalid clientcode or password", "AB1007")
        if not pyotp.TOTP(self.config.totp_secret).verify(str(body.get("totp", "")), valid_window=1):
            return self._fail("Invalid totp", "AB1050")
        self.logins += 1
        return self._ok(self._tokens())

    def _bearer_ok(self, request: web.Request) -> bool:
        return request.headers.get("Authorization", "").removeprefix("Bearer ") in self.jwts

    async def _profile(self, request: web.Request) -> web.Response:
        if not self._bearer_ok(request):
            return web.json_response(
                {"success": False, "message": "Invalid Token", "errorCode": "AG8001", "data": ""}, status=401
            )
        return self._ok(
            {
                "clientcode": self.config.client_code,
                "name": "SIMULATED USER",
                "email": "",
                "mobileno": "",
                "exchanges": sorted(p.EXCHANGE_TYPE_BY_SEGMENT),
                "products": ["MARGIN", "MIS", "NRML", "CNC", "CO", "BO"],
                "lastlogintime": "",
                "brokerid": "B2C",
            }
        )

    async def _generate_tokens(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if body.get("refreshToken") not in self.refresh_tokens:
            return self._fail("Invalid Token", "AG8001")
        return self._ok(self._tokens())

    async def _logout(self, request: web.Request) -> web.Response:
        self.jwts.discard(request.headers.get("Authorization", "").removeprefix("Bearer "))
        return self._ok(None)

    async def _master(self, request: web.Request) -> web.Response:
        return web.Response(body=dump_master(self.config.instruments), content_type="application/json")

    # ------------------------------------------------------------------ admin

    async def _state(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "connections": [{"id": c.id, "subscriptions": len(c.subscriptions)} for c in self.connections],
                "logins": self.logins,
                "upgrades": self.upgrades,
                "silent": self.silent,
            }
        )

    async def _fault(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await self.inject(name, **request.query)
        except ValueError as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        return web.json_response({"ok": True, "fault": name})


def ws_binary_frame(payload: bytes) -> bytes:
    """``payload`` as one unmasked, final, binary WebSocket frame (server to client, RFC 6455 §5.2)."""
    size = len(payload)
    if size < 126:
        return bytes((0x82, size)) + payload
    assert size < 1 << 16, "SmartStream packets are at most 443 bytes"
    return bytes((0x82, 126)) + size.to_bytes(2, "big") + payload


def _correlation(text: str) -> str:
    try:
        body = json.loads(text)
    except ValueError:
        return ""
    value = body.get("correlationID") if isinstance(body, dict) else None
    return value if isinstance(value, str) else ""


# --------------------------------------------------------------------------- a simulator in a thread


class SimulatorThread:
    """Runs a :class:`Simulator` on its own event loop in a daemon thread (tests, demo, benchmark)."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.sim = Simulator(config)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="angel-simulator", daemon=True)

    def __enter__(self) -> SimulatorThread:
        self._thread.start()
        self.call(self.sim.start())
        return self

    def __exit__(self, *exc: object) -> None:
        self.call(self.sim.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 10.0) -> Any:
        """Run a coroutine on the simulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def inject(self, name: str, **params: str) -> None:
        self.call(self.sim.inject(name, **params))
