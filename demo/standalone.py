"""Run a demo module as a command, outside ComfyUI's custom-node loader.

The pack's modules use relative imports (ComfyUI imports the pack under a path-like module
name), so a plain `python demo/train.py` cannot import its siblings. This registers the
repository as the package `fastattn_pack` without executing its `__init__` (that one
registers nodes and needs the whole host), puts ComfyUI on sys.path ($COMFYUI_PATH, else
the bundled .host/ComfyUI of `make setup`) with torch SDPA attention, then runs the module.
The test harness finds and configures the host through the same two functions.
"""

from __future__ import annotations

import importlib
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "fastattn_pack"


def host_path() -> Path:
    """The ComfyUI to use: $COMFYUI_PATH, else the bundled host of `make setup`."""
    path = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "ComfyUI")
    if not (path / "main.py").is_file():
        raise RuntimeError(f"No ComfyUI at {path}: run `make setup` (or set COMFYUI_PATH).")
    return path


def import_host(path: Path) -> None:
    """Put ComfyUI on sys.path with the options `main.py --cpu --use-pytorch-cross-attention`
    sets (torch SDPA attention: the baseline every comparison uses)."""
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    comfy.cli_args.args.use_pytorch_cross_attention = True
    comfy.cli_args.args.disable_all_custom_nodes = False
    # As main.py does first: ComfyUI's `utils` package must win over comfy/utils.py, which
    # `nodes` puts on sys.path.
    import utils.extra_config  # noqa: F401


def run(module: str, argv: list[str]) -> None:
    """Import `module` (e.g. "demo.train") from the pack and call its main(argv)."""
    import_host(host_path())
    package = types.ModuleType(PACKAGE)
    package.__path__ = [str(REPO)]
    sys.modules[PACKAGE] = package
    importlib.import_module(f"{PACKAGE}.{module}").main(argv)
