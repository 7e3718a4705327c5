"""consumers/node/consume.js: the Node.js reader of the tick streams, against what the real worker wrote;
and docs/streams.md: every ``redis-cli`` line and Node.js snippet in it, run against a real Redis.

The Node.js tests are skipped only when ``node`` is not on PATH. ``npm ci`` runs first if
``consumers/node/node_modules`` is missing (``.ci/run`` does it before the suite when npm is there).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from consumers import tail
from tests.test_tail import SBIN_LTP, USDINR_SNAP, add, blocked_clients, wait_blocked
from tests.workerkit import entries, wait_for, worker_settings
from worker import keys
from worker.app import WorkerThread
from worker.instruments import bundled_master_path, load_master_file
from worker.localredis import LocalRedis, free_port
from worker.schema import Tick, parse_entry
from worker.simulator import SimConfig, SimulatorThread

NODE_DIR = Path(__file__).resolve().parent.parent / "consumers" / "node"
CONSUME = NODE_DIR / "consume.js"

INTS = ("seq", "exch_ts", "recv_ts", "ltq", "volume", "ltt", "oi")
DECIMALS = (
    "ltp", "atp", "open", "high", "low", "close", "total_buy_qty", "total_sell_qty", "oi_change_pct",
    "upper_circuit", "lower_circuit", "high_52w", "low_52w",
)  # fmt: skip
STRINGS = ("v", "token", "exchange", "symbol", "mode")

#: Three modes, three segments; a symbol with a space; CDS prices have 7 decimals.
WANT = {
    "NSE:SBIN-EQ": "ltp",
    "NSE:Nifty 50": "ltp",
    "NSE:INFY-EQ": "quote",
    "NFO:NIFTY29DEC26FUT": "snap_quote",
    "CDS:USDINR29DEC26FUT": "snap_quote",
}


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with consumers/node/node_modules installed (``npm ci``) if missing."""
    found = shutil.which("node")
    if found is None:
        pytest.skip("`node` is not on PATH: the Node.js consumer (consumers/node/consume.js) cannot run")
    if not (NODE_DIR / "node_modules" / "redis").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("node is on PATH but npm is not, and consumers/node/node_modules is missing: install npm")
        done = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund", "--loglevel=error"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, f"npm ci failed: {done.stderr.strip()}"
    return found


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimConfig(instruments=load_master_file(bundled_master_path()), rate_per_token=20.0)) as thread:
        yield thread


def env(url: str) -> dict[str, str]:
    return os.environ | {"REDIS_URL": url}


def consume(node: str, url: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, str(CONSUME), *args], env=env(url), capture_output=True, text=True, timeout=timeout, check=False
    )


def printed(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines()]


def key_of(obj: dict[str, Any]) -> str:
    return f"{obj['exchange']}:{obj['symbol']}"


def assert_same_entry(obj: dict[str, Any], entry_id: bytes, fields: dict[bytes, bytes]) -> None:
    """The printed object is the stored entry, field by field, each with the documented type."""
    raw = {k.decode(): v.decode() for k, v in fields.items()}
    tick: Tick = parse_entry(entry_id, fields)
    assert obj["id"] == tick.id
    assert set(obj) == {"id", *raw}, "every field, and nothing else"
    for name in STRINGS:
        assert obj[name] == getattr(tick, name)
    for name in INTS:
        if name in raw:
            assert type(obj[name]) is int
            assert obj[name] == getattr(tick, name), name
    for name in DECIMALS:
        if name in raw:
            assert isinstance(obj[name], str), f"{name} must stay an exact decimal string"
            assert obj[name] == raw[name]
            assert Decimal(obj[name]) == getattr(tick, name), name
    for side in ("bids", "asks"):
        if side in raw:
            levels = [(Decimal(level["price"]), level["qty"], level["orders"]) for level in obj[side]]
            assert all(isinstance(level["price"], str) for level in obj[side])
            assert tuple(levels) == getattr(tick, side)
            assert set().union(*(set(level) for level in obj[side])) == {"price", "qty", "orders"}
    if tick.exchange == "CDS":
        assert re.fullmatch(r"\d+\.\d{7}", obj["ltp"]), "CDS prices have 7 decimals"


def test_node_prints_what_the_worker_wrote_field_by_field_in_stream_order(
    node: str,
    sim: SimulatorThread,
    redis_client: redis.Redis,
    redis_server: LocalRedis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    redis_client.hset(keys.SUBSCRIPTIONS, mapping=WANT)  # type: ignore[arg-type]
    with WorkerThread(worker_settings(sim, redis_server.url)) as worker:
        wait_for(lambda: all(redis_client.xlen(keys.ticks_for(k)) >= 5 for k in WANT), what="5 ticks of each")
        count = sum(int(redis_client.xlen(keys.ticks_for(k))) for k in WANT)
        live = consume(node, redis_server.url, "--count", str(count), *WANT)  # while the worker writes on
    assert worker.error is None
    assert live.returncode == 0, live.stderr
    assert live.stderr == ""
    got = printed(live.stdout)
    assert len(got) == count
    stored = {key: entries(redis_client, keys.ticks_for(key)) for key in WANT}
    for key, written in stored.items():
        mine = [obj for obj in got if key_of(obj) == key]
        assert [obj["id"] for obj in mine] == [i.decode() for i, _ in written[: len(mine)]], "stream order, no gap"
        for obj, (entry_id, fields) in zip(mine, written, strict=False):
            assert_same_entry(obj, entry_id, fields)

    # The worker has stopped: every entry of every stream, once, in order, equal.
    total = sum(len(written) for written in stored.values())
    everything = consume(node, redis_server.url, "--count", str(total), *WANT)
    assert everything.returncode == 0, everything.stderr
    from_node = printed(everything.stdout)
    assert len(from_node) == total
    for key, written in stored.items():
        mine = [obj for obj in from_node if key_of(obj) == key]
        assert [obj["id"] for obj in mine] == [i.decode() for i, _ in written], key
        for obj, (entry_id, fields) in zip(mine, written, strict=True):
            assert_same_entry(obj, entry_id, fields)
        assert {obj["mode"] for obj in mine} == {WANT[key]}

    # `angelstream tail --json` prints the very same objects.
    monkeypatch.setenv("REDIS_URL", redis_server.url)
    capsys.readouterr()
    assert tail.main(["--json", "--from-start", "--count", str(total), *WANT]) == 0
    from_tail = printed(capsys.readouterr().out)
    assert sorted(from_node, key=lambda obj: (key_of(obj), obj["id"])) == sorted(
        from_tail, key=lambda obj: (key_of(obj), obj["id"])
    )


def test_from_dollar_prints_only_entries_written_after_the_start(
    node: str, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    add(redis_client, SBIN_LTP, seq="1")
    before = blocked_clients(redis_client)
    proc = subprocess.Popen(
        [node, str(CONSUME), "--from", "$", "--count", "2", "NSE:SBIN-EQ", "CDS:USDINR29DEC26FUT"],
        env=env(redis_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_blocked(redis_client, before, "consume.js to wait in XREAD")
        new = [add(redis_client, USDINR_SNAP), add(redis_client, SBIN_LTP, seq="2")]
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (0, "")
    got = printed(out)
    assert sorted(obj["id"] for obj in got) == sorted(new)
    usdinr = next(obj for obj in got if obj["symbol"] == "USDINR29DEC26FUT")
    assert usdinr["seq"] == 9_007_199_254_740_993, "beyond 2**53, printed exactly"
    assert usdinr["volume"] == 90_071_992_547_409_930
    assert usdinr["venue"] == "future-field", "unknown fields are kept as strings"
    assert usdinr["bids"][0] == {"price": "83.1225000", "qty": 10, "orders": 2}


def test_from_an_id_resumes_after_it(node: str, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    ids = [add(redis_client, SBIN_LTP, seq=str(n)) for n in range(3)]
    done = consume(node, redis_server.url, "--from", ids[0], "--count", "2", "NSE:SBIN-EQ")
    assert done.returncode == 0, done.stderr
    assert [obj["id"] for obj in printed(done.stdout)] == ids[1:]


def test_sigint_stops_and_exits_0(node: str, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    first = add(redis_client, SBIN_LTP)
    before = blocked_clients(redis_client)
    proc = subprocess.Popen(
        [node, str(CONSUME), "NSE:SBIN-EQ"],
        env=env(redis_server.url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_blocked(redis_client, before, "consume.js to wait in XREAD")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (0, "")
    assert [obj["id"] for obj in printed(out)] == [first]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--count", "0", "NSE:SBIN-EQ"], 2, "--count must be a positive integer"),
        (["--from", "yesterday", "NSE:SBIN-EQ"], 2, "--from must be an entry ID"),
        (["SBIN-EQ"], 2, '"SBIN-EQ" is not EXCHANGE:SYMBOL'),
        ([], 2, "name at least one EXCHANGE:SYMBOL"),
        (["--verbose", "NSE:SBIN-EQ"], 2, "Unknown option '--verbose'"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(
    node: str, redis_server: LocalRedis, args: list[str], code: int, message: str
) -> None:
    done = consume(node, redis_server.url, *args)
    assert done.returncode == code
    assert done.stdout == ""
    assert done.stderr.startswith("consume.js: ")
    assert message in done.stderr
    assert done.stderr.count("\n") == 1


def test_help(node: str, redis_server: LocalRedis) -> None:
    done = consume(node, redis_server.url, "--help")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith("usage: node consume.js")


def test_a_malformed_entry_is_one_line_naming_stream_entry_and_field_and_exit_1(
    node: str, redis_client: redis.Redis, redis_server: LocalRedis
) -> None:
    entry_id = add(redis_client, USDINR_SNAP, seq="12a")
    done = consume(node, redis_server.url, "CDS:USDINR29DEC26FUT")
    assert done.returncode == 1
    assert done.stdout == ""
    assert (
        done.stderr == f'consume.js: ticks:CDS:USDINR29DEC26FUT entry {entry_id}: field seq is not an integer: "12a"\n'
    )


#: parseEntry, imported from consume.js, on each entry given as JSON: the error message, or null.
PARSE = """
const { parseEntry } = await import(process.argv[1]);
const answers = JSON.parse(process.argv[2]).map((fields) => {
  try { parseEntry('1-0', fields); return null; } catch (error) { return error.message; }
});
console.log(JSON.stringify(answers));
"""


def test_the_parser_refuses_every_kind_of_malformed_field(node: str) -> None:
    cases: dict[str, dict[str, str | None]] = {
        'entry 1-0: field seq is not an integer: "12a"': {"seq": "12a"},
        'entry 1-0: field volume is not an integer: "1e3"': {"volume": "1e3"},
        'entry 1-0: field ltp is not a decimal price: "83,12"': {"ltp": "83,12"},
        'entry 1-0: field high is not a decimal price: "1e2"': {"high": "1e2"},
        'entry 1-0: field oi_change_pct is not a number: "lots"': {"oi_change_pct": "lots"},
        'entry 1-0: field bids is not a list of [price, qty, orders]: "[[83.12,1]]"': {"bids": "[[83.12,1]]"},
        'entry 1-0: field asks is not a list of [price, qty, orders]: "{}"': {"asks": "{}"},
        'entry 1-0: field asks is not a list of [price, qty, orders]: "[[1.00,1,1][2.00,1,1]]"': {
            "asks": "[[1.00,1,1][2.00,1,1]]"
        },
        'entry 1-0: field bids is not a list of [price, qty, orders]: "[[1.00,1,x]]"': {"bids": "[[1.00,1,x]]"},
        'entry 1-0: schema version "2" is not 1, the one this reader knows': {"v": "2"},
        "entry 1-0: field token is missing": {"token": None},
    }
    entries_ = [{k: v for k, v in (USDINR_SNAP | change).items() if v is not None} for change in cases.values()]
    fine = [USDINR_SNAP | {"bids": "[]", "asks": " [ [1.00 , 2 ,3] ] ", "total_buy_qty": "-inf"}, SBIN_LTP]
    done = subprocess.run(
        [node, "--input-type=module", "-e", PARSE, CONSUME.as_uri(), json.dumps([*entries_, *fine])],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [*cases, None, None]


def test_a_missing_field_is_named(node: str, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    redis_client.xadd(keys.ticks("NSE", "SBIN-EQ"), {k: v for k, v in SBIN_LTP.items() if k != "recv_ts"})
    done = consume(node, redis_server.url, "NSE:SBIN-EQ")
    assert done.returncode == 1
    assert "field recv_ts is missing" in done.stderr


def test_redis_errors_are_one_line_and_exit_1(node: str, redis_client: redis.Redis, redis_server: LocalRedis) -> None:
    down = consume(node, f"redis://127.0.0.1:{free_port()}/0", "NSE:SBIN-EQ")
    assert down.returncode == 1
    assert down.stderr.startswith("consume.js: cannot reach Redis (")
    assert down.stderr.count("\n") == 1
    bad_url = consume(node, "localhost:6379", "NSE:SBIN-EQ")
    assert bad_url.returncode == 1
    assert bad_url.stderr.startswith("consume.js: REDIS_URL is invalid")
    redis_client.set(keys.ticks("NSE", "SBIN-EQ"), "not a stream")
    wrong = consume(node, redis_server.url, "NSE:SBIN-EQ")
    assert wrong.returncode == 1
    assert "WRONGTYPE" in wrong.stderr
    assert wrong.stderr.count("\n") == 1


# --------------------------------------------------------------------------- docs/streams.md, checked

DOC = Path(__file__).resolve().parent.parent / "docs" / "streams.md"
#: The entry IDs the document's examples use, and the symbols.
DOC_IDS = ["1718000000125-0", "1718000000125-1", *(f"1718000000{250 + n}-0" for n in range(12))]


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def doc_commands(cwd: Path) -> list[list[str]]:
    """Every ``redis-cli`` line of the document, as the arguments bash passes (quotes, ``$``, ``>``: as a shell)."""
    lines = [line for block in doc_blocks("sh") for line in block.splitlines() if line.startswith("redis-cli ")]
    fake = 'redis-cli() { for arg in "$@"; do printf "%s\\037" "$arg"; done; printf "\\036"; }'
    shell = subprocess.run(
        ["bash", "-c", "\n".join([fake, *lines])], cwd=cwd, capture_output=True, text=True, timeout=10, check=False
    )
    assert (shell.returncode, shell.stderr) == (0, ""), "every redis-cli line is a valid shell command"
    commands = [record.split("\037")[:-1] for record in shell.stdout.split("\036")[:-1]]
    assert len(commands) == len(lines), "no line redirects its output"
    return commands


def seed_like_the_worker(client: redis.Redis) -> None:
    """The keys the document reads, shaped as the worker writes them, at the IDs it quotes."""
    for n, entry_id in enumerate(DOC_IDS):
        client.xadd(keys.ticks("NSE", "SBIN-EQ"), SBIN_LTP | {"seq": str(101 + n)}, id=entry_id)  # type: ignore[arg-type]
    client.xadd(keys.ticks("CDS", "USDINR29DEC26FUT"), USDINR_SNAP, id="1718000000126-0")  # type: ignore[arg-type]
    client.xadd(keys.EVENTS, {"type": "worker_started", "ts": "1718000000000", "instruments": "42"})
    row = next(i for i in load_master_file(bundled_master_path()) if i.key == "NSE:SBIN-EQ").to_row()
    client.hset(keys.INSTRUMENTS, "NSE:SBIN-EQ", json.dumps(row, separators=(",", ":")))
    client.hset(keys.TOKENS, "NSE:3045", "NSE:SBIN-EQ")
    client.hset(keys.STATE, "NSE:SBIN-EQ", '{"state":"live","mode":"quote","token":"3045","since":1,"last_tick":2}')
    client.set(keys.HEARTBEAT, '{"pid":1}', ex=3)


def test_every_redis_cli_command_of_the_document_runs_against_redis(
    redis_client: redis.Redis, redis_server: LocalRedis, tmp_path: Path
) -> None:
    seed_like_the_worker(redis_client)
    commands = doc_commands(tmp_path)
    names = {
        " ".join(args[:2]).upper() if args[0].upper() in ("XGROUP", "XINFO") else args[0].upper() for args in commands
    }
    wanted = {"XREVRANGE", "XREAD", "XGROUP CREATE", "XREADGROUP", "XACK", "XAUTOCLAIM", "XPENDING", "PUBLISH", "HSET"}
    assert wanted <= names, "the document shows these"
    replies: dict[str, Any] = {}
    with redis.Redis.from_url(redis_server.url, protocol=2) as cli:  # RESP2 and raw replies, as redis-cli
        raw = cli.connection_pool.get_connection()
        try:
            for written in commands:
                args = list(written)
                if "BLOCK" in args:  # the document's waits, shortened: `BLOCK 0` waits for ever
                    args[args.index("BLOCK") + 1] = "10"
                try:
                    raw.send_command(*args)
                    replies[" ".join(args)] = raw.read_response()
                except redis.ResponseError as exc:
                    pytest.fail(f"redis-cli {shlex.join(args)}: {exc}")
        finally:
            cli.connection_pool.release(raw)
    assert len(replies["XREVRANGE ticks:NSE:SBIN-EQ + - COUNT 5"]) == 5
    group_read = "XREADGROUP GROUP mystrategy replica-1 COUNT 100 BLOCK 10 STREAMS ticks:NSE:SBIN-EQ >"
    assert len(replies[group_read][0][1]) == len(DOC_IDS), "the group reads the retained history after SETID 0"
    assert replies["XACK ticks:NSE:SBIN-EQ mystrategy 1718000000125-0 1718000000125-1"] == 2
    own = replies["XREADGROUP GROUP mystrategy replica-1 COUNT 100 STREAMS ticks:NSE:SBIN-EQ 0"]
    assert [entry_id.decode() for entry_id, _ in own[0][1]] == DOC_IDS[2:], "what replica-1 has not acked"
    entry_shown, row_shown = doc_blocks("text")
    assert replies["HGET angelstream:instruments NSE:SBIN-EQ"].decode() == row_shown.strip()
    assert replies["HGET angelstream:tokens NSE:3045"] == b"NSE:SBIN-EQ"
    [(entry_id, fields)] = replies["XRANGE ticks:NSE:SBIN-EQ - + COUNT 1"]
    assert re.findall(r'"([^"]*)"', entry_shown) == [value.decode() for value in (entry_id, *fields)]


@pytest.fixture
def node_dir_env(redis_server: LocalRedis) -> dict[str, str]:
    return env(redis_server.url)


def test_the_documents_node_snippet_with_consume_runs(
    node: str, redis_client: redis.Redis, node_dir_env: dict[str, str]
) -> None:
    seed_like_the_worker(redis_client)
    snippet = next(block for block in doc_blocks("js") if "consume(" in block)
    done = subprocess.run(
        [node, "--input-type=module", "-e", snippet],
        cwd=NODE_DIR,
        env=node_dir_env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [f"{entry_id} SBIN-EQ 812.40 -" for entry_id in DOC_IDS[:10]]


def test_the_documents_consumer_group_snippet_acks_everything_and_claims_a_dead_replicas_entries(
    node: str, redis_client: redis.Redis, node_dir_env: dict[str, str]
) -> None:
    seed_like_the_worker(redis_client)
    stream = keys.ticks("NSE", "SBIN-EQ")
    redis_client.xgroup_create(stream, "mystrategy", id="0")
    reply: Any = redis_client.xreadgroup("mystrategy", "replica-dead", {stream: ">"}, count=1)
    dead_id = reply[0][1][0][0].decode()
    redis_client.xclaim(stream, "mystrategy", "replica-dead", 0, [dead_id], idle=120_000)  # pending for 2 min
    snippet = next(block for block in doc_blocks("js") if "xReadGroup" in block)
    proc = subprocess.Popen(
        [node, "--input-type=module", "-e", snippet],
        cwd=NODE_DIR,
        env=node_dir_env | {"REPLICA": "replica-1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def done() -> bool:
            [group] = redis_client.xinfo_groups(stream)
            return bool(group["pending"] == 0 and group["lag"] == 0)

        wait_for(done, what="every entry processed and acknowledged")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert (proc.returncode, err) == (0, "")
    printed_ids = [line.split()[0] for line in out.splitlines()]
    assert sorted(printed_ids) == sorted(DOC_IDS), "each entry once, the dead replica's included"
    assert printed_ids[0] == dead_id, "claimed first"
    assert printed_ids[1:] == DOC_IDS[1:]
