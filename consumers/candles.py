"""OHLCV candles from the tick streams (``angelstream candles``).

The fold (no I/O) comes first: :class:`SymbolCandles` turns one symbol's ticks into candles.

* Candles are on **exchange time** (``exch_ts``), aligned to the session start of the tick's
  Indian day (09:15 IST for NSE/BSE/NFO/BFO, 09:00 for MCX/CDS/NCDEX; configurable per exchange):
  a candle starts at ``session start + k × interval``.
* **Volume** is the difference of the cumulative day volume (``volume``), never a sum of ``ltq``.
  The first tick ever seen for a symbol only sets the baseline; a smaller cumulative volume on a
  later Indian day is a new day (its whole value counts); on the same day it is an out-of-order
  tick and adds nothing. LTP-mode ticks carry no volume: a candle made only of them says
  ``has_volume=0``.
* A candle closes when a tick of a later candle arrives, or when the wall clock passes its end
  plus ``grace`` (so quiet symbols still close). Intervals without ticks make no candle.
* **Late ticks** (exchange time before the end of the last closed candle) are counted and dropped:
  a closed candle is never rewritten.

The service (:class:`CandleService`) reads the tick streams through the consumer group
``candles`` and keeps each symbol on one replica at a time (a lease), saves each symbol's state,
closed candles and ``XACK`` in one ``MULTI``, and writes closed candles with the explicit ID
``<start ms>-0``, so re-processing after a crash never duplicates a candle.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from datetime import time as wall_time
from decimal import Decimal
from typing import cast

import redis

from worker import keys, logs
from worker import settings as settings_module
from worker.schema import Tick, parse_entry
from worker.settings import IST

log = logging.getLogger(__name__)

CANDLE_SCHEMA_VERSION = "1"
DEFAULT_SESSIONS = {
    "NSE": wall_time(9, 15), "BSE": wall_time(9, 15), "NFO": wall_time(9, 15), "BFO": wall_time(9, 15),
    "CDS": wall_time(9, 0), "MCX": wall_time(9, 0), "NCDEX": wall_time(9, 0),
}  # fmt: skip
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class CandleConfigError(ValueError):
    """A bad interval or session setting; the message says what to write instead."""


def parse_interval(text: str) -> int:
    """``1m``, ``5m``, ``15m``, ``1h``, ``1d``, ``30s`` → milliseconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhd])\s*", text)
    if match is None or int(match[1]) == 0:
        raise CandleConfigError(f"bad interval {text!r}: write a number and a unit, e.g. 1m, 5m, 1h, 1d")
    return int(match[1]) * _UNITS[match[2]] * 1000


def parse_sessions(text: str) -> dict[str, wall_time]:
    """``MCX=09:00,NSE=09:15`` → session starts (IST) that override the defaults."""
    sessions = dict(DEFAULT_SESSIONS)
    for part in filter(None, (p.strip() for p in text.split(","))):
        exchange, _, at = part.partition("=")
        try:
            sessions[exchange.strip().upper()] = wall_time.fromisoformat(at.strip())
        except ValueError:
            raise CandleConfigError(f"bad session {part!r}: write EXCHANGE=HH:MM, e.g. MCX=09:00") from None
    return sessions


def bucket_start(exch_ts: int, interval_ms: int, session: wall_time) -> int:
    """The start (epoch ms) of the candle holding ``exch_ts``, aligned to the session of its IST day."""
    day = datetime.fromtimestamp(exch_ts / 1000, IST).date()
    anchor = int(datetime.combine(day, session, IST).timestamp() * 1000)
    return anchor + (exch_ts - anchor) // interval_ms * interval_ms


def _ist_day(exch_ts: int) -> str:
    return datetime.fromtimestamp(exch_ts / 1000, IST).date().isoformat()


@dataclass
class Candle:
    start: int  # epoch ms, exchange time
    end: int
    open: str
    high: str
    low: str
    close: str
    volume: int = 0
    has_volume: bool = False
    ticks: int = 0
    first_ts: int = 0
    last_ts: int = 0

    def fold(self, price: Decimal, exch_ts: int, volume: int | None) -> None:
        if exch_ts < self.first_ts:
            self.open, self.first_ts = str(price), exch_ts
        if exch_ts >= self.last_ts:
            self.close, self.last_ts = str(price), exch_ts
        if price > Decimal(self.high):
            self.high = str(price)
        if price < Decimal(self.low):
            self.low = str(price)
        if volume is not None:
            self.volume += volume
            self.has_volume = True
        self.ticks += 1

    def fields(self, exchange: str, symbol: str, interval: str) -> dict[str, str]:
        """The candle as a stream entry / hash (every value a string)."""
        return {
            "v": CANDLE_SCHEMA_VERSION, "exchange": exchange, "symbol": symbol, "interval": interval,
            "start": str(self.start), "end": str(self.end), "open": self.open, "high": self.high,
            "low": self.low, "close": self.close, "volume": str(self.volume),
            "has_volume": "1" if self.has_volume else "0", "ticks": str(self.ticks),
            "first_ts": str(self.first_ts), "last_ts": str(self.last_ts),
        }  # fmt: skip


@dataclass
class SymbolCandles:
    """One symbol's forming candles (one per interval) and what it needs to carry on after a restart."""

    intervals: dict[str, int]  # name → ms
    session: wall_time
    forming: dict[str, Candle] = field(default_factory=dict)
    closed_until: dict[str, int] = field(default_factory=dict)  # interval → end of the last closed candle
    last_id: str = "0-0"  # the last tick folded (a re-delivered tick is skipped)
    cum: int | None = None  # last cumulative day volume
    cum_ts: int = 0  # exchange time of that tick
    late: int = 0

    def fold(self, tick: Tick) -> list[tuple[str, Candle]]:
        """Fold one tick; returns the candles it closed, as (interval, candle)."""
        if _id_key(tick.id) <= _id_key(self.last_id):
            return []  # already folded before a crash, delivered again
        self.last_id = tick.id
        ts = tick.exch_ts
        delta = self._volume(tick)
        closed: list[tuple[str, Candle]] = []
        late = False
        for name, interval in self.intervals.items():
            start = bucket_start(ts, interval, self.session)
            if start < self.closed_until.get(name, 0):
                late = True
                continue
            candle = self.forming.get(name)
            if candle is not None and start > candle.start:
                closed.append((name, self._close(name, candle)))
                candle = None
            if candle is None:
                price = str(tick.ltp)
                candle = Candle(start, start + interval, price, price, price, price, first_ts=ts, last_ts=ts)
                self.forming[name] = candle
            candle.fold(tick.ltp, ts, delta)
        self.late += late
        return closed

    def _volume(self, tick: Tick) -> int | None:
        """This tick's share of the day volume; None when it carries none."""
        if tick.volume is None:
            return None
        if self.cum is None:
            delta = 0  # the first tick ever seen: only a baseline
        elif tick.volume >= self.cum:
            delta = tick.volume - self.cum
        elif _ist_day(tick.exch_ts) != _ist_day(self.cum_ts):
            delta = tick.volume  # a new day: the counter restarted
        else:
            return 0  # older than what we have seen: nothing new
        self.cum, self.cum_ts = tick.volume, tick.exch_ts
        return delta

    def _close(self, name: str, candle: Candle) -> Candle:
        del self.forming[name]
        self.closed_until[name] = candle.end
        return candle

    def expire(self, now_ms: int, grace_ms: int) -> list[tuple[str, Candle]]:
        """Close the candles whose end plus ``grace_ms`` has passed on the wall clock."""
        due = [(name, c) for name, c in self.forming.items() if c.end + grace_ms <= now_ms]
        return [(name, self._close(name, candle)) for name, candle in due]

    # ------------------------------------------------------------------ persistence

    def dump(self) -> str:
        return json.dumps(
            {
                "forming": {name: asdict(c) for name, c in self.forming.items()},
                "closed_until": self.closed_until, "last_id": self.last_id, "cum": self.cum,
                "cum_ts": self.cum_ts, "late": self.late,
            },
            separators=(",", ":"),
        )  # fmt: skip

    @classmethod
    def load(cls, text: str | None, intervals: dict[str, int], session: wall_time) -> SymbolCandles:
        state = cls(intervals, session)
        if text:
            raw = json.loads(text)
            state.forming = {n: Candle(**c) for n, c in raw["forming"].items() if n in intervals}
            state.closed_until = {n: int(v) for n, v in raw["closed_until"].items() if n in intervals}
            state.last_id, state.cum, state.cum_ts, state.late = raw["last_id"], raw["cum"], raw["cum_ts"], raw["late"]
        return state


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, n = entry_id.partition("-")
    return int(ms), int(n or 0)


def intervals_of(names: Iterable[str]) -> dict[str, int]:
    """``["1m", "5m"]`` → {name: ms}, in the order given."""
    found = {name.strip(): parse_interval(name) for name in names if name.strip()}
    if not found:
        raise CandleConfigError("no interval given: e.g. --intervals 1m,5m,1h")
    return found


# --------------------------------------------------------------------------- the service


Entries = list[tuple[str, dict[str, str]]]  # (entry ID, fields), decoded


@dataclass(frozen=True)
class CandleConfig:
    intervals: dict[str, int]
    sessions: dict[str, wall_time] = field(default_factory=lambda: dict(DEFAULT_SESSIONS))
    grace_ms: int = 5_000
    lease_ms: int = 10_000
    name: str = field(default_factory=socket.gethostname)
    maxlen: int = 100_000
    block_ms: int = 500
    batch: int = 1000
    discover_every: float = 2.0


@dataclass
class CandleStats:
    ticks: int = 0
    candles: int = 0
    late: int = 0
    duplicates: int = 0  # candles already written before a crash (refused by their explicit ID)


_ACQUIRE = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return false
"""
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class CandleService:
    """One replica. ``client`` must be created with ``decode_responses=True``."""

    def __init__(self, client: redis.Redis, config: CandleConfig) -> None:
        self.client = client
        self.config = config
        self.stats = CandleStats()
        self.owned: dict[str, SymbolCandles] = {}  # tick stream → state
        self._acquire = client.register_script(_ACQUIRE)  # free, or ours from before a restart
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._next_discovery = 0.0

    # ------------------------------------------------------------------ ownership

    def _share(self, streams: int) -> int:
        now = int(time.time() * 1000)
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(keys.CANDLE_REPLICAS, {self.config.name: now})
        pipe.zremrangebyscore(keys.CANDLE_REPLICAS, 0, now - 3 * self.config.lease_ms)
        pipe.zcard(keys.CANDLE_REPLICAS)
        replicas = int(pipe.execute()[-1])
        return -(-streams // max(replicas, 1))

    def discover(self) -> None:
        """Find tick streams, create the group on new ones, take or give back leases to balance replicas."""
        streams = sorted(self.client.scan_iter(match=keys.TICKS_PATTERN, count=1000, _type="STREAM"))
        share = self._share(len(streams))
        for stream in streams:
            if len(self.owned) >= share:
                break
            if stream not in self.owned:
                self._ensure_group(stream)
                if self._acquire(
                    keys=[keys.candle_owner(keys.symbol_of(stream))], args=[self.config.name, self.config.lease_ms]
                ):
                    self._take(stream)
        for stream in list(self.owned)[share:]:
            self.release(stream)

    def _ensure_group(self, stream: str) -> None:
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: it exists (a vanished stream fails later)
            self.client.xgroup_create(stream, keys.CANDLE_GROUP, id="0")

    def _take(self, stream: str) -> None:
        """Own ``stream``: load its state, then fold what an earlier owner read but did not acknowledge."""
        key = keys.symbol_of(stream)
        exchange = key.partition(":")[0]
        session = self.config.sessions.get(exchange, DEFAULT_SESSIONS["NSE"])
        saved = self.client.get(keys.candle_state(key))
        self.owned[stream] = SymbolCandles.load(saved, self.config.intervals, session)  # type: ignore[arg-type]
        log.info("candles: %s now on %s", key, self.config.name)
        cursor = "0-0"
        while True:
            reply = self.client.xautoclaim(
                stream, keys.CANDLE_GROUP, self.config.name, 0, cursor, count=self.config.batch
            )
            cursor, entries = cast(tuple[str, Entries], tuple(cast(list[object], reply)[:2]))
            self._process(stream, entries)
            if cursor == "0-0":
                return

    def renew(self) -> None:
        for stream in list(self.owned):
            key = keys.candle_owner(keys.symbol_of(stream))
            if not self._renew(keys=[key], args=[self.config.name, self.config.lease_ms]):
                log.warning("candles: lost the lease of %s", stream)
                del self.owned[stream]

    def release(self, stream: str) -> None:
        """Give ``stream`` back (its state is saved after every batch)."""
        self.owned.pop(stream, None)
        self._release(keys=[keys.candle_owner(keys.symbol_of(stream))], args=[self.config.name])

    # ------------------------------------------------------------------ the work

    def _process(self, stream: str, entries: Entries) -> None:
        """Fold ``entries`` (in order) and save state, closed candles and the XACK in one MULTI."""
        state = self.owned[stream]
        closed: list[tuple[str, Candle]] = []
        late = state.late
        ids = [entry_id for entry_id, _ in entries]
        for entry_id, fields in [e for e in entries if e[1]]:  # Redis 6.2 claims trimmed entries without fields
            closed += state.fold(parse_entry(entry_id, fields))
        self.stats.ticks += len(ids)
        self.stats.late += state.late - late
        self._save(stream, state, closed, ids)

    def _save(self, stream: str, state: SymbolCandles, closed: list[tuple[str, Candle]], ids: list[str]) -> None:
        key = keys.symbol_of(stream)
        exchange, _, symbol = key.partition(":")
        pipe = self.client.pipeline(transaction=True)
        for name, candle in closed:
            pipe.xadd(keys.candles(name, key), candle.fields(exchange, symbol, name),  # type: ignore[arg-type]
                      id=f"{candle.start}-0", maxlen=self.config.maxlen, approximate=True)  # fmt: skip
        for name in state.intervals:
            pipe.delete(keys.forming(name, key))
            if name in state.forming:
                pipe.hset(keys.forming(name, key), mapping=state.forming[name].fields(exchange, symbol, name))  # type: ignore[arg-type]
        pipe.set(keys.candle_state(key), state.dump())
        if ids:
            pipe.xack(stream, keys.CANDLE_GROUP, *ids)
        results = pipe.execute(raise_on_error=False)
        for result in results[: len(closed)]:
            if isinstance(result, redis.ResponseError):
                self.stats.duplicates += 1  # the same candle, written before a crash: kept once
            else:
                self.stats.candles += 1

    def step(self) -> None:
        """One round: discover (now and then), renew leases, read and fold, close candles that are due."""
        if time.monotonic() >= self._next_discovery:
            self.discover()
            self._next_discovery = time.monotonic() + self.config.discover_every
        self.renew()
        if self.owned:
            replies = self.client.xreadgroup(
                keys.CANDLE_GROUP, self.config.name, dict.fromkeys(self.owned, ">"),
                count=self.config.batch, block=self.config.block_ms,
            )  # fmt: skip
            for stream, entries in cast(list[tuple[str, Entries]], replies or []):
                self._process(stream, entries)
        else:
            time.sleep(self.config.block_ms / 1000)
        now = int(time.time() * 1000)
        for stream, state in list(self.owned.items()):
            due = state.expire(now, self.config.grace_ms)
            if due:
                self._save(stream, state, due, [])

    def run(self, stop: threading.Event) -> None:
        """Until ``stop``; a Redis outage is waited out."""
        failures = 0
        while not stop.is_set():
            try:
                self.step()
                failures = 0
            except redis.RedisError as exc:  # down, or a stream deleted under us
                failures += 1
                delay = min(5.0, 0.1 * 2 ** min(failures, 30))
                log.warning("candles: %s: %s; retrying in %.1f s", type(exc).__name__, exc, delay)
                self.owned.clear()  # start again from the saved state of what is still there
                self._next_discovery = 0.0
                stop.wait(delay)
        for stream in list(self.owned):
            self.release(stream)
        with contextlib.suppress(redis.RedisError):
            self.client.zrem(keys.CANDLE_REPLICAS, self.config.name)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="angelstream candles",
        description=(
            "Fold the tick streams into OHLCV candles (candles:INTERVAL:EXCHANGE:SYMBOL), on exchange time, "
            "through the Redis consumer group 'candles'. Run several replicas to share the symbols. Settings "
            "come from the environment and .env (REDIS_URL, CANDLE_*); options override them."
        ),
    )
    parser.add_argument("--intervals", help="comma-separated, e.g. 1m,5m,15m,1h,1d (CANDLE_INTERVALS, default 1m)")
    parser.add_argument("--sessions", help="session starts (IST), e.g. MCX=09:00 (CANDLE_SESSIONS)")
    parser.add_argument("--grace", type=float, help="seconds after a candle's end before it closes (CANDLE_GRACE)")
    parser.add_argument("--name", help="this replica's consumer name (CANDLE_NAME, default the host name)")
    return parser


def config_from(args: argparse.Namespace) -> CandleConfig:
    """The configuration from settings and options. Raises SettingsError or CandleConfigError."""
    s = settings_module.load_as(settings_module.CandleSettings)
    return CandleConfig(
        intervals=intervals_of((args.intervals or s.candle_intervals).split(",")),
        sessions=parse_sessions(args.sessions if args.sessions is not None else s.candle_sessions),
        grace_ms=int((args.grace if args.grace is not None else s.candle_grace) * 1000),
        lease_ms=int(s.candle_lease * 1000),
        name=args.name or s.candle_name or socket.gethostname(),
        maxlen=s.candles_maxlen,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from(args)
    except (settings_module.SettingsError, CandleConfigError) as exc:
        print(f"angelstream candles: {exc}", file=sys.stderr)
        return 2
    url = settings_module.load_as(settings_module.CandleSettings).redis_url
    client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    log.info("candles: %s on %s, intervals %s", config.name, url, ", ".join(config.intervals))
    CandleService(client, config).run(stop)
    client.close()
    return 0


if __name__ == "__main__":  # python -m consumers.candles
    logs.configure()
    sys.exit(main())
