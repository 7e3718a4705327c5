"""Angel's instrument master (``OpenAPIScripMaster.json``): load (with a local cached copy), parse,
index, look up, and publish in Redis so any consumer can resolve ``EXCHANGE:SYMBOL`` ↔ token.

Every row of the master is an object whose values are all strings (spec §7.3). An instrument is
addressed by users as ``EXCHANGE:SYMBOL`` (``exch_seg`` and ``symbol``, e.g. ``NSE:SBIN-EQ``) and
on the wire by ``(exchangeType, token)``.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from worker import keys
from worker.protocol import EXCHANGE_TYPE_BY_SEGMENT

log = logging.getLogger(__name__)

_REQUIRED = ("token", "symbol", "exch_seg")


class InstrumentError(ValueError):
    """The instrument master cannot be read."""


@dataclass(frozen=True, slots=True)
class Instrument:
    token: str
    symbol: str
    exchange: str  # exch_seg: NSE, NFO, BSE, BFO, MCX, NCDEX, CDS
    exchange_type: int
    name: str = ""
    instrument_type: str = ""
    expiry: str = ""
    strike: str = ""
    lot_size: int = 1
    tick_size: Decimal = Decimal(1)  # in paise, as the master gives it

    @property
    def key(self) -> str:
        return f"{self.exchange}:{self.symbol}"

    def to_row(self) -> dict[str, str]:
        """The instrument as an ``OpenAPIScripMaster.json`` row."""
        return {
            "token": self.token,
            "symbol": self.symbol,
            "name": self.name,
            "expiry": self.expiry,
            "strike": self.strike or "-1.000000",
            "lotsize": str(self.lot_size),
            "instrumenttype": self.instrument_type,
            "exch_seg": self.exchange,
            "tick_size": f"{self.tick_size:f}",
        }


def _instrument(index: int, row: Any) -> Instrument | None:
    if not isinstance(row, Mapping):
        raise InstrumentError(f"instrument master row {index} is not an object")
    for name in _REQUIRED:
        if not isinstance(row.get(name), str) or not row[name]:
            raise InstrumentError(f"instrument master row {index} has no {name!r}")
    exchange_type = EXCHANGE_TYPE_BY_SEGMENT.get(row["exch_seg"])
    if exchange_type is None:
        return None  # a segment SmartStream does not serve
    try:
        lot_size = int(Decimal(str(row.get("lotsize") or 1)))
        tick_size = Decimal(str(row.get("tick_size") or 1))
    except (InvalidOperation, ValueError):
        raise InstrumentError(
            f"instrument master row {index} ({row['symbol']}) has a bad lotsize or tick_size"
        ) from None
    return Instrument(
        token=row["token"],
        symbol=row["symbol"],
        exchange=row["exch_seg"],
        exchange_type=int(exchange_type),
        name=str(row.get("name") or ""),
        instrument_type=str(row.get("instrumenttype") or ""),
        expiry=str(row.get("expiry") or ""),
        strike=str(row.get("strike") or ""),
        lot_size=lot_size,
        tick_size=tick_size,
    )


def parse_master(raw: bytes | str) -> list[Instrument]:
    """Parse an ``OpenAPIScripMaster.json`` document; rows of unknown segments are skipped."""
    try:
        rows = json.loads(raw)
    except ValueError as exc:
        raise InstrumentError(f"instrument master is not JSON: {exc}") from None
    if not isinstance(rows, list):
        raise InstrumentError("instrument master must be a JSON array of rows")
    return [inst for i, row in enumerate(rows) if (inst := _instrument(i, row)) is not None]


def dump_master(instruments: Iterable[Instrument]) -> bytes:
    return json.dumps([inst.to_row() for inst in instruments], separators=(",", ":")).encode()


def bundled_master_path() -> Path:
    """The small master shipped with the package, for tests and the demo."""
    return Path(str(resources.files("worker") / "data" / "instruments.json"))


def load_master_file(path: str | Path) -> list[Instrument]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise InstrumentError(f"cannot read instrument master {path}: {exc.strerror}") from None
    return parse_master(raw)


class InstrumentIndex:
    """Both directions: ``EXCHANGE:SYMBOL`` → instrument and ``(exchangeType, token)`` → instrument."""

    def __init__(self, instruments: Iterable[Instrument]) -> None:
        self.by_key: dict[str, Instrument] = {}
        self.by_token: dict[tuple[int, str], Instrument] = {}
        self.by_folded: dict[str, Instrument] = {}
        for inst in instruments:
            self.by_key[inst.key] = inst
            self.by_token[(inst.exchange_type, inst.token)] = inst
            self.by_folded.setdefault(inst.key.casefold(), inst)

    def __len__(self) -> int:
        return len(self.by_key)

    def __iter__(self) -> Iterator[Instrument]:
        return iter(self.by_key.values())

    def get(self, key: str) -> Instrument | None:
        return self.by_key.get(key)

    def by_wire(self, exchange_type: int, token: str) -> Instrument | None:
        return self.by_token.get((exchange_type, token))

    def resolve(self, key: str) -> Instrument | None:
        """``EXCHANGE:SYMBOL`` exactly as the master spells it, else ignoring case."""
        return self.by_key.get(key) or self.by_folded.get(key.strip().casefold())

    def suggest(self, key: str, count: int = 3) -> list[str]:
        """Close matches for a key that is not in the master (same exchange first)."""
        exchange, _, symbol = key.strip().casefold().partition(":")
        initial = symbol[:1]
        same = [k for k in self.by_folded if k.startswith(f"{exchange}:{initial}")]
        pool = same or [k for k in self.by_folded if k.partition(":")[2].startswith(initial)]
        matches = difflib.get_close_matches(key.strip().casefold(), pool, n=count, cutoff=0.6)
        return [self.by_folded[m].key for m in matches]


async def fetch_master(source: str, timeout: float) -> bytes:
    """The raw master from an http(s) URL or a file path."""
    if source.startswith(("http://", "https://")):
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=max(timeout, 60))) as session,
                session.get(source, ssl=True) as response,  # https://: the certificate is verified, always
            ):
                response.raise_for_status()
                return await response.read()
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise InstrumentError(f"cannot download the instrument master from {source}: {exc}") from None
    try:
        return await asyncio.to_thread(Path(source).read_bytes)
    except OSError as exc:
        raise InstrumentError(f"cannot read the instrument master {source}: {exc.strerror}") from None


async def load_instruments(source: str, timeout: float, cache: str = "") -> InstrumentIndex:
    """The master from ``source``; saved to ``cache``, and read from it when ``source`` fails."""
    try:
        raw = await fetch_master(source, timeout)
        index = InstrumentIndex(parse_master(raw))
    except InstrumentError as exc:
        if not cache or not Path(cache).is_file():
            raise
        log.warning("%s; using the cached copy %s", exc, cache)
        return InstrumentIndex(parse_master(await fetch_master(cache, timeout)))
    if cache:
        try:
            await asyncio.to_thread(_save, Path(cache), raw)
        except OSError as exc:
            log.warning("cannot keep a copy of the instrument master in %s: %s", cache, exc.strerror)
    return index


def _save(path: Path, raw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(raw)
    os.replace(partial, path)  # readers never see half a file


async def publish_index(client: aioredis.Redis, index: InstrumentIndex, chunk: int = 2000) -> None:
    """Replace ``angelstream:instruments`` and ``angelstream:tokens`` atomically (build aside, then RENAME)."""
    staging_rows, staging_tokens = keys.staging(keys.INSTRUMENTS), keys.staging(keys.TOKENS)
    await client.delete(staging_rows, staging_tokens)
    batch = list(index)
    for start in range(0, len(batch), chunk):
        part = batch[start : start + chunk]
        pipe = client.pipeline(transaction=False)
        pipe.hset(staging_rows, mapping={i.key: json.dumps(i.to_row(), separators=(",", ":")) for i in part})
        pipe.hset(staging_tokens, mapping={keys.token_field(i.exchange, i.token): i.key for i in part})
        await pipe.execute()
    pipe = client.pipeline(transaction=True)
    pipe.rename(staging_rows, keys.INSTRUMENTS)
    pipe.rename(staging_tokens, keys.TOKENS)
    await pipe.execute()


def generate_master(count: int, seed: int = 1) -> list[Instrument]:
    """A synthetic NSE cash master of ``count`` instruments (load tests, benchmarks)."""
    rng = random.Random(seed)
    return [
        Instrument(
            token=str(100_000 + i),
            symbol=f"SYM{i:05d}-EQ",
            exchange="NSE",
            exchange_type=1,
            name=f"SYM{i:05d}",
            lot_size=1,
            tick_size=Decimal(rng.choice((1, 5, 10))),
        )
        for i in range(count)
    ]
