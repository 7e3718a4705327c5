"""Packet → tick entry (worker.normalize), the entry contract (worker.schema) and the key names (worker.keys)."""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from collections.abc import Iterator
from decimal import Decimal, localcontext
from typing import Any

import hiredis
import pytest
import redis
from hiredis import pack_command
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import strategies as gen
from worker import keys, normalize, schema
from worker import protocol as p
from worker.instruments import Instrument, bundled_master_path, load_master_file
from worker.localredis import LocalRedis
from worker.normalize import Normalizer, decode_fields, encode_fields, rupees_cds, rupees_paise
from worker.schema import Tick, parse_entry

INSTRUMENTS = load_master_file(bundled_master_path())
BY_KEY = {inst.key: inst for inst in INSTRUMENTS}
SBIN = BY_KEY["NSE:SBIN-EQ"]
USDINR = BY_KEY["CDS:USDINR29DEC26FUT"]

LTP_FIELDS = {"v", "token", "exchange", "symbol", "mode", "seq", "exch_ts", "ltp", "recv_ts"}
QUOTE_FIELDS = LTP_FIELDS | {
    "ltq", "atp", "volume", "open", "high", "low", "close", "total_buy_qty", "total_sell_qty",
}  # fmt: skip
SNAP_FIELDS = QUOTE_FIELDS | {
    "ltt", "oi", "oi_change_pct", "upper_circuit", "lower_circuit", "high_52w", "low_52w", "bids", "asks",
}  # fmt: skip

TS_MS = 1_735_201_464_000
RECV_US = 1_735_201_464_123_456


def rupees(units: int, inst: Instrument) -> Decimal:
    """The contract, computed independently: paise / 100, or 1e-7 units / 10^7 for the currency segment."""
    with localcontext() as ctx:
        ctx.prec = 60
        return Decimal(units) / (Decimal(10_000_000) if inst.exchange == "CDS" else Decimal(100))


def as_dict(fields: normalize.Fields) -> dict[str, str]:
    flat = decode_fields(fields)
    names = flat[::2]
    result = dict(zip(names, flat[1::2], strict=True))
    assert len(result) == len(names), "a field name appears twice"
    return result


def emit(normalizer: Normalizer, packet: p.Packet, recv_us: int = RECV_US) -> tuple[str, dict[str, str]]:
    out = normalizer.entry(packet, recv_us)
    assert out is not None
    return out[0], as_dict(out[1])


def levels(n: int, first_price: int, step: int) -> tuple[p.Level, ...]:
    return tuple((100 + i, first_price + step * i, i + 1) for i in range(n))


def snap(inst: Instrument, **changes: Any) -> p.SnapQuotePacket:
    packet = p.SnapQuotePacket(
        mode=3, exchange_type=inst.exchange_type, token=inst.token, sequence_number=42,
        exchange_timestamp=TS_MS, last_traded_price=80_050, last_traded_quantity=75,
        average_traded_price=79_999, volume=1_234_567, total_buy_quantity=224305.0, total_sell_quantity=0.5,
        open=79_000, high=81_005, low=78_900, close=79_500, last_traded_timestamp=1_735_201_463,
        open_interest=5000, open_interest_change_pct=-3.25, bids=levels(5, 80_045, -5), asks=levels(5, 80_055, 5),
        upper_circuit=87_450, lower_circuit=71_550, high_52_week=91_200, low_52_week=60_005,
    )  # fmt: skip
    return packet._replace(**changes)


def quote(inst: Instrument, **changes: Any) -> p.QuotePacket:
    s = snap(inst)
    return p.QuotePacket(2, *s[1:15])._replace(**changes)


def ltp(inst: Instrument, **changes: Any) -> p.LtpPacket:
    return p.LtpPacket(1, inst.exchange_type, inst.token, 42, TS_MS, 80_050)._replace(**changes)


def normalizer(*instruments: Instrument) -> Normalizer:
    n = Normalizer()
    for inst in instruments:
        n.add(inst)
    return n


# ----------------------------------------------------------------- keys and schema constants


def test_key_names() -> None:
    assert keys.ticks("NSE", "SBIN-EQ") == "ticks:NSE:SBIN-EQ"
    assert keys.ticks_for("NSE:SBIN-EQ") == "ticks:NSE:SBIN-EQ"
    assert keys.ticks_for(USDINR.key) == keys.ticks("CDS", "USDINR29DEC26FUT")
    assert keys.SUBSCRIPTIONS == "angelstream:subscriptions"
    assert keys.CONTROL == "angelstream:control"
    assert keys.EVENTS == "angelstream:events"


def test_mode_names_match_the_protocol_modes() -> None:
    assert schema.SCHEMA_VERSION == "1"
    assert schema.MODE_NAMES == {p.Mode.LTP: "ltp", p.Mode.QUOTE: "quote", p.Mode.SNAP_QUOTE: "snap_quote"}
    assert schema.MODES_BY_NAME == {"ltp": 1, "quote": 2, "snap_quote": 3}


# ----------------------------------------------------------------- prices


def test_remembered_prices_are_the_formatted_ones_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(normalize, "PRICE_CACHE_MAX", 3)
    calls: list[int] = []

    def fmt(units: int) -> str:
        calls.append(units)
        return rupees_paise(units)

    price = normalize.remembered(fmt)
    assert [price(u) for u in (80_050, 5, 80_050, 5)] == [b"800.50", b"0.05", b"800.50", b"0.05"]
    assert calls == [80_050, 5]  # the repeats were remembered
    assert [price(u) for u in (7, 9, 80_050)] == [b"0.07", b"0.09", b"800.50"]
    assert calls == [80_050, 5, 7, 9, 80_050]  # full at 3: it started over before 9


def test_rupees_worked_examples() -> None:
    assert rupees_paise(80_050) == "800.50"
    assert rupees_paise(5) == "0.05"
    assert rupees_paise(0) == "0.00"
    assert rupees_paise(-5) == "-0.05"
    assert rupees_paise(-100) == "-1.00"
    assert rupees_paise(2**63 - 1) == "92233720368547758.07"
    assert rupees_paise(-(2**63)) == "-92233720368547758.08"
    assert rupees_cds(835_012_500) == "83.5012500"
    assert rupees_cds(1) == "0.0000001"
    assert rupees_cds(-1) == "-0.0000001"
    assert rupees_cds(0) == "0.0000000"
    assert rupees_cds(-(2**63)) == "-922337203685.4775808"


_BOUNDARIES = [0, 1, 99, 100, 10**13 - 1, 10**13, 10**13 + 1, 2**53 + 1, 2**63 - 1]
BOUNDARIES = sorted({*_BOUNDARIES, *(-v for v in _BOUNDARIES), -(2**63)})
UNITS = st.one_of(gen.I64, st.integers(-(10**14), 10**14))


def check_paise(units: int) -> None:
    text = rupees_paise(units)
    assert re.fullmatch(r"-?\d+\.\d{2}", text)
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(units) / 100
        assert Decimal(text) == exact
        assert text == f"{exact:.2f}"


def check_cds(units: int) -> None:
    text = rupees_cds(units)
    assert re.fullmatch(r"-?\d+\.\d{7}", text)
    with localcontext() as ctx:
        ctx.prec = 60
        exact = Decimal(units) / 10_000_000
        assert Decimal(text) == exact
        assert text == f"{exact:.7f}"


@pytest.mark.parametrize("units", BOUNDARIES)
def test_rupees_are_exact_around_the_fast_path_limit_and_int64_ends(units: int) -> None:
    check_paise(units)
    check_cds(units)


@given(UNITS)
def test_rupees_paise_is_exact(units: int) -> None:
    check_paise(units)


@given(UNITS)
def test_rupees_cds_is_exact(units: int) -> None:
    check_cds(units)


# ----------------------------------------------------------------- the wire format of fields


def test_encode_and_decode_fields() -> None:
    fields = encode_fields(("name", "SBIN-EQ", "seq", 42, "pct", -3.25, "empty", ""))
    assert fields == (8, b"$4\r\nname\r\n$7\r\nSBIN-EQ\r\n$3\r\nseq\r\n$2\r\n42\r\n"
                         b"$3\r\npct\r\n$5\r\n-3.25\r\n$5\r\nempty\r\n$0\r\n\r\n")  # fmt: skip
    assert decode_fields(fields) == ("name", "SBIN-EQ", "seq", "42", "pct", "-3.25", "empty", "")
    assert decode_fields(encode_fields(("sym", "M&M 100% ₹"))) == ("sym", "M&M 100% ₹")
    # not valid Unicode (json.loads('"\\ud800"') gives one): kept, escaped, never refused
    assert decode_fields(encode_fields(("request_id", "a\ud800b"))) == ("request_id", "a\\ud800b")


@pytest.mark.parametrize(
    "fields",
    [
        (2, b"$1\r\na\r\n"),  # fewer arguments than counted
        (1, b"$1\r\na\r\n$1\r\nb\r\n"),  # more
        (1, b"$5\r\nab\r\n"),  # a length that is wrong
        (1, b":5\r\n"),  # not a bulk string
    ],
)
def test_decode_fields_refuses_what_is_not_that_many_bulk_strings(fields: normalize.Fields) -> None:
    with pytest.raises(ValueError, match="RESP bulk strings"):
        decode_fields(fields)


@settings(max_examples=200)
@given(st.sampled_from(INSTRUMENTS), st.one_of(gen.ltp(), gen.quote(), gen.snap_quote()), st.integers(0, 2**62))
def test_every_entry_is_exactly_what_pack_command_makes_of_its_values(
    inst: Instrument, packet: p.LtpPacket | p.QuotePacket | p.SnapQuotePacket, recv_us: int
) -> None:
    """The hand-made RESP (format strings, lengths computed per value) is byte for byte hiredis's own."""
    out = normalizer(inst).entry(packet._replace(exchange_type=inst.exchange_type, token=inst.token), recv_us)
    assert out is not None
    count, body = out[1]
    flat = decode_fields((count, body))
    assert pack_command(flat) == b"*%d\r\n" % count + body  # type: ignore[arg-type]
    assert count == {p.LtpPacket: 18, p.QuotePacket: 36, p.SnapQuotePacket: 54}[type(packet)]


# ----------------------------------------------------------------- entries, mode by mode


def test_ltp_entry() -> None:
    stream, fields = emit(normalizer(SBIN), ltp(SBIN))
    assert stream == "ticks:NSE:SBIN-EQ"
    assert fields == {
        "v": "1", "token": "3045", "exchange": "NSE", "symbol": "SBIN-EQ", "mode": "ltp",
        "seq": "42", "exch_ts": str(TS_MS), "ltp": "800.50", "recv_ts": str(RECV_US),
    }  # fmt: skip


def test_quote_entry() -> None:
    packet = quote(SBIN)
    stream, fields = emit(normalizer(SBIN), packet)
    assert stream == "ticks:NSE:SBIN-EQ"
    assert set(fields) == QUOTE_FIELDS
    assert fields["mode"] == "quote"
    assert fields["ltq"] == "75"
    assert fields["volume"] == "1234567"
    for name, units in (("atp", 79_999), ("open", 79_000), ("high", 81_005), ("low", 78_900), ("close", 79_500)):
        assert fields[name] == f"{rupees(units, SBIN):.2f}"
    assert fields["atp"] == "799.99"
    assert fields["total_buy_qty"] == "224305.0"
    assert fields["total_sell_qty"] == "0.5"


def test_snap_quote_entry() -> None:
    packet = snap(SBIN)
    _, fields = emit(normalizer(SBIN), packet)
    assert set(fields) == SNAP_FIELDS
    assert fields["mode"] == "snap_quote"
    assert fields["ltt"] == "1735201463000"  # Angel sends seconds; the entry has milliseconds
    assert fields["oi"] == "5000"
    assert fields["oi_change_pct"] == "-3.25"
    assert fields["upper_circuit"] == "874.50"
    assert fields["lower_circuit"] == "715.50"
    assert fields["high_52w"] == "912.00"
    assert fields["low_52w"] == "600.05"
    bids, asks = fields["bids"], fields["asks"]
    assert " " not in bids + asks  # compact
    assert bids.startswith("[[800.45,100,1],")
    assert json.loads(bids, parse_float=Decimal) == [[rupees(pr, SBIN), q, o] for q, pr, o in packet.bids]
    assert json.loads(asks, parse_float=Decimal) == [[rupees(pr, SBIN), q, o] for q, pr, o in packet.asks]


def test_snap_quote_with_uneven_or_empty_sides() -> None:
    packet = snap(SBIN, bids=levels(10, 80_000, -5), asks=())
    _, fields = emit(normalizer(SBIN), packet)
    assert fields["asks"] == "[]"
    assert len(json.loads(fields["bids"])) == 10


def test_currency_segment_prices_have_seven_decimals() -> None:
    packet = snap(USDINR, last_traded_price=835_012_500, bids=levels(5, 835_000_000, -2_500_000))
    stream, fields = emit(normalizer(USDINR), packet)
    assert stream == "ticks:CDS:USDINR29DEC26FUT"
    assert fields["token"] == "1151"
    assert fields["ltp"] == "83.5012500"
    assert fields["atp"] == "0.0079999"
    assert fields["bids"].startswith("[[83.5000000,100,1],[83.2500000,101,2],")
    for name in ("ltp", "atp", "open", "high", "low", "close", "upper_circuit", "lower_circuit", "high_52w", "low_52w"):
        assert re.fullmatch(r"-?\d+\.\d{7}", fields[name]), name


def test_same_token_on_two_exchanges_goes_to_two_streams() -> None:
    nse = Instrument("500", "ABC-EQ", "NSE", int(p.ExchangeType.NSE_CM))
    bse = Instrument("500", "ABC", "BSE", int(p.ExchangeType.BSE_CM))
    n = normalizer(nse, bse)
    assert emit(n, ltp(nse))[0] == "ticks:NSE:ABC-EQ"
    assert emit(n, ltp(bse))[0] == "ticks:BSE:ABC"
    assert n.repeats == 0


# ----------------------------------------------------------------- skipped, repeats, remove


def test_depth20_and_unknown_instruments_are_skipped() -> None:
    n = normalizer(SBIN)
    depth = p.Depth20Packet(4, SBIN.exchange_type, SBIN.token, TS_MS, TS_MS, levels(20, 100, 1), levels(20, 200, 1))
    assert n.entry(depth, RECV_US) is None
    assert n.skipped == 1
    assert n.entry(ltp(SBIN, token="999999"), RECV_US) is None  # token not added
    assert n.entry(ltp(SBIN, exchange_type=int(p.ExchangeType.BSE_CM)), RECV_US) is None  # same token, other segment
    assert n.skipped == 3
    assert n.repeats == 0
    assert n.entry(ltp(SBIN), RECV_US) is not None
    assert n.skipped == 3


@settings(max_examples=25)
@given(gen.depth20())
def test_every_depth20_packet_is_skipped(packet: p.Depth20Packet) -> None:
    n = normalizer(SBIN)
    assert n.entry(packet._replace(exchange_type=SBIN.exchange_type, token=SBIN.token), RECV_US) is None
    assert (n.skipped, n.repeats) == (1, 0)


def test_exact_repeat_is_not_emitted_but_a_changed_packet_is() -> None:
    n = normalizer(SBIN)
    first = snap(SBIN)
    assert n.entry(first, RECV_US) is not None
    assert n.entry(snap(SBIN), RECV_US + 1) is None  # equal packet, later receive time: still a repeat
    assert n.repeats == 1
    changed = snap(SBIN, bids=levels(5, 80_040, -5))
    assert n.entry(changed, RECV_US) is not None
    assert n.entry(first, RECV_US) is not None  # not equal to the *last* one any more
    assert n.repeats == 1
    assert n.skipped == 0


def test_repeats_are_per_mode_and_per_token() -> None:
    n = normalizer(SBIN, USDINR)
    assert n.entry(ltp(SBIN), RECV_US) is not None
    assert n.entry(quote(SBIN), RECV_US) is not None  # other mode
    assert n.entry(ltp(USDINR), RECV_US) is not None  # other token, same values
    assert n.entry(ltp(SBIN), RECV_US) is None  # the last LTP of SBIN, despite the Quote in between
    assert n.entry(quote(SBIN), RECV_US) is None
    assert n.repeats == 2


def test_remove_forgets_the_instrument_and_its_last_packets() -> None:
    n = normalizer(SBIN, USDINR)
    for packet in (ltp(SBIN), quote(SBIN), snap(SBIN), ltp(USDINR)):
        assert n.entry(packet, RECV_US) is not None
    n.remove(SBIN)
    assert n.entry(ltp(SBIN), RECV_US) is None
    assert (n.skipped, n.repeats) == (1, 0)
    assert n.entry(ltp(USDINR), RECV_US) is None  # the other instrument is untouched
    assert n.repeats == 1
    n.remove(SBIN)  # removing twice is harmless
    n.add(SBIN)
    for packet in (ltp(SBIN), quote(SBIN), snap(SBIN)):  # the earlier packets were forgotten
        assert n.entry(packet, RECV_US) is not None
    assert (n.skipped, n.repeats) == (1, 1)


# ----------------------------------------------------------------- parse_entry


def _wire(fields: dict[str, str]) -> dict[bytes, bytes]:
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_parse_entry_accepts_bytes_and_str() -> None:
    _, fields = emit(normalizer(SBIN), snap(SBIN))
    from_bytes = parse_entry(b"1-0", _wire(fields))
    from_str = parse_entry("1-0", fields)
    assert from_bytes == from_str
    assert from_bytes.id == "1-0"
    assert from_bytes.key == "NSE:SBIN-EQ"
    assert from_bytes.ltp == Decimal("800.50")
    assert from_bytes.bids is not None
    assert from_bytes.bids[0] == (Decimal("800.45"), 100, 1)
    assert isinstance(from_bytes.bids[0][0], Decimal)


def test_parse_entry_of_ltp_leaves_the_other_fields_none_and_ignores_unknown_fields() -> None:
    _, fields = emit(normalizer(SBIN), ltp(SBIN))
    tick = parse_entry(b"5-1", {**_wire(fields), b"added_in_a_later_version": b"x"})
    assert tick == Tick(
        id="5-1", v="1", token="3045", exchange="NSE", symbol="SBIN-EQ", mode="ltp", seq=42,
        exch_ts=TS_MS, ltp=Decimal("800.50"), recv_ts=RECV_US,
    )  # fmt: skip


# ----------------------------------------------------------------- round trip through Redis


@pytest.fixture(scope="module")
def conn(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.delete(*[keys.ticks_for(inst.key) for inst in INSTRUMENTS])
    yield client
    client.close()


def xadd_as_is(conn: redis.Redis, stream: str, fields: normalize.Fields) -> bytes:
    """XADD with the normalizer's bytes exactly as the sink sends them (not re-packed by redis-py)."""
    count, body = fields
    command = pack_command(("XADD", stream, "*"))  # type: ignore[arg-type]
    command = b"*%d\r\n" % (count + 3) + command[command.index(b"\n") + 1 :] + body
    kwargs = conn.connection_pool.connection_kwargs
    reader = hiredis.Reader()
    with socket.create_connection((kwargs["host"], kwargs["port"]), timeout=5) as sock:
        sock.sendall(command)
        while (reply := reader.gets()) is False:
            reader.feed(sock.recv(65536))
    assert isinstance(reply, bytes), reply
    return reply


def expected_tick(entry_id: str, inst: Instrument, packet: p.Packet, recv_us: int) -> Tick:
    """The tick the contract promises for ``packet``, computed from the packet's integers."""
    assert not isinstance(packet, p.Depth20Packet)
    tick = Tick(
        id=entry_id, v="1", token=inst.token, exchange=inst.exchange, symbol=inst.symbol,
        mode={p.LtpPacket: "ltp", p.QuotePacket: "quote", p.SnapQuotePacket: "snap_quote"}[type(packet)],
        seq=packet.sequence_number, exch_ts=packet.exchange_timestamp,
        ltp=rupees(packet.last_traded_price, inst), recv_ts=recv_us,
    )  # fmt: skip
    if isinstance(packet, p.QuotePacket | p.SnapQuotePacket):
        tick = dataclasses.replace(
            tick, ltq=packet.last_traded_quantity, atp=rupees(packet.average_traded_price, inst),
            volume=packet.volume, open=rupees(packet.open, inst), high=rupees(packet.high, inst),
            low=rupees(packet.low, inst), close=rupees(packet.close, inst),
        )  # fmt: skip
    if isinstance(packet, p.SnapQuotePacket):
        tick = dataclasses.replace(
            tick, ltt=packet.last_traded_timestamp * 1000, oi=packet.open_interest,
            upper_circuit=rupees(packet.upper_circuit, inst), lower_circuit=rupees(packet.lower_circuit, inst),
            high_52w=rupees(packet.high_52_week, inst), low_52w=rupees(packet.low_52_week, inst),
            bids=tuple((rupees(pr, inst), q, o) for q, pr, o in packet.bids),
            asks=tuple((rupees(pr, inst), q, o) for q, pr, o in packet.asks),
        )  # fmt: skip
    return tick


@settings(max_examples=50)
@given(
    st.sampled_from(INSTRUMENTS),
    st.one_of(gen.ltp(), gen.quote(), gen.snap_quote()),
    st.integers(0, 2**62),
)
def test_round_trip_through_redis(
    conn: redis.Redis, inst: Instrument, packet: p.LtpPacket | p.QuotePacket | p.SnapQuotePacket, recv_us: int
) -> None:
    packet = packet._replace(exchange_type=inst.exchange_type, token=inst.token)
    n = normalizer(inst)
    out = n.entry(packet, recv_us)
    assert out is not None
    stream, fields = out
    assert stream == f"ticks:{inst.exchange}:{inst.symbol}"
    names = {p.LtpPacket: LTP_FIELDS, p.QuotePacket: QUOTE_FIELDS, p.SnapQuotePacket: SNAP_FIELDS}[type(packet)]
    assert set(as_dict(fields)) == names
    entry_id = xadd_as_is(conn, stream, fields)
    entries: list[tuple[bytes, dict[bytes, bytes]]] = conn.xrange(stream, min=entry_id, max=entry_id)  # type: ignore[assignment]
    [(read_id, read_fields)] = entries
    tick = parse_entry(read_id, read_fields)

    without_floats = dataclasses.replace(tick, total_buy_qty=None, total_sell_qty=None, oi_change_pct=None)
    assert without_floats == expected_tick(entry_id.decode(), inst, packet, recv_us)
    if isinstance(packet, p.QuotePacket | p.SnapQuotePacket):
        assert tick.total_buy_qty is not None
        assert tick.total_sell_qty is not None
        assert float(tick.total_buy_qty) == packet.total_buy_quantity
        assert float(tick.total_sell_qty) == packet.total_sell_quantity
    if isinstance(packet, p.SnapQuotePacket):
        assert tick.oi_change_pct is not None
        assert float(tick.oi_change_pct) == packet.open_interest_change_pct
    else:
        assert tick.oi_change_pct is None
    places = 7 if inst.exchange == "CDS" else 2
    assert tick.ltp.as_tuple().exponent == -places  # the string has exactly 2 (7) decimals
    assert tick.key == inst.key
