"""Backend registry: names, availability, and the automatic choice by device."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from types import ModuleType

import torch

# name -> (module in this package, what must be importable for it to run)
BACKENDS = {
    "native": ("native", None),  # also needs its C++ source to build here (native.available)
    "torch": ("torch_tiles", None),
    "flex": ("flex", "torch.nn.attention.flex_attention"),
    "triton": ("triton_kernel", "triton"),
}
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
    background, or where it cannot be built); elsewhere Triton when importable, else FlexAttention.
    Off CPU the native kernel is never built nor imported: it could not run there."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")
        if not runs_here(name):
            raise ValueError(f"backend {name!r} cannot run here; available: {available_backends()}")
        return name
    if device.type != "cpu":
        return "triton" if runs_here("triton") else "flex"
    if _native().building():
        _announce_build_in_progress()
        return "torch"
    return "native" if runs_here("native") else "torch"


@functools.cache
def _announce_build_in_progress() -> None:
    log.info("FastAttn: the native CPU kernel is still being built; calls use the torch tiles until it is ready")


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (imported on first use; `name` is a resolved name)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {list(BACKENDS)}")
    return importlib.import_module(f".{BACKENDS[name][0]}", __package__)
