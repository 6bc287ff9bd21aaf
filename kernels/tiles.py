"""Query tiles and the exact key set each tile needs: the plan of the native and torch tile backends.

A tile is a box of image queries; its keys are the union of its queries' windows, found by
evaluating the mask on the box grown by the radius. A tile carries a mask only when some of
its queries must not see some of its keys. Adjacent tiles with the same contiguous query and
key span lengths and the same mask form a run, which one batched kernel call computes through
overlapping strided views (the interior of a band); a run covers at most RUN_TOKENS queries,
which bounds its output's scratch. Plans are cached per (layout, window, tile); the mask is
evaluated once per tile geometry (interior tiles are translates of one another).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .layout import TokenLayout
from .masks import image_mask
from .window import Window


@dataclass(frozen=True)
class KeyPart:
    keys: Tensor  # sorted flattened image indices
    mask: int | None  # index into TilePlan.masks; None when every query sees every key
    span: tuple[int, int] | None  # (start, stop) when the keys are contiguous


@dataclass(frozen=True)
class Tile:
    queries: Tensor  # sorted flattened image indices of the queries
    keys: Tensor  # sorted flattened image indices of the keys any query of the tile sees
    mask: int | None  # the mask of `keys` (as KeyPart.mask); None also when keys are in parts
    query_span: tuple[int, int] | None  # (start, stop) when the queries are contiguous
    key_span: tuple[int, int] | None  # (start, stop) when the keys are contiguous
    parts: tuple[KeyPart, ...]  # the keys as attended one part at a time (see _key_parts)


@dataclass(frozen=True)
class Run:
    """`count` tiles shaped like `first`, each one's query and key spans one query-span length
    after the previous one's (count 1: a lone tile, whose spans may be None)."""

    first: Tile
    count: int


@dataclass
class TilePlan:
    runs: list[Run]  # every tile once, in row-major order of their corners
    masks: list[Tensor]  # distinct boolean masks [queries, keys]; many tiles share one
    computed_pairs: int  # (query, image key) pairs the tiles compute
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
    """Tile shape measured fastest on an AVX-512 CPU (FLUX shapes, one thread): 64 tokens of the
    band, 8 x 8 (x 1 frame) boxes; smaller tiles compute fewer masked-out pairs but make more,
    smaller kernel calls, which run slower per FLOP, more so on AVX2 (BENCHMARKS.md)."""
    if window.shape == "band":
        return (64,)
    return (8, 8) if len(layout.grid) == 2 else (1, 8, 8)


RUN_TOKENS = 256  # the most queries one batched call computes (its output is scratch)
# The most non-contiguous keys attended (so gathered) at once: a CLEAR r16 tile's 1276 keys in
# two parts, a video r8/t2 tile's <= 2260 in three. Fewer parts mean fewer, larger calls and
# merges; the bound keeps two workers' key and value buffers (2 MiB at head_dim 128, float32)
# under the ~2.7 MiB that SDPA allocates beyond its output.
GATHER_KEYS = 1024


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
    """Whether `tile` is the next tile of `run`: same mask and span lengths, one tile further,
    and the run stays within RUN_TOKENS queries."""
    first = run.first
    spans = (first.query_span, first.key_span, tile.query_span, tile.key_span)
    if tile.mask != first.mask or None in spans:
        return False
    step = run.count * _length(first.query_span)
    return (
        step + _length(tile.query_span) <= RUN_TOKENS
        and _length(tile.query_span) == _length(first.query_span)
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


def _key_parts(
    keys: Tensor, sees: Tensor, mask_id: Callable[[Tensor], int | None], gather_keys: int
) -> tuple[KeyPart, ...]:
    """Non-contiguous keys in n interleaved parts keys[j::n] of at most `gather_keys` each, which
    bounds the gather buffers (the parts' results are merged through their log-sum-exps).
    Every query must see a key of every part (a query's window holds runs of adjacent keys);
    where one would not, the keys stay whole."""
    count = 1 if _span(keys) is not None else -(-keys.numel() // gather_keys)
    if not all(bool(sees[:, j::count].any(dim=1).all()) for j in range(count)):
        count = 1
    return tuple(
        KeyPart(keys[j::count].contiguous(), mask_id(sees[:, j::count]), _span(keys[j::count]))
        for j in range(count)
    )


def reach(window: Window, dims: int) -> list[int]:
    """How far (per grid axis) a query's window extends."""
    spatial = window.radius - 1 if window.shape == "circle" else window.radius
    return ([window.temporal_radius] if dims == 3 else []) + [spatial] * min(dims, 2)


@functools.lru_cache(maxsize=32)
def tile_plan(
    layout: TokenLayout, window: Window, tile: tuple[int, ...], gather_keys: int = GATHER_KEYS
) -> TilePlan:
    """Cover the image grid with tiles of shape `tile` (smaller at the far edges); a tile's
    non-contiguous keys come in parts of at most `gather_keys`."""
    grid = (layout.image_len,) if window.shape == "band" else layout.grid
    if len(tile) != len(grid):
        raise ValueError(f"tile {tile} must have one size per grid axis of {grid}")
    allowed = image_mask(layout, window)
    extent = reach(window, len(grid))
    tiles: list[Tile] = []
    masks: list[Tensor] = []
    mask_ids: dict = {}

    def mask_id(sees: Tensor) -> int | None:
        """The index of this mask in `masks` (added if new); None when it allows everything."""
        if bool(sees.all()):
            return None
        signature = (tuple(sees.shape), sees.numpy().tobytes())
        index = mask_ids.setdefault(signature, len(masks))
        if index == len(masks):
            masks.append(sees.contiguous())
        return index

    computed = 0
    # The window depends on coordinate offsets only, so tiles of one shape whose grown box is cut
    # the same way by the grid's edges (every interior tile) are translates of each other: the
    # mask is evaluated once per such geometry and the keys shifted (flattened indices of
    # same-shaped boxes differ by one constant).
    first_of_geometry: dict[tuple, tuple[Tile, int]] = {}
    for corner in itertools.product(*(range(0, g, t) for g, t in zip(grid, tile, strict=True))):
        top = [min(c + t, g) for c, t, g in zip(corner, tile, grid, strict=True)]
        queries = _box(list(corner), top, grid)
        low = [max(c - r, 0) for c, r in zip(corner, extent, strict=True)]
        high = [min(t + r, g) for t, r, g in zip(top, extent, grid, strict=True)]
        geometry = tuple((t - c, c - lo, h - t) for c, t, lo, h in zip(corner, top, low, high, strict=True))
        if geometry in first_of_geometry:
            model, model_query = first_of_geometry[geometry]
            tile_here = _shifted(model, queries, int(queries[0]) - model_query)
        else:
            candidates = _box(low, high, grid)
            sees = allowed(queries[:, None], candidates[None, :])
            needed = sees.any(dim=0)
            keys, sees = candidates[needed], sees[:, needed]
            parts = _key_parts(keys, sees, mask_id, gather_keys)
            whole = parts[0].mask if len(parts) == 1 else None
            tile_here = Tile(queries, keys, whole, _span(queries), _span(keys), parts)
            first_of_geometry[geometry] = (tile_here, int(queries[0]))
        computed += tile_here.queries.numel() * tile_here.keys.numel()
        tiles.append(tile_here)
    return TilePlan(_runs(tiles), masks, computed)


def _shifted(model: Tile, queries: Tensor, shift: int) -> Tile:
    """`model`'s tile moved by `shift` flattened indices (keys, parts and spans alike)."""

    def moved(span: tuple[int, int] | None) -> tuple[int, int] | None:
        return None if span is None else (span[0] + shift, span[1] + shift)

    parts = tuple(KeyPart(part.keys + shift, part.mask, moved(part.span)) for part in model.parts)
    return Tile(queries, model.keys + shift, model.mask, moved(model.query_span), moved(model.key_span), parts)
