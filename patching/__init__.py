"""Model-agnostic runtime that hooks ComfyUI's attention: per-run state, step / layer /
CFG-half tracking, and the token-layout adapters (the only per-architecture code)."""

from .adapters import Adapter, UnsupportedArchitectureError, adapter_for
from .call import AttentionCall
from .report import LayerRecord, RunReport
from .runtime import full_attention, install, patch_of
from .site import CallSite
from .state import AttentionMethod, AttentionPatch, SamplingRun

__all__ = [
    "Adapter",
    "AttentionCall",
    "AttentionMethod",
    "AttentionPatch",
    "CallSite",
    "LayerRecord",
    "RunReport",
    "SamplingRun",
    "UnsupportedArchitectureError",
    "adapter_for",
    "full_attention",
    "install",
    "patch_of",
]
