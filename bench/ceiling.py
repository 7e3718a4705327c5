"""Redis's own pipelined XADD rate for the worker's entry shape: what no client can beat.

``redis-benchmark`` (C, one connection, pipeline 64, random streams) when it is on PATH; else the
same load from Python with every command packed beforehand (``hiredis.pack_command``), so the
client costs next to nothing and Redis is what is measured.
"""

from __future__ import annotations

import csv
import io
import itertools
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import hiredis

from worker import protocol as p
from worker.instruments import generate_master
from worker.normalize import Normalizer, decode_fields
from worker.schema import MODES_BY_NAME
from worker.simulator import Market

PIPELINE = 64
MAXLEN = 10_000


@dataclass(frozen=True)
class Ceiling:
    ops_per_second: float
    tool: str  # "redis-benchmark" or "python"


def sample_fields(mode: str) -> tuple[str, ...]:
    """The fields of one real worker entry in ``mode`` (ltp, quote, snap_quote)."""
    inst = generate_master(1)[0]
    market = Market(inst, seed=1)
    market.step()
    normalizer = Normalizer()
    normalizer.add(inst)
    packet = p.decode(p.encode(market.packet(MODES_BY_NAME[mode])))
    entry = normalizer.entry(packet, time.time_ns() // 1000)
    assert entry is not None
    return decode_fields(entry[1])


def xadd_args(fields: tuple[str, ...], stream: str) -> list[str]:
    return ["XADD", stream, "MAXLEN", "~", str(MAXLEN), "*", *fields]


def redis_benchmark(port: int, fields: tuple[str, ...], streams: int, requests: int) -> float:
    """ops/s from ``redis-benchmark -c 1 -P 64 -r streams``: one connection, like the worker's writer."""
    binary = shutil.which("redis-benchmark")
    assert binary is not None
    args = [binary, "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-P", str(PIPELINE), "-n", str(requests)]
    args += ["-r", str(streams), "--csv", *xadd_args(fields, "ticks:NSE:__rand_int__")]
    out = subprocess.run(args, capture_output=True, text=True, check=True, timeout=300).stdout
    rows = [row for row in csv.reader(io.StringIO(out)) if len(row) > 1 and row[0] != "test"]
    return float(rows[-1][1])


def python_writer(port: int, fields: tuple[str, ...], streams: int, requests: int) -> float:
    """The same load from Python: pre-packed commands, pipelines of 64, replies parsed with hiredis."""
    commands = [hiredis.pack_command(tuple[Any](xadd_args(fields, f"ticks:NSE:{i:012d}"))) for i in range(streams)]
    batches = [b"".join(itertools.islice(itertools.cycle(commands), k, k + PIPELINE)) for k in range(0, 1024, PIPELINE)]
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sent = 0
        began = time.perf_counter()
        for batch in itertools.cycle(batches):
            if sent >= requests:
                break
            sock.sendall(batch)
            sent += PIPELINE
            replies = 0
            while replies < PIPELINE:
                reader.feed(sock.recv(1 << 16))
                while reader.gets() is not False:
                    replies += 1
        return sent / (time.perf_counter() - began)


def pack(args: tuple[Any, ...]) -> bytes:
    packed: bytes = hiredis.pack_command(args)
    return packed


def send_all(port: int, commands: list[bytes], batch: int = 1000) -> None:
    """Send pre-packed commands in pipelines of ``batch``, reading every reply (errors raise)."""
    reader = hiredis.Reader()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for start in range(0, len(commands), batch):
            chunk = commands[start : start + batch]
            sock.sendall(b"".join(chunk))
            replies = 0
            while replies < len(chunk):
                reader.feed(sock.recv(1 << 16))
                while (reply := reader.gets()) is not False:
                    if isinstance(reply, hiredis.ReplyError):
                        raise reply
                    replies += 1


def measure(port: int, mode: str, streams: int, requests: int, tool: str = "auto") -> Ceiling:
    fields = sample_fields(mode)
    if tool == "redis-benchmark" or (tool == "auto" and shutil.which("redis-benchmark")):
        return Ceiling(redis_benchmark(port, fields, streams, requests), "redis-benchmark")
    return Ceiling(python_writer(port, fields, streams, requests), "python")
