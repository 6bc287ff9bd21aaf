"""FastAttn: attention compression for diffusion transformers in ComfyUI.

ComfyUI imports this file when it loads the pack. It registers nodes and, when ComfyUI runs on
CPU, starts building the native CPU kernel on a background thread (about a minute the first
time, then loaded from torch's cache), so that no sample waits for it. No model work, no network.
"""

import comfy.model_management

from .nodes import comfy_entrypoint

if comfy.model_management.get_torch_device().type == "cpu":
    from .kernels.native import build_in_background

    build_in_background()

WEB_DIRECTORY = "./web"  # shows the inspector's and report's text on their nodes

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
