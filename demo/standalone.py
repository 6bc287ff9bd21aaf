"""Run a demo module as a command, outside ComfyUI's custom-node loader.

The pack's modules use relative imports (ComfyUI imports the pack under a path-like module
name), so a plain `python demo/train.py` cannot import its siblings. This registers the
repository as the package `fastattn_pack` without executing its `__init__` (that one
registers nodes and needs the whole host), puts ComfyUI on sys.path ($COMFYUI_PATH, else
the bundled .host/ComfyUI of `make setup`) with torch SDPA attention, then runs the module.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "fastattn_pack"


def _import_host() -> None:
    host = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")
    if not (host / "comfy").is_dir():
        raise SystemExit(f"No ComfyUI at {host}: run `make setup` or set COMFYUI_PATH.")
    sys.path.insert(0, str(host))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True


def run(module: str, argv: list[str]) -> None:
    """Import `module` (e.g. "demo.train") from the pack and call its main(argv)."""
    _import_host()
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(REPO)]
    sys.modules[PACKAGE] = package
    importlib.import_module(f"{PACKAGE}.{module}").main(argv)
