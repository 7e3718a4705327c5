"""Smoke test: the benchmarks run and print their tables (no timing is asserted)."""

from __future__ import annotations

import pytest

from bench import decode


def test_decode_benchmark_prints_a_row_per_mode(capsys: pytest.CaptureFixture[str]) -> None:
    assert decode.main(["--number", "20", "--repeat", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["mode", "bytes", "angelstream", "SDK", "speed-up"]
    assert [line.split()[:2] for line in lines[2:]] == [
        ["LTP", "51"],
        ["QUOTE", "123"],
        ["SNAP_QUOTE", "379"],
        ["DEPTH_20", "443"],
    ]
