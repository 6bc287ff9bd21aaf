"""The dense masked reference: the semantics every backend must match."""

from __future__ import annotations

import torch
from torch import Tensor

from .layout import TokenLayout
from .masks import sequence_mask
from .problem import Problem
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
    problem = Problem(q, k, v, layout, window, pool_weight=pool_weight, scale=scale)
    keys, values = problem.keys_with_pooled()
    rows = torch.arange(q.shape[2], device=q.device)
    cols = torch.arange(keys.shape[2], device=q.device)
    allowed = sequence_mask(layout, window)(rows[:, None], cols[None, :])
    scores = (q @ keys.transpose(-1, -2)) * problem.scale
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ values
