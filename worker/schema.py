"""The tick entry: the public contract of the ``ticks:{EXCHANGE}:{SYMBOL}`` streams.

Every value is a string (Redis stores bytes). Prices are exact decimal rupees; times are epoch
integers (UTC instants). ``v`` is the schema version: it changes only when a field's meaning or
unit changes; new fields may be added without a new version, so readers ignore unknown fields.

| field | modes | type, unit |
|---|---|---|
| v | all | schema version ("1") |
| token, exchange, symbol | all | instrument-master token, ``exch_seg`` and ``symbol`` |
| mode | all | ``ltp``, ``quote`` or ``snap_quote`` |
| seq | all | Angel's sequence number (0 for indices) |
| exch_ts | all | exchange timestamp, epoch milliseconds |
| ltp | all | last traded price, rupees (2 decimals; 7 for CDS) |
| recv_ts | all | when the worker received the frame, epoch microseconds |
| ltq | quote, snap_quote | last traded quantity, units |
| atp | quote, snap_quote | average traded price of the day, rupees |
| volume | quote, snap_quote | cumulative day volume, units |
| open, high, low, close | quote, snap_quote | day's OHLC, rupees (close = previous session's close) |
| total_buy_qty, total_sell_qty | quote, snap_quote | pending quantity, a decimal number |
| ltt | snap_quote | last traded time, epoch milliseconds (Angel sends seconds) |
| oi | snap_quote | open interest, units |
| oi_change_pct | snap_quote | open-interest change, percent, a decimal number |
| upper_circuit, lower_circuit | snap_quote | price bands, rupees |
| high_52w, low_52w | snap_quote | 52-week range, rupees |
| bids, asks | snap_quote | best five as compact JSON ``[[price, qty, orders], …]``, price in rupees, best first |
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal

SCHEMA_VERSION = "1"

MODE_NAMES = {1: "ltp", 2: "quote", 3: "snap_quote"}
MODES_BY_NAME = {name: mode for mode, name in MODE_NAMES.items()}


@dataclass(frozen=True, slots=True)
class Tick:
    """One stream entry, typed. Optional fields are None when the mode does not carry them."""

    id: str
    v: str
    token: str
    exchange: str
    symbol: str
    mode: str
    seq: int
    exch_ts: int
    ltp: Decimal
    recv_ts: int
    ltq: int | None = None
    atp: Decimal | None = None
    volume: int | None = None
    open: Decimal | None = None
    high: Decimal | None = None
    low: Decimal | None = None
    close: Decimal | None = None
    total_buy_qty: Decimal | None = None
    total_sell_qty: Decimal | None = None
    ltt: int | None = None
    oi: int | None = None
    oi_change_pct: Decimal | None = None
    upper_circuit: Decimal | None = None
    lower_circuit: Decimal | None = None
    high_52w: Decimal | None = None
    low_52w: Decimal | None = None
    bids: tuple[tuple[Decimal, int, int], ...] | None = None
    asks: tuple[tuple[Decimal, int, int], ...] | None = None

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.symbol}"


_INTS = ("seq", "exch_ts", "recv_ts", "ltq", "volume", "ltt", "oi")
_DECIMALS = (
    "ltp", "atp", "open", "high", "low", "close", "total_buy_qty", "total_sell_qty", "oi_change_pct",
    "upper_circuit", "lower_circuit", "high_52w", "low_52w",
)  # fmt: skip
_STRINGS = ("v", "token", "exchange", "symbol", "mode")


def _levels(text: str) -> tuple[tuple[Decimal, int, int], ...]:
    return tuple((Decimal(price), int(qty), int(orders)) for price, qty, orders in json.loads(text, parse_float=str))


def parse_entry(entry_id: bytes | str, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Tick:
    """A stream entry as returned by XRANGE/XREVRANGE/XREAD, typed."""
    text = {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }
    values: dict[str, object] = {name: text[name] for name in _STRINGS}
    values.update({name: int(text[name]) for name in _INTS if name in text})
    values.update({name: Decimal(text[name]) for name in _DECIMALS if name in text})
    for side in ("bids", "asks"):
        if side in text:
            values[side] = _levels(text[side])
    return Tick(id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id, **values)  # type: ignore[arg-type]
