"""CLEAR's down-sampled branch: image keys/values pooled over d x d patches."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .layout import TokenLayout
from .window import Window


def default_pool_weight(pool: int, *, device: torch.device | str = "cpu") -> Tensor:
    """The initial per-position weights: a plain average over each pool x pool patch."""
    return torch.full((pool * pool,), 1.0 / (pool * pool), device=device)


def check_pool_weight(window: Window, pool_weight: Tensor | None) -> None:
    """Raise a ValueError if `pool_weight` does not fit the window's pooling."""
    if pool_weight is None:
        return
    if not window.pool:
        raise ValueError("pool_weight was given but the window has no pooling (pool=0)")
    if pool_weight.numel() != window.pool**2:
        raise ValueError(
            f"pool_weight needs pool*pool = {window.pool**2} weights (one per patch position), "
            f"got shape {tuple(pool_weight.shape)}"
        )


def pool_tokens(x: Tensor, layout: TokenLayout, window: Window, weight: Tensor | None) -> Tensor:
    """Pool the image tokens of `x` [B, H, N, D] into [B, H, image_len / pool^2, D].

    Patch position (py, px) of each pool x pool patch gets weight[py * pool + px]; pooled tokens
    are in row-major order over (frames,) H / pool, W / pool.
    """
    d = window.pool
    *frames, height, width = layout.grid
    start = layout.image_start
    image = x[:, :, start : start + layout.image_len]
    batch, heads, _, dim = image.shape
    image = image.reshape(batch, heads, *frames, height // d, d, width // d, d, dim)
    if weight is None:
        weight = default_pool_weight(d, device=x.device)
    # one patch position at a time into a float32 sum: weighting the whole image at once would
    # allocate its size, and summing in bfloat16 would round at every position
    total = torch.promote_types(x.dtype, torch.float32)
    weight = weight.to(device=x.device, dtype=total).reshape(d, d)
    pooled = image.new_zeros((batch, heads, *frames, height // d, width // d, dim), dtype=total)
    for py in range(d):
        for px in range(d):
            pooled.addcmul_(image.select(-4, py).select(-2, px), weight[py, px])
    return pooled.to(x.dtype).reshape(batch, heads, -1, dim)


def pooled_parts(
    k: Tensor, v: Tensor, layout: TokenLayout, window: Window, weight: Tensor | None, max_keys: int
) -> Iterator[tuple[Tensor, Tensor]]:
    """The pooled keys and values of k, v [B, H, N, D], made one part at a time (whole pooled
    rows, at most `max_keys` pooled tokens each, in the order of `pool_tokens`), so that only one
    part need exist at once."""
    width, pool = layout.grid[-1], window.pool
    pooled_rows = layout.image_len // (width * pool)  # (frames x) height / pool
    rows_per_part = max(1, max_keys // (width // pool))
    for row in range(0, pooled_rows, rows_per_part):
        stop = min(row + rows_per_part, pooled_rows)
        band = slice(layout.image_start + row * pool * width, layout.image_start + stop * pool * width)
        band_layout = TokenLayout(0, ((stop - row) * pool, width))  # pooling never crosses frames
        yield tuple(pool_tokens(x[:, :, band], band_layout, window, weight) for x in (k, v))
