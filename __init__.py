"""FastAttn: attention compression for diffusion transformers in ComfyUI.

ComfyUI imports this file when it loads the pack. It only registers nodes: no model work,
no compilation, no network.
"""

from .nodes import comfy_entrypoint

__all__ = ["comfy_entrypoint"]
