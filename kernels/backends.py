"""Backend registry: names, availability, and the automatic choice by device."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

# name -> (module in this package, what must be importable for it to run)
BACKENDS = {
    "native": ("native", None),  # also needs its C++ source to build here (native.available)
    "torch": ("torch_tiles", None),
    "flex": ("flex", "torch.nn.attention.flex_attention"),
    "triton": ("triton_kernel", "triton"),
}


def _importable(name: str | None) -> bool:
    if name is None:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def _runs_here(name: str) -> bool:
    module, needs = BACKENDS[name]
    if not _importable(needs):
        return False
    return name != "native" or importlib.import_module(f".{module}", __package__).available()


def available_backends() -> list[str]:
    """Backends that can run here: dependencies importable (triton on CPU needs TRITON_INTERPRET=1),
    the native kernel built (on the first call; cached on disk after)."""
    return [name for name in BACKENDS if _runs_here(name)]


def choose_backend(name: str, device: torch.device) -> str:
    """Resolve "auto": the native kernel on CPU (torch tiles where it cannot be built); Triton on
    GPU when importable, else FlexAttention."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {available_backends()}")
        if not _runs_here(name):
            raise ValueError(f"backend {name!r} cannot run here; available: {available_backends()}")
        return name
    if device.type == "cpu":
        return "native" if _runs_here("native") else "torch"
    return "triton" if "triton" in available_backends() else "flex"


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (imported on first use)."""
    return importlib.import_module(f".{BACKENDS[choose_backend(name, torch.device('cpu'))][0]}", __package__)
