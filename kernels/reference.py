"""The dense masked reference: the semantics every backend must match."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import TokenLayout
from .masks import sequence_mask
from .pooling import pool_tokens
from .validate import check_inputs
from .window import Window


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    layout: TokenLayout,
    window: Window,
    *,
    pool_weight: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Window attention by a dense masked softmax, in the inputs' dtype (pass float64 for a
    ground truth). Costs O(N^2) time and memory: for tests, never for speed."""
    check_inputs(q, k, v, layout, window, pool_weight=pool_weight)
    if window.pool:
        k = torch.cat([k, pool_tokens(k, layout, window, pool_weight)], dim=2)
        v = torch.cat([v, pool_tokens(v, layout, window, pool_weight)], dim=2)
    rows = torch.arange(q.shape[2], device=q.device)
    cols = torch.arange(k.shape[2], device=q.device)
    allowed = sequence_mask(layout, window)(rows[:, None], cols[None, :])
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v
