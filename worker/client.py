"""Talking to the worker through Redis, from Python: read ticks, send commands, follow the streams.

* :func:`get_latest_ticks` — the newest ticks of one symbol (``XREVRANGE``), typed.
* :func:`send_command` — a command on ``angelstream:control``, and the worker's answer to it from
  ``angelstream:events`` (matched by ``request_id``).
* :func:`search_instruments` — look a symbol up in the instrument index the worker keeps in Redis.
* :class:`WebSocketDataStream` — subscribe through the worker and get every new tick in a callback,
  from one background thread that follows the streams with a blocking ``XREAD``.

Every failure is a :class:`ClientError` whose message is one line fit for a user.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker import keys
from worker.schema import Tick, parse_entry
from worker.settings import RedisSettings

log = logging.getLogger(__name__)

#: The event types that answer a command.
ANSWERS = ("command_accepted", "command_error")

Entry = tuple[bytes | str, dict[Any, Any]]


class ClientError(Exception):
    """Something this module could not do; the message is one line, fit to show a user."""


class RedisUnavailableError(ClientError, redis.ConnectionError):
    """Redis cannot be reached (also a ``redis.ConnectionError``, as before this module wrapped it)."""


class RedisCommandError(ClientError, redis.RedisError):
    """Redis answered a request with an error (e.g. a key of the wrong type)."""


class NoWorkerError(ClientError):
    """No worker received the command."""


class CommandTimeoutError(NoWorkerError):
    """A worker received the command but no answer came in time."""


class CommandRejected(ClientError):
    """The worker refused the command; the message is the worker's error text."""

    def __init__(self, message: str, request_id: str = "") -> None:
        super().__init__(message)
        self.request_id = request_id


class NotIndexedError(ClientError):
    """The instrument index is not in Redis (yet)."""


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


@contextmanager
def _redis_errors() -> Iterator[None]:
    """Redis' exceptions, as :class:`ClientError` with a one-line message."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnavailableError(
            f"cannot reach Redis ({_one_line(exc)}): is it running, and is REDIS_URL right?"
        ) from exc
    except redis.RedisError as exc:
        raise RedisCommandError(f"Redis refused the request: {_one_line(exc)}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _new_client(redis_url: str | None) -> redis.Redis:
    """A client for ``redis_url`` (``REDIS_URL`` if None): fails fast, one immediate retry."""
    url = RedisSettings().redis_url if redis_url is None else redis_url
    try:
        return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10, retry=Retry(NoBackoff(), 1))
    except ValueError as exc:
        raise ClientError(f"REDIS_URL is invalid: {_one_line(exc)}") from None


def open_redis(redis_url: str | None = None) -> redis.Redis:
    """A client for ``redis_url`` (``REDIS_URL`` if None) that has answered a PING; the caller closes it."""
    client = _new_client(redis_url)
    try:
        with _redis_errors():
            client.ping()
    except ClientError:
        client.close()
        raise
    return client


def _client(client: redis.Redis | None) -> redis.Redis:
    return client if client is not None else _new_client(None)


def _last_ids(client: redis.Redis, streams: Sequence[str]) -> dict[str, str]:
    """The ID of each stream's newest entry ("0-0" for an empty or missing stream): XREAD after it sees only newer."""
    pipe = client.pipeline(transaction=False)
    for stream in streams:
        pipe.xrevrange(stream, count=1)
    replies: list[list[Entry]] = pipe.execute()
    return {stream: _text(reply[0][0]) if reply else "0-0" for stream, reply in zip(streams, replies, strict=True)}


def get_latest_ticks(symbol: str, exchange: str, count: int = 10, client: redis.Redis | None = None) -> list[Tick]:
    """The newest ``count`` ticks of ``EXCHANGE:SYMBOL``, newest first (``REDIS_URL`` unless ``client``)."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    conn = _client(client)
    try:
        with _redis_errors():
            entries: list[Entry] = conn.xrevrange(keys.ticks(exchange, symbol), count=count)  # type: ignore[assignment]
    finally:
        if client is None:
            conn.close()
    return [parse_entry(entry_id, fields) for entry_id, fields in entries]


# --------------------------------------------------------------------------- commands


def _send_command(
    client: redis.Redis, action: str, symbols: Sequence[str], mode: str, timeout: float
) -> dict[str, str]:
    request_id = str(uuid.uuid4())
    body = json.dumps({"action": action, "symbols": list(symbols), "mode": mode, "request_id": request_id})
    position = _last_ids(client, [keys.EVENTS])[keys.EVENTS]  # the answer can only come after this
    deadline = time.monotonic() + timeout
    receivers = client.publish(keys.CONTROL, body)
    if receivers == 0:
        raise NoWorkerError(f"no worker is listening on {keys.CONTROL}: start `angelstream run`")
    while (remaining := deadline - time.monotonic()) > 0:
        block = max(1, min(1000, int(remaining * 1000)))  # chunks: stays well under any socket timeout
        reply: list[tuple[Any, list[Entry]]] = client.xread({keys.EVENTS: position}, count=100, block=block)  # type: ignore[assignment]
        for _, entries in reply:
            for entry_id, fields in entries:
                position = _text(entry_id)
                event = {_text(k): _text(v) for k, v in fields.items()}
                if event.get("request_id") == request_id and event.get("type") in ANSWERS:
                    if event["type"] == "command_error":
                        raise CommandRejected(event.get("error", "the worker refused the command"), request_id)
                    return event
    raise CommandTimeoutError(
        f"no answer from the worker within {timeout:g} s (request {request_id}): "
        f"is `angelstream run` healthy? see its events in {keys.EVENTS}"
    )


def send_command(
    client: redis.Redis, action: str, symbols: Sequence[str], mode: str = "ltp", timeout: float = 5.0
) -> dict[str, str]:
    """Publish a command on ``angelstream:control`` and wait for the worker's answer.

    Returns the ``command_accepted`` event (``request_id``, ``action``, ``symbols`` and ``tokens`` as
    JSON, ``mode``, ``type``, ``ts``). Raises :class:`CommandRejected` with the worker's error text,
    :class:`NoWorkerError` if no worker listens, :class:`CommandTimeoutError` if none answers within
    ``timeout`` seconds, :class:`RedisUnavailableError` if Redis cannot be reached.
    """
    with _redis_errors():
        return _send_command(client, action, symbols, mode, timeout)


# --------------------------------------------------------------------------- the instrument index


def _row(value: bytes | str) -> dict[str, str] | None:
    try:
        row = json.loads(value)
    except ValueError:
        return None
    return {str(k): str(v) for k, v in row.items()} if isinstance(row, dict) else None


def search_instruments(client: redis.Redis, text: str, exchange: str | None = None) -> list[tuple[str, dict[str, str]]]:
    """Instruments whose symbol or name contains ``text`` (any case), as (``EXCHANGE:SYMBOL``, master row).

    Exact symbol matches come first, then symbols starting with ``text``, then the rest; shorter
    symbols first within each. ``exchange`` keeps one exchange only. Reads the hash
    ``angelstream:instruments`` in chunks (``HSCAN``), so a full master never blocks Redis.
    Raises :class:`NotIndexedError` if the worker has not written the index yet.
    """
    wanted = text.strip().casefold()
    found: list[tuple[str, dict[str, str]]] = []
    with _redis_errors():
        if not client.hlen(keys.INSTRUMENTS):
            raise NotIndexedError(
                f"the worker has not indexed the instrument master yet ({keys.INSTRUMENTS} is empty): "
                "start `angelstream run` and try again once it has loaded the master"
            )
        for field, value in client.hscan_iter(keys.INSTRUMENTS, count=1000):
            key = _text(field)
            row = _row(value)
            if row is None or (exchange and key.partition(":")[0].casefold() != exchange.casefold()):
                continue
            if wanted in row.get("symbol", "").casefold() or wanted in row.get("name", "").casefold():
                found.append((key, row))

    def rank(item: tuple[str, dict[str, str]]) -> tuple[bool, bool, int, str]:
        symbol = item[1].get("symbol", "").casefold()
        return symbol != wanted, not symbol.startswith(wanted), len(symbol), item[0]

    return sorted(found, key=rank)


@dataclass(frozen=True)
class WorkerStatus:
    """What ``angelstream:heartbeat`` and ``angelstream:state`` say (see worker.status)."""

    heartbeat: dict[str, Any] | None  # None: no worker is running (the key expired)
    states: dict[str, dict[str, Any]]  # EXCHANGE:SYMBOL → {"state", "mode", "token", "since", "last_tick", "reason"}
    desired: dict[str, str]  # the subscriptions hash: EXCHANGE:SYMBOL → mode


def get_status(client: redis.Redis) -> WorkerStatus:
    """The worker's heartbeat, each subscription's state and the desired set, read in one round trip."""
    with _redis_errors():
        pipe = client.pipeline(transaction=False)
        pipe.get(keys.HEARTBEAT)
        pipe.hgetall(keys.STATE)
        pipe.hgetall(keys.SUBSCRIPTIONS)
        beat, states, desired = pipe.execute()
    parsed = {_text(k): _json_object(v) for k, v in states.items()}
    return WorkerStatus(
        _json_object(beat) if beat is not None else None,
        {k: v for k, v in parsed.items() if v},
        {_text(k): _text(v) for k, v in desired.items()},
    )


def _json_object(value: bytes | str) -> dict[str, Any]:
    """A JSON object, or {} for anything else (a reader never fails on one bad value)."""
    try:
        found = json.loads(value)
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


# --------------------------------------------------------------------------- following the streams


def _ignore(tick: Tick) -> None:
    """The callback when none is given: ticks are only counted."""


class WebSocketDataStream:
    """Live ticks from the worker's streams, delivered to ``on_tick_callback`` from one background thread.

    The name is the seed project's; the data comes from Redis, where the worker writes it. ::

        with WebSocketDataStream(on_tick_callback=print) as stream:   # REDIS_URL
            stream.subscribe([("SBIN-EQ", "NSE"), ("INFY-EQ", "NSE")], mode="quote")
            ...

    * :meth:`subscribe` asks the worker to subscribe (and raises if it refuses), then delivers every
      tick written to those streams from the moment it was called, each once, in stream order.
    * The reader thread uses a connection of its own for its blocking ``XREAD``; subscription changes
      apply within ``block_ms``. A callback that raises is logged and counted in
      :attr:`callback_errors`, and delivery goes on. When Redis goes away the reader retries with a
      capped backoff (counted in :attr:`redis_errors`) and resumes after the last tick it delivered.
    * Every method may be called from any thread (also from the callback).
    * ``client``: use that client (its pool also lends the reader its connection) instead of one for
      ``redis_url`` (``REDIS_URL`` if None); its socket timeout must exceed ``block_ms``.

    Counters: :attr:`delivered` (ticks handed to the callback), :attr:`callback_errors`,
    :attr:`bad_entries` (stream entries that are not ticks, skipped) and :attr:`redis_errors`.
    """

    #: Reconnect backoff of the reader, seconds: doubles from the first value up to the cap.
    retry_initial: float = 0.05
    retry_max: float = 2.0
    #: Most entries per stream taken by one XREAD.
    batch: int = 500

    def __init__(
        self,
        redis_url: str | None = None,
        on_tick_callback: Callable[[Tick], None] | None = None,
        *,
        client: redis.Redis | None = None,
        mode: str = "ltp",
        block_ms: int = 200,
    ) -> None:
        if block_ms <= 0:
            raise ValueError(f"block_ms must be positive, got {block_ms}")
        self._owns_client = client is None
        self._client = _new_client(redis_url) if client is None else client
        self.on_tick_callback = on_tick_callback or _ignore
        self.mode = mode
        self.block_ms = block_ms
        self._lock = threading.Lock()
        self._positions: dict[str, str] = {}  # EXCHANGE:SYMBOL → ID of the last tick delivered (or seen)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._reader: redis.Redis | None = None
        self.delivered = 0
        self.callback_errors = 0
        self.bad_entries = 0
        self.redis_errors = 0

    # ------------------------------------------------------------------ life

    def connect(self) -> WebSocketDataStream:
        """Check that Redis answers and start the reader thread (once; again after :meth:`disconnect`)."""
        with self._lock:
            if self._thread is not None:
                return self
            with _redis_errors():
                self._client.ping()
                # One connection of the client's pool, held by the reader alone for its blocking XREADs.
                self._reader = redis.Redis(connection_pool=self._client.connection_pool, single_connection_client=True)
            self._stop = threading.Event()  # a new one: a reader still stopping keeps its own, set
            self._thread = threading.Thread(
                target=self._run, args=(self._reader, self._stop), name="angelstream-stream", daemon=True
            )
            self._thread.start()
            return self

    def disconnect(self) -> None:
        """Stop and join the reader thread; close the connections this object opened."""
        with self._lock:
            thread, reader, self._thread, self._reader = self._thread, self._reader, None, None
            self._stop.set()
        if thread is not None and thread is not threading.current_thread():  # from the callback: it ends by itself
            thread.join()
        if reader is not None:
            reader.close()
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> WebSocketDataStream:
        return self.connect()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disconnect()

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._thread is not None

    @property
    def subscriptions(self) -> frozenset[str]:
        """The ``EXCHANGE:SYMBOL`` keys being followed."""
        with self._lock:
            return frozenset(self._positions)

    # ------------------------------------------------------------------ subscriptions

    def subscribe(
        self, symbols: Iterable[tuple[str, str]], mode: str | None = None, *, timeout: float = 5.0
    ) -> dict[str, str]:
        """Subscribe ``[(symbol, exchange), …]`` through the worker; their new ticks go to the callback.

        Returns the worker's ``command_accepted`` answer. Raises :class:`CommandRejected` (nothing is
        subscribed then), :class:`NoWorkerError`, :class:`CommandTimeoutError` or
        :class:`RedisUnavailableError`. A symbol already followed keeps its place in its stream.
        """
        wanted = [f"{exchange}:{symbol}" for symbol, exchange in symbols]
        with _redis_errors():
            start = _last_ids(self._client, [keys.ticks_for(key) for key in wanted])  # "now", before the worker acts
            answer = _send_command(self._client, "subscribe", wanted, mode or self.mode, timeout)
            accepted: list[str] = json.loads(answer["symbols"])
            # The worker names each instrument as the master spells it (nse:sbin-eq → NSE:SBIN-EQ).
            respelled = [keys.ticks_for(key) for key in accepted if keys.ticks_for(key) not in start]
            start |= _last_ids(self._client, respelled)
        with self._lock:
            for key in accepted:
                self._positions.setdefault(key, start[keys.ticks_for(key)])
        return answer

    def unsubscribe(self, symbols: Iterable[tuple[str, str]], *, timeout: float = 5.0) -> dict[str, str]:
        """Stop delivering ``[(symbol, exchange), …]`` (at once, whatever the worker says) and unsubscribe them.

        A callback already running may finish; no other tick of those symbols is delivered after
        this returns. Returns the worker's answer; raises as :meth:`subscribe`.
        """
        wanted = [f"{exchange}:{symbol}" for symbol, exchange in symbols]
        folded = {key.casefold() for key in wanted}
        with self._lock:
            for key in [key for key in self._positions if key.casefold() in folded]:
                del self._positions[key]
        with _redis_errors():
            return _send_command(self._client, "unsubscribe", wanted, self.mode, timeout)

    def get_latest_ticks(self, symbol: str, exchange: str, count: int = 10) -> list[Tick]:
        """The newest ``count`` ticks of ``EXCHANGE:SYMBOL``, newest first."""
        return get_latest_ticks(symbol, exchange, count, client=self._client)

    # ------------------------------------------------------------------ the reader thread

    def _run(self, reader: redis.Redis, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            with self._lock:
                followed = dict(self._positions)
            if not followed:
                stop.wait(self.block_ms / 1000)
                continue
            streams = {keys.ticks_for(key): key for key in followed}
            try:
                reply: list[tuple[Any, list[Entry]]] = reader.xread(  # type: ignore[assignment]
                    {stream: followed[key] for stream, key in streams.items()}, count=self.batch, block=self.block_ms
                )
            except (redis.RedisError, OSError) as exc:
                failures += 1
                delay = min(self.retry_max, self.retry_initial * 2 ** min(failures - 1, 30))
                with self._lock:
                    self.redis_errors += 1
                log.warning("stream reader: redis unavailable (%s); retrying in %.2f s", _one_line(exc), delay)
                stop.wait(delay)
                continue
            failures = 0
            for stream, entries in reply:
                key = streams[_text(stream)]
                self._deliver(key, followed[key], entries, stop)

    def _deliver(self, key: str, position: str, entries: list[Entry], stop: threading.Event) -> None:
        """Entries of one stream, in order, while the stream is still followed from ``position``."""
        for entry_id, fields in entries:
            with self._lock:
                if stop.is_set() or self._positions.get(key) != position:
                    return  # disconnected, or unsubscribed (perhaps subscribed again) since the read
                position = self._positions[key] = _text(entry_id)
            try:
                tick = parse_entry(entry_id, fields)
            except (KeyError, ValueError, TypeError, ArithmeticError) as exc:
                with self._lock:
                    self.bad_entries += 1
                log.warning("stream reader: skipped malformed entry %s of %s: %s", position, key, _one_line(exc))
                continue
            try:
                self.on_tick_callback(tick)
            except Exception:
                with self._lock:
                    self.callback_errors += 1
                log.exception("stream reader: on_tick_callback raised for %s %s", key, position)
            with self._lock:
                self.delivered += 1
