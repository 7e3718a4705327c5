from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable

import pytest
from hypothesis import find, given, settings
from hypothesis import strategies as st

from tests import strategies as gen
from worker import protocol as p

# ----------------------------------------------------------------- packets


@given(gen.packets())
def test_decode_of_encode_is_identity(packet: p.Packet) -> None:
    frame = p.encode(packet)
    assert len(frame) == p.PACKET_SIZE[p.Mode(packet.mode)]
    assert p.decode(frame) == packet


@given(gen.raw_frames())
def test_encode_of_decode_gives_back_the_frame(frame: bytes) -> None:
    packet = p.decode(frame)
    again = p.encode(packet)
    if isinstance(packet, p.SnapQuotePacket):  # flags are normalized to 1/0, bids first
        assert p.decode(again) == packet or any(math.isnan(x) for x in _floats(packet))
    else:
        assert again == frame


def _floats(packet: p.Packet) -> list[float]:
    return [v for v in packet if isinstance(v, float)]


def test_worked_example_from_the_spec() -> None:
    frame = bytes.fromhex(
        "0101" + "33303435" + "00" * 21 + "87d6120000000000" + "c01e110294010000" + "b238010000000000"
    )
    assert p.decode(frame) == p.LtpPacket(1, 1, "3045", 1_234_567, 1_735_201_464_000, 80_050)
    assert p.encode(p.decode(frame)) == frame


def test_snap_quote_buckets_depth_by_flag_and_keeps_floats() -> None:
    records = [(1, 10 + i, 1000 - i, i) for i in range(5)] + [(0, 20 + i, 1001 + i, i) for i in range(5)]
    depth = b"".join(struct.pack("<HqqH", *r) for r in records)
    head = struct.pack("<BB25sqqq", 3, 2, b"35001", 9, 1_735_201_464_000, 1000)
    quote = struct.pack("<qqqddqqqq", 75, 999, 10_000, 224305.0, 1.5, 990, 1010, 980, 995)
    snap = struct.pack("<qqd", 1_735_201_464, 5000, 0.0302)
    limits = struct.pack("<qqqq", 1200, 800, 1300, 700)
    packet = p.decode(head + quote + snap + depth + limits)
    assert isinstance(packet, p.SnapQuotePacket)
    assert packet.bids[0] == p.DepthLevel(price=1000, quantity=10, orders=0)
    assert [price for _, price, _ in packet.bids] == [1000, 999, 998, 997, 996]
    assert [price for _, price, _ in packet.asks] == [1001, 1002, 1003, 1004, 1005]
    assert packet.total_buy_quantity == 224305.0
    assert packet.open_interest_change_pct == 0.0302
    assert (packet.upper_circuit, packet.lower_circuit, packet.high_52_week, packet.low_52_week) == (
        1200, 800, 1300, 700,
    )  # fmt: skip


def test_depth20_reads_exchange_timestamp_at_27_and_received_time_at_35() -> None:
    levels = b"".join(struct.pack("<iih", q, pr, o) for q, pr, o in [(i, 100 + i, 1) for i in range(40)])
    frame = struct.pack("<BB25sqq", 4, 1, b"3045", 111, 222) + levels
    packet = p.decode(frame)
    assert isinstance(packet, p.Depth20Packet)
    assert (packet.exchange_timestamp, packet.packet_received_time) == (111, 222)
    assert packet.bids[0] == p.DepthLevel(quantity=0, price=100, orders=1)
    assert packet.asks[-1] == p.DepthLevel(quantity=39, price=139, orders=1)


def test_token_stops_at_the_first_nul_like_the_sdk() -> None:
    frame = struct.pack("<BB25sqqq", 1, 1, b"3045\x00\x0799", 1, 2, 3)
    assert p.decode(frame).token == "3045"


def test_token_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p, "_TOKEN_CACHE", {})
    monkeypatch.setattr(p, "_TOKEN_CACHE_LIMIT", 1)
    assert [p.decode(p.encode(p.LtpPacket(1, 1, t, 1, 2, 3))).token for t in ("1", "2", "1")] == ["1", "2", "1"]
    assert {b"1" + bytes(24): "1"} == p._TOKEN_CACHE


def test_decode_accepts_bytearray_and_memoryview() -> None:
    frame = p.encode(p.LtpPacket(1, 1, "3045", 1, 2, 3))
    assert p.decode(bytearray(frame)) == p.decode(memoryview(frame)) == p.decode(frame)


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (b"", "empty binary frame"),
        (bytes([9]) + bytes(50), "unknown subscription mode 9"),
        (bytes([0]) + bytes(50), "unknown subscription mode 0"),
        (bytes([1]) + bytes(49), "LTP packet must be 51 bytes, got 50"),
        (bytes([2]) + bytes(50), "Quote packet must be 123 bytes, got 51"),
        (bytes([3]) + bytes(377), "SnapQuote packet must be 379 bytes, got 378"),
        (bytes([4]) + bytes(443), "Depth-20 packet must be 443 bytes, got 444"),
        (struct.pack("<BB25sqqq", 1, 1, b"", 1, 2, 3), "empty token"),
        (struct.pack("<BB25sqqq", 1, 1, b"30\xff45", 1, 2, 3), "is not ASCII"),
    ],
)
def test_decode_errors_are_typed_and_clear(frame: bytes, message: str) -> None:
    with pytest.raises(p.DecodeError, match=message) as info:
        p.decode(frame)
    assert "\n" not in str(info.value)


def decodes_or_raises_decode_error_only(frame: bytes) -> None:
    """Any other exception fails the test; a DecodeError is one line, a packet has its mode's length."""
    try:
        packet = p.decode(frame)
    except p.DecodeError as exc:
        error = str(exc)
    else:
        assert len(frame) == p.PACKET_SIZE[p.Mode(packet.mode)]
        assert packet.token.isascii()
        assert packet.token
        return
    assert len(error.splitlines()) == 1


@given(st.binary(max_size=500))
def test_random_bytes_decode_or_raise_decode_error_only(frame: bytes) -> None:
    decodes_or_raises_decode_error_only(frame)


@given(st.sampled_from(list(p.PACKET_SIZE.values())).flatmap(lambda size: st.binary(min_size=size, max_size=size)))
def test_random_bytes_of_a_packets_length_decode_or_raise_decode_error_only(frame: bytes) -> None:
    decodes_or_raises_decode_error_only(frame)


@given(gen.mutated_frames())
def test_mutated_frames_decode_or_raise_decode_error_only(frame: bytes) -> None:
    decodes_or_raises_decode_error_only(frame)


LTP = p.LtpPacket(1, 1, "3045", 1_234_567, 1_735_201_464_000, 80_050)
LTP_FRAME = p.encode(LTP)


def bits_changed(a: bytes, b: bytes) -> int:
    return bin(int.from_bytes(a) ^ int.from_bytes(b)).count("1")


@pytest.mark.parametrize(
    "condition",
    [
        lambda f: len(f) == len(LTP_FRAME) and bits_changed(f, LTP_FRAME) == 1,  # one bit flipped
        lambda f: len(f) == len(LTP_FRAME) and bits_changed(f, LTP_FRAME) > 4,  # bytes overwritten
        lambda f: len(f) == len(LTP_FRAME) and f[0] == 3,  # the mode byte says SnapQuote: too short for it
        lambda f: 0 < len(f) < len(LTP_FRAME) and LTP_FRAME.startswith(f),  # truncated
        lambda f: f == b"",  # truncated to nothing
        lambda f: len(f) > len(LTP_FRAME) and f.startswith(LTP_FRAME),  # extended
        lambda f: len(f) > len(LTP_FRAME) and f[0] in (2, 3, 4),  # extended and relabelled as a longer mode
    ],
)
def test_the_mutations_reach_every_kind_of_damage(condition: Callable[[bytes], bool]) -> None:
    assert condition(find(gen.mutated_frames(st.just(LTP)), condition))


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        (p.LtpPacket(1, 1, "", 1, 2, 3), "must be 1-25"),
        (p.LtpPacket(1, 1, "1" * 26, 1, 2, 3), "must be 1-25"),
        (p.LtpPacket(1, 1, "30\x0045", 1, 2, 3), "without NUL"),
        (p.LtpPacket(1, 1, "३०४५", 1, 2, 3), "not ASCII"),
        (p.LtpPacket(1, 1, "3045", 2**63, 2, 3), "cannot encode packet"),
        (p.LtpPacket(1, 256, "3045", 1, 2, 3), "cannot encode packet"),
    ],
)
def test_encode_errors(packet: p.Packet, message: str) -> None:
    with pytest.raises(p.EncodeError, match=message):
        p.encode(packet)


def test_encode_checks_depth_sizes() -> None:
    level = p.DepthLevel(1, 1, 1)
    snap = p.SnapQuotePacket._make(
        (3, 1, "1", *([0] * 6), 0.0, 0.0, *([0] * 6), 0.0, (level,) * 5, (level,) * 4, 0, 0, 0, 0)
    )
    with pytest.raises(p.EncodeError, match="10 best-five records, got 5 bids \\+ 4 asks"):
        p.encode(snap)
    depth = p.Depth20Packet(4, 1, "1", 0, 0, (level,) * 20, (level,) * 19)
    with pytest.raises(p.EncodeError, match="20 bids and 20 asks, got 20 and 19"):
        p.encode(depth)


def test_price_divisor() -> None:
    assert p.price_divisor(p.ExchangeType.CDE_FO) == 10_000_000
    assert all(p.price_divisor(e) == 100 for e in p.ExchangeType if e != p.ExchangeType.CDE_FO)


# ----------------------------------------------------------------- requests


def test_build_requests_groups_by_mode_and_exchange_and_chunks_at_the_limit() -> None:
    subs = [(3, 2, f"n{i}") for i in range(3)] + [(1, 1, "a"), (3, 1, "b"), (1, 1, "a"), (3, 1, "c")]
    requests = p.build_requests(p.Action.SUBSCRIBE, subs, "corr1", max_tokens=3)
    assert [(r.mode, r.token_list) for r in requests] == [
        (p.Mode.LTP, ((1, ("a",)),)),
        (p.Mode.SNAP_QUOTE, ((1, ("b", "c")), (2, ("n0",)))),
        (p.Mode.SNAP_QUOTE, ((2, ("n1", "n2")),)),
    ]
    assert all(r.correlation_id == "corr1" and r.action is p.Action.SUBSCRIBE for r in requests)


def test_build_requests_default_limit_is_1000_tokens() -> None:
    requests = p.build_requests(p.Action.SUBSCRIBE, [(2, 1, str(i)) for i in range(2500)])
    assert [r.token_count for r in requests] == [1000, 1000, 500]
    exactly_full = p.build_requests(p.Action.SUBSCRIBE, [(2, 1, str(i)) for i in range(2000)])
    assert [r.token_count for r in exactly_full] == [1000, 1000]


def test_build_requests_depth20_is_nse_cm_only_and_50_per_request() -> None:
    requests = p.build_requests(p.Action.SUBSCRIBE, [(4, 1, str(i)) for i in range(120)])
    assert [r.token_count for r in requests] == [50, 50, 20]
    with pytest.raises(ValueError, match="only available for exchangeType 1"):
        p.build_requests(p.Action.SUBSCRIBE, [(4, 2, "1")])


def test_request_json_round_trip() -> None:
    request = p.build_requests(p.Action.UNSUBSCRIBE, [(2, 1, "3045"), (2, 13, "1151")], "abc")[0]
    text = request.to_json()
    assert json.loads(text) == {
        "correlationID": "abc",
        "action": 0,
        "params": {
            "mode": 2,
            "tokenList": [{"exchangeType": 1, "tokens": ["3045"]}, {"exchangeType": 13, "tokens": ["1151"]}],
        },
    }
    assert p.parse_request(text) == request


def test_parse_request_without_correlation_id() -> None:
    text = '{"action":1,"params":{"mode":1,"tokenList":[{"exchangeType":0,"tokens":["1"]}]}}'
    assert p.parse_request(text) == p.Request(p.Action.SUBSCRIBE, p.Mode.LTP, ((0, ("1",)),), "")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not JSON"),
        ("[]", "JSON object"),
        ('{"correlationID": 5, "action": 1}', "correlationID"),
        ('{"action": 2}', "action must be"),
        ('{"action": true}', "action must be"),
        ('{"action": 1}', "params must be"),
        ('{"action": 1, "params": {"mode": 5}}', "params.mode"),
        ('{"action": 1, "params": {"mode": 1, "tokenList": []}}', "non-empty array"),
        ('{"action": 1, "params": {"mode": 1, "tokenList": [1]}}', "must be an object"),
        (
            '{"action": 1, "params": {"mode": 1, "tokenList": [{"exchangeType": "1", "tokens": ["1"]}]}}',
            "integer",
        ),
        (
            '{"action": 1, "params": {"mode": 1, "tokenList": [{"exchangeType": 1, "tokens": [1]}]}}',
            "strings",
        ),
        (
            '{"action": 1, "params": {"mode": 1, "tokenList": [{"exchangeType": 1, "tokens": "1"}]}}',
            "strings",
        ),
    ],
)
def test_parse_request_rejects_what_the_server_answers_with_e1001(text: str, message: str) -> None:
    with pytest.raises(p.RequestError, match=message):
        p.parse_request(text)


# ----------------------------------------------------------------- server text


def test_parse_text() -> None:
    assert p.parse_text("pong") == p.Pong()
    assert p.parse_text(" pong\n") == p.Pong()
    error = p.ServerError("E1002", "Invalid Request. Subscription Limit Exceeded", "c1")
    assert p.parse_text(error.to_json()) == error
    assert p.parse_text('{"errorCode":"E1001","correlationID":null}') == p.ServerError("E1001", "", "")
    assert p.parse_text("hello") == p.UnknownText("hello")
    assert p.parse_text("[1]") == p.UnknownText("[1]")
    assert p.parse_text('{"errorCode": 5}') == p.UnknownText('{"errorCode": 5}')


def test_the_hypothesis_profile_is_chosen_by_the_environment() -> None:
    chosen = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    assert settings.default is not None
    assert settings.default.max_examples == settings.get_profile(chosen).max_examples
    assert settings.get_profile("ci").max_examples == 200
    assert settings.get_profile("fuzz").max_examples == 20_000
