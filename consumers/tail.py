"""``angelstream tail``: follow tick streams live, as a table or as JSON lines.

::

    python -m consumers.tail NSE:SBIN-EQ "NSE:Nifty 50" CDS:USDINR29DEC26FUT
    python -m consumers.tail --json --from-start --count 100 NSE:SBIN-EQ | jq -r .ltp

It reads ``ticks:{EXCHANGE}:{SYMBOL}`` (docs/streams.md) with a blocking ``XREAD`` from the Redis
at ``REDIS_URL`` (environment or ``.env``). Only ticks written after it starts, unless
``--from-start``.

* The table has one row per symbol: the last price (green when it rose since the previous tick, red
  when it fell), the change since the first tick seen, the day's volume, the best bid and ask
  (snap_quote), the exchange time in IST and the ticks seen.
* ``--json`` prints each tick as one JSON object per line (flushed), ``id`` first, then every field
  in stream order: integers as numbers, prices and other decimals as their exact strings, ``bids``
  and ``asks`` as ``[{"price", "qty", "orders"}, …]``, unknown fields as strings. The same shape as
  ``consumers/node/consume.js``.

:func:`main` returns the exit code: 0 when done (``--count``) or on Ctrl-C, 1 after an error (one
line on stderr), 2 for bad usage. ``angelstream tail`` calls it with the rest of its arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from worker import keys
from worker.schema import SCHEMA_VERSION, Tick, parse_entry
from worker.settings import RedisSettings

IST = timezone(timedelta(hours=5, minutes=30), "IST")  # India keeps no daylight saving time

#: Longest single blocking XREAD, ms (it is repeated; the socket timeout is well above it).
BLOCK_MS = 1000
#: Most entries per stream taken by one XREAD.
BATCH = 500

#: Fields that are integers; ``bids``/``asks`` are levels; every other field is kept as its string.
INT_FIELDS = frozenset({"seq", "exch_ts", "recv_ts", "ltq", "volume", "ltt", "oi"})
LEVEL_FIELDS = frozenset({"bids", "asks"})

_KEY = re.compile(r"[^:\s]+:\S.*")

Fields = dict[str, str]


class TailError(Exception):
    """Something that ends the tail; the message is one line fit for a user."""


# --------------------------------------------------------------------------- one entry


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


#: The smallest valid entry (every field an entry must have): a field that fails to parse in it alone is malformed.
_MINIMAL: Fields = {
    "v": SCHEMA_VERSION, "token": "1", "exchange": "X", "symbol": "X", "mode": "ltp",
    "seq": "0", "exch_ts": "0", "ltp": "0.00", "recv_ts": "0",
}  # fmt: skip
_PARSE_ERRORS = (ValueError, ArithmeticError, TypeError)


def _parses(fields: Fields) -> bool:
    try:
        parse_entry("0-0", fields)
    except _PARSE_ERRORS:
        return False
    return True


def read_tick(stream: str, entry_id: str, fields: Fields) -> Tick:
    """``fields`` typed; :class:`TailError` naming the entry if it is not a tick of a known schema version."""
    missing = [name for name in _MINIMAL if name not in fields]
    if missing:
        raise TailError(f"{stream} entry {entry_id} is not a tick: missing {', '.join(missing)}")
    if fields["v"] != SCHEMA_VERSION:
        raise TailError(
            f"{stream} entry {entry_id}: schema version {fields['v']!r} is not {SCHEMA_VERSION}, "
            "the one this reader knows"
        )
    try:
        return parse_entry(entry_id, fields)
    except _PARSE_ERRORS:
        bad = [f"{name}={value!r}" for name, value in fields.items() if not _parses(_MINIMAL | {name: value})]
        raise TailError(f"{stream} entry {entry_id} is not a tick: malformed {', '.join(bad)}") from None


def as_json(entry_id: str, fields: Fields) -> dict[str, Any]:
    """One entry (already checked by :func:`read_tick`) as a JSON object: exact decimal strings, int ints."""
    out: dict[str, Any] = {"id": entry_id}
    for name, value in fields.items():
        if name in INT_FIELDS:
            out[name] = int(value)
        elif name in LEVEL_FIELDS:
            levels = json.loads(value, parse_float=str, parse_int=str)
            out[name] = [{"price": price, "qty": int(qty), "orders": int(orders)} for price, qty, orders in levels]
        else:
            out[name] = value
    return out


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    """What the table shows for one symbol."""

    key: str
    last: Tick | None = None
    previous: Decimal | None = None  # the ltp before the last tick
    first: Decimal | None = None  # the ltp of the first tick seen
    seen: int = 0

    def add(self, tick: Tick) -> None:
        self.previous = None if self.last is None else self.last.ltp
        self.first = tick.ltp if self.first is None else self.first
        self.last = tick
        self.seen += 1


def _style(change: Decimal) -> str:
    return "green" if change > 0 else "red" if change < 0 else ""


def _ltp(row: Row, tick: Tick) -> Text:
    change = Decimal(0) if row.previous is None else tick.ltp - row.previous
    arrow = " ▲" if change > 0 else " ▼" if change < 0 else "  "
    return Text(f"{tick.ltp}{arrow}", style=_style(change))


def _change(row: Row, tick: Tick) -> Text:
    first = cast(Decimal, row.first)
    change = tick.ltp - first
    percent = f" ({change * 100 / first:+.2f} %)" if first else ""
    return Text(f"{change:+f}{percent}", style=_style(change))


def _best(levels: tuple[tuple[Decimal, int, int], ...] | None) -> str:
    return f"{levels[0][0]} × {levels[0][1]:,}" if levels else "—"


def ist_time(epoch_ms: int) -> str:
    """Epoch milliseconds as IST wall time, ``HH:MM:SS.mmm``."""
    when = datetime.fromtimestamp(epoch_ms // 1000, IST).replace(microsecond=epoch_ms % 1000 * 1000)
    return when.strftime("%H:%M:%S.%f")[:-3]


def render(rows: Sequence[Row]) -> Table:
    """The table of the latest tick of each symbol."""
    table = Table(title="angelstream tail (Ctrl-C to stop)", caption="exchange time in IST (UTC+05:30)")
    for column in ("symbol", "mode", "ltp", "change", "volume", "bid", "ask", "exch time", "ticks"):
        table.add_column(column, justify="left" if column in ("symbol", "mode") else "right", no_wrap=True)
    for row in rows:
        tick = row.last
        if tick is None:
            table.add_row(row.key, "", "waiting…", "", "", "", "", "", "0")
            continue
        table.add_row(
            row.key, tick.mode, _ltp(row, tick), _change(row, tick),
            "—" if tick.volume is None else f"{tick.volume:,}", _best(tick.bids), _best(tick.asks),
            ist_time(tick.exch_ts), f"{row.seen:,}",
        )  # fmt: skip
    return table


# --------------------------------------------------------------------------- reading


def _positions(client: redis.Redis, streams: Sequence[str], from_start: bool) -> dict[str, str]:
    """Where each stream is read from: its start, or its newest entry now (so no XREAD "$" misses any)."""
    if from_start:
        return dict.fromkeys(streams, "0-0")
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xrevrange(stream, count=1)
    replies: list[list[tuple[bytes, Any]]] = pipe.execute()
    return {stream: _text(reply[0][0]) if reply else "0-0" for stream, reply in zip(streams, replies, strict=True)}


def _check_known(client: redis.Redis, wanted: Sequence[str]) -> None:
    """If the worker indexed the instrument master, a symbol must be in it (or at least have a stream)."""
    if not client.exists(keys.INSTRUMENTS):
        return  # no worker has run here yet: wait for the streams
    pipe = client.pipeline(transaction=False)
    for key in wanted:
        pipe.hexists(keys.INSTRUMENTS, key)
        pipe.exists(keys.ticks_for(key))
    found: list[Any] = pipe.execute()
    unknown = [key for n, key in enumerate(wanted) if not found[2 * n] and not found[2 * n + 1]]
    if unknown:
        raise TailError(
            f"not in the instrument master ({keys.INSTRUMENTS}) and no stream: {', '.join(unknown)} "
            "(names are case-sensitive; find one with `angelstream search TEXT`)"
        )


def follow(
    client: redis.Redis, positions: dict[str, str], count: int | None
) -> Iterator[list[tuple[str, str, Fields]]]:
    """Batches of new entries (stream, ID, fields), in stream order, until ``count`` entries in all."""
    left = count
    asked: dict[Any, Any] = positions  # the same dict: each XREAD asks from the last entry seen
    while left is None or left > 0:
        batch = BATCH if left is None else min(BATCH, left)
        reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]] = client.xread(  # type: ignore[assignment]
            asked, count=batch, block=BLOCK_MS
        )
        out: list[tuple[str, str, Fields]] = []
        for raw_stream, entries in reply:
            stream = _text(raw_stream)
            for raw_id, raw_fields in entries:
                positions[stream] = entry_id = _text(raw_id)
                out.append((stream, entry_id, {_text(k): _text(v) for k, v in raw_fields.items()}))
        if left is not None:
            out = out[:left]  # XREAD's COUNT is per stream
            left -= len(out)
        if out:
            yield out


# --------------------------------------------------------------------------- the command


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Follow the tick streams ticks:{EXCHANGE}:{SYMBOL} in Redis (REDIS_URL) live: a table with one row "
            "per symbol, or with --json one JSON object per tick and line. Ctrl-C stops."
        ),
    )
    parser.add_argument("symbols", nargs="+", metavar="EXCHANGE:SYMBOL", help="e.g. NSE:SBIN-EQ 'NSE:Nifty 50'")
    parser.add_argument("--json", action="store_true", help="one JSON object per tick per line, every field")
    parser.add_argument("--from-start", action="store_true", help="every tick still in the streams first")
    parser.add_argument("--count", type=_positive, metavar="N", help="stop after N ticks in all")
    return parser


def _fail(message: str) -> int:
    print(f"tail: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _write_json(batches: Iterator[list[tuple[str, str, Fields]]]) -> None:
    for batch in batches:
        for stream, entry_id, fields in batch:
            read_tick(stream, entry_id, fields)
            sys.stdout.write(json.dumps(as_json(entry_id, fields), ensure_ascii=False, separators=(",", ":")) + "\n")
            sys.stdout.flush()


def _show_table(batches: Iterator[list[tuple[str, str, Fields]]], wanted: Sequence[str], console: Console) -> None:
    rows = {keys.ticks_for(key): Row(key) for key in wanted}
    with Live(render(list(rows.values())), console=console, refresh_per_second=8) as live:
        for batch in batches:
            for stream, entry_id, fields in batch:
                rows[stream].add(read_tick(stream, entry_id, fields))
            live.update(render(list(rows.values())))


def _quiet_stdout() -> None:
    """After the reader of our stdout went away (``| head``): no error when Python flushes it at exit."""
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def main(argv: Sequence[str] | None = None, *, prog: str = "angelstream tail", console: Console | None = None) -> int:
    """Run the tail; returns the exit code. ``console``: where the table goes (a new one on stdout if None)."""
    try:
        args = _parser(prog).parse_args(argv)
    except SystemExit as exc:
        return 0 if not exc.code else 2  # --help, or a usage error argparse already printed
    wanted = list(dict.fromkeys(args.symbols))
    for key in wanted:
        if not _KEY.fullmatch(key):
            return _fail(f"{key!r} is not EXCHANGE:SYMBOL (e.g. NSE:SBIN-EQ)")
    try:
        client = redis.Redis.from_url(
            RedisSettings().redis_url,
            socket_connect_timeout=5,
            socket_timeout=BLOCK_MS / 1000 + 10,
            retry=Retry(NoBackoff(), 1),
        )
    except ValueError as exc:
        return _fail(f"REDIS_URL is invalid: {exc}")
    try:
        with client:
            _check_known(client, wanted)
            positions = _positions(client, [keys.ticks_for(key) for key in wanted], args.from_start)
            batches = follow(client, positions, args.count)
            if args.json:
                _write_json(batches)
            else:
                _show_table(batches, wanted, console or Console())
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        _quiet_stdout()
        return 0
    except TailError as exc:
        return _fail(str(exc))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        return _fail(f"cannot reach Redis ({exc}): is it running, and is REDIS_URL right?")
    except redis.RedisError as exc:
        return _fail(f"Redis refused a request: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m consumers.tail"))
