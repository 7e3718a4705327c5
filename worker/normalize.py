"""Packet → tick entry (the fields of ``worker.schema``), ready for XADD. No I/O.

Prices become exact decimal rupees; timestamps stay epoch integers (UTC instants); the instrument
master gives the exchange and symbol names. A packet equal to the last one of the same token and
mode (the snapshot Angel re-sends after a resubscribe) yields nothing, so it is written once.

The fields come out already in Redis's wire format (RESP bulk strings, see ``Fields``): each mode
is one format string with the field names in it, filled with the values' bytes and lengths. This is
the hot path: against a tuple of names and values packed later by ``hiredis.pack_command`` it
costs about half (``python -m bench``; bench/README.md has the figures).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hiredis import Reader, pack_command

from worker import keys
from worker import protocol as p
from worker.instruments import Instrument
from worker.schema import MODE_NAMES, SCHEMA_VERSION

#: An entry's fields as XADD takes them: (how many arguments, names and values alternating; the
#: arguments, each a RESP bulk string ``$<length>\r\n<bytes>\r\n``).
Fields = tuple[int, bytes]


def encode_fields(flat: tuple[str | int | float, ...]) -> Fields:
    """``("name", value, …)`` → ``Fields`` (ints and floats as their decimal text). Text that is not
    valid Unicode (a lone surrogate, from a JSON ``\\ud800`` or an undecodable header) is kept with
    backslash escapes: an event or a name is never refused for it."""
    safe = tuple(v.encode("utf-8", "backslashreplace") if isinstance(v, str) else v for v in flat)
    packed: bytes = pack_command(safe)  # type: ignore[arg-type]
    return len(flat), packed[packed.index(b"\n") + 1 :]  # without the array header "*<n>\r\n"


def decode_fields(fields: Fields) -> tuple[str, ...]:
    """``Fields`` → ``("name", "value", …)``: what Redis will hold (for tests, tools and probes)."""
    count, body = fields
    reader = Reader(encoding="utf-8")
    reader.feed(b"*%d\r\n" % count + body)
    values = reader.gets()
    if (
        not isinstance(values, list)
        or len(values) != count
        or not all(isinstance(value, str) for value in values)
        or reader.gets() is not False
    ):
        raise ValueError(f"not {count} RESP bulk strings: {body[:80]!r}")
    return tuple(values)


def _template(*names: str) -> bytes:
    """The RESP of ``name, value, …`` with a ``$%d\r\n%b\r\n`` slot per value: fill with (length, bytes)."""
    return b"".join(b"$%d\r\n%b\r\n$%%d\r\n%%b\r\n" % (len(name), name.encode()) for name in names)


_LTP = _template("seq", "exch_ts", "ltp", "recv_ts")
_QUOTE = _template("ltq", "atp", "volume", "open", "high", "low", "close", "total_buy_qty", "total_sell_qty")
_SNAP = _template("ltt", "oi", "oi_change_pct", "upper_circuit", "lower_circuit", "high_52w", "low_52w", "bids", "asks")
_COUNTS = {1: 18, 2: 36, 3: 54}  # arguments per mode: 5 + 4 (+ 9 (+ 9)) names and as many values

# Below this many units, "%.2f" % (units / 100) is exact: the double nearest to the quotient has
# at most 13 significant digits to keep, well inside a double's 15-16.
_FAST_LIMIT = 10**13


def _exact(units: int, digits: int) -> str:
    whole, fraction = divmod(abs(units), 10**digits)
    return f"{'-' if units < 0 else ''}{whole}.{fraction:0{digits}d}"


def rupees_paise(units: int) -> str:
    """Paise → rupees with 2 decimals, exactly."""
    return "%.2f" % (units / 100) if -_FAST_LIMIT < units < _FAST_LIMIT else _exact(units, 2)


def rupees_cds(units: int) -> str:
    """Currency-segment units (1e-7 rupee) → rupees with 7 decimals, exactly."""
    return "%.7f" % (units / 10_000_000) if -_FAST_LIMIT < units < _FAST_LIMIT else _exact(units, 7)


PRICE_CACHE_MAX = 1 << 16  # prices remembered per unit (paise, CDS), ~7 MB when full


def remembered(fmt: Callable[[int], str]) -> Callable[[int], bytes]:
    """``fmt``, encoded, with a bounded memory of the prices it formatted. Ticks repeat the same few
    prices (a SnapQuote carries 28, its depth a few ticks from the last price): a lookup is ~5x
    cheaper than formatting. Full, the memory starts over."""
    memory: dict[int, bytes] = {}

    def price(units: int) -> bytes:
        text = memory.get(units)
        if text is None:
            if len(memory) >= PRICE_CACHE_MAX:
                memory.clear()
            text = memory[units] = fmt(units).encode()
        return text

    return price


_PAISE = remembered(rupees_paise)
_CDS = remembered(rupees_cds)


@dataclass(slots=True)
class Target:
    """Where one (exchange type, token) goes: its stream and the entry's constant leading fields."""

    stream: str
    heads: dict[int, bytes]  # mode → the RESP of "v", "1", "token", …, "mode", name
    price: Callable[[int], bytes]  # rupees_paise or rupees_cds, remembered


class Normalizer:
    """Turns packets into ``(stream, fields)``; remembers the last packet per token and mode."""

    def __init__(self) -> None:
        self._targets: dict[tuple[int, str], Target] = {}
        self._last: dict[tuple[int, int, str], p.Packet] = {}
        self.repeats = 0  # exact repeats suppressed
        self.skipped = 0  # packets of instruments not added, or of Depth-20 (not in the tick contract)
        self.received = [0] * 128  # ticks normalized, at [exchange type * 8 + mode] (metrics)

    def add(self, inst: Instrument) -> None:
        constant = ("v", SCHEMA_VERSION, "token", inst.token, "exchange", inst.exchange, "symbol", inst.symbol)
        heads = {mode: encode_fields((*constant, "mode", name))[1] for mode, name in MODE_NAMES.items()}
        price = _CDS if inst.exchange_type == p.ExchangeType.CDE_FO else _PAISE
        self._targets[(inst.exchange_type, inst.token)] = Target(keys.ticks(inst.exchange, inst.symbol), heads, price)

    def remove(self, inst: Instrument) -> None:
        self._targets.pop((inst.exchange_type, inst.token), None)
        for mode in MODE_NAMES:
            self._last.pop((mode, inst.exchange_type, inst.token), None)

    def entry(self, packet: p.Packet, recv_us: int) -> tuple[str, Fields] | None:
        """The stream and fields for ``packet``; None for a repeat, a Depth-20 packet or an unknown instrument."""
        target = self._targets.get((packet.exchange_type, packet.token))
        if target is None or isinstance(packet, p.Depth20Packet):
            self.skipped += 1
            return None
        last_key = (packet.mode, packet.exchange_type, packet.token)
        if self._last.get(last_key) == packet:
            self.repeats += 1
            return None
        self._last[last_key] = packet
        self.received[packet.exchange_type * 8 + packet.mode] += 1
        price = target.price
        seq, exch_ts, ltp, recv = (
            b"%d" % packet.sequence_number, b"%d" % packet.exchange_timestamp,
            price(packet.last_traded_price), b"%d" % recv_us,
        )  # fmt: skip
        body = target.heads[packet.mode] + _LTP % (
            len(seq), seq, len(exch_ts), exch_ts, len(ltp), ltp, len(recv), recv,
        )  # fmt: skip
        if isinstance(packet, p.QuotePacket | p.SnapQuotePacket):
            ltq, atp, volume, open_, high, low, close, buy, sell = (
                b"%d" % packet.last_traded_quantity, price(packet.average_traded_price), b"%d" % packet.volume,
                price(packet.open), price(packet.high), price(packet.low), price(packet.close),
                repr(packet.total_buy_quantity).encode(), repr(packet.total_sell_quantity).encode(),
            )  # fmt: skip
            body += _QUOTE % (
                len(ltq), ltq, len(atp), atp, len(volume), volume, len(open_), open_, len(high), high,
                len(low), low, len(close), close, len(buy), buy, len(sell), sell,
            )  # fmt: skip
        if isinstance(packet, p.SnapQuotePacket):
            ltt, oi, oi_pct, upper, lower, high52, low52, bids, asks = (
                b"%d" % (packet.last_traded_timestamp * 1000), b"%d" % packet.open_interest,
                repr(packet.open_interest_change_pct).encode(), price(packet.upper_circuit),
                price(packet.lower_circuit), price(packet.high_52_week), price(packet.low_52_week),
                _levels(packet.bids, price), _levels(packet.asks, price),
            )  # fmt: skip
            body += _SNAP % (
                len(ltt), ltt, len(oi), oi, len(oi_pct), oi_pct, len(upper), upper, len(lower), lower,
                len(high52), high52, len(low52), low52, len(bids), bids, len(asks), asks,
            )  # fmt: skip
        return target.stream, (_COUNTS[packet.mode], body)


_FIVE_LEVELS = b"[" + b",".join([b"[%b,%d,%d]"] * 5) + b"]"


def _levels(levels: tuple[p.Level, ...], price: Callable[[int], bytes]) -> bytes:
    """``[[price,quantity,orders],…]``; the usual five levels in one format (~1.3 µs less per side)."""
    if len(levels) == 5:
        (q1, p1, o1), (q2, p2, o2), (q3, p3, o3), (q4, p4, o4), (q5, p5, o5) = levels
        return _FIVE_LEVELS % (
            price(p1), q1, o1, price(p2), q2, o2, price(p3), q3, o3, price(p4), q4, o4, price(p5), q5, o5,
        )  # fmt: skip
    return b"[" + b",".join([b"[%b,%d,%d]" % (price(pr), qty, orders) for qty, pr, orders in levels]) + b"]"
