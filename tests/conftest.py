from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from hypothesis import HealthCheck, settings

from worker.localredis import LocalRedis
from worker.simulator import SimConfig, SimulatorThread

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None)
settings.load_profile("ci")


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
