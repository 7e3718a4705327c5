"""End-to-end benchmark: Redis's ceiling, the naive SDK baseline, and angelstream itself, on one machine.

    python -m bench [--quick] [--repeat N] [--out DIR] [--update-readme]

One run starts a private ``redis-server`` and the simulator in blast mode (pre-encoded frames, as
fast as the socket drains or at a fixed rate), then measures, each section on a fresh Redis state:

1. **ceiling**: Redis's own pipelined XADD rate for the worker's entry shape (``redis-benchmark``
   ``-c 1 -P 64`` over as many streams as tokens), per mode;
2. **naive**: the SDK's parser + one XADD round trip per tick (:mod:`bench.naive`), per mode;
3. **angelstream**: ``python -m worker run`` as its own process, frames in → XADDs acknowledged,
   at the maximum rate the simulator can push, per mode: ticks/s (XADDs Redis executed, from
   ``INFO commandstats``), the worker's CPU per tick (``/proc``), ticks dropped;
4. **latency** at fixed offered loads: frame received → XADD acknowledged (in the worker,
   :mod:`bench.probed_worker`), frame received → a consumer's XREAD, and XADD → XREAD
   (:mod:`bench.latency`): p50/p99/p99.9;
5. **footprint**: the worker's RSS with 3,000 subscribed tokens; Redis bytes per stream entry.

Every section is repeated ``--repeat`` times; the table shows medians. Results go to
``DIR/e2e.json`` and ``DIR/e2e.md``; ``--update-readme`` also puts the table in bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import redis

from bench import ceiling, harness, procstat
from bench.harness import TOKENS_PER_CONNECTION, BenchError
from bench.latency import PROBE_STREAM
from bench.stats import median_of, summary
from worker import keys
from worker.instruments import Instrument
from worker.schema import MODES_BY_NAME
from worker.simulator import SimulatorThread

MODES = ("snap_quote", "ltp")
MODE_TITLES = {"ltp": "LTP", "quote": "Quote", "snap_quote": "SnapQuote"}
CEILING_REQUESTS = {"ltp": 400_000, "quote": 300_000, "snap_quote": 200_000}
CEILING_MIN_REQUESTS = 1_000
README = Path(__file__).with_name("README.md")
README_BEGIN = "<!-- bench:e2e:begin -->"
README_END = "<!-- bench:e2e:end -->"

#: The issue's targets.
TARGET_VS_CEILING = 0.40
TARGET_VS_NAIVE = 10.0
TARGET_P99_MS = 2.0
TARGET_P99_AT = 10_000
TARGET_BYTES_PER_ENTRY = 110
TARGET_RSS_MB = 150
FOOTPRINT_TOKENS = 3000
FOOTPRINT_RATE = 10_000


@dataclass
class Options:
    modes: tuple[str, ...] = MODES
    tokens: int = FOOTPRINT_TOKENS  # subscribed for the throughput runs (3 connections of 1000)
    warmup: float = 2.0  # seconds of blast before a throughput window
    seconds: float = 5.0  # throughput window
    naive_seconds: float = 3.0
    ceiling_scale: float = 1.0  # × CEILING_REQUESTS
    ceiling_tool: str = "auto"
    latency_mode: str = "snap_quote"
    latency_tokens: int = 1000  # one connection
    latency_rates: tuple[int, ...] = (1_000, 10_000, 50_000)
    latency_warmup: float = 1.5
    latency_seconds: float = 5.0
    footprint_seconds: float = 2.0  # at FOOTPRINT_RATE before the RSS is read
    repeat: int = 3
    settings: dict[str, str] = field(default_factory=dict)  # worker settings (env), e.g. BATCH_MAX
    preload: tuple[str, ...] = ()  # modules the worker process imports first (trying hot-path changes)
    sections: tuple[str, ...] = ("ceiling", "naive", "angelstream", "latency")

    @classmethod
    def quick(cls) -> Options:
        return cls(
            tokens=100,
            warmup=0.3,
            seconds=0.5,
            naive_seconds=0.3,
            ceiling_scale=0.05,
            latency_tokens=100,
            latency_rates=(1_000,),
            latency_warmup=0.3,
            latency_seconds=0.5,
            footprint_seconds=0.3,
            repeat=1,
        )


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- sections


def run_ceiling(server_port: int, client: redis.Redis, opts: Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in opts.modes:
        client.flushall()
        requests = max(CEILING_MIN_REQUESTS, int(CEILING_REQUESTS[mode] * opts.ceiling_scale))
        result = ceiling.measure(server_port, mode, opts.tokens, requests, opts.ceiling_tool)
        out[mode] = {"ticks_per_s": round(result.ops_per_second), "tool": result.tool, "streams": opts.tokens}
        log(f"ceiling {mode}: {result.ops_per_second:,.0f} XADD/s ({result.tool})")
    return out


def run_naive(sim: SimulatorThread, server_url: str, client: redis.Redis, opts: Options) -> dict[str, Any]:
    out: dict[str, Any] = {}
    instruments = sim.sim.config.instruments[: min(opts.tokens, TOKENS_PER_CONNECTION)]
    for mode in opts.modes:
        client.flushall()
        harness.blast(sim, True)
        args = [sys.executable, "-m", "bench.naive", "--ws-url", sim.sim.ws_url, "--api-url", sim.sim.url]
        args += ["--redis-url", server_url, "--mode", str(MODES_BY_NAME[mode])]
        args += ["--tokens", ",".join(i.token for i in instruments)]
        args += ["--warmup", str(opts.warmup), "--seconds", str(opts.naive_seconds)]
        try:
            done = subprocess.run(
                args, check=False, capture_output=True, text=True, timeout=120, cwd=tempfile.gettempdir()
            )
        finally:
            harness.blast(sim, False)
        if done.returncode != 0:
            raise BenchError(f"the naive client failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rate = result["ticks"] / result["seconds"]
        out[mode] = {
            "ticks_per_s": round(rate),
            "cpu_us_per_tick": round(1e6 * result["cpu_seconds"] / result["ticks"], 1),
        }
        log(f"naive {mode}: {rate:,.0f} ticks/s")
    return out


def _active_connections(sim: SimulatorThread) -> int:
    async def count() -> int:
        return sum(1 for c in sim.sim.connections if c.subscriptions)

    active: int = sim.call(count())
    return max(1, active)


@contextlib.contextmanager
def _worker(
    sim: SimulatorThread,
    server_url: str,
    client: redis.Redis,
    instruments: list[Instrument],
    mode: str,
    opts: Options,
    extra_env: dict[str, str] | None = None,
) -> Any:
    client.flushall()
    harness.subscribe(client, instruments, mode)
    env = {"BENCH_PRELOAD": ",".join(opts.preload)} | (extra_env or {})
    worker = harness.start_worker(sim, server_url, opts.settings, "bench.probed_worker", env)
    try:
        harness.wait_subscribed(sim, client, worker, len(instruments))
        yield worker
    finally:
        harness.blast(sim, False)
        worker.stop()


def _window(
    sim: SimulatorThread, client: redis.Redis, worker: harness.WorkerProcess, seconds: float, probes: bool = False
) -> dict[str, Any]:
    """Rates over ``seconds`` of whatever load is running now (``probes``: less the latency client's XADDs)."""
    beat0 = harness.heartbeat(client) or {}
    probes0 = int(client.xlen(PROBE_STREAM)) if probes else 0
    calls0, cpu0, rcpu0 = harness.xadd_calls(client) - probes0, worker.cpu(), harness.redis_cpu(client)
    frames0 = sim.sim.blast_frames
    began = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - began
    probes1 = int(client.xlen(PROBE_STREAM)) if probes else 0
    calls, cpu, rcpu = harness.xadd_calls(client) - probes1, worker.cpu(), harness.redis_cpu(client)
    frames = sim.sim.blast_frames
    beat = harness.heartbeat(client) or {}
    written = max(1, calls - calls0)
    return {
        "ticks_per_s": round(written / elapsed),
        "offered_per_s": round((frames - frames0) / elapsed),
        "dropped_per_s": round((beat.get("ticks_dropped", 0) - beat0.get("ticks_dropped", 0)) / elapsed),
        "buffered_at_end": beat.get("buffered", 0),
        "worker_cpu_cores": round((cpu - cpu0) / elapsed, 2),
        "worker_cpu_us_per_tick": round(1e6 * (cpu - cpu0) / written, 1),
        "redis_cpu_us_per_tick": round(1e6 * (rcpu - rcpu0) / written, 2),
    }


def steady_bytes_per_entry(client: redis.Redis, port: int, mode: str, samples: list[tuple[Any, ...]]) -> float:
    """Redis memory per entry once streams are long: the worker's own entries (``samples``, as it wrote
    them) copied into 100 streams × 1,000 entries with IDs like the worker's (receive ms, 100 ms apart);
    used_memory before and after, divided by the entries. The fixed cost per stream is ~1 B of that."""
    fields = samples or [ceiling.sample_fields(mode)]
    base_ms = time.time_ns() // 1_000_000
    commands = [
        ceiling.pack(("XADD", f"bench:mem:{s}", f"{base_ms + 100 * i}-0", *fields[(s + i) % len(fields)]))
        for s in range(MEMORY_STREAMS)
        for i in range(MEMORY_ENTRIES)
    ]
    before = harness.used_memory(client)
    ceiling.send_all(port, commands)
    grown = harness.used_memory(client) - before
    client.delete(*[f"bench:mem:{s}" for s in range(MEMORY_STREAMS)])
    return round(grown / len(commands), 1)


MEMORY_STREAMS = 100
MEMORY_ENTRIES = 1000


def sample_entries(client: redis.Redis, count: int = 200) -> list[tuple[Any, ...]]:
    """Up to ``count`` entries the worker wrote, as flat field tuples (a few from each of several streams)."""
    found: list[tuple[Any, ...]] = []
    for stream in client.scan_iter(match=keys.TICKS_PATTERN, count=100):
        entries: Any = client.xrange(stream, count=20)
        found += [tuple(itertools.chain.from_iterable(f.items())) for _, f in entries]
        if len(found) >= count:
            break
    return found


def stream_memory(client: redis.Redis) -> dict[str, Any]:
    """All the tick streams hold, per entry, each stream's fixed overhead included: used_memory before and
    after deleting them (the worker stopped)."""
    streams = list(client.scan_iter(match=keys.TICKS_PATTERN, count=1000))
    entries = sum(int(client.xlen(s)) for s in streams)
    before = harness.used_memory(client)
    for start in range(0, len(streams), 500):
        client.delete(*streams[start : start + 500])
    return {
        "redis_bytes_per_entry_with_keys": round((before - harness.used_memory(client)) / max(1, entries), 1),
        "entries_per_stream": round(entries / max(1, len(streams)), 1),
    }


def run_angelstream(
    sim: SimulatorThread, server_url: str, server_port: int, client: redis.Redis, opts: Options
) -> dict[str, Any]:
    out: dict[str, Any] = {"modes": {}, "footprint": {}}
    instruments = sim.sim.config.instruments[: opts.tokens]
    for mode in opts.modes:
        with _worker(sim, server_url, client, instruments, mode, opts) as worker:
            if not out["footprint"]:  # the first mode's worker: RSS idle, then at a steady FOOTPRINT_RATE
                idle = worker.memory()
                harness.blast(sim, True, FOOTPRINT_RATE / _active_connections(sim))
                steady = _window(sim, client, worker, opts.footprint_seconds)
                out["footprint"] = {
                    "tokens": len(instruments),
                    "mode": mode,
                    "rss_idle_mb": round(idle.rss / 2**20, 1),
                    "rss_mb": round(worker.memory().rss / 2**20, 1),
                    "at_ticks_per_s": steady["ticks_per_s"],
                }
            harness.blast(sim, True)
            time.sleep(opts.warmup)
            result = _window(sim, client, worker, opts.seconds)
            result["peak_rss_mb"] = round(worker.memory().peak / 2**20, 1)
            harness.blast(sim, False)
        samples = sample_entries(client)
        result |= stream_memory(client)
        result["redis_bytes_per_entry"] = steady_bytes_per_entry(client, server_port, mode, samples)
        out["modes"][mode] = result
        log(
            f"angelstream {mode}: {result['ticks_per_s']:,} ticks/s written, {result['offered_per_s']:,}/s offered, "
            f"{result['dropped_per_s']:,}/s dropped, {result['worker_cpu_us_per_tick']} µs CPU/tick"
        )
    return out


def _stream_sample(instruments: list[Instrument], rate: float) -> list[str]:
    """Enough streams for ~2,000 samples/s at ``rate`` ticks/s over all of them (at most 200)."""
    count = max(1, min(len(instruments), 200, math.ceil(len(instruments) * 2000 / rate)))
    return [keys.ticks(i.exchange, i.symbol) for i in instruments[:count]]


def run_latency(sim: SimulatorThread, server_url: str, client: redis.Redis, opts: Options) -> dict[str, Any]:
    levels: dict[str, Any] = {}
    instruments = sim.sim.config.instruments[: opts.latency_tokens]
    for rate in opts.latency_rates:
        with tempfile.TemporaryDirectory(prefix="angelstream-bench-lat-") as tmp:
            samples_path = os.path.join(tmp, "samples.bin")
            env = {"BENCH_LATENCY_FILE": samples_path}
            with _worker(sim, server_url, client, instruments, opts.latency_mode, opts, env) as worker:
                harness.blast(sim, True, rate / _active_connections(sim))
                time.sleep(opts.latency_warmup)
                began_us = time.time_ns() // 1000
                streams = _stream_sample(instruments, rate)
                args = [sys.executable, "-m", "bench.latency", "--redis-url", server_url]
                args += ["--streams", ",".join(streams), "--seconds", str(opts.latency_seconds)]
                consumer = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                window = _window(sim, client, worker, opts.latency_seconds, probes=True)
                stdout, stderr = consumer.communicate(timeout=60)
                ended_us = time.time_ns() // 1000
                if consumer.returncode != 0:
                    raise BenchError(f"the latency client failed:\n{stderr[-2000:]}")
                harness.blast(sim, False)
            samples = array("q")
            with open(samples_path, "rb") as handle:
                samples.frombytes(handle.read())
        acked = [samples[i + 1] for i in range(0, len(samples), 2) if began_us <= samples[i] <= ended_us]
        read = json.loads(stdout.strip().splitlines()[-1])
        levels[str(rate)] = {
            "offered_per_s": window["offered_per_s"],
            "written_per_s": window["ticks_per_s"],
            "dropped_per_s": window["dropped_per_s"],
            "buffered_at_end": window["buffered_at_end"],
            "frame_to_xadd_ack": summary(acked),
            "frame_to_consumer": summary(read["frame_to_consumer"]),
            "xadd_to_xread": summary(read["xadd_to_xread"]),
            "sampled_streams": len(streams),
        }
        log(
            f"latency {rate:,}/s: frame→ack p50/p99 {levels[str(rate)]['frame_to_xadd_ack']['p50_ms']}/"
            f"{levels[str(rate)]['frame_to_xadd_ack']['p99_ms']} ms, written {window['ticks_per_s']:,}/s"
        )
    return {"mode": opts.latency_mode, "tokens": len(instruments), "levels": levels}


def run_once(opts: Options) -> dict[str, Any]:
    count = max(opts.tokens, opts.latency_tokens)
    began, steal0 = time.monotonic(), procstat.stolen_cpu()
    with harness.private_redis() as (server, client), harness.simulator(harness.master(count)) as sim:
        version = str(client.info("server")["redis_version"])
        result: dict[str, Any] = {"redis_version": version}
        if "ceiling" in opts.sections:
            result["ceiling"] = run_ceiling(server.port, client, opts)
        if "naive" in opts.sections:
            result["naive"] = run_naive(sim, server.url, client, opts)
        if "angelstream" in opts.sections:
            angel = run_angelstream(sim, server.url, server.port, client, opts)
            result["angelstream"] = angel["modes"]
            result["footprint"] = angel["footprint"] | {
                "redis_bytes_per_entry": {mode: angel["modes"][mode]["redis_bytes_per_entry"] for mode in opts.modes}
            }
        if "latency" in opts.sections:
            result["latency"] = run_latency(sim, server.url, client, opts)
    elapsed = time.monotonic() - began
    result["machine_load"] = {"steal_cores": round((procstat.stolen_cpu() - steal0) / elapsed, 2)}
    for mode, row in result.get("angelstream", {}).items():
        if "ceiling" in result:
            row["vs_ceiling"] = round(row["ticks_per_s"] / result["ceiling"][mode]["ticks_per_s"], 3)
        if "naive" in result:
            row["vs_naive"] = round(row["ticks_per_s"] / result["naive"][mode]["ticks_per_s"], 2)
    return result


# --------------------------------------------------------------------------- targets and the report


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for mode, row in result.get("angelstream", {}).items():
        title = MODE_TITLES[mode]
        if "vs_ceiling" in row:
            ratio = row["vs_ceiling"]
            rows.append(
                _target(
                    f"e2e / ceiling ({title})",
                    f"≥ {TARGET_VS_CEILING:.0%}",
                    ratio,
                    ratio >= TARGET_VS_CEILING,
                    "{:.1%}",
                )
            )
        if "vs_naive" in row:
            ratio = row["vs_naive"]
            rows.append(
                _target(f"e2e / naive ({title})", f"≥ {TARGET_VS_NAIVE:g}×", ratio, ratio >= TARGET_VS_NAIVE, "{:.1f}×")
            )
    level = result.get("latency", {}).get("levels", {}).get(str(TARGET_P99_AT))
    if level is not None:
        p99 = level["frame_to_xadd_ack"]["p99_ms"]
        ok = p99 <= TARGET_P99_MS and level["dropped_per_s"] == 0
        rows.append(
            _target(f"p99 frame→XADD ack at {TARGET_P99_AT:,}/s", f"≤ {TARGET_P99_MS:g} ms", p99, ok, "{:.2f} ms")
        )
    if "footprint" in result:
        for mode, value in result["footprint"]["redis_bytes_per_entry"].items():
            rows.append(
                _target(
                    f"Redis bytes/entry ({MODE_TITLES[mode]})",
                    f"≤ {TARGET_BYTES_PER_ENTRY}",
                    value,
                    value <= TARGET_BYTES_PER_ENTRY,
                    "{:.0f} B",
                )
            )
        rss = result["footprint"]["rss_mb"]
        rows.append(
            _target(
                f"worker RSS, {result['footprint']['tokens']:,} tokens",
                f"≤ {TARGET_RSS_MB} MB",
                rss,
                rss <= TARGET_RSS_MB,
                "{:.0f} MB",
            )
        )
    return rows


def _target(name: str, target: str, value: float, met: bool, fmt: str) -> dict[str, Any]:
    return {"name": name, "target": target, "value": value, "shown": fmt.format(value), "met": bool(met)}


def _n(value: float) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:,.0f}"


def render(result: dict[str, Any]) -> str:
    """The Markdown report (the console gets the same); sections left out with --only are left out here."""
    m = result["meta"]
    modes = list(m["options"]["modes"])
    lines = [
        f"**{m['date']}** · {m['machine']['cpu']}, {m['machine']['cores']} cores, {m['machine']['memory_gib']} GiB · "
        f"Python {m['python']} · Redis {m['redis_version']} · {m['runs']} run(s), medians · "
        f"{m['options']['tokens']:,} tokens · `{m['command']}`",
    ]
    load = result.get("machine_load")
    if load:
        lines[0] += f" · CPU stolen by the hypervisor meanwhile: {load['steal_cores']:.2f} cores"
    c, nv, a = result.get("ceiling"), result.get("naive"), result.get("angelstream")
    if c or nv or a:
        lines += [
            "",
            "| ticks/s (medians; <sub>min–max of the runs</sub>) | " + " | ".join(MODE_TITLES[x] for x in modes) + " |",
        ]
        lines.append("|---|" + "---:|" * len(modes))

    def row(name: str, cells: list[str]) -> None:
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    def spread(section: str, mode: str, key: str = "ticks_per_s") -> str:
        values = [run[section][mode][key] for run in result.get("runs", []) if section in run]
        return f" <sub>{min(values):,.0f}–{max(values):,.0f}</sub>" if len(values) > 1 else ""

    if c:
        row(
            f"1. Ceiling: Redis pipelined XADD ({c[modes[0]]['tool']}, 1 conn., P64)",
            [_n(c[x]["ticks_per_s"]) + spread("ceiling", x) for x in modes],
        )
    if nv:
        row(
            "2. Naive: SDK parser + 1 XADD round trip per tick",
            [_n(nv[x]["ticks_per_s"]) + spread("naive", x) for x in modes],
        )
    if a:
        row(
            "3. **angelstream** end to end (XADDs acked)",
            [f"**{_n(a[x]['ticks_per_s'])}**" + spread("angelstream", x) for x in modes],
        )
        if c:
            row("angelstream / ceiling", [f"{a[x]['vs_ceiling']:.1%}" for x in modes])
        if nv:
            row("angelstream / naive", [f"{a[x]['vs_naive']:.1f}×" for x in modes])
        row("frames offered by the simulator, /s", [_n(a[x]["offered_per_s"]) for x in modes])
        row("ticks dropped by the worker (buffer full), /s", [_n(a[x]["dropped_per_s"]) for x in modes])
        row("ticks waiting in the worker's buffer at the end", [_n(a[x]["buffered_at_end"]) for x in modes])
        row(
            "worker CPU, µs per tick written (cores used)",
            [f"{a[x]['worker_cpu_us_per_tick']:.1f} ({a[x]['worker_cpu_cores']:.2f})" for x in modes],
        )
        row("Redis CPU, µs per tick", [f"{a[x]['redis_cpu_us_per_tick']:.2f}" for x in modes])
    if nv:
        row("naive client CPU, µs per tick", [f"{nv[x]['cpu_us_per_tick']:.1f}" for x in modes])

    lat = result.get("latency")
    if lat:
        lines += [
            "",
            f"Latency, {MODE_TITLES[lat['mode']]}, {lat['tokens']:,} tokens, ms p50 / p99 / p99.9:",
            "",
            "| offered ticks/s | written /s | dropped /s | frame → XADD acked | frame → consumer XREAD "
            "| XADD → XREAD |",
            "|---:|---:|---:|---|---|---|",
        ]
        for rate, level in lat["levels"].items():
            cells = [
                f"{int(rate):,} ({_n(level['offered_per_s'])})", _n(level["written_per_s"]), _n(level["dropped_per_s"]),
                *[_pcts(level[k]) for k in ("frame_to_xadd_ack", "frame_to_consumer", "xadd_to_xread")],
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")

    f = result.get("footprint")
    if f and a:
        lines += [
            "",
            "| footprint | value |",
            "|---|---:|",
            f"| worker RSS, {f['tokens']:,} tokens ({MODE_TITLES[f['mode']]}), idle | {f['rss_idle_mb']:.0f} MB |",
            f"| worker RSS, {f['tokens']:,} tokens, at {_n(f['at_ticks_per_s'])} ticks/s | {f['rss_mb']:.0f} MB |",
            *[f"| worker peak RSS under max load ({MODE_TITLES[x]}) | {a[x]['peak_rss_mb']:.0f} MB |" for x in modes],
            *[
                f"| Redis bytes per entry ({MODE_TITLES[x]}): long streams · as the run left them "
                f"({a[x]['entries_per_stream']:,.0f} entries/stream, keys included) | "
                f"{f['redis_bytes_per_entry'][x]:.0f} B · {a[x]['redis_bytes_per_entry_with_keys']:.0f} B |"
                for x in modes
            ],
        ]
    if result["targets"]:
        lines += [
            "",
            "| target | goal | measured | |",
            "|---|---|---:|---|",
            *[
                f"| {t['name']} | {t['target']} | {t['shown']} | {'met' if t['met'] else '**missed**'} |"
                for t in result["targets"]
            ],
        ]
    return "\n".join(lines) + "\n"


def _pcts(s: dict[str, float]) -> str:
    return f"{s['p50_ms']:.2f} / {s['p99_ms']:.2f} / {s['p999_ms']:.2f}"


def update_readme(table: str, path: Path = README) -> None:
    text = path.read_text()
    head, _, rest = text.partition(README_BEGIN)
    _, _, tail = rest.partition(README_END)
    path.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")


# --------------------------------------------------------------------------- the command


def parse_args(argv: Sequence[str] | None) -> tuple[Options, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a sanity pass of a few seconds (tiny loads, 1 run)")
    parser.add_argument("--repeat", type=int, help="runs; medians are reported (default 3, --quick 1)")
    parser.add_argument("--modes", help="comma-separated: snap_quote, quote, ltp (default snap_quote,ltp)")
    parser.add_argument("--tokens", type=int, help="tokens subscribed in the throughput runs (default 3000)")
    parser.add_argument("--seconds", type=float, help="throughput window per mode (default 5)")
    parser.add_argument("--latency-rates", help="comma-separated offered ticks/s (default 1000,10000,50000)")
    parser.add_argument("--latency-mode", choices=sorted(MODE_TITLES), help="(default snap_quote)")
    parser.add_argument("--latency-seconds", type=float, help="window per offered load (default 5)")
    parser.add_argument("--only", help="comma-separated sections: ceiling, naive, angelstream, latency (default all)")
    parser.add_argument("--ceiling-tool", choices=("auto", "redis-benchmark", "python"), default="auto")
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE", help="a worker setting (env), e.g. BATCH_MAX=1000"
    )
    parser.add_argument(
        "--preload", action="append", default=[], metavar="MODULE",
        help="import MODULE in the worker process before it starts (a monkeypatch to try; on PYTHONPATH)",
    )  # fmt: skip
    parser.add_argument("--out", default=str(Path(__file__).with_name("results")), help="where e2e.json and e2e.md go")
    parser.add_argument("--update-readme", action="store_true", help="put the table in bench/README.md")
    args = parser.parse_args(argv)
    opts = Options.quick() if args.quick else Options()
    changes: dict[str, Any] = {}
    if args.repeat:
        changes["repeat"] = args.repeat
    if args.modes:
        changes["modes"] = tuple(m.strip() for m in args.modes.split(","))
        unknown = [m for m in changes["modes"] if m not in MODE_TITLES]
        if unknown:
            parser.error(f"unknown mode(s) {unknown}: use ltp, quote, snap_quote")
    if args.tokens:
        changes["tokens"] = args.tokens
    if args.seconds:
        changes["seconds"] = args.seconds
    if args.latency_rates:
        changes["latency_rates"] = tuple(int(r) for r in args.latency_rates.split(","))
    if args.latency_mode:
        changes["latency_mode"] = args.latency_mode
    if args.latency_seconds:
        changes["latency_seconds"] = args.latency_seconds
    changes["ceiling_tool"] = args.ceiling_tool
    changes["settings"] = dict(item.split("=", 1) for item in args.set)
    changes["preload"] = tuple(args.preload)
    if args.only:
        changes["sections"] = tuple(x.strip() for x in args.only.split(","))
        unknown = [x for x in changes["sections"] if x not in Options.sections]
        if unknown:
            parser.error(f"unknown section(s) {unknown}: use ceiling, naive, angelstream, latency")
    return replace(opts, **changes), args


def main(argv: Sequence[str] | None = None) -> int:
    opts, args = parse_args(argv)
    began = time.monotonic()
    runs = []
    try:
        for number in range(1, opts.repeat + 1):
            log(f"run {number}/{opts.repeat}")
            runs.append(run_once(opts))
    except (BenchError, OSError, redis.RedisError, subprocess.SubprocessError) as exc:
        print(f"python -m bench: {exc}", file=sys.stderr)
        return 1
    result: dict[str, Any] = median_of(runs)
    result["targets"] = targets(result)
    result["meta"] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": procstat.machine(),
        "python": platform.python_version(),
        "redis_version": runs[0]["redis_version"],
        "runs": len(runs),
        "seconds": round(time.monotonic() - began, 1),
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "options": asdict(opts),
    }
    result["runs"] = runs
    table = render(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "e2e.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "e2e.md").write_text(table)
    if args.update_readme:
        update_readme(table)
    log(f"done in {result['meta']['seconds']:.0f} s: {out / 'e2e.json'}, {out / 'e2e.md'}")
    return 0
