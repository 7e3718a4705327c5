"""Subscription state and worker health, kept in Redis so any language (and ``angelstream status``) can read them.

* ``angelstream:state`` (hash): per ``EXCHANGE:SYMBOL`` a JSON object with ``state``:
  ``pending`` (subscribed, no tick yet), ``live`` (ticking; ``last_tick`` is the last receive
  time), ``stale`` (no tick for ``stale_after`` seconds) or ``rejected`` (with ``reason``), plus
  ``mode``, ``token`` and ``since`` (when it entered that state), times in epoch ms.
* ``angelstream:heartbeat`` (string with a TTL of a few intervals): the worker's health as JSON.
  If the key is missing, no worker is running.

Runs on the worker's event loop beside the control plane, never on the data path: the data path
only records the receive time of each instrument's last packet in a dict.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import redis.asyncio as aioredis

from worker import keys
from worker.schema import MODE_NAMES

if TYPE_CHECKING:
    from worker.app import Worker
    from worker.feed import FeedConnection

log = logging.getLogger(__name__)

STATES = ("pending", "live", "stale", "rejected")
LAST_TICK_RESOLUTION_MS = 10_000
CHUNK = 200  # symbols serialized and written per step, so the event loop is never held long
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


@dataclass
class SymbolState:
    state: str
    mode: str = ""
    token: str = ""
    since: int = 0  # epoch ms
    last_tick: int | None = None  # epoch ms
    reason: str = ""

    def signature(self) -> tuple[str, str, str, int, int | None, str]:
        """What :meth:`to_json` depends on: equal signatures, equal JSON."""
        last = None if self.last_tick is None else self.last_tick - self.last_tick % LAST_TICK_RESOLUTION_MS
        return (self.state, self.mode, self.token, self.since, last, self.reason)

    def to_json(self) -> str:
        """Compact JSON without empty fields; ``last_tick`` to the 10 s, so a live symbol is rewritten
        every 10 s, not every interval (the stream itself holds each tick's exact time)."""
        out: dict[str, str | int] = {"state": self.state}
        if self.mode:
            out["mode"] = self.mode
        if self.token:
            out["token"] = self.token
        out["since"] = self.since
        if self.last_tick is not None:
            out["last_tick"] = self.last_tick - self.last_tick % LAST_TICK_RESOLUTION_MS
        if self.reason:
            out["reason"] = self.reason
        return _ENCODE(out)


class Status:
    def __init__(self, client: aioredis.Redis, worker: Worker, interval: float, stale_after: float) -> None:
        self.client = client
        self.worker = worker
        self.interval = interval
        self.stale_after = stale_after
        self.states: dict[str, SymbolState] = {}
        self.subscribed_at: dict[str, int] = {}  # key → epoch ms it joined the live set
        self.started_at = int(time.time() * 1000)
        self._written: dict[str, str] = {}  # what the state hash holds now
        self._json: dict[str, tuple[tuple[Any, ...], str]] = {}  # key → (signature, JSON): serialized once
        self._last_written_count = 0
        self._last_at = time.monotonic()
        self._ttl = max(3, math.ceil(interval * 3))

    # ------------------------------------------------------------------ computing

    def compute(self, now_ms: int) -> dict[str, SymbolState]:
        """Every subscription's state now."""
        control = self.worker.control
        live = control.live if control is not None else {}
        rejected = control.stats.rejected if control is not None else {}
        placement = self.worker.feed.placement
        last_seen = self.worker.last_seen
        for key in list(self.subscribed_at):
            if key not in live:
                del self.subscribed_at[key]
        states: dict[str, SymbolState] = {}
        for key, inst in live.items():
            joined = self.subscribed_at.setdefault(key, now_ms)
            placed = placement.get((inst.exchange_type, inst.token))
            mode = MODE_NAMES.get(placed[1], "") if placed else ""
            seen_us = last_seen.get((inst.exchange_type, inst.token))
            last_tick = seen_us // 1000 if seen_us is not None and seen_us // 1000 >= joined else None
            if last_tick is None:
                state = "pending"
            elif now_ms - last_tick > self.stale_after * 1000:
                state = "stale"
            else:
                state = "live"
            states[key] = self._since(key, SymbolState(state, mode, inst.token, now_ms, last_tick))
        for key, reason in rejected.items():
            states[key] = self._since(key, SymbolState("rejected", reason=reason, since=now_ms))
        self.states = states
        return states

    def _since(self, key: str, new: SymbolState) -> SymbolState:
        old = self.states.get(key)
        if old is not None and old.state == new.state:
            new.since = old.since
        return new

    def heartbeat(self, now_ms: int) -> dict[str, Any]:
        w = self.worker
        stats = w.sink.stats
        elapsed = max(time.monotonic() - self._last_at, 1e-6)
        rate = (stats.written - self._last_written_count) / elapsed
        self._last_written_count, self._last_at = stats.written, time.monotonic()
        seen = max(w.last_seen.values(), default=None)
        counts = dict.fromkeys(STATES, 0)
        for state in self.states.values():
            counts[state.state] += 1
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started_at": self.started_at,
            "at": now_ms,
            "connections": [_connection(c) for c in w.feed.connections],
            "last_tick": seen // 1000 if seen is not None else None,
            "ticks_written": stats.written,
            "ticks_per_second": round(rate, 1),
            "ticks_dropped": stats.dropped,
            "ticks_rejected": stats.rejected,
            "events_dropped": stats.events_dropped,
            "buffered": w.sink.buffered,
            "redis_ok": stats.redis_ok,
            "write_errors": stats.write_errors,
            "decode_errors": w.decode_errors,
            "reconnects": sum(c.reconnects for c in w.feed.connections),
            "logins": w.logins,
            "subscriptions": counts,
        }

    # ------------------------------------------------------------------ writing

    async def publish(self) -> None:
        """Write what changed in the state hash (in chunks, yielding to the loop between them), and the heartbeat."""
        now_ms = int(time.time() * 1000)
        states = list(self.compute(now_ms).items())
        current: dict[str, str] = {}
        known, memo = self._json, {}
        for start in range(0, len(states), CHUNK):
            changed: dict[str, str] = {}
            for key, state in states[start : start + CHUNK]:
                signature = state.signature()
                last = known.get(key)
                value = last[1] if last is not None and last[0] == signature else state.to_json()
                memo[key] = (signature, value)
                current[key] = value
                if self._written.get(key) != value:
                    changed[key] = value
            if changed:
                await self.client.hset(keys.STATE, mapping=changed)  # type: ignore[arg-type]
            await asyncio.sleep(0)
        gone = [key for key in self._written if key not in current]
        pipe = self.client.pipeline(transaction=False)
        if gone:
            pipe.hdel(keys.STATE, *gone)
        pipe.set(keys.HEARTBEAT, json.dumps(self.heartbeat(now_ms), separators=(",", ":")), ex=self._ttl)
        await pipe.execute()
        self._written, self._json = current, memo

    async def run(self) -> None:
        """Publish every ``interval`` until cancelled; a Redis outage only delays it."""
        first = True
        while True:
            try:
                if first:
                    await self.client.delete(keys.STATE)  # a previous worker's states
                    first = False
                await self.publish()
            except (redis.RedisError, OSError) as exc:
                self._written = {}  # rewrite everything once Redis is back
                log.debug("status: redis unavailable (%s)", type(exc).__name__)
            await asyncio.sleep(self.interval)


def _connection(conn: FeedConnection) -> dict[str, Any]:
    return {
        "name": conn.name,
        "state": conn.state,
        "tokens": len(conn.desired),
        "connects": conn.connects,
        "reconnects": conn.reconnects,
        "last_error": conn.last_error,
        "last_frame_at": int(conn.last_frame_at * 1000) or None,
    }
