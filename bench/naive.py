"""The naive baseline: what a typical user writes on top of the SDK, run as its own process.

    python -m bench.naive --ws-url WS --api-url URL --redis-url URL --mode 3 --tokens 1,2,… --seconds S

One WebSocket (websocket-client, the SDK's transport), each binary frame parsed by the SDK's own
``SmartWebSocketV2._parse_binary_data`` (:func:`worker.angel.sdk_packet_parser`), then one
``XADD ticks:<token> MAXLEN ~ 10000 * …`` per tick with redis-py (+ hiredis), waiting for each
reply: the ``on_data`` callback of the SDK's examples with ``r.xadd(...)`` in it. It leaves out
the SDK's ``WebSocketApp`` dispatch, so it is, if anything, a little faster than the real thing.

Prints one JSON object: ticks written in the measured window, its length, and this process's CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import redis
import websocket

from worker import angel
from worker import protocol as p
from worker.simulator import DEFAULT_API_KEY, DEFAULT_CLIENT_CODE, DEFAULT_PIN, DEFAULT_TOTP_SECRET


def flatten(tick: dict[str, Any]) -> dict[Any, Any]:
    """What a user does to fit the SDK's dict into a stream entry: nested best-five lists as JSON."""
    return {k: json.dumps(v) if isinstance(v, list | dict) else v for k, v in tick.items()}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ws-url", required=True)
    parser.add_argument("--api-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--mode", type=int, required=True, help="1 LTP, 2 Quote, 3 SnapQuote")
    parser.add_argument("--tokens", required=True, help="comma-separated NSE tokens (at most 1000)")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args(argv)

    session = angel.login(args.api_url, DEFAULT_API_KEY, DEFAULT_CLIENT_CODE, DEFAULT_PIN, DEFAULT_TOTP_SECRET)
    headers = {
        "Authorization": session.jwt_token,
        "x-api-key": DEFAULT_API_KEY,
        "x-client-code": DEFAULT_CLIENT_CODE,
        "x-feed-token": session.feed_token,
    }
    ws = websocket.create_connection(args.ws_url, header=[f"{k}: {v}" for k, v in headers.items()], timeout=10)
    tokens = args.tokens.split(",")
    request = {
        "correlationID": "naive",
        "action": 1,
        "params": {"mode": args.mode, "tokenList": [{"exchangeType": p.ExchangeType.NSE_CM, "tokens": tokens}]},
    }
    ws.send(json.dumps(request))
    parse = angel.sdk_packet_parser()
    r = redis.Redis.from_url(args.redis_url)

    written = 0
    measuring = False
    began = time.monotonic()
    start = began + args.warmup
    end = start + args.seconds
    count0 = cpu0 = t0 = 0.0
    while True:
        data = ws.recv()
        if isinstance(data, str):
            continue  # pong / errors
        tick = parse(data)
        r.xadd(f"ticks:{tick['token']}", flatten(tick), maxlen=10_000, approximate=True)
        written += 1
        if written % 64 == 0:
            now = time.monotonic()
            if not measuring and now >= start:
                measuring, count0, cpu0, t0 = True, written, time.process_time(), now
            elif measuring and now >= end:
                result = {"ticks": written - count0, "seconds": now - t0, "cpu_seconds": time.process_time() - cpu0}
                break
    print(json.dumps(result), flush=True)
    ws.close()
    r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
