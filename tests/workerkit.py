"""Helpers for tests that run the real worker against the simulator and a real Redis."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import redis
import requests

from worker import keys
from worker import protocol as p
from worker.instruments import Instrument
from worker.schema import Tick, parse_entry
from worker.settings import Settings, load
from worker.simulator import SimulatorThread

TickPacket = p.LtpPacket | p.QuotePacket | p.SnapQuotePacket

#: Fast timings so faults resolve in a fraction of a second.
FAST: dict[str, Any] = {
    "heartbeat_interval": 0.2,
    "stall_timeout": 3.0,
    "reconnect_initial": 0.05,
    "reconnect_max": 0.4,
    "reconnect_jitter": 0.02,
    "healthy_after": 0.3,
    "connect_timeout": 5.0,
    "shutdown_timeout": 3.0,
    "redis_retry_max": 0.2,
    "instruments_cache": "",  # tests that want one say so
    "health_port": 0,  # any free port: tests run side by side
}


def worker_settings(sim: SimulatorThread, redis_url: str, **overrides: Any) -> Settings:
    """Settings pointing the worker at ``sim`` and ``redis_url`` (nothing read from a .env)."""
    values: dict[str, Any] = {name.lower(): value for name, value in sim.sim.worker_env().items()}
    values["redis_url"] = redis_url
    return load(**(values | FAST | overrides))


def wait_for(predicate: Callable[[], object], timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = re.escape(name) + (r"\{" + re.escape(wanted) + r"\}" if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.MULTILINE)
    assert found is not None, f"{name} {labels} not in the metrics"
    return float(found[1])


def scrape(url: str) -> str:
    """The worker's /metrics, as Prometheus text."""
    return requests.get(url + "/metrics", timeout=5).text


def entries(client: redis.Redis, stream: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE of a whole stream, from a client without ``decode_responses``."""
    return cast(list[tuple[bytes, dict[bytes, bytes]]], client.xrange(stream))


def ticks(client: redis.Redis, key: str) -> list[Tick]:
    """Every entry of the tick stream of ``EXCHANGE:SYMBOL``, oldest first."""
    return [parse_entry(i, f) for i, f in entries(client, keys.ticks_for(key))]


def events(client: redis.Redis, kind: str | None = None) -> list[dict[str, str]]:
    found = []
    for _, fields in entries(client, keys.EVENTS):
        event = {k.decode(): v.decode() for k, v in fields.items()}
        if kind is None or event["type"] == kind:
            found.append(event)
    return found


@dataclass(frozen=True)
class Tx:
    packet: TickPacket
    at: float  # time.monotonic() when the simulator sent it


def sent_to(sim: SimulatorThread, inst: Instrument) -> list[Tx]:
    """What the simulator sent for ``inst`` (any mode but Depth-20), consecutive repeats removed."""
    out: list[Tx] = []
    for s in list(sim.sim.sent):
        pk = s.packet
        if (pk.exchange_type, pk.token) != (inst.exchange_type, inst.token) or isinstance(pk, p.Depth20Packet):
            continue
        if not out or out[-1].packet != pk:
            out.append(Tx(pk, s.at))
    return out


def is_subsequence(part: Iterable[object], whole: Iterable[object]) -> bool:
    it = iter(whole)
    return all(any(x == y for y in it) for x in part)


def _rupees(units: int, inst: Instrument) -> Decimal:
    return Decimal(units) / (10_000_000 if inst.exchange == "CDS" else 100)


def _levels(levels: tuple[p.Level, ...], inst: Instrument) -> tuple[tuple[Decimal, int, int], ...]:
    return tuple((_rupees(price, inst), qty, orders) for qty, price, orders in levels)


def assert_tick_is(tick: Tick, packet: TickPacket, inst: Instrument) -> None:
    """Every field of ``tick`` equals the packet's value, computed here independently."""
    assert (tick.v, tick.token, tick.exchange, tick.symbol) == ("1", inst.token, inst.exchange, inst.symbol)
    assert tick.mode == {1: "ltp", 2: "quote", 3: "snap_quote"}[packet.mode]
    assert (tick.seq, tick.exch_ts) == (packet.sequence_number, packet.exchange_timestamp)
    assert tick.ltp == _rupees(packet.last_traded_price, inst)
    assert tick.recv_ts > 1_600_000_000_000_000  # epoch µs
    if isinstance(packet, p.QuotePacket | p.SnapQuotePacket):
        assert (tick.ltq, tick.volume) == (packet.last_traded_quantity, packet.volume)
        assert tick.atp == _rupees(packet.average_traded_price, inst)
        ohlc = (packet.open, packet.high, packet.low, packet.close)
        assert (tick.open, tick.high, tick.low, tick.close) == tuple(_rupees(x, inst) for x in ohlc)
        assert tick.total_buy_qty is not None
        assert tick.total_sell_qty is not None
        assert float(tick.total_buy_qty) == packet.total_buy_quantity  # the shortest exact float64 text
        assert float(tick.total_sell_qty) == packet.total_sell_quantity
    else:
        assert tick.volume is None
        assert tick.open is None
    if isinstance(packet, p.SnapQuotePacket):
        assert tick.ltt == packet.last_traded_timestamp * 1000
        assert tick.oi == packet.open_interest
        assert tick.oi_change_pct is not None
        assert float(tick.oi_change_pct) == packet.open_interest_change_pct
        bands = (packet.upper_circuit, packet.lower_circuit, packet.high_52_week, packet.low_52_week)
        assert (tick.upper_circuit, tick.lower_circuit, tick.high_52w, tick.low_52w) == tuple(
            _rupees(x, inst) for x in bands
        )
        assert tick.bids == _levels(packet.bids, inst)
        assert tick.asks == _levels(packet.asks, inst)
    else:
        assert tick.bids is None
        assert tick.oi is None


@dataclass(frozen=True)
class FaultFigures:
    """What one fault cost, for the table printed at the end of the run (and kept in the README)."""

    case: str
    sent: int  # ticks the simulator sent for the symbols checked
    written: int  # entries in their streams
    lost: int  # sent but never written (must be 0, or within the outage window / buffer bound)
    duplicates: int  # written more than once (must be 0)
    recovery_s: float | None  # from the fault to the first tick written after it


FAULT_REPORT: list[FaultFigures] = []


def record_fault(
    case: str, sim: SimulatorThread, client: redis.Redis, insts: Iterable[Instrument], recovery_s: float | None
) -> FaultFigures:
    sent = written = unique = delivered = 0
    for inst in insts:
        got = [(t.seq, t.exch_ts) for t in ticks(client, inst.key)]
        keys_sent = {(s.packet.sequence_number, s.packet.exchange_timestamp) for s in sent_to(sim, inst)}
        sent += len(keys_sent)
        written += len(got)
        unique += len(set(got))
        delivered += len(set(got) & keys_sent)
    figures = FaultFigures(case, sent, written, sent - delivered, written - unique, recovery_s)
    FAULT_REPORT.append(figures)
    return figures


def fault_table() -> list[str]:
    lines = ["| fault | ticks sent | written | lost | duplicates | recovered in |", "|---|---|---|---|---|---|"]
    for f in FAULT_REPORT:
        recovered = "-" if f.recovery_s is None else f"{f.recovery_s:.2f} s"
        lines.append(f"| {f.case} | {f.sent} | {f.written} | {f.lost} | {f.duplicates} | {recovered} |")
    return lines
