"""Proving the token order of a model no adapter knows, before a window touches it.

A generic adapter knows the image grid (the latent and the model's patch size) and the text length
(the conditioning), but not where the text sits in a joint sequence, nor that the image tokens
follow the grid row by row. Windows on a wrong order would be silently wrong, so the order is
proven on the model itself: everything before a model's first self-attention acts on each token
alone (patch embedding, norms, projections, rotary embedding), so changing the latent cells of one
grid position changes exactly one query row of that first call, the row of that position. The
runtime runs the model up to that call (then stops it) once unchanged and once per probed position
(corners, neighbours along each axis), and accepts the order only if every probe moved exactly the
row row-major order predicts, after the text (text first) or from 0 (text after, or no text).
A model that mixes tokens earlier (a convolution wider than a patch, global pooling of the image)
moves more rows: the order stays unproven and windows stand aside.

Only the first self-attention call of a forward can be proven this way (attention mixes every token
it sees), so the proof covers the calls of that kind (joint, or image-only); the calls of the other
kind keep step and CFG sharing, which do not depend on the order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import torch

from .call import AttentionCall

Forward = Callable[[torch.Tensor, Callable], object]  # runs the model on a latent with an attention override


@dataclass(frozen=True)
class LayoutProof:
    """What the proof established for one latent size and text length."""

    kind: str | None  # the kind of call whose token order is proven ("joint" or "image"); None: none
    text_first: bool = True  # where a proven joint call holds its text
    reason: str = ""  # why nothing was proven, for the report


class _Captured(Exception):
    """Stops the model at its first self-attention call, once its queries are captured."""


def prove_layout(forward: Forward, x: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...],
                 text_len: int) -> LayoutProof:
    """Run `forward` up to the first self-attention call on `x` and on copies changed at a few grid
    positions; see the module docstring. `patch` has one entry per axis of `grid`."""
    image_len = math.prod(grid)
    try:
        baseline, kind = _first_queries(forward, x, image_len, text_len)
        if baseline is None:
            return LayoutProof(None, reason="no self-attention call over the image tokens was found")
        offsets = {0} if kind == "image" else {text_len, 0}  # text first, or after the image
        for cell in _probe_cells(grid):
            changed, _ = _first_queries(forward, _perturbed(x, cell, patch), image_len, text_len)
            rows = _changed_rows(baseline, changed)
            index = sum(i * math.prod(grid[axis + 1:]) for axis, i in enumerate(cell))
            offsets &= {row - index for row in rows} if len(rows) == 1 else set()
            if not offsets:
                return LayoutProof(None, reason=f"changing grid position {cell} moved query rows {rows[:6]} of the "
                                                f"first {kind} call, not the one row a row-major grid puts there")
    except comfy.model_management.InterruptProcessingException:
        raise  # the user's cancel
    except Exception as error:  # a model that cannot be run this way: no proof, never a failed run
        logging.info("FastAttn: the token-order proof could not run (%s)", error)
        return LayoutProof(None, reason=f"the proof could not run the model ({type(error).__name__})")
    offset = offsets.pop()
    return LayoutProof(kind, text_first=offset == text_len and text_len > 0)


def _first_queries(forward: Forward, x: torch.Tensor, image_len: int,
                   text_len: int) -> tuple[torch.Tensor | None, str | None]:
    """The queries [B, H, N, D] of the model's first self-attention call over the image (image-only or
    joint), and that call's kind; (None, None) if the forward made none."""
    captured: list = []

    def capture(func, *args, **kwargs):
        call = AttentionCall(func, args, kwargs, None)
        if call.q_len == call.k_len and call.q_len != text_len and call.q_len in (image_len, image_len + text_len):
            captured.append((call.heads_first()[0].detach().clone(), "image" if call.q_len == image_len else "joint"))
            raise _Captured
        return func(*args, **kwargs)

    try:
        forward(x, capture)
    except _Captured:
        pass
    return captured[0] if captured else (None, None)


def _probe_cells(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The first cell, its next neighbour along each axis, the middle and the last cell."""
    first = (0,) * len(grid)
    neighbours = [tuple(int(axis == moved) for axis in range(len(grid))) for moved in range(len(grid))]
    cells = [first, *neighbours, tuple(size // 2 for size in grid), tuple(size - 1 for size in grid)]
    return [cell for cell in dict.fromkeys(cells) if all(i < size for i, size in zip(cell, grid, strict=True))]


def _perturbed(x: torch.Tensor, cell: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """`x` with the latent cells of one token (every channel and batch row) shifted."""
    changed = x.clone()
    region = tuple(slice(i * p, (i + 1) * p) for i, p in zip(cell, patch, strict=True))
    changed[(..., *region)] += 1.0 + x.abs().amax()  # the grid is the latent's last axes
    return changed


def _changed_rows(before: torch.Tensor, after: torch.Tensor | None) -> list[int]:
    """Sequence positions whose queries changed by more than rounding (1e-4 of the largest change)."""
    if after is None or after.shape != before.shape:
        return []
    change = (after.double() - before.double()).abs().nan_to_num(nan=math.inf).amax(dim=(0, 1, 3))
    largest = float(change.max())
    if largest == 0.0:
        return []
    return change.gt(largest * 1e-4).nonzero().flatten().tolist()
