"""Block sparsity of the window mask over sequence blocks: which (query block, key block)
pairs are empty, partial (need the mask) or full. Shared by the FlexAttention and Triton
backends; cached per (layout, window, block size).

Built without evaluating the mask on every pair (O(N^2): 72 s at FLUX 4096^2 on one core):
each query's keys are a few intervals of key indices (one per grid row its window touches,
plus the text and pooled keys), counted per query block with difference arrays, so the cost is
the number of queries times the window's rows plus one cumulative sum per query block.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import TokenLayout
from .masks import image_mask, unravel
from .tiles import reach
from .window import Window

CHUNK_ELEMENTS = 1 << 23  # key counts held at once (query blocks x keys), 32 MiB of int32


@dataclass(frozen=True)
class BlockMap:
    block: int
    kv_len: int  # keys: the sequence, then the pooled keys
    partial_count: Tensor  # [query blocks] int32
    partial_index: Tensor  # [query blocks, key blocks] int32, first partial_count valid
    full_count: Tensor
    full_index: Tensor

    @property
    def computed_pairs(self) -> int:
        """(query, key) pairs a kernel computes when it computes every visited block whole."""
        return int(self.partial_count.sum() + self.full_count.sum()) * self.block * self.block


def _compact(flags: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: how many flags are set, and their column indices first (stable order)."""
    count = flags.sum(dim=1, dtype=torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return count, order


def _row_profile(window: Window, dims: int) -> tuple[Tensor, Tensor, Tensor]:
    """The window around one query as grid rows: each row's offsets along the leading axes
    [rows, dims - 1] and the range [lo, hi] of last-axis offsets it sees. Read off the mask
    itself on a grid just large enough (the windows only depend on the offsets)."""
    size = [2 * r + 1 for r in reach(window, dims)]
    centre = torch.tensor(math.prod(size) // 2)
    seen = image_mask(TokenLayout(0, tuple(size)), window)(centre, torch.arange(math.prod(size)))
    rows = seen.view(-1, size[-1])
    kept = torch.nonzero(rows.any(dim=1)).flatten()
    columns = torch.arange(size[-1])
    lo = torch.where(rows[kept], columns, size[-1]).amin(dim=1)
    hi = torch.where(rows[kept], columns, -1).amax(dim=1)
    if not torch.equal(rows[kept].sum(dim=1), hi - lo + 1):
        raise AssertionError(f"the {window.shape} window is not one interval per grid row")
    leading = torch.stack(unravel(kept, tuple(size[:-1])), dim=1) if dims > 1 else kept[:, None][:, :0]
    middle = torch.tensor(size[:-1]) // 2
    return leading - middle, lo - size[-1] // 2, hi - size[-1] // 2


def _image_intervals(layout: TokenLayout, window: Window) -> tuple[Tensor, Tensor]:
    """Per image query, the [start, stop) image-index intervals of the image keys it sees,
    [image_len, rows] (empty where a row falls off the grid)."""
    grid = (layout.image_len,) if window.shape == "band" else layout.grid
    leading, lo, hi = _row_profile(window, len(grid))
    coords = unravel(torch.arange(layout.image_len), grid)
    width = grid[-1]
    first = (coords[-1][:, None] + lo).clamp(min=0)
    last = (coords[-1][:, None] + hi).clamp(max=width - 1)
    inside = first <= last
    row = torch.zeros_like(first)
    for axis, size in enumerate(grid[:-1]):
        at = coords[axis][:, None] + leading[:, axis]
        inside &= (at >= 0) & (at < size)
        row = row * size + at
    starts = torch.where(inside, row * width + first, 0)
    return starts, torch.where(inside, row * width + last + 1, 0)


@functools.lru_cache(maxsize=32)
def kept_image_pairs(layout: TokenLayout, window: Window) -> int:
    """(image query, image key) pairs the window keeps: the lengths of the key intervals."""
    starts, stops = _image_intervals(layout, window)
    return int((stops - starts).sum())


def _key_intervals(layout: TokenLayout, window: Window, kv_len: int) -> tuple[Tensor, Tensor]:
    """Per sequence query, the [start, stop) intervals of keys it sees, [seq_len, rows + 2]:
    text queries every original key; image queries their window, the text and the pooled keys."""
    image_starts, image_stops = _image_intervals(layout, window)
    rows = image_starts.shape[1] + 2
    starts = torch.zeros(layout.seq_len, rows, dtype=torch.long)
    stops = torch.zeros_like(starts)
    text = slice(layout.text_start, layout.text_start + layout.text_len)
    image = slice(layout.image_start, layout.image_start + layout.image_len)
    stops[text, 0] = layout.seq_len
    starts[image, :-2], stops[image, :-2] = (
        image_starts + layout.image_start,
        image_stops + layout.image_start,
    )
    starts[image, -2], stops[image, -2] = text.start, text.stop
    starts[image, -1], stops[image, -1] = layout.seq_len, kv_len
    return starts, stops


@functools.lru_cache(maxsize=32)
def block_map(layout: TokenLayout, window: Window, block: int) -> BlockMap:
    """Classify every block pair: how many queries of each query block see each key (from the
    key intervals), then per key block whether any query sees a key / every query every key."""
    seq, kv_len = layout.seq_len, layout.seq_len + window.pooled_len(layout)
    starts, stops = _key_intervals(layout, window, kv_len)
    q_blocks, kv_blocks = -(-seq // block), -(-kv_len // block)
    width = kv_blocks * block + 1  # one more column for the stops at the end
    key_valid = (torch.arange(kv_blocks * block) < kv_len).view(kv_blocks, block).all(dim=1)
    partial, full = [], []
    chunk = max(1, CHUNK_ELEMENTS // width)
    for first in range(0, q_blocks, chunk):
        rows = torch.arange(first * block, min((first + chunk) * block, seq))
        local = (rows // block - first)[:, None] * width
        diff = torch.zeros(-(-len(rows) // block) * width, dtype=torch.int32)
        ones = torch.ones(starts[rows].numel(), dtype=torch.int32)
        diff.index_add_(0, (local + starts[rows]).flatten(), ones)
        diff.index_add_(0, (local + stops[rows]).flatten(), -ones)
        counts = diff.view(-1, width).cumsum(dim=1)[:, :-1].view(-1, kv_blocks, block)
        queries = (seq - torch.arange(first, first + counts.shape[0]) * block).clamp(max=block)
        seen_any = counts.amax(dim=2) > 0
        seen_all = (counts.amin(dim=2) == queries[:, None]) & key_valid
        full.append(seen_all)
        partial.append(seen_any & ~seen_all)
    partial_count, partial_index = _compact(torch.cat(partial))
    full_count, full_index = _compact(torch.cat(full))
    return BlockMap(block, kv_len, partial_count, partial_index, full_count, full_index)
