"""The calibration benchmark (tests/benchmarks/bench_calibration.py) on a tiny run: its speed table
sets each plan's FLOP bound beside the measured speed-up and flags a speed-up above it; it calibrates on a
prompt batch of three captions."""

from __future__ import annotations

import importlib
import itertools
import re
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent / "benchmarks"
TINY = ["--size", "8", "--steps", "3", "--modes", "budget", "--step-reuse", "--deltas", "0.1", "--cost", "flops",
        "--rounds", "1", "--uniform-fractions", "0.125", "--uniform-refresh", "2", "--lazy-thresholds",
        "--easy-thresholds", "--fbc-thresholds", "--calibration-captions", "3", "--calibration-seeds", "1"]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports its neighbours as top-level modules
    return importlib.import_module("bench_calibration")


def test_a_speedup_more_than_five_percent_above_its_bound_is_flagged(bench):
    assert bench.bound_cell(1.5, 1.6) == "1.60x"
    assert bench.bound_cell(1.66, 1.6) == "1.60x"  # within 5%: timer noise
    assert bench.bound_cell(1.7, 1.6) == "1.60x (above its FLOP bound: measurement noise or load)"


def test_the_speed_table_shows_each_plans_flop_bound(bench, capsys):
    bench.main(TINY)
    out = capsys.readouterr().out
    assert "calibrated on 3 caption(s) x 1 seeds" in out and "calibration batch of 3," in out  # a prompt batch
    lines = out.splitlines()
    first = next(index for index, line in enumerate(lines) if line.startswith("| contestant |"))
    header, _, *rows = itertools.takewhile(lambda line: line.startswith("|"), lines[first:])
    assert [cell.strip() for cell in header.strip("|").split("|")][:3] == [
        "contestant", "speedup vs full (median)", "FLOP bound"]
    cells = {row.strip("|").split("|")[0].strip(): [cell.strip() for cell in row.strip("|").split("|")[1:]]
             for row in rows}
    plans = ["budget plan, delta 0.1", "budget + step reuse plan, delta 0.1"]
    assert list(cells) == ["full attention", *plans, "uniform W+R window 0.125, refresh 2"]
    for name, (speedup, bound, *_) in cells.items():
        if name not in plans:
            assert bound == "-"
            continue
        match = re.fullmatch(r"(\d+\.\d\d)x( \(above its FLOP bound: measurement noise or load\))?", bound)
        assert match and float(match.group(1)) >= 1.0, bound
        assert bool(match.group(2)) == (float(speedup.removesuffix("x")) > 1.05 * float(match.group(1)))
    assert "FLOP bound: the largest speed-up the FLOPs a plan skips allow" in out
