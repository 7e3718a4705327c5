"""The simulator speaks Angel's protocol (spec §8) and its fault knobs do what they say."""

from __future__ import annotations

import asyncio
import threading
import time
from decimal import Decimal
from pathlib import Path

import pytest
import requests
import websocket

from tests.simclient import (
    auth_headers,
    open_stream,
    receive,
    receive_until,
    recv_text,
    refusal,
    sim_login,
    subscribe,
    wait_closed,
)
from tests.test_protocol_vs_sdk import differences
from worker import angel
from worker import protocol as p
from worker.instruments import Instrument, parse_master
from worker.simulator import (
    LOGIN_PATH,
    MASTER_PATH,
    PROFILE_PATH,
    TOKENS_PATH,
    Market,
    SimConfig,
    SimulatorThread,
)

SBIN = (1, "3045")
USDINR = (13, "1151")
NIFTY = (1, "99926000")
NIFTY_FUT = (2, "35001")


# ----------------------------------------------------------------- the unmodified SDK against the simulator


def test_unmodified_sdk_logs_in_and_parses_the_stream(
    sim: SimulatorThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    sdk = angel.load_sdk()
    connect = sdk.SmartConnect(api_key=sim.sim.config.api_key, root=sim.sim.url)
    cfg = sim.sim.config
    import pyotp

    reply = connect.generateSession(cfg.client_code, cfg.pin, pyotp.TOTP(cfg.totp_secret).now())
    assert reply["status"] is True
    assert reply["data"]["clientcode"] == cfg.client_code
    assert reply["data"]["jwtToken"].startswith("Bearer ")

    client = sdk.SmartWebSocketV2(reply["data"]["jwtToken"], cfg.api_key, cfg.client_code, connect.getfeedToken())
    client.ROOT_URI = sim.sim.ws_url  # the only change: where it connects
    received: list[dict[str, object]] = []
    client.on_open = lambda app: [
        client.subscribe("c1", mode, [{"exchangeType": ex, "tokens": [tok]}])
        for mode, (ex, tok) in ((1, SBIN), (2, USDINR), (3, NIFTY_FUT), (3, NIFTY))
    ]
    client.on_data = lambda app, data: received.append(data)
    client.on_error = lambda *reason: None  # its give-up calls on_error(str, str) (spec §5.3)
    runner = threading.Thread(target=client.connect, daemon=True)
    runner.start()
    deadline = time.monotonic() + 10
    while len(received) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.MAX_RETRY_ATTEMPT = 0  # the SDK reconnects even on a deliberate close (bug B1)
    client.close_connection()
    runner.join(5)

    sent = [s.packet for s in sim.sim.sent]
    assert len(received) >= 40
    for data, packet in zip(received, sent, strict=False):
        assert differences(packet, data) == []
    assert {d["subscription_mode"] for d in received} == {1, 2, 3}
    assert not list(tmp_path.iterdir()), "the SDK wrote into the working directory"


# ----------------------------------------------------------------- REST


def test_login_profile_tokens_logout(sim: SimulatorThread) -> None:
    session = sim_login(sim)
    assert session.feed_token == sim.sim.feed_token
    assert sim.sim.logins == 1
    headers = {"X-PrivateKey": sim.sim.config.api_key}
    tokens = requests.post(sim.sim.url + TOKENS_PATH, json={"refreshToken": session.refresh_token}, timeout=5).json()
    assert tokens["status"] is True
    assert tokens["data"]["feedToken"] == session.feed_token
    assert requests.post(sim.sim.url + TOKENS_PATH, json={"refreshToken": "x"}, timeout=5).json()["errorcode"] == (
        "AG8001"
    )
    unauthorized = requests.get(sim.sim.url + PROFILE_PATH, headers=headers, timeout=5)
    assert unauthorized.status_code == 401
    assert unauthorized.json()["errorCode"] == "AG8001"
    bearer = {"Authorization": session.jwt_token}
    assert requests.get(sim.sim.url + PROFILE_PATH, headers=bearer, timeout=5).json()["status"] is True
    assert requests.post(sim.sim.url + "/rest/secure/angelbroking/user/v1/logout", headers=bearer, timeout=5).ok
    assert requests.get(sim.sim.url + PROFILE_PATH, headers=bearer, timeout=5).status_code == 401


@pytest.mark.parametrize(
    ("headers", "body", "code"),
    [
        ({"X-PrivateKey": "wrong"}, {}, "AG8004"),
        ({"X-PrivateKey": "sim-api-key"}, {"clientcode": "S1234567", "password": "0000", "totp": "1"}, "AB1007"),
        ({"X-PrivateKey": "sim-api-key"}, {"clientcode": "S1234567", "password": "1234", "totp": "000000"}, "AB1050"),
        ({"X-PrivateKey": "sim-api-key"}, [1], "AB1007"),
        ({"X-PrivateKey": "sim-api-key"}, "not json", "AB1007"),
    ],
)
def test_login_refusals(sim: SimulatorThread, headers: dict[str, str], body: object, code: str) -> None:
    data = body if isinstance(body, str) else None
    json_body = None if isinstance(body, str) else body
    reply = requests.post(sim.sim.url + LOGIN_PATH, headers=headers, json=json_body, data=data, timeout=5).json()
    assert (reply["status"], reply["errorcode"]) == (False, code)


def test_instrument_master_endpoint(sim: SimulatorThread) -> None:
    served = parse_master(requests.get(sim.sim.url + MASTER_PATH, timeout=5).content)
    assert served == sim.sim.config.instruments


# ----------------------------------------------------------------- the upgrade


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"x-client-code": "NOPE"}, "Invalid Client Code"),
        ({"Authorization": "Bearer forged"}, "Invalid Auth token"),
        ({"x-api-key": "wrong"}, "Invalid API Key"),
        ({"x-feed-token": "stale"}, "Invalid Feed Token"),
    ],
)
def test_bad_credentials_get_401_with_reason_header(
    sim: SimulatorThread, override: dict[str, str], reason: str
) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        open_stream(sim, override=override)
    assert refusal(info.value) == (401, reason)


def test_bare_jwt_and_query_parameter_auth_are_accepted(sim: SimulatorThread) -> None:
    session = sim_login(sim)
    bare = open_stream(sim, session, {"Authorization": session.jwt_token.removeprefix("Bearer ")})
    bare.close()
    cfg = sim.sim.config
    url = f"{sim.sim.ws_url}?clientCode={cfg.client_code}&feedToken={session.feed_token}&apiKey={cfg.api_key}"
    websocket.create_connection(url, timeout=5).close()


def test_lenient_auth_needs_only_client_code_and_feed_token() -> None:
    with SimulatorThread(SimConfig(strict_auth=False)) as thread:
        session = sim_login(thread)
        open_stream(thread, session, {"Authorization": "", "x-api-key": ""}).close()


def test_a_fourth_connection_is_reset(sim: SimulatorThread) -> None:
    session = sim_login(sim)
    open_ = [open_stream(sim, session) for _ in range(3)]
    extra = open_stream(sim, session)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        extra.recv()
    for ws in open_:
        ws.send(p.PING)
        assert recv_text(ws) == p.PONG
        ws.close()


# ----------------------------------------------------------------- in the socket


def test_text_ping_and_control_ping(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    ws.send(p.PING)
    assert recv_text(ws) == p.PONG
    ws.ping(b"are-you-there")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are-you-there")
    ws.send_binary(b"clients do not send binary; ignored")
    ws.send(p.PING)
    assert recv_text(ws) == p.PONG
    ws.close()


@pytest.mark.parametrize(
    ("mode", "pair", "kind"),
    [
        (1, SBIN, p.LtpPacket),
        (2, USDINR, p.QuotePacket),
        (3, NIFTY_FUT, p.SnapQuotePacket),
        (3, NIFTY, p.SnapQuotePacket),
        (4, SBIN, p.Depth20Packet),
        (3, (2, "35010"), p.SnapQuotePacket),
        (2, (5, "440001"), p.QuotePacket),
        (1, (3, "500112"), p.LtpPacket),
    ],
)
def test_subscription_streams_full_packets_starting_with_a_snapshot(
    sim: SimulatorThread, mode: int, pair: tuple[int, str], kind: type
) -> None:
    ws = open_stream(sim)
    subscribe(ws, mode, pair)
    frames = receive_until(ws, 4)
    ws.close()
    packets = [p.decode(f) for f in frames]
    assert all(isinstance(pk, kind) and (pk.exchange_type, pk.token) == pair for pk in packets)
    assert [s.snapshot for s in sim.sim.sent[:2]] == [True, False]
    assert packets == [s.packet for s in sim.sim.sent[: len(packets)]]
    timestamps = [pk.exchange_timestamp for pk in packets]
    assert timestamps == sorted(timestamps)


def test_market_fields_are_realistic() -> None:
    config = SimConfig()
    by_symbol = {i.symbol: i for i in config.instruments}
    sbin = Market(by_symbol["SBIN-EQ"], seed=1)
    first = sbin.packet(p.Mode.SNAP_QUOTE)
    for _ in range(50):
        sbin.step()
    later = sbin.packet(p.Mode.SNAP_QUOTE)
    assert isinstance(first, p.SnapQuotePacket)
    assert isinstance(later, p.SnapQuotePacket)
    assert later.sequence_number == first.sequence_number + 50
    assert later.volume > first.volume > 0
    assert all(b[1] < later.last_traded_price < a[1] for b, a in zip(later.bids, later.asks, strict=True))
    assert later.low <= later.last_traded_price <= later.high
    assert later.lower_circuit < later.close < later.upper_circuit
    assert later.last_traded_timestamp == later.exchange_timestamp // 1000
    assert later.open_interest == 0

    usdinr = Market(by_symbol["USDINR29DEC26FUT"], seed=1).packet(p.Mode.LTP)
    assert isinstance(usdinr, p.LtpPacket)
    assert 70 <= Decimal(usdinr.last_traded_price) / p.price_divisor(13) <= 100
    nifty = Market(by_symbol["Nifty 50"], seed=1)
    nifty.step()
    assert nifty.packet(p.Mode.LTP) == p.LtpPacket(1, 1, "99926000", 0, nifty.exch_ts, nifty.ltp)
    future = Market(by_symbol["NIFTY29DEC26FUT"], seed=1).packet(p.Mode.SNAP_QUOTE)
    assert isinstance(future, p.SnapQuotePacket)
    assert future.open_interest > 0
    assert sbin.packet(p.Mode.QUOTE) is sbin.packet(p.Mode.QUOTE)  # a snapshot repeats the last packet
    same_seed = [Market(by_symbol["SBIN-EQ"], seed=1).packet(1)._replace(exchange_timestamp=0) for _ in range(2)]
    assert same_seed[0] == same_seed[1]  # prices are deterministic; only the clock differs


def test_tiny_prices_stay_positive() -> None:
    penny = Instrument("9", "PENNY-EQ", "NSE", 1, tick_size=Decimal(5))
    market = Market(penny, seed=3)
    market.ltp = market.tick
    for _ in range(200):
        market.step()
        packet = market.packet(p.Mode.SNAP_QUOTE)
        assert isinstance(packet, p.SnapQuotePacket)
        assert packet.last_traded_price >= market.tick
        assert all(price >= market.tick for _, price, _ in packet.bids)


def test_request_errors_and_silent_ignores(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    ws.send('{"correlationID":"bad1","action":7}')
    assert p.parse_text(recv_text(ws)) == p.ServerError("E1001", "Invalid Request Payload", "bad1")
    ws.send("not json")
    assert p.parse_text(recv_text(ws)) == p.ServerError("E1001", "Invalid Request Payload", "")
    ws.send('["list"]')
    assert p.parse_text(recv_text(ws)) == p.ServerError("E1001", "Invalid Request Payload", "")
    ws.send('{"correlationID": 5}')
    assert p.parse_text(recv_text(ws)) == p.ServerError("E1001", "Invalid Request Payload", "")
    ws.send(p.Request(p.Action.SUBSCRIBE, p.Mode.DEPTH_20, ((2, ("35001",)),), "d1").to_json())
    assert p.parse_text(recv_text(ws)) == p.ServerError("E1001", "Invalid Request Payload", "d1")
    many = tuple(str(i) for i in range(51))
    ws.send(p.Request(p.Action.SUBSCRIBE, p.Mode.DEPTH_20, ((1, many),), "d2").to_json())
    assert p.parse_text(recv_text(ws)) == p.ServerError("E1001", "Invalid Request Payload", "d2")
    # unknown exchange type, unknown token, unsubscribe of what is not subscribed: silence
    ws.send(p.Request(p.Action.SUBSCRIBE, p.Mode.LTP, ((0, ("3045",)), (1, ("424242",))), "x").to_json())
    subscribe(ws, 1, (1, "777"), action=0)
    frames, texts = receive(ws, 0.4)
    assert (frames, texts) == ([], [])
    ws.close()


def test_duplicates_ignored_and_the_token_limit_answers_e1002() -> None:
    with SimulatorThread(SimConfig(max_tokens=3, rate_per_token=50)) as thread:
        ws = open_stream(thread)
        subscribe(ws, 1, SBIN, (1, "2885"))
        subscribe(ws, 1, SBIN)  # duplicate: no new snapshot, no error
        frames = receive_until(ws, 2)
        assert len(frames) >= 2
        subscribe(ws, 1, (1, "1594"), (1, "11536"), corr="big")
        _, texts = receive(ws, 0.3)
        assert p.ServerError("E1002", "Invalid Request. Subscription Limit Exceeded", "big") in [
            p.parse_text(t) for t in texts
        ]
        state = requests.get(thread.sim.url + "/sim/state", timeout=5).json()
        assert state["connections"][0]["subscriptions"] == 2
        subscribe(ws, 1, SBIN, (1, "2885"), action=0)
        receive(ws, 0.1)  # what was in flight
        assert receive(ws, 0.3) == ([], [])
        ws.close()


def test_depth20_can_be_deprecated() -> None:
    with SimulatorThread(SimConfig(depth20=False, rate_per_token=50)) as thread:
        ws = open_stream(thread)
        subscribe(ws, 4, SBIN)
        assert receive(ws, 0.4) == ([], [])
        ws.close()


def test_the_event_rate_is_capped_round_robin() -> None:
    config = SimConfig(rate_per_token=20, max_rate=20, record=True)  # one event per round
    with SimulatorThread(config) as thread:
        ws = open_stream(thread)
        subscribe(ws, 1, SBIN, (1, "2885"), (1, "1594"))
        frames = receive_until(ws, 9, seconds=3)
        ws.close()
    events = [s.packet.token for s in thread.sim.sent if not s.snapshot]
    assert len(frames) >= 9
    assert set(events[:3]) == {"3045", "2885", "1594"}


# ----------------------------------------------------------------- faults


def test_fault_close_sends_a_close_frame(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    sim.inject("close", code="1001")
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert int.from_bytes(data[:2], "big") == 1001


def test_fault_drop_resets_tcp_without_a_close_frame(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    sim.inject("drop")
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        ws.recv_data(control_frame=True)


def test_fault_silence_stops_data_and_pongs_then_resumes(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    subscribe(ws, 1, SBIN)
    assert receive_until(ws, 2)
    sim.inject("silence")
    receive(ws, 0.1)  # in flight
    subscribe(ws, 1, (1, "2885"))  # no snapshot while silent
    ws.send(p.PING)
    ws.ping(b"x")
    assert receive(ws, 0.4) == ([], [])
    sim.sim.set_silent(False)
    ws.send(p.PING)
    _, texts = receive(ws, 0.3)
    assert texts == [p.PONG]
    assert receive_until(ws, 2)
    sim.inject("silence", seconds="0.2")
    receive(ws, 0.1)
    time.sleep(0.3)
    assert receive_until(ws, 1)
    ws.close()


def test_fault_truncate_garbage_error(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    sim.inject("truncate")
    sim.inject("garbage")
    sim.inject("error", code="E1002")
    frames, texts = receive(ws, 0.3)
    assert [len(f) for f in frames] == [100, 51]
    for frame in frames:
        with pytest.raises(p.DecodeError):
            p.decode(frame)
    assert p.parse_text(texts[0]) == p.ServerError("E1002", "Invalid Request Payload", "")
    ws.close()


def test_fault_rotate_invalidates_feed_token_and_jwt(sim: SimulatorThread) -> None:
    old = sim_login(sim)
    ws = open_stream(sim, old)
    sim.inject("rotate")
    assert wait_closed(ws)
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        open_stream(sim, old)
    assert refusal(info.value) == (401, "Invalid Auth token")
    new = sim_login(sim)
    assert new.feed_token != old.feed_token
    with pytest.raises(websocket.WebSocketBadStatusException) as info:
        websocket.create_connection(sim.sim.ws_url, header=auth_headers(sim, new, **{"x-feed-token": old.feed_token}))
    assert refusal(info.value) == (401, "Invalid Feed Token")
    kept = open_stream(sim, new)
    sim.inject("rotate", disconnect="0")
    kept.send(p.PING)
    assert recv_text(kept) == p.PONG
    kept.close()


@pytest.mark.parametrize(("status", "reason"), [("429", "Too Many Requests"), ("401", "Invalid Feed Token")])
def test_fault_refuse_upgrades(sim: SimulatorThread, status: str, reason: str) -> None:
    session = sim_login(sim)
    sim.inject("refuse", count="2", status=status)
    for _ in range(2):
        with pytest.raises(websocket.WebSocketBadStatusException) as info:
            open_stream(sim, session)
        assert refusal(info.value) == (int(status), reason)
    open_stream(sim, session).close()
    assert sim.sim.upgrades == 3


def test_faults_over_http_and_unknown_faults(sim: SimulatorThread) -> None:
    assert requests.post(sim.sim.url + "/sim/faults/garbage", timeout=5).json() == {"ok": True, "fault": "garbage"}
    bad = requests.post(sim.sim.url + "/sim/faults/meteor", timeout=5)
    assert bad.status_code == 400
    assert "unknown fault 'meteor'" in bad.json()["error"]
    state = requests.get(sim.sim.url + "/sim/state", timeout=5).json()
    assert state == {"connections": [], "logins": 0, "upgrades": 0, "silent": False}


def test_scheduled_faults_repeat(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    sim.loop.call_soon_threadsafe(sim.sim.schedule_fault, "garbage", 0.05)
    frames = receive_until(ws, 3, seconds=3)
    assert len(frames) >= 3
    assert all(f[0] == 0xEE for f in frames)
    ws.close()


def test_a_scheduled_fault_can_stop_after_a_number_of_times(sim: SimulatorThread) -> None:
    ws = open_stream(sim)

    async def schedule() -> asyncio.Task[None]:
        return sim.sim.schedule_fault("garbage", 0.05, times=3)

    task = sim.call(schedule())
    frames = receive_until(ws, 4, seconds=1)
    assert task.done()
    assert len(frames) == 3
    ws.close()


def test_sends_to_a_dropped_connection_are_harmless(sim: SimulatorThread) -> None:
    ws = open_stream(sim)
    subscribe(ws, 1, SBIN)
    assert receive_until(ws, 1)

    async def drop_then_send() -> None:
        conn = sim.sim.connections[0]
        sim.sim.drop_connections()
        await sim.sim.send_raw(b"x")
        await sim.sim.send_error()
        await sim.sim._send_packet(conn, p.LtpPacket(1, 1, "3045", 1, 2, 3), snapshot=False)
        await conn.ws.close()
        await sim.sim._send_packet(conn, p.LtpPacket(1, 1, "3045", 1, 2, 3), snapshot=False)

    sent = len(sim.sim.sent)
    sim.call(drop_then_send())
    assert len(sim.sim.sent) == sent


def test_stopping_closes_open_connections() -> None:
    thread = SimulatorThread(SimConfig())
    with thread:
        ws = open_stream(thread)
    assert wait_closed(ws)
    assert thread.loop.is_closed()
    asyncio.run(thread.sim.stop())  # a second stop is harmless
