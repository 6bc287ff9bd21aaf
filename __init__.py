"""FastAttn: attention compression for diffusion transformers in ComfyUI.

ComfyUI imports this file when it loads the pack. It only registers nodes: no model work,
no compilation, no network.
"""

from .nodes import comfy_entrypoint

WEB_DIRECTORY = "./web"  # shows the inspector's and report's text on their nodes

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
