"""Query tiles and the exact key set each tile needs: the plan of the torch tile backend.

A tile is a box of image queries; its keys are the union of its queries' windows, found by
evaluating the mask on the box grown by the radius. A tile carries a mask only when some of
its queries must not see some of its keys. Adjacent tiles with the same contiguous query and
key span lengths and the same mask form a run, which one batched kernel call computes through
overlapping strided views (the interior of a band). Consecutive tiles form groups covering one
contiguous range of image tokens (rows of tiles), so the keys every image query sees (text,
pooled) can be attended for a whole group at once. Plans are cached per (layout, window, tile).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layout import TokenLayout
from .masks import image_mask
from .window import Window


@dataclass(frozen=True)
class Tile:
    queries: Tensor  # sorted flattened image indices of the queries
    keys: Tensor  # sorted flattened image indices of the keys any query of the tile sees
    mask: int | None  # index into TilePlan.masks; None when every query sees every key
    query_span: tuple[int, int] | None  # (start, stop) when the queries are contiguous
    key_span: tuple[int, int] | None  # (start, stop) when the keys are contiguous


@dataclass(frozen=True)
class Run:
    """`count` tiles shaped like `first`, each one's query and key spans one query-span length
    after the previous one's (count 1: a lone tile, whose spans may be None)."""

    first: Tile
    count: int


@dataclass(frozen=True)
class Group:
    start: int  # the group's tiles cover image tokens start .. stop-1 exactly
    stop: int
    tiles: list[Tile]
    runs: list[Run]


@dataclass
class TilePlan:
    groups: list[Group]
    masks: list[Tensor]  # distinct boolean masks [queries, keys]; many tiles share one
    computed_pairs: int  # (query, image key) pairs the tiles compute
    kept_pairs: int  # (query, image key) pairs the window keeps
    _additive: dict = field(default_factory=dict, repr=False)

    def additive_masks(self, dtype: torch.dtype, device: torch.device) -> list[Tensor]:
        """The masks as 0 / -inf biases in `dtype` (what fused attention kernels take)."""
        key = (dtype, device)
        if key not in self._additive:
            self._additive[key] = [
                torch.zeros(m.shape, dtype=dtype, device=device).masked_fill_(~m.to(device), float("-inf"))
                for m in self.masks
            ]
        return self._additive[key]


def default_tile(layout: TokenLayout, window: Window) -> tuple[int, ...]:
    """Tile shape measured fastest on CPU (FLUX shapes, one thread): 64 tokens of the band,
    8 x 8 (x 1 frame) boxes; smaller tiles compute fewer masked-out pairs but call more often."""
    if window.shape == "band":
        return (64,)
    return (8, 8) if len(layout.grid) == 2 else (1, 8, 8)


GROUP_TOKENS = 512  # close a group once it covers a contiguous range this long (bounds scratch)


def _span(index: Tensor) -> tuple[int, int] | None:
    start, stop = int(index[0]), int(index[-1]) + 1
    return (start, stop) if stop - start == index.numel() else None


def _box(lo: list[int], hi: list[int], grid: tuple[int, ...]) -> Tensor:
    """Flattened row-major indices of the box lo <= coords < hi (sorted)."""
    index = torch.zeros((), dtype=torch.long)
    for start, stop, size in zip(lo, hi, grid, strict=True):
        index = index[..., None] * size + torch.arange(start, stop)
    return index.reshape(-1)


def _length(span: tuple[int, int] | None) -> int | None:
    return None if span is None else span[1] - span[0]


def _extends(run: Run, tile: Tile) -> bool:
    """Whether `tile` is the next tile of `run`: same mask and span lengths, one tile further."""
    first = run.first
    spans = (first.query_span, first.key_span, tile.query_span, tile.key_span)
    if tile.mask != first.mask or None in spans:
        return False
    step = run.count * _length(first.query_span)
    return (
        _length(tile.query_span) == _length(first.query_span)
        and _length(tile.key_span) == _length(first.key_span)
        and tile.query_span[0] == first.query_span[0] + step
        and tile.key_span[0] == first.key_span[0] + step
    )


def _runs(tiles: list[Tile]) -> list[Run]:
    runs: list[Run] = []
    for tile in tiles:
        if runs and _extends(runs[-1], tile):
            runs[-1] = Run(runs[-1].first, runs[-1].count + 1)
        else:
            runs.append(Run(tile, 1))
    return runs


def _reach(window: Window, dims: int) -> list[int]:
    """How far (per grid axis) a query's window extends."""
    spatial = window.radius - 1 if window.shape == "circle" else window.radius
    return ([window.temporal_radius] if dims == 3 else []) + [spatial] * min(dims, 2)


@functools.lru_cache(maxsize=32)
def tile_plan(layout: TokenLayout, window: Window, tile: tuple[int, ...]) -> TilePlan:
    """Cover the image grid with tiles of shape `tile` (smaller at the far edges)."""
    grid = (layout.image_len,) if window.shape == "band" else layout.grid
    if len(tile) != len(grid):
        raise ValueError(f"tile {tile} must have one size per grid axis of {grid}")
    allowed = image_mask(layout, window)
    reach = _reach(window, len(grid))
    groups, tiles, masks, mask_ids = [], [], [], {}
    computed = kept = covered = 0
    for corner in itertools.product(*(range(0, g, t) for g, t in zip(grid, tile, strict=True))):
        top = [min(c + t, g) for c, t, g in zip(corner, tile, grid, strict=True)]
        queries = _box(list(corner), top, grid)
        low = [max(c - r, 0) for c, r in zip(corner, reach, strict=True)]
        high = [min(t + r, g) for t, r, g in zip(top, reach, grid, strict=True)]
        candidates = _box(low, high, grid)
        sees = allowed(queries[:, None], candidates[None, :])
        needed = sees.any(dim=0)
        keys, sees = candidates[needed], sees[:, needed]
        computed += sees.numel()
        kept += int(sees.sum())
        mask = None
        if not bool(sees.all()):
            signature = (tuple(sees.shape), sees.numpy().tobytes())
            mask = mask_ids.setdefault(signature, len(masks))
            if mask == len(masks):
                masks.append(sees)
        tiles.append(Tile(queries, keys, mask, _span(queries), _span(keys)))
        start = groups[-1].stop if groups else 0
        covered += queries.numel()
        last = max(int(t.queries[-1]) for t in tiles)
        if covered == last + 1 - start and (covered >= GROUP_TOKENS or last + 1 == math.prod(grid)):
            groups.append(Group(start, last + 1, tiles, _runs(tiles)))
            tiles, covered = [], 0
    return TilePlan(groups, masks, computed, kept)
