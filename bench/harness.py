"""The pieces every end-to-end measurement needs: a private Redis, the simulator, the worker as a process."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import redis

from bench import procstat
from worker import keys
from worker.instruments import Instrument, generate_master
from worker.localredis import LocalRedis
from worker.simulator import SimConfig, SimulatorThread

TOKENS_PER_CONNECTION = 1000


class BenchError(RuntimeError):
    pass


def wait_until(predicate: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def xadd_calls(client: redis.Redis) -> int:
    """XADDs Redis has executed since the last CONFIG RESETSTAT (tick streams and events alike)."""
    stats: dict[str, Any] = client.info("commandstats")
    return int(stats.get("cmdstat_xadd", {}).get("calls", 0))


def redis_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def used_memory(client: redis.Redis) -> int:
    info: dict[str, Any] = client.info("memory")
    return int(info["used_memory"])


def heartbeat(client: redis.Redis) -> dict[str, Any] | None:
    raw = client.get(keys.HEARTBEAT)
    beat: dict[str, Any] | None = json.loads(raw) if isinstance(raw, bytes) else None
    return beat


@contextlib.contextmanager
def private_redis() -> Iterator[tuple[LocalRedis, redis.Redis]]:
    """A throwaway ``redis-server`` (never the shared one) and a client of it."""
    with LocalRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            yield server, client
        finally:
            client.close()


@contextlib.contextmanager
def simulator(instruments: list[Instrument], **config: Any) -> Iterator[SimulatorThread]:
    config.setdefault("rate_per_token", 0.001)  # no random walk to speak of: the benchmark sends what it measures
    with SimulatorThread(SimConfig(instruments=instruments, **config)) as sim:
        yield sim


def master(count: int) -> list[Instrument]:
    return generate_master(count)


def blast(sim: SimulatorThread, enabled: bool, rate: float = 0.0) -> None:
    """Blast mode on (``rate`` frames/s per connection; 0: flat out) or off, from any thread."""
    sim.loop.call_soon_threadsafe(sim.sim.set_blast, enabled, rate)


def sim_subscriptions(sim: SimulatorThread) -> int:
    async def count() -> int:
        return sum(len(c.subscriptions) for c in sim.sim.connections)

    result: int = sim.call(count())
    return result


@dataclass
class WorkerProcess:
    """``python -m worker run`` (or another entry point) against the simulator, as a child process."""

    proc: subprocess.Popen[bytes]
    workdir: tempfile.TemporaryDirectory[str]
    log_path: str

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return procstat.cpu_seconds(self.pid)

    def memory(self) -> procstat.Memory:
        return procstat.memory(self.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, errors="replace") as handle:
            return "".join(handle.readlines()[-lines:])

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        code = self.proc.returncode
        self.workdir.cleanup()
        return code


def _die_with_parent() -> None:  # runs in the child, between fork and exec
    """The worker gets SIGTERM if the benchmark dies, so a crashed run leaves no worker behind (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def start_worker(
    sim: SimulatorThread,
    redis_url: str,
    settings: Mapping[str, str] | None = None,
    module: str = "worker",
    extra_env: Mapping[str, str] | None = None,
) -> WorkerProcess:
    """Start the worker process: the simulator's ``ANGEL_*`` settings, ``redis_url``, no instrument cache.

    It runs in an empty directory, so no ``.env`` is read; ``settings`` override (e.g. ``BATCH_MAX``).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANGEL_", "REDIS_"))}
    env |= sim.sim.worker_env()
    env |= {
        "REDIS_URL": redis_url,
        "INSTRUMENTS_CACHE": "",
        "LOG_LEVEL": "WARNING",
        "HEALTH_PORT": "0",  # a free port: never collide with a worker already running here
        "PYTHONUNBUFFERED": "1",
    }
    env |= dict(settings or {})
    env |= dict(extra_env or {})
    workdir = tempfile.TemporaryDirectory(prefix="angelstream-bench-")
    log_path = os.path.join(workdir.name, "worker.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", module, "run"],
            cwd=workdir.name,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, no locks taken
        )
    return WorkerProcess(proc, workdir, log_path)


def subscribe(client: redis.Redis, instruments: list[Instrument], mode: str) -> None:
    """Write the desired subscriptions to the hash the worker reconciles from."""
    client.delete(keys.SUBSCRIPTIONS)
    for start in range(0, len(instruments), 1000):
        part = instruments[start : start + 1000]
        client.hset(keys.SUBSCRIPTIONS, mapping={i.key: mode for i in part})


def wait_subscribed(
    sim: SimulatorThread, client: redis.Redis, worker: WorkerProcess, count: int, timeout: float = 60
) -> None:
    """Until the simulator holds all ``count`` subscriptions and the worker reports them (live or pending)."""

    def ready() -> bool:
        if not worker.alive():
            raise BenchError(f"the worker exited with {worker.proc.returncode}:\n{worker.log_tail()}")
        if sim_subscriptions(sim) < count:
            return False
        beat = heartbeat(client)
        return beat is not None and beat["subscriptions"]["live"] + beat["subscriptions"]["pending"] >= count

    wait_until(ready, timeout, f"{count} subscriptions")
