"""Attention FLOPs: full, kept by the exact mask, and computed by a backend."""

from __future__ import annotations

from dataclasses import dataclass

from .backends import backend_module
from .blocks import kept_image_pairs
from .layout import TokenLayout
from .window import Window


@dataclass(frozen=True)
class FlopCount:
    """FLOPs of QK^T and PV: 2 * 2 * head_dim per (query, key) pair, times batch and heads."""

    full: int  # dense attention over the original sequence
    mask: int  # pairs the exact window mask keeps
    computed: int  # pairs the backend actually computes (tiles / blocks)


def attention_flops(
    layout: TokenLayout, window: Window, *, batch: int, heads: int, head_dim: int, backend: str = "torch"
) -> FlopCount:
    """Count FLOPs without running attention (plans and block maps are cached and reused)."""
    window.check(layout)
    per_pair = 4 * head_dim * batch * heads
    kept = window.shared_pairs(layout) + kept_image_pairs(layout, window)
    return FlopCount(
        full=per_pair * layout.seq_len**2,
        mask=per_pair * kept,
        computed=per_pair * backend_module(backend).computed_pairs(layout, window),
    )
