"""`angelstream run` as a real process: configuration errors, SIGTERM, secrets."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.workerkit import assert_tick_is, record_fault, sent_to, ticks, wait_for
from worker import keys
from worker.instruments import InstrumentIndex, bundled_master_path, load_master_file
from worker.localredis import LocalRedis
from worker.simulator import SimConfig, SimulatorThread

INDEX = InstrumentIndex(load_master_file(bundled_master_path()))


def clean_env(**values: str) -> dict[str, str]:
    """The environment without any angelstream setting, plus ``values``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANGEL_", "REDIS_", "STREAM_"))}
    return env | values


def run(cwd: Path, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(rate_per_token=20.0, record=True)) as thread:
        yield thread


def sim_env(sim: SimulatorThread, redis_url: str) -> dict[str, str]:
    return clean_env(REDIS_URL=redis_url, HEARTBEAT_INTERVAL="0.5", HEALTH_PORT="0", **sim.sim.worker_env())


def test_a_missing_setting_exits_2_with_one_line_naming_it(tmp_path: Path) -> None:
    done = run(tmp_path, clean_env())
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "ANGEL_API_KEY is required" in line
    assert ".env.example" in line


def test_an_invalid_setting_exits_2_naming_it_without_a_traceback(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("ANGEL_API_KEY=k\nANGEL_CLIENT_CODE=C1\nANGEL_PIN=1\nANGEL_TOTP_SECRET=S\n")
    done = run(tmp_path, clean_env(STREAM_MAXLEN="lots"))
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert "STREAM_MAXLEN is invalid" in line
    assert "lots" in line


def test_an_unreadable_instrument_master_exits_1_with_one_line(tmp_path: Path, redis_server: LocalRedis) -> None:
    env = clean_env(
        REDIS_URL=redis_server.url,
        ANGEL_API_KEY="k",
        ANGEL_CLIENT_CODE="C1",
        ANGEL_PIN="1",
        ANGEL_TOTP_SECRET="S",
        ANGEL_INSTRUMENTS_URL=str(tmp_path / "missing.json"),
    )
    done = run(tmp_path, env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("angelstream run: cannot read the instrument master")


BROKEN_WRITER = """
import sys
from worker import cli, sink

def broken(self, batch):
    raise RuntimeError("a bug in the writer")

sink.Sink._xadds = broken
sys.exit(cli.main(["run"]))
"""


def test_a_failing_writer_exits_1_with_one_line(tmp_path: Path, sim: SimulatorThread, redis_server: LocalRedis) -> None:
    """A bug that kills the writer task ends the process (a supervisor restarts it), never a mute worker."""
    done = subprocess.run(
        [sys.executable, "-c", BROKEN_WRITER],
        cwd=tmp_path,
        env=sim_env(sim, redis_server.url) | {"PYTHONPATH": str(Path(__file__).parents[1])},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last == "angelstream run: the writer task failed (RuntimeError: a bug in the writer); restart it"
    assert 'level=critical logger=worker.app msg="the writer task failed, the worker stops' in done.stderr


@pytest.mark.faults
def test_sigterm_flushes_the_buffer_and_exits_0(tmp_path: Path, sim: SimulatorThread, redis_server: LocalRedis) -> None:
    """Redis is paused, so ticks pile up in the worker; SIGTERM must still write every one, then exit 0."""
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    want = {"NSE:SBIN-EQ": "snap_quote", "NSE:INFY-EQ": "quote", "NFO:NIFTY29DEC26FUT": "ltp"}
    for key, mode in want.items():
        client.hset(keys.SUBSCRIPTIONS, key, mode)
    env = sim_env(sim, redis_server.url) | {"LOG_FORMAT": "json"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: all(client.xlen(keys.ticks_for(k)) >= 3 for k in want), timeout=20, what="ticks")
        client.execute_command("CLIENT", "PAUSE", "1500", "WRITE")
        time.sleep(0.5)  # ticks accumulate in the worker's buffer
        sim.sim.set_silent(True)
        time.sleep(0.2)  # the last frames arrive
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        took = time.monotonic() - began
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    assert took < 5.0
    insts = [INDEX.by_key[k] for k in want]
    record_fault("process: SIGTERM with Redis paused", sim, client, insts, None)
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line one JSON object
    assert all(set(line) >= {"ts", "level", "logger", "msg"} for line in lines)
    assert any("all flushed" in line["msg"] for line in lines)
    for key in want:
        inst = INDEX.by_key[key]
        got, sent = ticks(client, key), sent_to(sim, inst)
        assert len(got) == len(sent)
        for tick, s in zip(got, sent, strict=True):
            assert_tick_is(tick, s.packet, inst)
    cfg = sim.sim.config
    stored = {k: client.xrange(k) if client.type(k) == b"stream" else client.hgetall(k) for k in client.scan_iter()}
    everything = stderr + repr(stored)
    secrets = [cfg.totp_secret, cfg.api_key, sim.sim.feed_token, *sim.sim.jwts]
    assert len(secrets) == 4, "one login"
    for secret in secrets:
        assert secret not in everything
    client.close()
