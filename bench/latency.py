"""The latency client, run as its own process beside the worker (so its CPU and GIL are its own).

    python -m bench.latency --redis-url URL --streams a,b,… --seconds S [--probe-every 0.005]

* **frame → consumer**: one ``XREAD BLOCK`` loop over the sampled tick streams. For every entry,
  the time it arrived here minus its ``recv_ts`` (the worker's clock when the frame came off the
  WebSocket). Both are ``time.time_ns()`` on the same machine.
* **XADD → XREAD**: a thread XADDs a probe entry to ``bench:probe`` every ``--probe-every``
  seconds, stamped just before the call; the same XREAD loop reads it. So it is Redis's own
  delivery (XADD executed → blocked reader woken → reply parsed), under the same load.

Prints one JSON object: the two lists of samples, in µs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

PROBE_STREAM = "bench:probe"


def _probe(url: str, every: float, stop: threading.Event) -> None:
    client = redis.Redis.from_url(url)
    next_at = time.monotonic()
    while not stop.is_set():
        client.xadd(PROBE_STREAM, {"t": time.time_ns() // 1000}, maxlen=10_000, approximate=True)
        next_at += every
        time.sleep(max(0.0, next_at - time.monotonic()))
    client.close()


def measure(url: str, streams: list[str], seconds: float, probe_every: float) -> dict[str, list[int]]:
    client = redis.Redis.from_url(url)
    names = [*streams, PROBE_STREAM]
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.xrevrange(name, count=1)
    tops: list[Any] = pipe.execute()  # start after what each stream holds now (IDs are receive times: no guessing)
    last: dict[Any, Any] = {name: top[0][0] if top else "0-0" for name, top in zip(names, tops, strict=True)}
    frame_to_consumer: list[int] = []
    xadd_to_xread: list[int] = []
    stop = threading.Event()
    prober = threading.Thread(target=_probe, args=(url, probe_every, stop), daemon=True)
    prober.start()
    deadline = time.monotonic() + seconds
    probe_key = PROBE_STREAM.encode()
    while time.monotonic() < deadline:
        reply: Any = client.xread(last, count=1000, block=100)
        now = time.time_ns() // 1000
        for stream, entries in reply or ():
            if stream == probe_key:
                xadd_to_xread += [now - int(fields[b"t"]) for _, fields in entries]
            else:
                frame_to_consumer += [now - int(fields[b"recv_ts"]) for _, fields in entries]
            last[stream.decode()] = entries[-1][0]
    stop.set()
    prober.join(2)
    client.close()
    return {"frame_to_consumer": frame_to_consumer, "xadd_to_xread": xadd_to_xread}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--streams", required=True, help="comma-separated tick streams to read")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--probe-every", type=float, default=0.005)
    args = parser.parse_args(argv)
    result = measure(args.redis_url, args.streams.split(","), args.seconds, args.probe_every)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
