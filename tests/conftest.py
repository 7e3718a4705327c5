from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

from tests.workerkit import FAULT_REPORT, fault_table
from worker.localredis import LocalRedis
from worker.simulator import SimConfig, SimulatorThread

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
#: The long run (README, "Fuzzing"): HYPOTHESIS_PROFILE=fuzz pytest -m hypothesis --timeout=0
settings.register_profile(
    "fuzz", max_examples=20_000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    with LocalRedis() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: LocalRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    """A fresh simulator per test, recording what it sends, ticking fast."""
    with SimulatorThread(SimConfig(rate_per_token=50.0, record=True)) as thread:
        yield thread


@pytest.fixture(autouse=True)
def no_worker_left_running() -> Iterator[None]:
    """A test that leaves a worker thread running fails here, by name, instead of disturbing the next ones."""
    yield
    deadline = time.monotonic() + 15
    while any(t.name == "angelstream-worker" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [t for t in threading.enumerate() if t.name == "angelstream-worker"]
    stacks = sys._current_frames()
    where = ["".join(traceback.format_stack(stacks[t.ident])[-6:]) for t in left if t.ident in stacks]
    assert not left, f"{len(left)} worker thread(s) still running after the test, at:\n" + "\n".join(where)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault suite's figures: what each fault cost in ticks and time."""
    if FAULT_REPORT:
        terminalreporter.section("fault suite: ticks lost, duplicates, time to recover")
        for line in fault_table():
            terminalreporter.write_line(line)
