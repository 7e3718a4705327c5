"""Every Redis key and channel angelstream reads or writes. No other module builds a key string."""

from __future__ import annotations

PREFIX = "angelstream"

#: Hash of desired subscriptions: field ``EXCHANGE:SYMBOL``, value the mode (ltp, quote, snap_quote).
SUBSCRIPTIONS = f"{PREFIX}:subscriptions"
#: Pub/sub channel for commands: {"action", "symbols", "mode", "request_id"}.
CONTROL = f"{PREFIX}:control"
#: Stream of command answers, errors and worker events (capped with MAXLEN ~).
EVENTS = f"{PREFIX}:events"
#: Hash of each subscription's state: field ``EXCHANGE:SYMBOL``, value JSON {"state": "pending"|"live"|"stale"|
#: "rejected", "mode", "token", "since" (epoch ms), "last_tick" (epoch ms), "reason"}.
STATE = f"{PREFIX}:state"
#: String with a TTL: the worker's health as JSON (connections, last tick, counts); gone if the worker died.
HEARTBEAT = f"{PREFIX}:heartbeat"
#: Hash of the instrument master: field ``EXCHANGE:SYMBOL``, value the master's JSON row.
INSTRUMENTS = f"{PREFIX}:instruments"
#: Hash from the wire to the name: field ``EXCHANGE:TOKEN`` (e.g. ``NSE:3045``), value ``EXCHANGE:SYMBOL``.
TOKENS = f"{PREFIX}:tokens"


#: SCAN pattern of every tick stream.
TICKS_PATTERN = "ticks:*"
#: Consumer group of the candle builder on every tick stream.
CANDLE_GROUP = "candles"
#: Sorted set of live candle-builder replicas (member: consumer name, score: last beat, epoch ms).
CANDLE_REPLICAS = f"{PREFIX}:candles:replicas"


def ticks(exchange: str, symbol: str) -> str:
    """The tick stream of one instrument, e.g. ``ticks:NSE:SBIN-EQ``."""
    return f"ticks:{exchange}:{symbol}"


def ticks_for(key: str) -> str:
    """The tick stream of ``EXCHANGE:SYMBOL``."""
    return f"ticks:{key}"


def token_field(exchange: str, token: str) -> str:
    """The field of :data:`TOKENS` for one instrument, e.g. ``NSE:3045``."""
    return f"{exchange}:{token}"


def staging(key: str) -> str:
    """Where a replacement of ``key`` is built before an atomic RENAME."""
    return f"{key}:staging"


def symbol_of(stream: str) -> str:
    """``EXCHANGE:SYMBOL`` of a tick stream name."""
    return stream.removeprefix("ticks:")


def candles(interval: str, key: str) -> str:
    """Closed candles of ``EXCHANGE:SYMBOL`` for ``interval``, e.g. ``candles:1m:NSE:SBIN-EQ`` (a stream)."""
    return f"candles:{interval}:{key}"


def forming(interval: str, key: str) -> str:
    """The candle still forming, e.g. ``candles:forming:1m:NSE:SBIN-EQ`` (a hash; gone between candles)."""
    return f"candles:forming:{interval}:{key}"


def candle_state(key: str) -> str:
    """The candle builder's saved state for one symbol (a string of JSON)."""
    return f"{PREFIX}:candles:state:{key}"


def candle_owner(key: str) -> str:
    """Which candle-builder replica holds ``EXCHANGE:SYMBOL`` now (a string with a TTL: the lease)."""
    return f"{PREFIX}:candles:owner:{key}"
