"""Test harness: the ComfyUI host in-process with the pack loaded as ComfyUI loads it,
and a real headless server for end-to-end tests. Shared by tests and benchmarks."""

from .host import PACK, comfy_path, node_io, pack_import, pack_nodes

__all__ = ["PACK", "comfy_path", "node_io", "pack_import", "pack_nodes"]
