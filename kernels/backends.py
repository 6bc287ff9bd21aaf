"""Backend registry: names, availability, and the automatic choice by device.

Off CPU, "auto" is decided once per device type, before the first window is computed, and said
once in the log: the Triton kernel where Triton is installed and runs here, else compiled
FlexAttention where it runs here (on CUDA and XPU it needs Triton too), else the torch tiles,
which need only torch's own attention (a Windows portable ComfyUI without Triton, Apple MPS, a
GPU Triton does not support). "Runs here" is checked by running the backend once on a small
window problem against the dense reference, so a broken install is found up front instead of
raising in the middle of sampling.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch

from .layout import TokenLayout
from .problem import Problem
from .reference import reference_attention
from .window import Window

# name -> (module in this package, what must be importable for it to run)
BACKENDS = {
    "native": ("native", None),  # also needs its C++ source to build here (native.available)
    "torch": ("torch_tiles", None),
    "flex": ("flex", "torch.nn.attention.flex_attention"),
    "triton": ("triton_kernel", "triton"),
}
TRITON_DEVICES = ("cuda", "xpu")  # where Triton (and so compiled FlexAttention) generates kernels
log = logging.getLogger(__name__)


def _importable(name: str | None) -> bool:
    if name is None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _native() -> ModuleType:
    return importlib.import_module(f".{BACKENDS['native'][0]}", __package__)


def runs_here(name: str) -> bool:
    """Whether backend `name` can run here (builds the native kernel on the first call)."""
    module, needs = BACKENDS[name]
    if not _importable(needs):
        return False
    return name != "native" or _native().available()


def available_backends() -> list[str]:
    """Backends that can run here: dependencies importable (triton on CPU needs TRITON_INTERPRET=1),
    the native kernel built (on the first call; cached on disk after)."""
    return [name for name in BACKENDS if runs_here(name)]


def choose_backend(name: str, device: torch.device) -> str:
    """Resolve "auto": on CPU the native kernel (the torch tiles while it is being built in the
    background, or where it cannot be built); elsewhere the first of Triton, compiled FlexAttention
    and the torch tiles that runs on this device type (see the module docstring). Off CPU the
    native kernel is never built nor imported: it could not run there."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")
        if not runs_here(name):
            raise ValueError(f"backend {name!r} cannot run here; available: {available_backends()}")
        return name
    if device.type != "cpu":
        return _device_backend(device.type)
    if _native().building():
        _announce_build_in_progress()
        return "torch"
    return "native" if runs_here("native") else "torch"


@functools.cache
def _device_backend(device_type: str) -> str:
    """The backend "auto" uses on this (non-CPU) device type, found once and logged once."""
    reasons = []
    for name in ("triton", "flex"):
        reason = _why_not_on(name, device_type)
        if reason is None:
            log.info("FastAttn: window attention on %s uses the %s backend", device_type, name)
            return name
        reasons.append(reason)
    log.warning("FastAttn: window attention on %s uses the torch tiles (torch attention; slower than a fused "
                "kernel, same results): %s", device_type, "; ".join(reasons))
    return "torch"


def _why_not_on(name: str, device_type: str) -> str | None:
    """Why backend `name` cannot run on this device type (None: it runs)."""
    needs_triton = name == "triton" or device_type in TRITON_DEVICES  # compiled FlexAttention is Triton there
    if needs_triton and not _importable("triton"):
        return f"{name} needs Triton on {device_type}, and Triton is not installed"
    if name == "triton" and device_type not in TRITON_DEVICES:
        return f"Triton does not run on {device_type}"
    if not _importable(BACKENDS[name][1]):
        return f"{name} is not available in this torch"
    return _failed_launch(name, device_type)


def _failed_launch(name: str, device_type: str) -> str | None:
    """Run backend `name` on a small band and a small circle window (its two kinds of kernels) on this
    device type against the dense reference; the error (or the mismatch) if it fails, None if it works."""
    layout = TokenLayout(4, (8, 8))
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, layout.seq_len, 32, generator=generator) for _ in range(3))
    try:
        device = torch.device(device_type)
        for window in (Window("band", 9), Window("circle", 3)):
            out = backend_module(name).window_attention(Problem(*(t.to(device) for t in (q, k, v)), layout, window))
            expected = reference_attention(q.double(), k.double(), v.double(), layout, window)
            if not torch.allclose(out.double().cpu(), expected, atol=2e-3, rtol=2e-3):
                return f"{name} gave wrong results on {device_type}"
    except Exception as error:  # noqa: BLE001  (any failure means: do not use it)
        return f"{name} failed on {device_type}: {type(error).__name__}: {str(error)[:200]}"
    return None


@functools.cache
def _announce_build_in_progress() -> None:
    log.info("FastAttn: the native CPU kernel is still being built; calls use the torch tiles until it is ready")


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (imported on first use; `name` is a resolved name)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")
    return importlib.import_module(f".{BACKENDS[name][0]}", __package__)
