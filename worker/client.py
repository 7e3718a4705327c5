"""Reading the streams from Python: latest ticks (``XREVRANGE``), typed."""

from __future__ import annotations

import redis

from worker import keys
from worker.schema import Tick, parse_entry
from worker.settings import RedisSettings


def _client(client: redis.Redis | None) -> redis.Redis:
    return client if client is not None else redis.Redis.from_url(RedisSettings().redis_url)


def get_latest_ticks(symbol: str, exchange: str, count: int = 10, client: redis.Redis | None = None) -> list[Tick]:
    """The newest ``count`` ticks of ``EXCHANGE:SYMBOL``, newest first (``REDIS_URL`` unless ``client``)."""
    if count <= 0:
        raise ValueError(f"count must be positive, got {count}")
    conn = _client(client)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = conn.xrevrange(  # type: ignore[assignment]
            keys.ticks(exchange, symbol), count=count
        )
    finally:
        if client is None:
            conn.close()
    return [parse_entry(entry_id, fields) for entry_id, fields in entries]
