"""Hypothesis strategies for SmartStream packets and raw frames (shared by the codec tests)."""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from worker import protocol as p

I64 = st.integers(-(2**63), 2**63 - 1)
I32 = st.integers(-(2**31), 2**31 - 1)
I16 = st.integers(-(2**15), 2**15 - 1)
U16 = st.integers(0, 2**16 - 1)
U8 = st.integers(0, 255)
F64 = st.floats(allow_nan=False)
TOKENS = st.text(alphabet="0123456789", min_size=1, max_size=25)

_head = (U8, TOKENS)


def ltp(mode: int = p.Mode.LTP) -> st.SearchStrategy[p.LtpPacket]:
    return st.builds(p.LtpPacket, st.just(mode), *_head, I64, I64, I64)


_quote_tail = (I64, I64, I64, I64, I64, I64, F64, F64, I64, I64, I64, I64)


def quote() -> st.SearchStrategy[p.QuotePacket]:
    return st.builds(p.QuotePacket, st.just(int(p.Mode.QUOTE)), *_head, *_quote_tail)


def _five_levels() -> st.SearchStrategy[tuple[tuple[p.DepthLevel, ...], tuple[p.DepthLevel, ...]]]:
    level = st.builds(p.DepthLevel, I64, I64, U16)
    return st.integers(0, 10).flatmap(
        lambda bids: st.tuples(
            st.lists(level, min_size=bids, max_size=bids).map(tuple),
            st.lists(level, min_size=10 - bids, max_size=10 - bids).map(tuple),
        )
    )


def snap_quote() -> st.SearchStrategy[p.SnapQuotePacket]:
    return st.builds(
        lambda head, tail, snap, depth, limits: p.SnapQuotePacket(
            int(p.Mode.SNAP_QUOTE), *head, *tail, *snap, *depth, *limits
        ),
        st.tuples(*_head),
        st.tuples(*_quote_tail),
        st.tuples(I64, I64, F64),
        _five_levels(),
        st.tuples(I64, I64, I64, I64),
    )


def depth20() -> st.SearchStrategy[p.Depth20Packet]:
    level = st.builds(p.DepthLevel, I32, I32, I16)
    side = st.lists(level, min_size=20, max_size=20).map(tuple)
    return st.builds(p.Depth20Packet, st.just(int(p.Mode.DEPTH_20)), *_head, I64, I64, side, side)


def packets() -> st.SearchStrategy[p.Packet]:
    return st.one_of(ltp(), quote(), snap_quote(), depth20())


def raw_frames() -> st.SearchStrategy[bytes]:
    """Frames of the right length for their mode with a digit token and arbitrary payload bytes."""
    return st.builds(
        lambda mode, exchange, token, body: (
            struct.pack("<BB25s", mode, exchange, token.encode()) + body[: p.PACKET_SIZE[p.Mode(mode)] - 27]
        ),
        st.sampled_from([int(m) for m in p.Mode]),
        U8,
        TOKENS,
        st.binary(min_size=416, max_size=416),
    )


MUTATIONS = ("flip", "byte", "truncate", "extend")


@st.composite
def mutated_frames(draw: st.DrawFn, base: st.SearchStrategy[p.Packet] | None = None) -> bytes:
    """A valid frame (of ``base``, any packet by default) after 1-4 mutations: bit flips, byte overwrites,
    truncation (to any length, empty included) and extension (1-64 random bytes appended)."""
    frame = bytearray(p.encode(draw(base if base is not None else packets())))
    for kind in draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=4)):
        if kind == "extend":
            frame += draw(st.binary(min_size=1, max_size=64))
        elif kind == "truncate":
            del frame[draw(st.integers(0, len(frame))) :]
        elif not frame:
            continue  # nothing left to flip or overwrite
        elif kind == "flip":
            bit = draw(st.integers(0, len(frame) * 8 - 1))
            frame[bit // 8] ^= 1 << (bit % 8)
        else:
            frame[draw(st.integers(0, len(frame) - 1))] = draw(U8)
    return bytes(frame)
