"""One window-attention call: the inputs every backend receives, checked once with
actionable messages."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import TokenLayout
from .pooling import check_pool_weight, pool_tokens
from .window import Window


@dataclass(frozen=True)
class Problem:
    """q, k, v [B, H, N, D] with N = layout.seq_len; `scale` defaults to D^-0.5."""

    q: Tensor
    k: Tensor
    v: Tensor
    layout: TokenLayout
    window: Window
    pool_weight: Tensor | None = None
    residual: Tensor | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        q, k, v, layout = self.q, self.k, self.v, self.layout
        if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
            raise ValueError(
                "q, k, v must all be [batch, heads, tokens, head_dim] of one shape, got "
                f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
            )
        if q.shape[2] != layout.seq_len:
            raise ValueError(
                f"q has {q.shape[2]} tokens but the layout has {layout.seq_len} "
                f"({layout.text_len} text + {layout.image_len} image of grid {layout.grid})"
            )
        if not (q.dtype == k.dtype == v.dtype and q.device == k.device == v.device):
            raise ValueError("q, k, v must share one dtype and one device")
        if self.residual is not None and self.residual.shape != q.shape:
            raise ValueError(
                f"residual must have q's shape {tuple(q.shape)}, got {tuple(self.residual.shape)}"
            )
        self.window.check(layout)
        check_pool_weight(self.window, self.pool_weight)
        if self.scale is None:
            object.__setattr__(self, "scale", q.shape[-1] ** -0.5)

    def keys_with_pooled(self) -> tuple[Tensor, Tensor]:
        """k and v with the pooled keys appended after the sequence (as the mask numbers them)."""
        if not self.window.pool:
            return self.k, self.v
        return tuple(
            torch.cat([x, pool_tokens(x, self.layout, self.window, self.pool_weight)], dim=2)
            for x in (self.k, self.v)
        )
