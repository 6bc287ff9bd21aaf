"""Backend registry: names, availability, and the automatic choice by device."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch

# name -> (module in this package, what must be importable for it to run)
BACKENDS = {
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


def available_backends() -> list[str]:
    """Backends whose dependencies are importable here (triton on CPU needs TRITON_INTERPRET=1)."""
    return [name for name, (_, needs) in BACKENDS.items() if _importable(needs)]


def choose_backend(name: str, device: torch.device) -> str:
    """Resolve "auto": torch tiles on CPU; Triton on GPU when importable, else FlexAttention."""
    if name != "auto":
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose 'auto' or one of {available_backends()}")
        if name not in available_backends():
            raise ValueError(f"backend {name!r} is not importable here; available: {available_backends()}")
        return name
    if device.type == "cpu":
        return "torch"
    return "triton" if "triton" in available_backends() else "flex"


def backend_module(name: str) -> ModuleType:
    """The module implementing backend `name` (imported on first use)."""
    return importlib.import_module(f".{BACKENDS[choose_backend(name, torch.device('cpu'))][0]}", __package__)
