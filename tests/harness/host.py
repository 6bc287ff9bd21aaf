"""Import ComfyUI in this process and load the pack through ComfyUI's own custom-node loader.

Importing this module does it once: the host's command-line options are set as
`main.py --cpu --use-pytorch-cross-attention` would set them (torch SDPA is the baseline
every comparison uses), then `nodes.load_custom_node` loads the pack from the host's
`custom_nodes` folder, exactly as at server start-up.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]
PACK_DIR_NAME = "comfyui_fastattn"


def _standalone() -> ModuleType:
    """The pack's demo/standalone.py, which finds and configures the host for scripts too
    (loaded by file: the pack itself is importable only once the host is)."""
    spec = importlib.util.spec_from_file_location("fastattn_standalone", REPO / "demo" / "standalone.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_STANDALONE = _standalone()
comfy_path = _STANDALONE.host_path


def _import_host(path: Path) -> None:
    _STANDALONE.import_host(path)
    import comfy.utils

    comfy.utils.PROGRESS_BAR_ENABLED = False  # samplers' tqdm bars would flood test and benchmark output


def _load_pack(path: Path) -> ModuleType:
    import nodes

    link = path / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        raise RuntimeError(f"The pack is not linked at {link}: run `make setup`.")
    module_path = str(link)
    if not asyncio.run(nodes.load_custom_node(module_path)):
        raise RuntimeError(f"ComfyUI failed to load the pack from {module_path}; see the log above.")
    asyncio.run(nodes.init_builtin_extra_nodes())
    return sys.modules[module_path.replace(".", "_x_")]


def node_io(class_type: str) -> tuple[list[tuple[str, str]], list[str]]:
    """A registered node's inputs as (name, type) in order ("COMBO" for a list of choices),
    and its output types, as the host defines them."""
    import nodes

    node = nodes.NODE_CLASS_MAPPINGS[class_type]
    types = node.INPUT_TYPES()
    inputs = [
        (name, spec[0] if isinstance(spec[0], str) else "COMBO")
        for section in ("required", "optional")
        for name, spec in types.get(section, {}).items()
    ]
    return inputs, list(node.RETURN_TYPES)


def pack_nodes() -> dict:
    """Every node the pack registers, node id -> its class, from the pack's own extension."""
    extension = asyncio.run(pack_import("nodes").comfy_entrypoint())
    return {node.define_schema().node_id: node for node in asyncio.run(extension.get_node_list())}


def pack_import(name: str) -> ModuleType:
    """Import a submodule of the loaded pack, e.g. pack_import("kernels.window")."""
    return importlib.import_module(f"{PACK.__name__}.{name}")


_import_host(comfy_path())
PACK = _load_pack(comfy_path())
