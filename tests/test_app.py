"""The worker's wiring: the re-login clock, the instrument master source, start-up failures."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from datetime import time as wall_time
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from tests import strategies as gen
from tests.workerkit import worker_settings
from worker import app, keys
from worker import protocol as p
from worker.app import Worker, WorkerFailed, WorkerThread, next_relogin
from worker.instruments import InstrumentError, InstrumentIndex, bundled_master_path, load_instruments, load_master_file
from worker.localredis import LocalRedis
from worker.settings import IST, load, redact_url
from worker.simulator import MASTER_PATH, SimulatorThread
from worker.sink import Sink


def test_next_relogin_is_the_next_occurrence_of_the_wall_time_in_india() -> None:
    eight = wall_time(8, 0)
    # 01:30 UTC is 07:00 IST: one hour to go
    assert next_relogin(datetime(2026, 11, 24, 1, 30, tzinfo=UTC), eight) == 3600
    # 02:30 UTC is exactly 08:00 IST: the next one is tomorrow
    assert next_relogin(datetime(2026, 11, 24, 2, 30, tzinfo=UTC), eight) == 86400
    # 23:00 IST the day before, expressed in IST
    assert next_relogin(datetime(2026, 11, 23, 23, 0, tzinfo=IST), eight) == 9 * 3600


def test_the_instrument_master_from_a_file_or_a_url(sim: SimulatorThread, tmp_path: Path) -> None:
    from_file = asyncio.run(load_instruments(str(bundled_master_path()), 5))
    from_url = asyncio.run(load_instruments(sim.sim.url + MASTER_PATH, 5))
    assert len(from_file) == len(from_url) == len(sim.sim.index)
    with pytest.raises(InstrumentError, match=r"cannot download the instrument master from .*404"):
        asyncio.run(load_instruments(sim.sim.url + "/nothing.json", 5))
    with pytest.raises(InstrumentError, match="cannot download"):
        asyncio.run(load_instruments("http://127.0.0.1:1/master.json", 5))
    with pytest.raises(InstrumentError, match="cannot read the instrument master"):
        asyncio.run(load_instruments(str(tmp_path), 5))


def test_redis_urls_are_logged_without_their_password() -> None:
    assert redact_url("redis://worker:s3cret@redis:6379/0") == "redis://***@redis:6379/0"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


def test_a_worker_that_cannot_start_says_why(sim: SimulatorThread, redis_server: LocalRedis, tmp_path: Path) -> None:
    thread = WorkerThread(worker_settings(sim, redis_server.url, angel_instruments_url=str(tmp_path / "none.json")))
    with pytest.raises(RuntimeError, match="did not start: InstrumentError"):
        thread.start()
    thread.stop()  # already ended: nothing to do
    assert isinstance(thread.error, InstrumentError)


def test_the_daily_refresh_reloads_the_master_and_a_refused_relogin_waits_for_tomorrow(
    sim: SimulatorThread, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits = iter([0.0, 3600.0])
    monkeypatch.setattr(app, "next_relogin", lambda now, at: next(waits))
    worker = Worker(worker_settings(sim, redis_server.url, angel_pin="0000"))
    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(worker.sink, "event", lambda kind, **fields: seen.append((kind, fields)))

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        task = asyncio.create_task(worker.daily(client))
        async with asyncio.timeout(10):
            while len(seen) < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not task.done(), "waiting for tomorrow"
        task.cancel()
        assert await client.hlen(keys.INSTRUMENTS) == len(sim.sim.index)
        await client.aclose()

    asyncio.run(main())
    assert [kind for kind, _ in seen] == ["instruments_refreshed", "login_failed"]
    assert worker.logins == 0
    assert worker.index is not None
    assert len(worker.index) == len(sim.sim.index)


def test_a_failed_refresh_keeps_the_master_in_use(
    sim: SimulatorThread, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    worker = Worker(worker_settings(sim, redis_server.url, angel_instruments_url=str(tmp_path / "gone.json")))
    index = InstrumentIndex(load_master_file(bundled_master_path()))
    worker.use_index(index)
    seen: list[tuple[str, dict[str, Any]]] = []
    monkeypatch.setattr(worker.sink, "event", lambda kind, **fields: seen.append((kind, fields)))
    asyncio.run(worker.refresh_instruments(aioredis.Redis.from_url(redis_server.url)))
    assert worker.index is index
    assert seen[0][0] == "instruments_refresh_failed"
    assert "gone.json" in seen[0][1]["error"]


def test_a_new_master_forgets_vanished_instruments(sim: SimulatorThread, redis_server: LocalRedis) -> None:
    worker = Worker(worker_settings(sim, redis_server.url))
    everything = load_master_file(bundled_master_path())
    sbin = next(i for i in everything if i.key == "NSE:SBIN-EQ")
    worker.use_index(InstrumentIndex(everything))
    packet = p.LtpPacket(1, 1, sbin.token, 1, 1_700_000_000_000, 100)
    assert worker.normalizer.entry(packet, 1) is not None
    worker.use_index(InstrumentIndex([i for i in everything if i is not sbin]))
    assert worker.normalizer.entry(packet._replace(sequence_number=2), 2) is None


def test_the_relogin_clock_runs_in_india_time() -> None:
    now = datetime.now(IST)
    soon = (now + timedelta(minutes=5)).time()
    assert 299 <= next_relogin(now, soon) <= 300


def test_the_master_is_indexed_in_redis_once_redis_is_back(sim: SimulatorThread) -> None:
    with LocalRedis() as own:
        own.stop()
        worker = Worker(worker_settings(sim, own.url, redis_retry_max=0.1))
        worker.use_index(InstrumentIndex(load_master_file(bundled_master_path())))

        async def main() -> None:
            client = aioredis.Redis.from_url(own.url, decode_responses=True)
            task = asyncio.create_task(worker.publish_instruments(client))
            await asyncio.sleep(0.3)
            assert not task.done()
            await asyncio.to_thread(own.start)
            await asyncio.wait_for(task, 10)
            assert await client.hlen(keys.INSTRUMENTS) == 42
            await client.aclose()

        asyncio.run(main())


def test_a_worker_that_outlives_its_stop_timeout_is_reported(
    sim: SimulatorThread, redis_server: LocalRedis, caplog: pytest.LogCaptureFixture
) -> None:
    thread = WorkerThread(worker_settings(sim, redis_server.url)).start()
    thread.stop(timeout=0)  # the shutdown takes longer than no time at all
    assert "the worker thread did not stop within 0 s" in caplog.text
    thread.stop()
    assert not thread._thread.is_alive()


def test_a_failing_writer_stops_the_worker_loudly_instead_of_leaving_it_mute(
    sim: SimulatorThread, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in the writer task would leave the worker reading and never writing (ready, but mute): it stops."""

    def broken(self: Sink, batch: list[Any]) -> list[bytes]:
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(Sink, "_xadds", broken)
    worker = Worker(worker_settings(sim, redis_server.url, health_port=0))

    async def main() -> None:
        async with asyncio.timeout(30):
            await worker.run(asyncio.Event())  # nobody stops it: only the failure can

    with pytest.raises(
        WorkerFailed, match=r"^the writer task failed \(RuntimeError: a bug in the writer\); restart it$"
    ):
        asyncio.run(main())
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert record.getMessage() == "the writer task failed, the worker stops: RuntimeError('a bug in the writer')"
    assert record.exc_info is not None  # the traceback is in the log


def test_a_feed_connection_that_fails_stops_the_worker_too(
    sim: SimulatorThread, redis_server: LocalRedis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug on the read path kills that connection's task (its other errors are retried): the worker stops."""

    def broken(self: Worker, frame: bytes, recv_us: int) -> None:
        raise RuntimeError("a bug on the read path")

    monkeypatch.setattr(Worker, "on_frame", broken)
    worker = Worker(worker_settings(sim, redis_server.url, health_port=0))

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url)
        await client.hset(keys.SUBSCRIPTIONS, "NSE:SBIN-EQ", "ltp")
        await client.aclose()
        async with asyncio.timeout(30):
            await worker.run(asyncio.Event())

    with pytest.raises(WorkerFailed, match=r"^the feed-1 task failed \(RuntimeError: a bug on the read path\)"):
        asyncio.run(main())
    assert worker.failed is not None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL] == [
        "the feed-1 task failed, the worker stops: RuntimeError('a bug on the read path')"
    ]


def test_only_a_failure_before_the_stop_is_fatal_and_tasks_that_end_well_are_fine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    worker = Worker(FUZZ_SETTINGS)

    async def fails(message: str, after: float) -> None:
        await asyncio.sleep(after)
        raise ValueError(message)

    async def main() -> None:
        worker._stop = stop = asyncio.Event()
        fine = worker.watch(asyncio.create_task(asyncio.sleep(0), name="fine"))
        cancelled = worker.watch(asyncio.create_task(asyncio.sleep(60), name="cancelled"))
        cancelled.cancel()
        await asyncio.wait([fine, cancelled])
        await asyncio.sleep(0)  # the done callbacks run
        assert not stop.is_set()
        first = worker.watch(asyncio.create_task(fails("first", 0.01), name="first"))
        second = worker.watch(asyncio.create_task(fails("second", 0.02), name="second"))
        await asyncio.wait([first, second])
        await asyncio.sleep(0)
        assert stop.is_set()
        assert worker.failed is first

    asyncio.run(main())
    assert [(r.levelname, r.getMessage()) for r in caplog.records if r.levelno >= logging.ERROR] == [
        ("CRITICAL", "the first task failed, the worker stops: ValueError('first')"),
        ("ERROR", "the second task failed while the worker stops: ValueError('second')"),
    ]


FUZZ_INDEX = InstrumentIndex(load_master_file(bundled_master_path()))
FUZZ_SETTINGS = load(
    angel_api_key="k", angel_client_code="C1", angel_pin="1", angel_totp_secret="S", angel_api_url="http://127.0.0.1:1",
    angel_ws_url="ws://127.0.0.1:1/s", angel_instruments_url="master.json", buffer_max=50,
)  # fmt: skip
FUZZ_WORKER = Worker(FUZZ_SETTINGS, FUZZ_INDEX)
FUZZ_WORKER.use_index(FUZZ_INDEX)
#: Packets of instruments in the master (so the normalizer, not only the decoder, sees them), any field values.
KNOWN_PACKETS = st.tuples(gen.packets(), st.sampled_from(list(FUZZ_INDEX))).map(
    lambda pair: pair[0]._replace(exchange_type=pair[1].exchange_type, token=pair[1].token)
)


@given(gen.mutated_frames(KNOWN_PACKETS) | st.binary(max_size=500), st.integers(0, 2**62))
def test_fuzz_the_worker_takes_any_frame_without_raising(frame: bytes, recv_us: int) -> None:
    """What the feed hands on_frame: a frame is decoded and queued, or counted as undecodable; nothing else."""
    worker, normalizer = FUZZ_WORKER, FUZZ_WORKER.normalizer

    def outcomes() -> int:
        return worker.decode_errors + normalizer.skipped + normalizer.repeats + sum(normalizer.received)

    before = outcomes()
    worker.on_frame(frame, recv_us)
    assert outcomes() == before + 1, "exactly one outcome: undecodable, skipped, a repeat, or received"
