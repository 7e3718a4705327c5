from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import websocket

from tests.simclient import recv_binary
from worker import protocol as p
from worker.angel import login
from worker.cli import main
from worker.simulator import DEFAULT_API_KEY, DEFAULT_CLIENT_CODE, DEFAULT_PIN, DEFAULT_TOTP_SECRET


def _start_sim(*args: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "sim", "--port", "0", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    banner = proc.stdout.readline()
    assert banner.startswith("angelstream sim: REST http://127.0.0.1:"), banner
    return proc, banner.split()[3]


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0


def test_sim_command_serves_login_and_stream_and_stops_on_sigterm() -> None:
    proc, url = _start_sim("--generate", "20", "--rate", "20", "--refuse-upgrades", "1", "--refuse-status", "401")
    try:
        session = login(url, DEFAULT_API_KEY, DEFAULT_CLIENT_CODE, DEFAULT_PIN, DEFAULT_TOTP_SECRET)
        ws_url = url.replace("http", "ws") + "/smart-stream"
        headers = [
            f"Authorization: {session.jwt_token}",
            f"x-api-key: {DEFAULT_API_KEY}",
            f"x-client-code: {DEFAULT_CLIENT_CODE}",
            f"x-feed-token: {session.feed_token}",
        ]
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(ws_url, header=headers, timeout=5)
        ws = websocket.create_connection(ws_url, header=headers, timeout=5)
        ws.send(p.Request(p.Action.SUBSCRIBE, p.Mode.LTP, ((1, ("100003",)),)).to_json())
        packet = p.decode(recv_binary(ws))
        assert (packet.token, packet.exchange_type) == ("100003", 1)
        ws.close()
    finally:
        _stop(proc)


def test_sim_command_injects_scheduled_faults(tmp_path: Path) -> None:
    master = tmp_path / "master.json"
    master.write_text('[{"token": "1", "symbol": "ONE-EQ", "exch_seg": "NSE"}]')
    proc, url = _start_sim("--instruments", str(master), "--fault", "garbage:0.1", "--lenient-auth", "--no-depth20")
    try:
        session = login(url, DEFAULT_API_KEY, DEFAULT_CLIENT_CODE, DEFAULT_PIN, DEFAULT_TOTP_SECRET)
        ws_url = url.replace("http", "ws") + "/smart-stream"
        ws = websocket.create_connection(
            ws_url, header=[f"x-client-code: {DEFAULT_CLIENT_CODE}", f"x-feed-token: {session.feed_token}"], timeout=5
        )
        assert recv_binary(ws)[0] == 0xEE
        ws.close()
    finally:
        _stop(proc)


def test_sim_help_documents_every_knob(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sim", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for knob in ("--rate", "--max-rate", "--fault", "--refuse-upgrades", "--refuse-status", "--lenient-auth",
                 "--no-depth20", "--max-connections", "--max-tokens", "--totp-secret", "--generate", "--seed",
                 "close", "drop", "silence", "truncate", "garbage", "error", "rotate", "refuse"):  # fmt: skip
        assert knob in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--fault", "meteor:1"], "unknown fault 'meteor'"),
        (["--fault", "drop:soon"], "write NAME:SECONDS"),
        (["--fault", "drop:0"], "SECONDS must be positive"),
        (["--rate", "0"], "must be positive"),
        (["--rate", "fast"], "'fast' is not a number"),
        (["--generate", "x"], "'x' is not a whole number"),
        (["--refuse-status", "500"], "invalid choice"),
    ],
)
def test_bad_options_exit_2_with_one_clear_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["sim", *args])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_unreadable_master_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sim", "--instruments", str(tmp_path / "none.json")]) == 2
    assert "angelstream sim: cannot read instrument master" in capsys.readouterr().err


def test_busy_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["sim", "--port", str(port)]) == 1
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
