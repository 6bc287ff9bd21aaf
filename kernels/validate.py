"""Input checks shared by the reference and every backend, with actionable messages."""

from __future__ import annotations

from torch import Tensor

from .layout import TokenLayout
from .pooling import check_pool_weight
from .window import Window


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    window: Window,
    *,
    pool_weight: Tensor | None = None,
    residual: Tensor | None = None,
) -> None:
    """Raise a ValueError unless q, k, v are [B, H, N, D] with N = layout.seq_len and the
    window applies to the layout."""
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
    if residual is not None and residual.shape != q.shape:
        raise ValueError(f"residual must have q's shape {tuple(q.shape)}, got {tuple(residual.shape)}")
    window.check(layout)
    check_pool_weight(window, pool_weight)
