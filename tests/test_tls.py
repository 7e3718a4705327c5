"""TLS to Angel's endpoints: login, the instrument master and the feed verify certificates, always.

The simulator serves https:// and wss:// with a self-signed certificate made here: each of the
worker's clients refuses it, while a client that is told to trust that certificate gets through
(so the refusal is the certificate's, not a dead server's). Plaintext is for the simulator only,
and the worker says so at startup.
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from tests.workerkit import worker_settings
from worker import angel
from worker.app import WorkerThread
from worker.feed import Credentials, FeedConfig, FeedConnection
from worker.instruments import InstrumentError, fetch_master
from worker.localredis import LocalRedis
from worker.simulator import MASTER_PATH, SimConfig, SimulatorThread

WORKER = Path(__file__).parent.parent / "worker"
VERIFY_FAILED = "CERTIFICATE_VERIFY_FAILED"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A self-signed certificate for 127.0.0.1 (key beside it): valid for the host, trusted by nobody."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH: cannot make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", "key.pem", "-out", "cert.pem"],
        cwd=where, check=True, capture_output=True,
    )  # fmt: skip
    return where / "cert.pem"


@pytest.fixture
def tls_sim(certificate: Path) -> Iterator[SimulatorThread]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certificate, certificate.with_name("key.pem"))
    with SimulatorThread(SimConfig(tls=context)) as thread:
        yield thread


@pytest.fixture
def no_ca_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """requests trusts REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE when set: none of the developer's."""
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)


def trusting(certificate: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certificate))


def test_the_simulator_serves_tls_to_a_client_that_trusts_its_certificate(
    tls_sim: SimulatorThread, certificate: Path
) -> None:
    assert re.fullmatch(r"https://127\.0\.0\.1:\d+", tls_sim.sim.url)
    assert re.fullmatch(r"wss://127\.0\.0\.1:\d+/smart-stream", tls_sim.sim.ws_url)
    response = requests.get(tls_sim.sim.url + MASTER_PATH, verify=str(certificate), timeout=5)
    assert response.status_code == 200
    assert response.json()
    with pytest.raises(requests.exceptions.SSLError, match=VERIFY_FAILED):
        requests.get(tls_sim.sim.url + MASTER_PATH, timeout=5)


@pytest.mark.usefixtures("no_ca_override")
def test_login_refuses_a_self_signed_certificate(
    tls_sim: SimulatorThread, certificate: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tls_sim.sim.config
    args = (tls_sim.sim.url, cfg.api_key, cfg.client_code, cfg.pin, cfg.totp_secret)
    with pytest.raises(angel.LoginError, match=r"^login request to https://127\.0\.0\.1:\d+ failed: SSLError$"):
        angel.login(*args, timeout=5)
    assert tls_sim.sim.logins == 0
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate))  # the very same call, trusting this certificate
    assert angel.login(*args, timeout=5).client_code == cfg.client_code
    assert tls_sim.sim.logins == 1


def test_the_instrument_master_download_refuses_a_self_signed_certificate(
    tls_sim: SimulatorThread, certificate: Path
) -> None:
    url = tls_sim.sim.url + MASTER_PATH
    with pytest.raises(InstrumentError, match=f"^cannot download the instrument master from {url}: .*{VERIFY_FAILED}"):
        asyncio.run(fetch_master(url, 5))

    async def trusted() -> int:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=trusting(certificate)) as response:
            return response.status

    assert asyncio.run(trusted()) == 200


def test_the_feed_refuses_a_self_signed_certificate(tls_sim: SimulatorThread, certificate: Path) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def credentials(fresh: bool) -> Credentials:
        return Credentials("Bearer jwt", "api-key", "S1234567", "feed-token")

    async def main() -> None:
        conn = FeedConnection(
            "tls", FeedConfig(tls_sim.sim.ws_url, reconnect_initial=0.05, reconnect_max=0.1, reconnect_jitter=0.01),
            credentials, lambda frame, at: None, lambda kind, **fields: seen.append((kind, fields)),
        )  # fmt: skip
        await conn.update(add=[(1, 1, "3045")])
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(conn.run(session))
            async with asyncio.timeout(10):
                while len([kind for kind, _ in seen if kind == "feed_reconnecting"]) < 2:
                    await asyncio.sleep(0.01)
            await conn.close()
            await task
            assert conn.connects == 0
            assert conn.causes == {"connect": conn.reconnects}
            # The same upgrade from a client that trusts the certificate reaches the server (401: no login).
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await session.ws_connect(tls_sim.sim.ws_url, ssl=trusting(certificate))
            assert refused.value.status == 401

    asyncio.run(main())
    causes = [fields["cause"] for kind, fields in seen if kind == "feed_reconnecting"]
    assert all(cause.startswith(f"cannot connect to {tls_sim.sim.ws_url}: ") for cause in causes)
    assert all(VERIFY_FAILED in cause for cause in causes)
    assert tls_sim.sim.upgrades == 1, "only the trusting client's upgrade ever reached the server"


@pytest.mark.usefixtures("no_ca_override")
def test_a_worker_pointed_at_a_self_signed_server_does_not_start(
    tls_sim: SimulatorThread, redis_server: LocalRedis
) -> None:
    with pytest.raises(RuntimeError, match=f"the worker did not start: InstrumentError.*{VERIFY_FAILED}"):
        WorkerThread(worker_settings(tls_sim, redis_server.url)).start()
    assert tls_sim.sim.logins == 0


def test_a_worker_on_the_local_simulator_warns_that_it_is_unencrypted(
    sim: SimulatorThread, redis_server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="worker.app"), WorkerThread(worker_settings(sim, redis_server.url)):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.name == "worker.app" and r.levelno == logging.WARNING]
    assert warnings == [
        f"{name}={url} is UNENCRYPTED (no TLS): only for the local simulator, never Angel One"
        for name, url in [
            ("ANGEL_API_URL", sim.sim.url),
            ("ANGEL_WS_URL", sim.sim.ws_url),
            ("ANGEL_INSTRUMENTS_URL", sim.sim.url + MASTER_PATH),
        ]
    ]


#: Ways to switch certificate verification off in the clients the worker uses (aiohttp, requests,
#: the SDK, ssl); none may appear in worker/ (the simulator's own server context is not a client).
DISABLING = [
    r"\bssl\s*=\s*False", r"\bverify\s*=\s*False", r"disable_ssl\s*=\s*True", r"CERT_NONE",
    r"check_hostname\s*=\s*False", r"verify_ssl\s*=\s*False", r"_create_unverified_context", r"TCPConnector\([^)]*ssl",
]  # fmt: skip


def test_nothing_in_the_worker_switches_verification_off() -> None:
    sources = sorted(WORKER.rglob("*.py"))
    assert len(sources) > 10
    found = [
        f"{path.name}: {match.group(0)}"
        for path in sources
        for pattern in DISABLING
        for match in re.finditer(pattern, path.read_text())
    ]
    assert found == []
    assert re.search(r"disable_ssl\s*=\s*False", (WORKER / "angel.py").read_text()), "the SDK told to verify"
