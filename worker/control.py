"""The control plane: the desired subscriptions live in Redis, and the feed is made to match them.

* ``angelstream:subscriptions`` (hash, field ``EXCHANGE:SYMBOL``, value the mode) is the truth.
* Commands on ``angelstream:control`` (``subscribe``, ``unsubscribe``, ``resync``) are validated,
  applied to the hash, and then to the feed as a diff (never a full resubscribe, never a reconnect).
* Because pub/sub is lossy, the worker also reconciles from the hash at start, whenever the
  pub/sub connection comes back, and every ``reconcile_interval`` seconds, so a client that only
  writes the hash is obeyed too.
* Every command is answered on ``angelstream:events`` with its ``request_id``: accepted (with the
  resolved tokens) or an error naming the problem. A bad command changes nothing.
* Limits: a command is at most ``MAX_COMMAND_BYTES`` and ``MAX_SYMBOLS_PER_COMMAND`` symbols, each
  symbol must be in the instrument master, and a token bucket (``CONTROL_RATE`` commands/s, bursts
  of ``CONTROL_BURST``) bounds how many are applied: every message on the channel spends a token,
  valid or not, and one that finds none is refused (answered, counted, not applied).
* Nothing in a command becomes a Redis key: symbols are resolved to the master's own instruments
  before anything is written, and every key comes from :mod:`worker.keys`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis

from worker import keys
from worker.instruments import Instrument, InstrumentIndex
from worker.schema import MODES_BY_NAME

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 64 * 1024
MAX_SYMBOLS_PER_COMMAND = 3000
ACTIONS = ("subscribe", "unsubscribe", "resync")
#: Defaults of CONTROL_RATE (commands per second, on average) and CONTROL_BURST (commands at once).
CONTROL_RATE = 10.0
CONTROL_BURST = 50

#: apply(want): make the feed serve exactly ``want`` ((exch, token) → mode); returns what did not fit.
Apply = Callable[[dict[tuple[int, str], int]], Awaitable[list[tuple[int, str]]]]
EventSink = Callable[..., None]


class CommandError(ValueError):
    """A command that cannot be applied; the message says what is wrong and how to fix it."""

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


@dataclass(frozen=True)
class Command:
    action: str
    symbols: tuple[str, ...] = ()
    mode: str = "ltp"
    request_id: str = ""


def parse_command(raw: bytes | str) -> Command:
    """Validate a command's shape (symbols are resolved later). Raises :class:`CommandError`."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise CommandError(
            f"command is {len(raw)} bytes; the limit is {MAX_COMMAND_BYTES}: send fewer symbols per command"
        )
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError; RecursionError: [[[[…
        raise CommandError('command is not JSON: send {"action": "subscribe", "symbols": ["NSE:SBIN-EQ"]}') from None
    if not isinstance(body, dict):
        raise CommandError("command must be a JSON object with action, symbols, mode and request_id")
    request_id = body.get("request_id", "")
    if not isinstance(request_id, str) or len(request_id) > 200:
        raise CommandError("request_id must be a string of at most 200 characters")
    action = body.get("action")
    if action not in ACTIONS:
        raise CommandError(f"unknown action {action!r}: use one of {', '.join(ACTIONS)}", request_id)
    if action == "resync":
        return Command("resync", request_id=request_id)
    symbols = body.get("symbols")
    if isinstance(symbols, str):
        symbols = [symbols]
    if not isinstance(symbols, list) or not symbols or not all(isinstance(s, str) and s for s in symbols):
        raise CommandError(
            'symbols must be a non-empty list of "EXCHANGE:SYMBOL" strings, e.g. ["NSE:SBIN-EQ"]', request_id
        )
    if len(symbols) > MAX_SYMBOLS_PER_COMMAND:
        raise CommandError(f"{len(symbols)} symbols in one command; the limit is {MAX_SYMBOLS_PER_COMMAND}", request_id)
    malformed = [s for s in symbols if ":" not in s]
    if malformed:
        raise CommandError(
            f'symbols must look like "EXCHANGE:SYMBOL" (e.g. NSE:SBIN-EQ); got {malformed[:5]}', request_id
        )
    mode = body.get("mode", "ltp")
    if action == "subscribe" and (not isinstance(mode, str) or mode not in MODES_BY_NAME):
        raise CommandError(f"unknown mode {mode!r}: use ltp, quote or snap_quote", request_id)
    return Command(str(action), tuple(dict.fromkeys(symbols)), str(mode), request_id)


class RateLimit:
    """A token bucket: ``burst`` commands at once, then ``rate`` per second on average."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """Spend one token if there is one."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def error(self, request_id: str) -> CommandError:
        return CommandError(
            f"rate limited: more than {self.rate:g} commands/s (bursts of {self.burst}), so this one was not "
            f"applied: batch symbols into one command (up to {MAX_SYMBOLS_PER_COMMAND}) or raise CONTROL_RATE",
            request_id,
        )


@dataclass
class ControlStats:
    commands: int = 0
    errors: int = 0  # commands refused, for any reason
    rate_limited: int = 0  # of which: over the rate limit
    reconciles: int = 0
    pubsub_reconnects: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # key → reason, from the last reconcile


class Control:
    """Runs on the event loop; ``client`` must be created with ``decode_responses=True``."""

    def __init__(
        self,
        client: aioredis.Redis,
        index: InstrumentIndex,
        apply: Apply,
        event: EventSink,
        capacity: int,
        reconcile_interval: float = 30.0,
        limit: RateLimit | None = None,
    ) -> None:
        self.client = client
        self.index = index
        self._apply = apply
        self._event = event
        self.capacity = capacity
        self.reconcile_interval = reconcile_interval
        self.limit = limit or RateLimit(CONTROL_RATE, CONTROL_BURST)
        self.stats = ControlStats()
        self._limited_run = 0  # refusals over the rate limit since the last command let through
        self.live: dict[str, Instrument] = {}  # what the feed serves now, by EXCHANGE:SYMBOL
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ the hash → the feed

    async def reconcile(self) -> None:
        """Read the hash and make the feed match it (diffs only). Bad entries are reported and skipped."""
        async with self._lock:
            raw: dict[str, str] = await self.client.hgetall(keys.SUBSCRIPTIONS)  # type: ignore[assignment]
            want: dict[tuple[int, str], int] = {}
            by_wire: dict[tuple[int, str], Instrument] = {}
            rejected: dict[str, str] = {}
            for key, mode_name in sorted(raw.items()):
                inst = self.index.resolve(key)
                mode = MODES_BY_NAME.get(mode_name)
                if inst is None:
                    rejected[key] = "unknown symbol"
                elif mode is None:
                    rejected[key] = f"unknown mode {mode_name!r}"
                else:
                    want[(inst.exchange_type, inst.token)] = mode
                    by_wire[(inst.exchange_type, inst.token)] = inst
            for wire in await self._apply(want):
                rejected[by_wire[wire].key] = "capacity exceeded"
                del by_wire[wire]
            self.live = {inst.key: inst for inst in by_wire.values()}
            self.stats.reconciles += 1
            for key, reason in rejected.items():
                if self.stats.rejected.get(key) != reason:
                    self._event("subscription_rejected", symbol=key, reason=reason)
            self.stats.rejected = rejected

    # ------------------------------------------------------------------ commands

    async def handle(self, raw: bytes | str) -> None:
        """Apply one command and answer it on the events stream."""
        self.stats.commands += 1
        allowed = self.limit.take()
        if allowed and self._limited_run:
            log.info("control: accepting commands again after %d refused over the rate limit", self._limited_run)
            self._limited_run = 0
        try:
            command = parse_command(raw)  # even over the limit: bounded, and it finds the request_id to answer
            if not allowed:
                raise self.limit.error(command.request_id)
            answer = await self._execute(command)
        except CommandError as exc:
            self._refuse(exc if allowed else self.limit.error(exc.request_id), limited=not allowed)
            return
        self._event("command_accepted", **answer)

    def _refuse(self, error: CommandError, limited: bool) -> None:
        self.stats.errors += 1
        if not limited:
            log.info("command refused: %s", error)
        else:
            self.stats.rate_limited += 1
            self._limited_run += 1
            if self._limited_run == 1:  # one line per flood, not one per command
                log.warning("control: %s (each refusal is answered and counted; not logged again)", error)
        self._event("command_error", request_id=error.request_id, error=str(error))

    def _resolve(self, symbols: tuple[str, ...], request_id: str) -> list[Instrument]:
        found: list[Instrument] = []
        unknown: list[str] = []
        for symbol in symbols:
            inst = self.index.resolve(symbol)
            if inst is None:
                unknown.append(symbol)
            else:
                found.append(inst)
        if unknown:
            hints = []
            for symbol in unknown[:5]:
                close = self.index.suggest(symbol)
                hints.append(f"{symbol} (did you mean {', '.join(close)}?)" if close else symbol)
            raise CommandError(f"not in the instrument master: {'; '.join(hints)}", request_id)
        return found

    async def _execute(self, command: Command) -> dict[str, str]:
        answer = {"request_id": command.request_id, "action": command.action}
        if command.action == "resync":
            await self.reconcile()
            return answer | {"symbols": str(len(self.live))}
        instruments = self._resolve(command.symbols, command.request_id)
        fields = {inst.key: command.mode for inst in instruments}
        if command.action == "subscribe":
            current = set(await self.client.hkeys(keys.SUBSCRIPTIONS))
            total = len(current | set(fields))
            if total > self.capacity:
                raise CommandError(
                    f"capacity exceeded: {total} symbols would be subscribed; at most {self.capacity} fit "
                    "(connections × 1000 tokens per client code): unsubscribe some first",
                    command.request_id,
                )
            await self.client.hset(keys.SUBSCRIPTIONS, mapping=fields)  # type: ignore[arg-type]
        else:
            await self.client.hdel(keys.SUBSCRIPTIONS, *fields)
        await self.reconcile()
        tokens = {inst.key: inst.token for inst in instruments}
        return answer | {"symbols": json.dumps(list(tokens)), "tokens": json.dumps(tokens), "mode": command.mode}

    # ------------------------------------------------------------------ the loop

    async def run(self, retry_max: float = 5.0) -> None:
        """Listen for commands for ever; reconcile at (re)start and periodically."""
        failures = 0
        while True:
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.CONTROL)
                await self.reconcile()
                failures = 0
                next_reconcile = asyncio.get_running_loop().time() + self.reconcile_interval
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        await self.handle(message["data"])
                    if asyncio.get_running_loop().time() >= next_reconcile:
                        await self.reconcile()
                        next_reconcile = asyncio.get_running_loop().time() + self.reconcile_interval
            except (redis.RedisError, OSError) as exc:
                failures += 1
                self.stats.pubsub_reconnects += 1
                delay = min(retry_max, 0.1 * 2 ** min(failures, 30))  # capped: 2**1024 overflows a float
                log.warning("control: redis unavailable (%s); retrying in %.1f s", type(exc).__name__, delay)
                await asyncio.sleep(delay)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
