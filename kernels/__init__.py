"""Pure attention functions on tensors (nothing of ComfyUI): local-window attention for
diffusion transformers, a dense reference defining it, and fast backends."""

from .attention import window_attention
from .backends import available_backends
from .flops import FlopCount, attention_flops
from .layout import TokenLayout
from .reference import reference_attention
from .window import Window

__all__ = [
    "FlopCount",
    "TokenLayout",
    "Window",
    "attention_flops",
    "available_backends",
    "reference_attention",
    "window_attention",
]
