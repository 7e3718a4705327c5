"""``python -m bench.probed_worker run``: the real worker, optionally with the writer's acknowledgements timed.

Without ``$BENCH_LATENCY_FILE`` it is ``python -m worker run`` and nothing else. ``$BENCH_PRELOAD``
(comma-separated modules) is imported first: a way to try a hot-path change (a module that
monkeypatches the worker) with the very same benchmark, without touching ``worker/``.

With ``$BENCH_LATENCY_FILE``, the worker's code is still unchanged; this entry point wraps
``Sink._apply`` (called with a batch once its replies are in) so that, for each tick it wrote, it
records the epoch µs at which the batch's replies were back and that
time minus the tick's ``recv_ts`` (the worker's clock when the frame came off the WebSocket):
**frame received → XADD acknowledged**, as the worker sees it, including the queue, the batch
wait and the Redis round trip.

The samples go to ``$BENCH_LATENCY_FILE`` when the worker exits: int64 pairs (ack µs, latency µs).
Costs about half a µs per tick, so throughput is measured with the plain ``python -m worker``.
"""

from __future__ import annotations

import array
import importlib
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from worker import keys
from worker.cli import main
from worker.sink import Sink

_samples = array.array("q")  # ack µs, latency µs, ack µs, latency µs, …


def _timed(apply: Callable[..., Any]) -> Callable[..., Any]:
    def timed_apply(self: Sink, *args: Any, **kwargs: Any) -> Any:
        again = apply(self, *args, **kwargs)
        now = time.time_ns() // 1000
        retried = {id(entry) for entry in again} if again else ()
        for entry in args[0]:  # (batch, results, held)
            if entry.stream != keys.EVENTS and id(entry) not in retried:
                _samples.append(now)
                _samples.append(now - entry.us)
        return again

    return timed_apply


def run(argv: list[str]) -> int:
    for module in filter(None, os.environ.get("BENCH_PRELOAD", "").split(",")):
        importlib.import_module(module)
    path = os.environ.get("BENCH_LATENCY_FILE")
    if not path:
        return main(argv)
    Sink._apply = _timed(Sink._apply)  # type: ignore[method-assign]
    try:
        return main(argv)
    finally:
        with open(path, "wb") as out:
            _samples.tofile(out)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
