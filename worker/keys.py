"""Every Redis key and channel angelstream reads or writes. No other module builds a key string."""

from __future__ import annotations

PREFIX = "angelstream"

#: Hash of desired subscriptions: field ``EXCHANGE:SYMBOL``, value the mode (ltp, quote, snap_quote).
SUBSCRIPTIONS = f"{PREFIX}:subscriptions"
#: Pub/sub channel for commands: {"action", "symbols", "mode", "request_id"}.
CONTROL = f"{PREFIX}:control"
#: Stream of command answers, errors and worker events (capped with MAXLEN ~).
EVENTS = f"{PREFIX}:events"


def ticks(exchange: str, symbol: str) -> str:
    """The tick stream of one instrument, e.g. ``ticks:NSE:SBIN-EQ``."""
    return f"ticks:{exchange}:{symbol}"


def ticks_for(key: str) -> str:
    """The tick stream of ``EXCHANGE:SYMBOL``."""
    return f"ticks:{key}"
