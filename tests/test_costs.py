"""What the time probe keeps on disk (per device, across sessions, for MAX_AGE_S, surviving a
broken file or one of an older layout) and the cost table Calibrate shows, on hand-made layer slots."""

from __future__ import annotations

import itertools
import json
import logging

import folder_paths
import pytest
import torch
from harness import pack_import

costs = pack_import("plans.costs")
timings = pack_import("plans.timings")
LayerInfo = pack_import("plans.schema").LayerInfo

CPU = torch.device("cpu")
KEY = ("full", 2, "cpu", torch.float32, 2, 2, 64, 64, 8)


@pytest.fixture
def user_directory(tmp_path, monkeypatch):
    """A user folder of the test's own, an empty session memo, no problem logged yet, and a probe clock
    on which every run takes 10 ms (steady: stored)."""
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    monkeypatch.setattr(costs, "_seconds", {})
    monkeypatch.setattr(timings, "_logged", set())
    monkeypatch.setattr(costs, "_clock", _clock([0.01] * 1000))
    return tmp_path


def _clock(durations: list[float]):
    """A probe clock on which the timed runs take `durations`, one after the other (read twice per run)."""
    readings = itertools.chain.from_iterable((10.0 * index, 10.0 * index + duration)
                                             for index, duration in enumerate(durations))
    return lambda: next(readings)


def _probe(runs: list) -> float:
    return costs.probe_seconds(KEY, lambda: runs.append(1), CPU)


def _stored(seconds: float, measured_at: float) -> dict:
    """One time as the file keeps it."""
    return {"seconds": seconds, "measured_at": measured_at}


def _file(seconds: float, measured_at: float) -> dict:
    """A whole file holding one time of KEY on this CPU."""
    return _layout({repr(KEY): _stored(seconds, measured_at)})


def _layout(times: dict, version: int = timings.VERSION) -> dict:
    """A whole file holding `times` (probe key -> entry) on this CPU."""
    return {"version": version, "devices": {timings.device_identity(CPU): times}}


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == timings.__name__]


def test_a_new_session_reads_the_probe_times_from_disk(user_directory, monkeypatch):
    monkeypatch.setattr(timings, "_now", lambda: 1.7e9)
    runs: list[int] = []
    first = _probe(runs)
    assert len(runs) == 1 + costs.PROBE_RUNS
    path = user_directory / "__fastattn" / "timings.json"
    assert timings.timings_path() == path and not list(path.parent.glob(".timings-*"))  # no temporary file left
    assert json.loads(path.read_text()) == _file(first, 1.7e9)
    monkeypatch.setattr(costs, "_seconds", {})  # a restart: the session's memo is gone
    monkeypatch.setattr(timings, "_now", lambda: 1.7e9 + timings.MAX_AGE_S)  # the last moment it is fresh
    assert _probe(runs) == first and len(runs) == 1 + costs.PROBE_RUNS  # read, not probed


@pytest.mark.parametrize("age", [timings.MAX_AGE_S + 1, -3600.0], ids=["expired", "from the future"])
def test_an_expired_time_is_probed_again_and_overwritten(user_directory, monkeypatch, age):
    monkeypatch.setattr(timings, "_now", lambda: 1.7e9)
    runs: list[int] = []
    _probe(runs)
    monkeypatch.setattr(costs, "_seconds", {})
    monkeypatch.setattr(timings, "_now", lambda: 1.7e9 + age)  # expired, or measured "in the future" (clock set back)
    again = _probe(runs)
    assert len(runs) == 2 * (1 + costs.PROBE_RUNS)  # not read: probed again
    assert json.loads(timings.timings_path().read_text()) == _file(again, 1.7e9 + age)  # and stored anew


def test_a_file_of_the_older_layout_is_ignored_and_rewritten(user_directory, caplog):
    """Version 1 kept bare seconds, with no measurement time: they could be of any age."""
    path = timings.timings_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_layout({repr(KEY): 0.5}, version=1)))
    runs: list[int] = []
    with caplog.at_level(logging.WARNING):
        seconds = _probe(runs)
    assert len(runs) == 1 + costs.PROBE_RUNS and seconds != 0.5
    (warning,) = _warnings(caplog)
    assert f"not a version {timings.VERSION} timings file" in warning
    assert json.loads(path.read_text()) == _file(seconds, pytest.approx(timings._now(), abs=60))


def test_another_device_identity_probes_anew(user_directory, monkeypatch):
    runs: list[int] = []
    _probe(runs)
    identity = timings.device_identity(CPU)
    assert torch.__version__ in identity and f"{torch.get_num_threads()} threads" in identity
    monkeypatch.setattr(costs, "_seconds", {})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 977)  # CPU times depend on the threads
    assert timings.device_identity(CPU) != identity
    _probe(runs)
    assert len(runs) == 2 * (1 + costs.PROBE_RUNS)
    stored = json.loads(timings.timings_path().read_text())["devices"]
    assert set(stored) == {identity, timings.device_identity(CPU)}  # both kept


@pytest.mark.parametrize("content", [b"\xff\xfe{ not json", b'{"version": 1, "devices": {"cpu x"', b"[1, 2]",
                                     b'{"version": 1, "devices": ["cpu"]}', b'{"version": 99, "devices": {}}'])
def test_a_broken_file_is_logged_once_and_rewritten(user_directory, caplog, content):
    path = timings.timings_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    runs: list[int] = []
    with caplog.at_level(logging.WARNING):
        seconds = _probe(runs)
    assert len(runs) == 1 + costs.PROBE_RUNS
    (warning,) = _warnings(caplog)
    assert "ignoring the probe times" in warning and str(path) in warning
    assert json.loads(path.read_text()) == _file(seconds, pytest.approx(timings._now(), abs=60))


@pytest.mark.parametrize("entry", [0.5, _stored("fast", 1.7e9), {"seconds": 0.5}, _stored(0.5, "yesterday"),
                                   _stored(-0.5, 1.7e9), _stored(float("nan"), 1.7e9)])
def test_a_stored_time_that_is_not_a_time_is_measured_again(user_directory, monkeypatch, entry):
    monkeypatch.setattr(timings, "_now", lambda: 1.7e9)
    path = timings.timings_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(_layout({repr(KEY): entry})))
    runs: list[int] = []
    assert isinstance(_probe(runs), float) and len(runs) == 1 + costs.PROBE_RUNS


def test_an_unwritable_folder_keeps_the_times_for_the_session(user_directory, caplog):
    (user_directory / "__fastattn").write_text("a file where the folder should be")
    runs: list[int] = []
    with caplog.at_level(logging.WARNING):
        first = _probe(runs)
        again = _probe(runs)
        costs.probe_seconds(("another",), lambda: runs.append(2), CPU)
    assert first == again and len(runs) == 2 * (1 + costs.PROBE_RUNS)
    cannot_read, cannot_write = _warnings(caplog)  # each problem logged once, not at every probe
    assert "ignoring the probe times" in cannot_read and "cannot write the probe times" in cannot_write


def test_an_unsteady_probe_is_timed_again_and_stored_once_steady(user_directory, monkeypatch):
    runs: list[int] = []
    loaded = [0.01, 0.01, 0.03, 0.01, 0.01]  # one run beside other work: 3 times the fastest
    monkeypatch.setattr(costs, "_clock", _clock(loaded + [0.02] * costs.PROBE_RUNS))
    assert _probe(runs) == pytest.approx(0.02) and len(runs) == 2 * (1 + costs.PROBE_RUNS)
    assert json.loads(timings.timings_path().read_text()) == _file(pytest.approx(0.02), pytest.approx(timings._now(), abs=60))


def test_a_probe_unsteady_twice_prices_the_session_only(user_directory, monkeypatch):
    """Stored, a time measured under load would price every calibration on this device for MAX_AGE_S."""
    runs: list[int] = []
    loaded = [0.01, 0.04, 0.01, 0.02, 0.01]
    monkeypatch.setattr(costs, "_clock", _clock(loaded * 2))
    assert _probe(runs) == _probe(runs) == pytest.approx(0.01)  # the median, kept for the session
    assert len(runs) == 2 * (1 + costs.PROBE_RUNS) and not timings.timings_path().exists()
    monkeypatch.setattr(costs, "_seconds", {})  # a restart: probed anew
    monkeypatch.setattr(costs, "_clock", _clock([0.02] * costs.PROBE_RUNS))
    assert _probe(runs) == pytest.approx(0.02) and timings.timings_path().exists()


# --- the cost table ---------------------------------------------------------------------------

TIMED = costs.Prices(1e-3, 5e-4, {0.0625: (2e-4, 1e-4), 0.125: (4e-4, 2e-4)}, "time")
IMAGE = costs.LayerSlot(LayerInfo("image", 2, 8), True, 10**9, {0.0625: 10**8, 0.125: 2 * 10**8}, TIMED)
JOINT = costs.LayerSlot(LayerInfo("joint", 4, 16), True, 3 * 10**9, {0.0625: 10**8, 0.125: 2 * 10**8},
                        costs.Prices(3e-3, 1.5e-3, {0.0625: (3e-4, 1.5e-4), 0.125: (6e-4, 3e-4)}, "time"))
CROSS = costs.LayerSlot(LayerInfo("cross", 2, 8), False, 10**8, {0.0625: 10**8}, costs.Prices(1e8, 5e7, {}))


def _rows(table: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("|") and not line.startswith("|-")]


def test_the_cost_table_prices_each_layer_shape_relative_to_full_attention():
    table = costs.cost_table([IMAGE, CROSS, IMAGE, JOINT, IMAGE, IMAGE])
    header, *rows = _rows(table)
    assert header == ["layers", "kind", "heads x dim", "full", "full+asc", "wars 0.0625", "wars+asc 0.0625",
                      "wars 0.125", "wars+asc 0.125", "ast"]
    assert rows == [
        ["0, 2, 4-5", "image", "2 x 8", "1 ms (1.00x)", "0.5 ms (0.50x)", "0.2 ms (0.20x)", "0.1 ms (0.10x)",
         "0.4 ms (0.40x)", "0.2 ms (0.20x)", "0"],
        ["3", "joint", "4 x 16", "3 ms (1.00x)", "1.5 ms (0.50x)", "0.3 ms (0.10x)", "0.15 ms (0.05x)",
         "0.6 ms (0.20x)", "0.3 ms (0.10x)", "0"],
    ]
    assert "ms of attention time measured on this device" in table
    assert "Layers 1 (cross): always full attention" in table
    assert len({len(line) for line in table.splitlines() if line.startswith("|")}) == 1  # padded: columns line up


def test_the_cost_table_says_flops_where_the_prices_are_flops():
    flops = costs.LayerSlot(IMAGE.info, True, 2 * 10**9, {0.0625: 5 * 10**8},
                            costs.Prices(2e9, 1e9, {0.0625: (5e8, 2.5e8)}))
    header, row = _rows(costs.cost_table([flops]))
    assert header[3:] == ["full", "full+asc", "wars 0.0625", "wars+asc 0.0625", "ast"]
    assert row[3:] == ["2 GFLOPs (1.00x)", "1 GFLOPs (0.50x)", "0.5 GFLOPs (0.25x)", "0.25 GFLOPs (0.12x)", "0"]
    assert "in attention GFLOPs" in costs.cost_table([flops])


def test_a_model_with_nothing_to_compress_says_so():
    assert costs.cost_table([CROSS, CROSS]).splitlines() == [
        "No compressible attention layer: nothing to price.", "Layers 0-1 (cross): always full attention, not priced."]
