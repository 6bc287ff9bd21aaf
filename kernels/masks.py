"""Masks as small pure functions of index tensors (like FlexAttention's mask_mod).

Every backend derives its sparsity from these, so the semantics live in one place.
Indices broadcast: pass q[:, None] and k[None, :] for a dense mask.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .layout import TokenLayout
from .window import Window

MaskFn = Callable[[Tensor, Tensor], Tensor]


def unravel(index: Tensor, grid: tuple[int, ...]) -> list[Tensor]:
    """Row-major grid coordinates of flattened image indices, slowest axis first."""
    coords = []
    for size in reversed(grid[1:]):
        coords.append(index % size)
        index = index // size
    coords.append(index)
    return coords[::-1]


def band(q: Tensor, k: Tensor, radius: int) -> Tensor:
    """DiTFastAttn's 1D window: |i - j| <= radius over flattened image indices."""
    return (q - k).abs() <= radius


def circle(q: list[Tensor], k: list[Tensor], radius: int, temporal_radius: int) -> Tensor:
    """CLEAR's window: dy^2 + dx^2 < radius^2 (strict), plus |dt| <= temporal_radius in 3D."""
    dy, dx = q[-2] - k[-2], q[-1] - k[-1]
    return (dy * dy + dx * dx < radius * radius) & _temporal(q, k, temporal_radius)


def square(q: list[Tensor], k: list[Tensor], radius: int, temporal_radius: int) -> Tensor:
    """Square neighbourhood: |dy| <= radius and |dx| <= radius, plus |dt| <= temporal_radius."""
    near = ((q[-2] - k[-2]).abs() <= radius) & ((q[-1] - k[-1]).abs() <= radius)
    return near & _temporal(q, k, temporal_radius)


def _temporal(q: list[Tensor], k: list[Tensor], temporal_radius: int) -> Tensor | bool:
    return (q[0] - k[0]).abs() <= temporal_radius if len(q) == 3 else True


def image_mask(layout: TokenLayout, window: Window) -> MaskFn:
    """Mask over pairs of flattened image indices (0 .. image_len-1)."""
    if window.shape == "band":
        return lambda q, k: band(q, k, window.radius)
    local = circle if window.shape == "circle" else square
    grid = layout.grid
    return lambda q, k: local(unravel(q, grid), unravel(k, grid), window.radius, window.temporal_radius)


def sequence_mask(layout: TokenLayout, window: Window) -> MaskFn:
    """Mask over (query, key) sequence indices; keys >= seq_len are the pooled keys.

    Text queries see every original key; image queries see all text keys, all pooled keys
    and the image keys inside their window.
    """
    local = image_mask(layout, window)
    start, count, seq_len = layout.image_start, layout.image_len, layout.seq_len

    def mask(q: Tensor, k: Tensor) -> Tensor:
        q_image = (q >= start) & (q < start + count)
        k_image = (k >= start) & (k < start + count)
        near = local((q - start).clamp(0, count - 1), (k - start).clamp(0, count - 1))
        return torch.where(q_image, near | ~k_image, k < seq_len)

    return mask
