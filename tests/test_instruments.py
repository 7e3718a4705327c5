from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from worker import keys
from worker.instruments import (
    Instrument,
    InstrumentError,
    InstrumentIndex,
    bundled_master_path,
    dump_master,
    generate_master,
    load_instruments,
    load_master_file,
    parse_master,
    publish_index,
)
from worker.localredis import LocalRedis

SBIN_ROW = {
    "token": "3045", "symbol": "SBIN-EQ", "name": "SBIN", "expiry": "", "strike": "-1.000000",
    "lotsize": "1", "instrumenttype": "", "exch_seg": "NSE", "tick_size": "5.000000",
}  # fmt: skip


def test_parse_a_master_row_and_write_it_back() -> None:
    [sbin] = parse_master(json.dumps([SBIN_ROW]))
    assert sbin == Instrument("3045", "SBIN-EQ", "NSE", 1, "SBIN", "", "", "-1.000000", 1, Decimal(5))
    assert sbin.key == "NSE:SBIN-EQ"
    assert json.loads(dump_master([sbin])) == [SBIN_ROW]


def test_rows_of_segments_smartstream_does_not_serve_are_skipped() -> None:
    rows = [SBIN_ROW, SBIN_ROW | {"exch_seg": "NCO", "token": "1"}]
    assert [i.token for i in parse_master(json.dumps(rows))] == ["3045"]


def test_optional_fields_default() -> None:
    [inst] = parse_master(json.dumps([{"token": "1", "symbol": "X", "exch_seg": "CDS"}]))
    assert (inst.exchange_type, inst.lot_size, inst.tick_size, inst.to_row()["strike"]) == (
        13,
        1,
        Decimal(1),
        "-1.000000",
    )


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{", "not JSON"),
        ("{}", "JSON array"),
        ("[1]", "row 0 is not an object"),
        ('[{"token": "1", "symbol": "X"}]', "row 0 has no 'exch_seg'"),
        ('[{"token": "", "symbol": "X", "exch_seg": "NSE"}]', "row 0 has no 'token'"),
        ('[{"token": "1", "symbol": "X", "exch_seg": "NSE", "lotsize": "a"}]', r"row 0 \(X\) has a bad lotsize"),
    ],
)
def test_bad_masters_name_the_problem(raw: str, message: str) -> None:
    with pytest.raises(InstrumentError, match=message):
        parse_master(raw)


def test_the_bundled_master_covers_every_segment_and_indices() -> None:
    instruments = load_master_file(bundled_master_path())
    assert {"NSE", "NFO", "BSE", "MCX", "CDS"} <= {i.exchange for i in instruments}
    assert {"Nifty 50", "Nifty Bank", "SENSEX"} <= {i.symbol for i in instruments if i.instrument_type == "AMXIDX"}
    assert len(instruments) >= 30


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InstrumentError, match=r"cannot read instrument master .*nope\.json"):
        load_master_file(tmp_path / "nope.json")


def test_index_both_ways() -> None:
    index = InstrumentIndex(generate_master(100))
    assert len(index) == 100
    inst = index.get("NSE:SYM00042-EQ")
    assert inst is not None
    assert index.by_wire(1, inst.token) is inst
    assert index.get("NSE:NOPE") is None
    assert [i.symbol for i in index][:2] == ["SYM00000-EQ", "SYM00001-EQ"]
    assert generate_master(5, seed=2) == generate_master(5, seed=2)


def test_resolve_exact_or_ignoring_case_and_suggest_close_matches() -> None:
    index = InstrumentIndex(load_master_file(bundled_master_path()))
    assert index.resolve("NSE:SBIN-EQ") is index.by_key["NSE:SBIN-EQ"]
    assert index.resolve(" nse:sbin-eq ") is index.by_key["NSE:SBIN-EQ"]
    assert index.resolve("NSE:NOSUCH-EQ") is None
    assert index.suggest("NSE:SBI-EQ")[0] == "NSE:SBIN-EQ"
    assert "NSE:INFY-EQ" in index.suggest("NSE:INFI-EQ")
    assert index.suggest("BOM:SBIN-EQ")[0] in ("NSE:SBIN-EQ", "BSE:SBIN")  # no such exchange: any exchange
    assert index.suggest("NSE:ZZZZZZ") == []


def test_the_master_is_kept_in_a_local_copy_used_when_the_source_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache" / "master.json"
    source = tmp_path / "master.json"
    source.write_bytes(bundled_master_path().read_bytes())
    first = asyncio.run(load_instruments(str(source), 5, str(cache)))
    assert cache.read_bytes() == source.read_bytes()
    source.unlink()
    again = asyncio.run(load_instruments(str(source), 5, str(cache)))
    assert list(again) == list(first)
    assert "using the cached copy" in caplog.text
    with pytest.raises(InstrumentError, match="cannot read the instrument master"):
        asyncio.run(load_instruments(str(source), 5, str(tmp_path / "no-cache.json")))
    with pytest.raises(InstrumentError, match="cannot read the instrument master"):
        asyncio.run(load_instruments(str(source), 5))


def test_a_cache_that_cannot_be_written_is_only_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "file").write_text("not a directory")
    index = asyncio.run(load_instruments(str(bundled_master_path()), 5, str(tmp_path / "file" / "master.json")))
    assert len(index) == 42
    assert "cannot keep a copy of the instrument master" in caplog.text


def test_the_index_in_redis_resolves_both_ways_and_is_replaced_whole(redis_server: LocalRedis) -> None:
    everything = load_master_file(bundled_master_path())

    async def main() -> None:
        client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        await client.delete(keys.INSTRUMENTS, keys.TOKENS)
        await publish_index(client, InstrumentIndex(everything), chunk=10)
        assert await client.hlen(keys.INSTRUMENTS) == 42
        row = json.loads(await client.hget(keys.INSTRUMENTS, "NSE:SBIN-EQ") or "{}")
        assert row == SBIN_ROW | {"tick_size": row["tick_size"], "name": row["name"], "lotsize": row["lotsize"]}
        assert row["token"] == "3045"
        assert await client.hget(keys.TOKENS, "NSE:3045") == "NSE:SBIN-EQ"
        assert await client.hget(keys.TOKENS, keys.token_field("CDS", "1151")) == "CDS:USDINR29DEC26FUT"
        await publish_index(client, InstrumentIndex(everything[:5]))
        assert await client.hlen(keys.INSTRUMENTS) == 5
        assert await client.hlen(keys.TOKENS) == 5
        assert not await client.exists(keys.staging(keys.INSTRUMENTS))
        await client.aclose()

    asyncio.run(main())
