"""Decode speed per packet and mode: angelstream's codec against smartapi-python's parser.

    python -m bench.decode [--number N] [--repeat R]

Prints nanoseconds per packet (best of R runs of N decodes each) and the speed-up. Packets come
from the simulator's market model, so they carry realistic values.
"""

from __future__ import annotations

import argparse
import platform
import sys
import timeit
from collections.abc import Callable, Sequence
from typing import Any

from worker import protocol as p
from worker.angel import sdk_packet_parser
from worker.instruments import bundled_master_path, load_master_file
from worker.simulator import Market


def sample_frames() -> dict[p.Mode, bytes]:
    sbin = next(i for i in load_master_file(bundled_master_path()) if i.symbol == "SBIN-EQ")
    market = Market(sbin, seed=1)
    market.step()
    return {mode: p.encode(market.packet(mode)) for mode in p.Mode}


def per_packet_ns(parse: Callable[[bytes], Any], frame: bytes, number: int, repeat: int) -> float:
    return min(timeit.repeat(lambda: parse(frame), number=number, repeat=repeat)) / number * 1e9


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20_000, help="decodes per timing run")
    parser.add_argument("--repeat", type=int, default=5, help="timing runs; the best is reported")
    args = parser.parse_args(argv)
    sdk = sdk_packet_parser()
    print(f"# decode, ns per packet (best of {args.repeat} × {args.number}); {platform.python_implementation()} "
          f"{platform.python_version()} on {platform.machine()}")  # fmt: skip
    print(f"{'mode':<11}{'bytes':>6}{'angelstream':>13}{'SDK':>10}{'speed-up':>10}")
    for mode, frame in sample_frames().items():
        ours = per_packet_ns(p.decode, frame, args.number, args.repeat)
        theirs = per_packet_ns(sdk, frame, args.number, args.repeat)
        print(f"{mode.name:<11}{len(frame):>6}{ours:>13.0f}{theirs:>10.0f}{theirs / ours:>9.1f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
