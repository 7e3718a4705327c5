"""A tiny synchronous SmartStream client for simulator tests (websocket-client, like the SDK)."""

from __future__ import annotations

import time

import websocket

from worker import protocol as p
from worker.angel import Session, login
from worker.simulator import SimulatorThread


def sim_login(thread: SimulatorThread) -> Session:
    cfg = thread.sim.config
    return login(thread.sim.url, cfg.api_key, cfg.client_code, cfg.pin, cfg.totp_secret)


def auth_headers(thread: SimulatorThread, session: Session, **override: str) -> list[str]:
    headers = {
        "Authorization": session.jwt_token,
        "x-api-key": thread.sim.config.api_key,
        "x-client-code": thread.sim.config.client_code,
        "x-feed-token": session.feed_token,
    } | override
    return [f"{k}: {v}" for k, v in headers.items()]


def open_stream(
    thread: SimulatorThread, session: Session | None = None, override: dict[str, str] | None = None
) -> websocket.WebSocket:
    session = session or sim_login(thread)
    headers = auth_headers(thread, session, **(override or {}))
    return websocket.create_connection(thread.sim.ws_url, header=headers, timeout=5)


def recv_text(ws: websocket.WebSocket) -> str:
    data = ws.recv()
    assert isinstance(data, str), f"expected a text frame, got {data!r}"
    return data


def recv_binary(ws: websocket.WebSocket) -> bytes:
    data = ws.recv()
    assert isinstance(data, bytes), f"expected a binary frame, got {data!r}"
    return data


def refusal(exc: websocket.WebSocketBadStatusException) -> tuple[int, str]:
    """(HTTP status, x-error-message) of a refused upgrade."""
    return exc.status_code, (exc.resp_headers or {}).get("x-error-message", "")


def subscribe(ws: websocket.WebSocket, mode: int, *pairs: tuple[int, str], action: int = 1, corr: str = "") -> None:
    for request in p.build_requests(p.Action(action), [(mode, ex, tok) for ex, tok in pairs], corr):
        ws.send(request.to_json())


def receive(ws: websocket.WebSocket, seconds: float = 0.5) -> tuple[list[bytes], list[str]]:
    """Everything that arrives within ``seconds``: (binary frames, text frames)."""
    frames: list[bytes] = []
    texts: list[str] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        ws.settimeout(left)
        try:
            opcode, data = ws.recv_data()
        except websocket.WebSocketTimeoutException:
            break
        if opcode == websocket.ABNF.OPCODE_BINARY:
            frames.append(data)
        else:
            texts.append(data.decode())
    return frames, texts


def receive_until(ws: websocket.WebSocket, count: int, seconds: float = 5.0) -> list[bytes]:
    frames: list[bytes] = []
    deadline = time.monotonic() + seconds
    while len(frames) < count and time.monotonic() < deadline:
        got, _ = receive(ws, min(0.2, deadline - time.monotonic()))
        frames += got
    return frames


def wait_closed(ws: websocket.WebSocket, seconds: float = 5.0) -> bool:
    """Read until the server closes or drops the connection; True if it did within ``seconds``."""
    deadline = time.monotonic() + seconds
    ws.settimeout(seconds)
    while time.monotonic() < deadline:
        try:
            ws.recv()
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            return True
    return False
