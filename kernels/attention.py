"""The entry point: window attention with the backend chosen by device or by name."""

from __future__ import annotations

from torch import Tensor

from .backends import backend_module, choose_backend
from .layout import TokenLayout
from .problem import Problem
from .window import Window


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    window: Window,
    *,
    backend: str = "auto",
    pool_weight: Tensor | None = None,
    residual: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention of q, k, v [B, H, N, D] restricted to `window`, plus `residual` if given
    (DiTFastAttn's window + residual). Same result as `reference_attention`, at a cost that
    falls with the window."""
    problem = Problem(q, k, v, layout, window, pool_weight, residual, scale)
    return backend_module(choose_backend(backend, q.device)).window_attention(problem)
