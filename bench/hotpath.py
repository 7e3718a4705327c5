"""CPU per tick of the worker's own code, without I/O, against the naive path's: one process, best of R.

    python -m bench.hotpath [--tokens N] [--ticks N] [--repeat R]

angelstream: ``Worker.on_frame`` (decode → normalize → the writer's queue), then, per batch of
``BATCH_MAX``, the writer's own steps: take it (entry IDs), make its XADD bytes, count the replies.
Naive: the SDK's parser, its dict flattened (best-five lists as JSON), the XADD packed by redis-py
(with hiredis). Neither counts the WebSocket, the sockets or Redis: this is the part a code change
moves, measured in one process, so without the end-to-end run's noise (bench/README.md).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import sys
import time
from collections.abc import Callable, Sequence

import redis

from bench.naive import flatten
from worker import protocol as p
from worker.angel import sdk_packet_parser
from worker.app import Worker
from worker.instruments import InstrumentIndex, generate_master
from worker.settings import load
from worker.simulator import Market

DISTINCT = 4  # packets per token, cycled: never an exact repeat of the token's last one (as the simulator's blast)


def frames(mode: p.Mode, tokens: int) -> tuple[InstrumentIndex, list[bytes]]:
    """The instruments and ``DISTINCT`` frames per token, interleaved as a busy feed sends them."""
    index = InstrumentIndex(generate_master(tokens))
    markets = [Market(inst, seed=i) for i, inst in enumerate(index)]
    out: list[bytes] = []
    for _ in range(DISTINCT):
        for market in markets:
            market.step()
            out.append(p.encode(market.packet(mode)))
    return index, out


def offline_worker(index: InstrumentIndex) -> Worker:
    """A worker that knows ``index`` and is never started: its code, none of its I/O."""
    settings = load(
        angel_api_key="k", angel_client_code="C1", angel_pin="1", angel_totp_secret="S",
        angel_api_url="http://127.0.0.1:1", angel_ws_url="ws://127.0.0.1:1/s", angel_instruments_url="master.json",
    )  # fmt: skip
    worker = Worker(settings, index)
    worker.use_index(index)
    return worker


def angelstream(worker: Worker, batch: list[bytes]) -> Callable[[], None]:
    """One pass over ``batch`` through the worker's code (no sockets: Redis's replies are made up)."""
    sink, on_frame, batch_max = worker.sink, worker.on_frame, worker.settings.batch_max
    clock = itertools.count(time.time_ns() // 1000, 7)  # receive times, µs, increasing

    def one_pass() -> None:
        for k, frame in enumerate(batch, 1):
            on_frame(frame, next(clock))
            if k % batch_max == 0 or k == len(batch):
                taken = sink._take()
                sink._xadds(taken)
                sink._apply(taken, [entry.id for entry in taken], ())

    return one_pass


def naive(batch: list[bytes]) -> Callable[[], None]:
    """One pass over ``batch`` the naive way: the SDK's parser, flatten, redis-py's XADD packing."""
    parse = sdk_packet_parser()
    pack: Callable[..., object] = redis.Connection().pack_command  # type: ignore[no-untyped-call]

    def one_pass() -> None:
        for frame in batch:
            tick = parse(frame)
            fields = flatten(tick)
            pieces: list[object] = ["XADD", f"ticks:{tick['token']}", "MAXLEN", "~", 10_000, "*"]
            for pair in fields.items():
                pieces.extend(pair)
            pack(*pieces)

    return one_pass


def best_per_tick_us(passes: Sequence[Callable[[], None]], ticks: int, repeat: int) -> list[float]:
    """Each pass's best time per tick, µs; the passes take turns, so a slow spell of the machine
    falls on all of them alike."""
    best = [float("inf")] * len(passes)
    for _ in range(repeat):
        for i, one_pass in enumerate(passes):
            began = time.perf_counter()
            one_pass()
            best[i] = min(best[i], time.perf_counter() - began)
    return [seconds / ticks * 1e6 for seconds in best]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1000, help="instruments, one market model each")
    parser.add_argument("--repeat", type=int, default=15, help="passes over the frames; the best is reported")
    args = parser.parse_args(argv)
    print(f"# CPU per tick without I/O, µs (best of {args.repeat} passes over {args.tokens:,} tokens × "
          f"{DISTINCT} frames); {platform.python_implementation()} {platform.python_version()}")  # fmt: skip
    print(f"{'mode':<11}{'angelstream':>13}{'naive':>10}{'speed-up':>10}")
    for mode in (p.Mode.LTP, p.Mode.QUOTE, p.Mode.SNAP_QUOTE):
        index, batch = frames(mode, args.tokens)
        passes = [angelstream(offline_worker(index), batch), naive(batch)]
        ours, theirs = best_per_tick_us(passes, len(batch), args.repeat)
        print(f"{mode.name:<11}{ours:>13.2f}{theirs:>10.2f}{theirs / ours:>9.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
