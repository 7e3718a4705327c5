"""Differential test: our decoder against smartapi-python's own ``_parse_binary_data``.

Field by field, for generated packets of every mode and for raw frames of arbitrary bytes. The
only differences allowed are the ones the spec documents as SDK bugs, and those are asserted
explicitly: B8 (OI change % read as int64) and B9 (Depth-20 timestamps).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given

from tests import strategies as gen
from worker import protocol as p
from worker.angel import sdk_packet_parser

SdkParser = Callable[[bytes], dict[str, Any]]


@pytest.fixture(scope="module")
def sdk_parse() -> SdkParser:
    return sdk_packet_parser()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return bool(a == b) and type(a) is type(b)


def _levels(levels: tuple[p.Level, ...], flag: int) -> list[dict[str, int]]:
    return [{"flag": flag, "quantity": qty, "price": price, "no of orders": orders} for qty, price, orders in levels]


def _int64_bits(value: float) -> int:
    bits: int = struct.unpack("<q", struct.pack("<d", value))[0]
    return bits


def differences(ours: p.Packet, sdk: dict[str, Any]) -> list[str]:
    """Names of the fields where our packet and the SDK's dict disagree (documented bugs allowed)."""
    expected: dict[str, Any] = {
        "subscription_mode": ours.mode,
        "exchange_type": ours.exchange_type,
        "token": ours.token,
    }
    if isinstance(ours, p.Depth20Packet):
        # B9: the SDK takes both timestamps from offset 35 and drops the real one at 27.
        expected |= {
            "exchange_timestamp": ours.packet_received_time,
            "packet_received_time": ours.packet_received_time,
            "depth_20_buy_data": [
                {"quantity": qty, "price": price, "num_of_orders": orders} for qty, price, orders in ours.bids
            ],
            "depth_20_sell_data": [
                {"quantity": qty, "price": price, "num_of_orders": orders} for qty, price, orders in ours.asks
            ],
        }
    else:
        expected |= {
            "subscription_mode_val": {1: "LTP", 2: "QUOTE", 3: "SNAP_QUOTE"}.get(ours.mode),
            "sequence_number": ours.sequence_number,
            "exchange_timestamp": ours.exchange_timestamp,
            "last_traded_price": ours.last_traded_price,
        }
    if isinstance(ours, p.QuotePacket | p.SnapQuotePacket):
        expected |= {
            "last_traded_quantity": ours.last_traded_quantity,
            "average_traded_price": ours.average_traded_price,
            "volume_trade_for_the_day": ours.volume,
            "total_buy_quantity": ours.total_buy_quantity,
            "total_sell_quantity": ours.total_sell_quantity,
            "open_price_of_the_day": ours.open,
            "high_price_of_the_day": ours.high,
            "low_price_of_the_day": ours.low,
            "closed_price": ours.close,
        }
    if isinstance(ours, p.SnapQuotePacket):
        expected |= {
            "last_traded_timestamp": ours.last_traded_timestamp,
            "open_interest": ours.open_interest,
            # B8: the SDK reads this float64 as int64, i.e. its bit pattern.
            "open_interest_change_percentage": _int64_bits(ours.open_interest_change_pct),
            "upper_circuit_limit": ours.upper_circuit,
            "lower_circuit_limit": ours.lower_circuit,
            "52_week_high_price": ours.high_52_week,
            "52_week_low_price": ours.low_52_week,
        }
    wrong = [name for name, value in expected.items() if name not in sdk or not _same(value, sdk[name])]
    if isinstance(ours, p.SnapQuotePacket):
        # The SDK buckets by flag (any non-zero flag is a bid); ours keeps the flag's meaning only.
        sdk_bids = [{**lv, "flag": 1} for lv in sdk["best_5_buy_data"]]
        if sdk_bids != _levels(ours.bids, 1) or any(lv["flag"] == 0 for lv in sdk["best_5_buy_data"]):
            wrong.append("bids")
        if sdk["best_5_sell_data"] != _levels(ours.asks, 0):
            wrong.append("asks")
    extra = set(sdk) - set(expected) - {"best_5_buy_data", "best_5_sell_data"}
    return wrong + sorted(extra)


@given(gen.packets())
def test_decode_equals_the_sdk_on_encoded_packets(sdk_parse: SdkParser, packet: p.Packet) -> None:
    frame = p.encode(packet)
    assert p.decode(frame) == packet
    assert differences(p.decode(frame), sdk_parse(frame)) == []


@given(gen.raw_frames())
def test_decode_equals_the_sdk_on_raw_frames(sdk_parse: SdkParser, frame: bytes) -> None:
    assert differences(p.decode(frame), sdk_parse(frame)) == []


def test_documented_sdk_bugs_are_real(sdk_parse: SdkParser) -> None:
    """B8 and B9 on a concrete frame: the SDK's values are wrong, ours are right."""
    real_world = 4584350709158701777  # a value users saw from the SDK (spec §3.5)
    oi_pct = struct.unpack("<d", struct.pack("<q", real_world))[0]
    bid = p.DepthLevel(quantity=5, price=80_045, orders=1)
    ask = p.DepthLevel(quantity=5, price=80_055, orders=1)
    snap = p.SnapQuotePacket(
        3, 1, "3045", 1, 1_735_201_464_000, 80_050, 1, 80_000, 10, 1.0, 2.0, 1, 2, 1, 1,
        1_735_201_464, 100, oi_pct, (bid,) * 5, (ask,) * 5, 1, 1, 1, 1,
    )  # fmt: skip
    sdk = sdk_parse(p.encode(snap))
    assert sdk["open_interest_change_percentage"] == real_world
    decoded = p.decode(p.encode(snap))
    assert isinstance(decoded, p.SnapQuotePacket)
    assert round(decoded.open_interest_change_pct, 4) == 0.0302
    depth = p.Depth20Packet(4, 1, "3045", 111, 222, (p.DepthLevel(1, 1, 1),) * 20, (p.DepthLevel(2, 2, 2),) * 20)
    sdk = sdk_parse(p.encode(depth))
    assert sdk["exchange_timestamp"] == 222 != p.decode(p.encode(depth)).exchange_timestamp


def _corruptions() -> list[tuple[p.Packet, str, Any]]:
    level = p.DepthLevel(quantity=5, price=80_045, orders=1)
    snap = p.SnapQuotePacket(
        3, 1, "3045", 1, 2, 3, 4, 5, 6, 7.0, 8.0, 9, 10, 11, 12, 13, 14, 0.5,
        (level,) * 5, (level._replace(price=80_055),) * 5, 15, 16, 17, 18,
    )  # fmt: skip
    depth = p.Depth20Packet(4, 1, "3045", 111, 222, (level,) * 20, (level,) * 20)
    cases: list[tuple[p.Packet, str, Any]] = []
    for name, value in snap._asdict().items():
        if name in ("bids", "asks"):
            wrong: Any = (value[0]._replace(quantity=99), *value[1:])
        elif isinstance(value, str):
            wrong = value + "1"
        else:
            wrong = value + 1
        cases.append((snap, name, wrong))
    cases.append((depth, "packet_received_time", 223))
    cases.append((depth, "bids", (level._replace(orders=2), *depth.bids[1:])))
    cases.append((depth, "asks", (level._replace(price=1), *depth.asks[1:])))
    return cases


@pytest.mark.parametrize(("packet", "field", "wrong"), _corruptions())
def test_the_comparison_notices_one_corrupted_field(
    sdk_parse: SdkParser, packet: p.Packet, field: str, wrong: Any
) -> None:
    """As if our decoder read one field from a wrong offset: the differential test must fail."""
    sdk = sdk_parse(p.encode(packet))
    assert differences(packet, sdk) == []
    assert differences(packet._replace(**{field: wrong}), sdk) != []
