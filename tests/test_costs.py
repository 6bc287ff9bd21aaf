"""What the time probe keeps on disk: per device, across sessions, surviving a broken file."""

from __future__ import annotations

import json
import logging

import folder_paths
import pytest
import torch
from harness import pack_import

costs = pack_import("plans.costs")
timings = pack_import("plans.timings")

CPU = torch.device("cpu")
KEY = ("full", 2, "cpu", torch.float32, 2, 2, 64, 64, 8)


@pytest.fixture
def user_directory(tmp_path, monkeypatch):
    """A user folder of the test's own, an empty session memo and no problem logged yet."""
    monkeypatch.setattr(folder_paths, "get_user_directory", lambda: str(tmp_path))
    monkeypatch.setattr(costs, "_seconds", {})
    monkeypatch.setattr(timings, "_logged", set())
    return tmp_path


def _probe(runs: list) -> float:
    return costs.probe_seconds(KEY, lambda: runs.append(1), CPU)


def _warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == timings.__name__]


def test_a_new_session_reads_the_probe_times_from_disk(user_directory, monkeypatch):
    runs: list[int] = []
    first = _probe(runs)
    assert len(runs) == 1 + costs.PROBE_RUNS
    path = user_directory / "__fastattn" / "timings.json"
    assert timings.timings_path() == path and not list(path.parent.glob(".timings-*"))  # no temporary file left
    stored = json.loads(path.read_text())["devices"]
    assert stored == {timings.device_identity(CPU): {repr(KEY): first}}
    monkeypatch.setattr(costs, "_seconds", {})  # a restart: the session's memo is gone
    assert _probe(runs) == first and len(runs) == 1 + costs.PROBE_RUNS  # read, not probed


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
    assert json.loads(path.read_text()) == {"version": timings.VERSION,
                                            "devices": {timings.device_identity(CPU): {repr(KEY): seconds}}}


def test_a_stored_time_that_is_not_a_time_is_measured_again(user_directory):
    path = timings.timings_path()
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"version": timings.VERSION,
                                "devices": {timings.device_identity(CPU): {repr(KEY): "fast"}}}))
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

