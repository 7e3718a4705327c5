"""SmartStream (Angel One WebSocket 2.0) codec, sans-I/O.

Bytes in, typed values out, and back again. Shared by the worker, the simulator, the tests and
the benchmark. Nothing here touches a socket, a clock or Redis.

Layouts follow ``shared/docs/smartstream-protocol.md`` §3: one packet per binary frame,
little-endian, the mode in byte 0 fixing the length (LTP 51, Quote 123, SnapQuote 379,
Depth-20 443). Prices stay integers in the exchange's unit (paise; 1e-7 rupee for the currency
segment) at this layer; scaling is the normalizer's job.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, NamedTuple

# --------------------------------------------------------------------------- enums and facts


class Mode(IntEnum):
    """Subscription mode, byte 0 of every packet and ``params.mode`` of every request."""

    LTP = 1
    QUOTE = 2
    SNAP_QUOTE = 3
    DEPTH_20 = 4


class ExchangeType(IntEnum):
    """``exchangeType`` codes (§2.2)."""

    NSE_CM = 1
    NSE_FO = 2
    BSE_CM = 3
    BSE_FO = 4
    MCX_FO = 5
    NCX_FO = 7
    CDE_FO = 13


class Action(IntEnum):
    UNSUBSCRIBE = 0
    SUBSCRIBE = 1


#: Instrument-master ``exch_seg`` → ``exchangeType``.
EXCHANGE_TYPE_BY_SEGMENT: dict[str, ExchangeType] = {
    "NSE": ExchangeType.NSE_CM,
    "NFO": ExchangeType.NSE_FO,
    "BSE": ExchangeType.BSE_CM,
    "BFO": ExchangeType.BSE_FO,
    "MCX": ExchangeType.MCX_FO,
    "NCDEX": ExchangeType.NCX_FO,
    "CDS": ExchangeType.CDE_FO,
}


def price_divisor(exchange_type: int) -> int:
    """Wire price units per rupee: 1e7 for the currency segment, 100 (paise) elsewhere (§3.7)."""
    return 10_000_000 if exchange_type == ExchangeType.CDE_FO else 100


#: Angel's limits (§2.2).
MAX_TOKENS_PER_CONNECTION = 1000
MAX_TOKENS_PER_REQUEST = 1000
MAX_DEPTH_20_TOKENS_PER_REQUEST = 50
TOKEN_FIELD_SIZE = 25

# --------------------------------------------------------------------------- packets


#: One depth level, in wire order: (quantity, price in wire units, number of orders). Decoding
#: yields plain tuples, sliced in C straight out of the unpacked frame (NamedTuples would cost
#: more than the whole unpack); :class:`DepthLevel` is the same shape with names.
Level = tuple[int, int, int]


class DepthLevel(NamedTuple):
    quantity: int
    price: int  # wire units (paise; 1e-7 rupee for CDS)
    orders: int


class LtpPacket(NamedTuple):
    mode: int
    exchange_type: int
    token: str
    sequence_number: int
    exchange_timestamp: int  # epoch milliseconds
    last_traded_price: int


class QuotePacket(NamedTuple):
    mode: int
    exchange_type: int
    token: str
    sequence_number: int
    exchange_timestamp: int
    last_traded_price: int
    last_traded_quantity: int
    average_traded_price: int
    volume: int  # cumulative day volume
    total_buy_quantity: float
    total_sell_quantity: float
    open: int
    high: int
    low: int
    close: int


class SnapQuotePacket(NamedTuple):
    mode: int
    exchange_type: int
    token: str
    sequence_number: int
    exchange_timestamp: int
    last_traded_price: int
    last_traded_quantity: int
    average_traded_price: int
    volume: int
    total_buy_quantity: float
    total_sell_quantity: float
    open: int
    high: int
    low: int
    close: int
    last_traded_timestamp: int  # epoch SECONDS
    open_interest: int
    open_interest_change_pct: float
    bids: tuple[Level, ...]  # records with flag 1, wire order (best first)
    asks: tuple[Level, ...]  # records with flag 0
    upper_circuit: int
    lower_circuit: int
    high_52_week: int
    low_52_week: int


class Depth20Packet(NamedTuple):
    mode: int
    exchange_type: int
    token: str
    exchange_timestamp: int  # offset 27 (the SDK wrongly reads 35)
    packet_received_time: int  # offset 35
    bids: tuple[Level, ...]  # 20 levels
    asks: tuple[Level, ...]  # 20 levels


Packet = LtpPacket | QuotePacket | SnapQuotePacket | Depth20Packet


class ProtocolError(ValueError):
    """Base class of every error this module raises."""


class DecodeError(ProtocolError):
    """A binary frame is not a valid SmartStream packet."""


class EncodeError(ProtocolError):
    """A packet cannot be encoded (bad token, value out of range, wrong depth size)."""


# --------------------------------------------------------------------------- layouts

Buffer = bytes | bytearray | memoryview

_LTP = struct.Struct("<BB25sqqq")
_QUOTE = struct.Struct("<BB25sqqq qqqdd qqqq")
# SnapQuote is decoded with the 2-byte side flags skipped (pad bytes), so each best-five record
# is three adjacent values; the flags are checked on the frame's bytes. Encoding writes them.
_SNAP = struct.Struct("<BB25sqqq qqqdd qqqq qqd" + "xxqqH" * 10 + "qqqq")
_SNAP_ENCODE = struct.Struct("<BB25sqqq qqqdd qqqq qqd" + "HqqH" * 10 + "qqqq")
_SNAP_FLAGS = struct.Struct("<H" + "18xH" * 9)  # the 10 flags, from offset 147
_DEPTH = struct.Struct("<BB25sqq" + "iih" * 40)

PACKET_SIZE: dict[Mode, int] = {
    Mode.LTP: _LTP.size,
    Mode.QUOTE: _QUOTE.size,
    Mode.SNAP_QUOTE: _SNAP_ENCODE.size,
    Mode.DEPTH_20: _DEPTH.size,
}
_NAMES = {Mode.LTP: "LTP", Mode.QUOTE: "Quote", Mode.SNAP_QUOTE: "SnapQuote", Mode.DEPTH_20: "Depth-20"}

_SNAP_DEPTH_START = 18  # index of the first best-five value in _SNAP's tuple
_SNAP_LIMITS_START = _SNAP_DEPTH_START + 30
_DEPTH_OFFSET = 147
_BIDS_FIRST_LOW = bytes([1] * 5 + [0] * 5)  # low bytes of the flags when 5 bids precede 5 asks
_ZERO_HIGH = bytes(10)

# Hot path: NamedTuple constructors are Python functions; tuple.__new__ builds the same value in C.
_new = tuple.__new__

_TOKEN_CACHE: dict[bytes, str] = {}
_TOKEN_CACHE_LIMIT = 20_000  # > 3 connections × 1000 tokens; garbage cannot grow it past this


def _token(raw: bytes) -> str:
    """The token of a 25-byte field (callers try ``_TOKEN_CACHE`` first)."""
    head = raw.partition(b"\0")[0]
    if not head:
        raise DecodeError("packet has an empty token field (bytes 2-26): corrupted frame")
    try:
        token = head.decode("ascii")
    except UnicodeDecodeError:
        raise DecodeError(f"packet token {head!r} is not ASCII: corrupted frame") from None
    if len(_TOKEN_CACHE) < _TOKEN_CACHE_LIMIT:
        _TOKEN_CACHE[raw] = token
    return token


def _decode_ltp(frame: Buffer) -> LtpPacket:
    v = _LTP.unpack(frame)
    packet: LtpPacket = _new(LtpPacket, (v[0], v[1], _TOKEN_CACHE.get(v[2]) or _token(v[2]), v[3], v[4], v[5]))
    return packet


def _decode_quote(frame: Buffer) -> QuotePacket:
    v = _QUOTE.unpack(frame)
    packet: QuotePacket = _new(QuotePacket, (v[0], v[1], _TOKEN_CACHE.get(v[2]) or _token(v[2]), *v[3:]))
    return packet


def _decode_snap(frame: Buffer) -> SnapQuotePacket:
    v = _SNAP.unpack(frame)
    bids: tuple[Level, ...]
    asks: tuple[Level, ...]
    if frame[147:347:20] == _BIDS_FIRST_LOW and frame[148:348:20] == _ZERO_HIGH:  # what Angel sends
        bids = (v[18:21], v[21:24], v[24:27], v[27:30], v[30:33])
        asks = (v[33:36], v[36:39], v[39:42], v[42:45], v[45:48])
    else:  # flag 1 = bid, 0 = ask (§3.5); like the SDK, any non-zero flag counts as a bid
        flags = _SNAP_FLAGS.unpack_from(frame, _DEPTH_OFFSET)
        levels = [v[i : i + 3] for i in range(_SNAP_DEPTH_START, _SNAP_LIMITS_START, 3)]
        bids = tuple(level for flag, level in zip(flags, levels, strict=True) if flag)
        asks = tuple(level for flag, level in zip(flags, levels, strict=True) if not flag)
    packet: SnapQuotePacket = _new(
        SnapQuotePacket,
        (
            v[0],
            v[1],
            _TOKEN_CACHE.get(v[2]) or _token(v[2]),
            *v[3:_SNAP_DEPTH_START],
            bids,
            asks,
            *v[_SNAP_LIMITS_START:],
        ),
    )
    return packet


def _decode_depth(frame: Buffer) -> Depth20Packet:
    v = _DEPTH.unpack(frame)
    records = iter(v[5:])
    levels = tuple(zip(records, records, records, strict=False))  # (quantity, price, orders) × 40
    packet: Depth20Packet = _new(
        Depth20Packet, (v[0], v[1], _TOKEN_CACHE.get(v[2]) or _token(v[2]), v[3], v[4], levels[:20], levels[20:])
    )
    return packet


# Byte 0 → (expected length, decoder); None for an unknown mode.
_TABLE: list[tuple[int, Callable[[Buffer], Packet]] | None] = [None] * 256
_TABLE[Mode.LTP] = (_LTP.size, _decode_ltp)
_TABLE[Mode.QUOTE] = (_QUOTE.size, _decode_quote)
_TABLE[Mode.SNAP_QUOTE] = (_SNAP.size, _decode_snap)
_TABLE[Mode.DEPTH_20] = (_DEPTH.size, _decode_depth)


def decode(frame: Buffer) -> Packet:
    """Decode one binary WebSocket frame. Raises :class:`DecodeError` and nothing else."""
    try:
        entry = _TABLE[frame[0]]
    except IndexError:
        raise DecodeError("empty binary frame: expected a 51, 123, 379 or 443-byte SmartStream packet") from None
    if entry is None or len(frame) != entry[0]:
        raise _shape_error(frame)
    return entry[1](frame)


def _shape_error(frame: Buffer) -> DecodeError:
    if frame[0] not in _NAMES:
        return DecodeError(
            f"unknown subscription mode {frame[0]} in byte 0 of a {len(frame)}-byte frame: "
            "expected 1 (LTP), 2 (Quote), 3 (SnapQuote) or 4 (Depth-20)"
        )
    mode = Mode(frame[0])
    return DecodeError(
        f"{_NAMES[mode]} packet must be {PACKET_SIZE[mode]} bytes, got {len(frame)}: truncated or corrupted frame"
    )


# --------------------------------------------------------------------------- encoding


def _token_bytes(token: str) -> bytes:
    try:
        raw = token.encode("ascii")
    except UnicodeEncodeError:
        raise EncodeError(f"token {token!r} is not ASCII") from None
    if not raw or len(raw) > TOKEN_FIELD_SIZE or b"\0" in raw:
        raise EncodeError(f"token {token!r} must be 1-{TOKEN_FIELD_SIZE} ASCII characters without NUL")
    return raw


def _pack(layout: struct.Struct, values: Sequence[Any]) -> bytes:
    try:
        return layout.pack(*values)
    except struct.error as exc:
        raise EncodeError(f"cannot encode packet: {exc}") from None


def encode(packet: Packet) -> bytes:
    """Encode a packet into the exact bytes Angel's server sends (the simulator's half of the codec)."""
    token = _token_bytes(packet.token)
    if isinstance(packet, LtpPacket | QuotePacket):
        layout = _LTP if isinstance(packet, LtpPacket) else _QUOTE
        return _pack(layout, (packet[0], packet[1], token, *packet[3:]))
    if isinstance(packet, SnapQuotePacket):
        if len(packet.bids) + len(packet.asks) != 10:
            raise EncodeError(
                f"SnapQuote needs 10 best-five records, got {len(packet.bids)} bids + {len(packet.asks)} asks"
            )
        depth: list[int] = []
        for flag, side in ((1, packet.bids), (0, packet.asks)):
            for level in side:
                depth += (flag, *level)
        return _pack(
            _SNAP_ENCODE,
            (
                packet[0], packet[1], token, *packet[3:_SNAP_DEPTH_START],
                *depth, *packet[_SNAP_DEPTH_START + 2:],
            ),
        )  # fmt: skip
    if len(packet.bids) != 20 or len(packet.asks) != 20:
        raise EncodeError(f"Depth-20 needs 20 bids and 20 asks, got {len(packet.bids)} and {len(packet.asks)}")
    records = [value for level in (*packet.bids, *packet.asks) for value in level]
    head = (packet.mode, packet.exchange_type, token, packet.exchange_timestamp, packet.packet_received_time)
    return _pack(_DEPTH, (*head, *records))


# --------------------------------------------------------------------------- requests (client → server text)


@dataclass(frozen=True, slots=True)
class Request:
    """One subscribe/unsubscribe request: ``token_list`` is ((exchangeType, (token, …)), …)."""

    action: Action
    mode: Mode
    token_list: tuple[tuple[int, tuple[str, ...]], ...]
    correlation_id: str = ""

    def to_json(self) -> str:
        body: dict[str, Any] = {
            "correlationID": self.correlation_id,
            "action": int(self.action),
            "params": {
                "mode": int(self.mode),
                "tokenList": [{"exchangeType": ex, "tokens": list(tokens)} for ex, tokens in self.token_list],
            },
        }
        return json.dumps(body, separators=(",", ":"))

    @property
    def token_count(self) -> int:
        return sum(len(tokens) for _, tokens in self.token_list)


class RequestError(ProtocolError):
    """A client request the server answers with ``E1001`` (invalid request payload)."""


def build_requests(
    action: Action,
    subscriptions: Iterable[tuple[int, int, str]],
    correlation_id: str = "",
    max_tokens: int = MAX_TOKENS_PER_REQUEST,
) -> list[Request]:
    """Group ``(mode, exchange_type, token)`` triples into as few requests as the limits allow.

    One mode per request (the protocol has one ``params.mode``); several exchange types per
    request; at most ``max_tokens`` tokens per request (50 for Depth-20). Order is deterministic:
    modes and exchange types ascending, tokens in first-seen order, duplicates removed.
    """
    grouped: dict[int, dict[int, dict[str, None]]] = {}
    for mode, exchange_type, token in subscriptions:
        if mode == Mode.DEPTH_20 and exchange_type != ExchangeType.NSE_CM:
            raise ValueError(f"Depth-20 is only available for exchangeType 1 (NSE_CM), not {exchange_type}")
        grouped.setdefault(mode, {}).setdefault(exchange_type, {})[token] = None
    requests: list[Request] = []
    for mode in sorted(grouped):
        limit = min(max_tokens, MAX_DEPTH_20_TOKENS_PER_REQUEST) if mode == Mode.DEPTH_20 else max_tokens
        chunk: list[tuple[int, tuple[str, ...]]] = []
        room = limit
        for exchange_type in sorted(grouped[mode]):
            tokens = list(grouped[mode][exchange_type])
            while tokens:
                part, tokens = tokens[:room], tokens[room:]
                chunk.append((exchange_type, tuple(part)))
                room -= len(part)
                if not room:
                    requests.append(Request(action, Mode(mode), tuple(chunk), correlation_id))
                    chunk, room = [], limit
        if chunk:
            requests.append(Request(action, Mode(mode), tuple(chunk), correlation_id))
    return requests


def parse_request(text: str) -> Request:
    """Parse a client request the way the server validates it; raises :class:`RequestError`."""
    try:
        body = json.loads(text)
    except ValueError:
        raise RequestError("request is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError("request must be a JSON object")
    correlation_id = body.get("correlationID", "")
    if not isinstance(correlation_id, str):
        raise RequestError("correlationID must be a string")
    action = body.get("action")
    if type(action) is not int or action not in (0, 1):
        raise RequestError("action must be 0 (unsubscribe) or 1 (subscribe)")
    params = body.get("params")
    if not isinstance(params, dict):
        raise RequestError("params must be an object")
    mode = params.get("mode")
    if type(mode) is not int or mode not in (1, 2, 3, 4):
        raise RequestError("params.mode must be 1, 2, 3 or 4")
    token_list = params.get("tokenList")
    if not isinstance(token_list, list) or not token_list:
        raise RequestError("params.tokenList must be a non-empty array")
    parsed: list[tuple[int, tuple[str, ...]]] = []
    for entry in token_list:
        if not isinstance(entry, dict):
            raise RequestError("each tokenList entry must be an object")
        exchange_type = entry.get("exchangeType")
        tokens = entry.get("tokens")
        if type(exchange_type) is not int:
            raise RequestError("tokenList[].exchangeType must be an integer")
        if not isinstance(tokens, list) or not all(isinstance(t, str) and t for t in tokens):
            raise RequestError("tokenList[].tokens must be an array of non-empty strings")
        parsed.append((exchange_type, tuple(tokens)))
    return Request(Action(action), Mode(mode), tuple(parsed), correlation_id)


# --------------------------------------------------------------------------- server text frames

PING = "ping"
PONG = "pong"


@dataclass(frozen=True, slots=True)
class Pong:
    pass


@dataclass(frozen=True, slots=True)
class ServerError:
    """An error JSON the server sends as a text frame (``E1001``, ``E1002``, …)."""

    code: str
    message: str
    correlation_id: str = ""

    def to_json(self) -> str:
        return json.dumps(
            {"correlationID": self.correlation_id, "errorCode": self.code, "errorMessage": self.message},
            separators=(",", ":"),
        )


@dataclass(frozen=True, slots=True)
class UnknownText:
    text: str


ServerText = Pong | ServerError | UnknownText

E1001 = "E1001"  # Invalid Request Payload
E1002 = "E1002"  # Invalid Request. Subscription Limit Exceeded


def parse_text(text: str) -> ServerText:
    """Classify a server text frame: ``pong``, an error JSON, or something unknown (kept verbatim)."""
    if text.strip() == PONG:
        return Pong()
    try:
        body = json.loads(text)
    except ValueError:
        return UnknownText(text)
    if isinstance(body, dict) and isinstance(body.get("errorCode"), str):
        return ServerError(body["errorCode"], str(body.get("errorMessage", "")), str(body.get("correlationID") or ""))
    return UnknownText(text)
