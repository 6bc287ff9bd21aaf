"""Probe times kept across ComfyUI restarts, so that calibrating after a restart probes nothing
already measured: one small JSON file in the host's internal user folder
(`<user>/__fastattn/timings.json`, which the host never serves over HTTP), each time filed under
the device that measured it and the probe's key, with the Unix time it was measured (a time
older than MAX_AGE_S counts as never measured).

It is only a cache: a file that cannot be read is ignored (one log line) and replaced by the next
write; one that cannot be written leaves the times to the session. Neither stops a calibration."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import folder_paths
import torch

VERSION = 2  # of the file's layout (2: times with when they were measured); others are ignored and rewritten
# A stored time this old is measured again: one measured under load, or before a driver or library update
# that the device identity does not name, would otherwise price every later calibration on this device.
MAX_AGE_S = 30 * 24 * 3600.0
_now = time.time  # the clock measurement times are stored and aged by (tests move it)
log = logging.getLogger(__name__)
_logged: set[str] = set()  # problems already logged this session (a broken file is met at each probe)


def timings_path() -> Path:
    return Path(folder_paths.get_system_user_directory("fastattn")) / "timings.json"


def device_identity(device: torch.device) -> str:
    """What a time measured on `device` depends on besides the probe: the chip, the torch version,
    and on CPU the number of threads torch computes with."""
    if device.type == "cpu":
        return f"cpu {_cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    device_name = getattr(getattr(torch, device.type, None), "get_device_name", None)
    chip = device_name(device) if device_name is not None else _cpu_name()  # e.g. MPS: the SoC
    return f"{device.type} {chip}, torch {torch.__version__}"


@functools.cache
def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def stored_seconds(identity: str, key: str) -> float | None:
    """The time stored for probe `key` on the device `identity`, None if there is none, it is not a
    time, or it was measured more than MAX_AGE_S ago (or, by the clock, in the future)."""
    entry = _read().get(identity, {}).get(key)
    if not isinstance(entry, dict):
        return None
    seconds, measured_at = entry.get("seconds"), entry.get("measured_at")
    if not all(isinstance(value, float) and math.isfinite(value) for value in (seconds, measured_at)):
        return None
    return seconds if seconds >= 0 and 0 <= _now() - measured_at <= MAX_AGE_S else None


def store_seconds(identity: str, key: str, seconds: float) -> None:
    """Adds one time, measured now, to the file, written whole to a temporary file and renamed over
    the old one (a reader never sees half a file)."""
    devices = _read()
    devices.setdefault(identity, {})[key] = {"seconds": seconds, "measured_at": _now()}
    path = timings_path()
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=".timings-", suffix=".tmp",
                                         delete=False) as file:
            temporary = Path(file.name)
            json.dump({"version": VERSION, "devices": devices}, file, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        _log_once(f"FastAttn: cannot write the probe times to {path} ({error}); they are kept for this session only")
        if temporary is not None:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)


def _read() -> dict[str, dict[str, object]]:
    """Device identity -> probe key -> {"seconds", "measured_at"}, as stored; {} where the file is
    missing or broken."""
    path = timings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # ValueError: not JSON, or not UTF-8
        _log_once(f"FastAttn: ignoring the probe times in {path} ({error}); they are measured again and rewritten")
        return {}
    devices = data.get("devices") if isinstance(data, dict) and data.get("version") == VERSION else None
    if not isinstance(devices, dict) or not all(isinstance(times, dict) for times in devices.values()):
        _log_once(f"FastAttn: ignoring the probe times in {path} (not a version {VERSION} timings file); they are "
                  "measured again and rewritten")
        return {}
    return devices


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning(message)
