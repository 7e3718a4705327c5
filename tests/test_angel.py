"""The SDK adapter: side effects contained, login through SmartConnect, no secret in any message."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.simclient import sim_login
from worker import angel
from worker.localredis import free_port
from worker.simulator import SimulatorThread


def test_importing_and_constructing_the_sdk_has_no_side_effects(tmp_path: Path) -> None:
    """In a fresh interpreter: no lookup of api.ipify.org, no ./logs/, no log output."""
    script = textwrap.dedent(
        """
        import socket
        looked_up = []
        real = socket.getaddrinfo
        def spy(host, *args, **kwargs):
            looked_up.append(host)
            return real(host, *args, **kwargs)
        socket.getaddrinfo = spy
        from worker.angel import load_sdk, sdk_packet_parser
        sdk = load_sdk()
        assert load_sdk() is sdk
        sdk.SmartConnect(api_key="k")
        sdk_packet_parser()
        print("lookups:", looked_up)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "lookups: []"
    assert done.stderr == ""
    assert list(tmp_path.iterdir()) == []


def test_the_ip_lookup_is_refused_loudly_in_the_importing_thread_only() -> None:
    calls: list[str] = []

    def real_get(url: str, **kwargs: object) -> str:
        calls.append(url)
        return "real"

    get = angel._refusing_get(threading.get_ident(), real_get)
    with pytest.raises(requests.ConnectionError, match=r"api\.ipify\.org is disabled"):
        get("https://api.ipify.org")
    elsewhere: list[object] = []
    other = threading.Thread(target=lambda: elsewhere.append(get("https://example.test/master.json", timeout=5)))
    other.start()
    other.join()
    assert (elsewhere, calls) == (["real"], ["https://example.test/master.json"])


def test_login_returns_a_session_without_secrets_in_its_repr(sim: SimulatorThread) -> None:
    session = sim_login(sim)
    assert session.jwt_token.startswith("Bearer ")
    assert session.feed_token == sim.sim.feed_token
    assert session.refresh_token in sim.sim.refresh_tokens
    assert repr(session) == "Session(client_code='S1234567')"


def test_refused_login_names_the_reason_not_the_secrets(sim: SimulatorThread) -> None:
    cfg = sim.sim.config
    with pytest.raises(angel.LoginError) as info:
        angel.login(sim.sim.url, cfg.api_key, cfg.client_code, "9999", cfg.totp_secret)
    message = str(info.value)
    assert message == "Angel refused the login for S1234567: Invalid clientcode or password AB1007"
    assert "9999" not in message
    assert cfg.totp_secret not in message


def test_login_errors_without_a_server_or_with_a_bad_secret() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(angel.LoginError, match=r"login request to http://127\.0\.0\.1:\d+ failed: ConnectionError"):
        angel.login(url, "k", "C1", "1234", "ANGELSTREAMSIMULATORTOTPSECRETAB", timeout=2)
    with pytest.raises(angel.LoginError, match="ANGEL_TOTP_SECRET is not a valid base32 TOTP secret"):
        angel.login(url, "k", "C1", "1234", "not base32!")


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        ("garbage", "Angel refused the login for C1: unexpected reply"),
        (
            {"status": False, "message": "Invalid Token", "errorCode": "AG8001"},
            "Angel refused the login for C1: Invalid Token AG8001",
        ),
        ({"status": False}, "Angel refused the login for C1: no message"),
        ({"status": True, "data": None}, "Angel refused the login for C1: no message"),
        ({"status": True, "data": {"jwtToken": "j", "refreshToken": "r"}}, "login reply from u lacks feedToken"),
    ],
)
def test_login_reply_shapes(monkeypatch: pytest.MonkeyPatch, reply: Any, message: str) -> None:
    sdk = angel.load_sdk()
    monkeypatch.setattr(sdk.SmartConnect, "generateSession", lambda self, *args: reply)
    with pytest.raises(angel.LoginError) as info:
        angel.login("u", "k", "C1", "1234", "ANGELSTREAMSIMULATORTOTPSECRETAB")
    assert str(info.value) == message
