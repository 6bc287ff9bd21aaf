"""Triton kernel for circle and square windows, in tile-major blocks: each query block and each
key block is a box of the image grid (GridConfig: frames x rows x columns). By default the boxes
are addressed through index maps inside the kernel, so q, k, v stay in their row-major order and
nothing is permuted. With `tile_major_keys` the image keys and values are first copied, once per
call, into box order (each key box one contiguous block of BLOCK_N rows, padded at the grid's far
edges): the kernel then reads every key block as one dense tile (what Hopper's bulk copies and
warp-group products want) instead of BLOCK_N gathered rows; queries are still read and outputs
written through the index maps (once per program).

A 64-token block of row-major order is a strip of a grid row (half a row of a 128-wide grid),
whose circle reaches whole rows of keys: at FLUX 2048^2 r16 the row-major blocks compute 27% of
the scores where the mask keeps 10%. A box's window is a box: far fewer key blocks per query
block. Per image query box: its key boxes (seen whole first: no mask but the grid's edge; then
the partial ones, masked by the window computed from coordinates), then the text keys and the
pooled keys (every image query sees them) in the same online softmax; the residual is added
before the store. Text queries attend to every original key in blocks of the sequence.

Which key boxes a query box needs is exact and cheap: the mask is monotone in |dt|, |dy|, |dx|,
so a box pair has some pair in the window iff its smallest per-axis gaps are in it, and every
pair iff its largest gaps are."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from .layout import TokenLayout
from .masks import circle, square
from .problem import Problem
from .triton_steps import attend_block, attend_range, launch_options, load_rows, store_rows
from .window import Window

PAIR_CHUNK = 1 << 22  # box pairs classified at once


@dataclass(frozen=True)
class GridConfig:
    """How the kernel cuts the work: the query and key boxes, (frames, rows, columns) each with a
    power-of-two token count (the blocks of the matrix products), and the launch's warps and
    software-pipeline stages."""

    query_box: tuple[int, int, int] = (1, 16, 8)
    key_box: tuple[int, int, int] = (1, 8, 8)
    num_warps: int = 8
    num_stages: int = 3
    tile_major_keys: bool = False  # copy k, v into key-box order first (dense key blocks)

    def __post_init__(self) -> None:
        for box in (self.query_box, self.key_box):
            tokens = math.prod(box)
            if len(box) != 3 or min(box) < 1 or tokens < 16 or tokens & (tokens - 1):
                raise ValueError(f"a box is (frames, rows, columns) of a power-of-two >= 16 tokens, got {box}")


def default_config(layout: TokenLayout) -> GridConfig:
    """Query boxes of 16 rows x 8 columns, key boxes of 8 x 8, one frame deep, 8 warps, 3 stages:
    the fastest of the configurations tried on an H200 at every FLUX and Wan shape of
    tests/benchmarks/bench_gpu.py (BENCHMARKS.md), 1.2 - 1.5x the 8 x 8 / 4 warps start."""
    return GridConfig()


@dataclass(frozen=True)
class BoxLists:
    """Per query box (frame-major, then row-major over the boxes of a frame): its key boxes,
    the `full_count` seen whole first."""

    key_count: Tensor  # [query boxes] int32
    full_count: Tensor  # [query boxes] int32
    key_boxes: Tensor  # [query boxes, max key boxes] int32


@dataclass(frozen=True)
class Boxes:
    """The grid cut into boxes of one shape (cut at the grid's far edges)."""

    counts: tuple[int, int, int]  # boxes along frames, rows, columns
    first: list[Tensor]  # per axis (frame, row, column), each box's first coordinate
    last: list[Tensor]  # and its last


def grid_boxes(layout: TokenLayout, box: tuple[int, int, int]) -> Boxes:
    grid = (layout.grid[0] if len(layout.grid) == 3 else 1, *layout.grid[-2:])
    counts = tuple(-(-size // side) for size, side in zip(grid, box, strict=True))
    index = torch.arange(math.prod(counts))
    coords = (index // (counts[1] * counts[2]), index // counts[2] % counts[1], index % counts[2])
    first = [c * side for c, side in zip(coords, box, strict=True)]
    last = [(f + side).clamp(max=size) - 1 for f, side, size in zip(first, box, grid, strict=True)]
    return Boxes(counts, first, last)


def _gaps(queries: Boxes, keys: Boxes, chunk: slice) -> tuple[list[Tensor], list[Tensor]]:
    """Per axis, the smallest and largest |offset| between any query of query boxes[chunk] and
    any key of each key box: [queries, keys] each."""
    near, far = [], []
    for q_lo, q_hi, k_lo, k_hi in zip(queries.first, queries.last, keys.first, keys.last, strict=True):
        q_lo, q_hi = q_lo[chunk, None], q_hi[chunk, None]
        near.append(torch.maximum(k_lo[None, :] - q_hi, q_lo - k_hi[None, :]).clamp(min=0))
        far.append(torch.maximum(k_hi[None, :] - q_lo, q_hi - k_lo[None, :]))
    return near, far


@functools.lru_cache(maxsize=32)
def box_lists(
    layout: TokenLayout, window: Window, query_box: tuple[int, int, int], key_box: tuple[int, int, int]
) -> BoxLists:
    """Classify every (query box, key box) pair by its smallest and largest per-axis gaps."""
    queries, keys = grid_boxes(layout, query_box), grid_boxes(layout, key_box)
    local = circle if window.shape == "circle" else square
    axes = slice(0, 3) if len(layout.grid) == 3 else slice(1, 3)  # no frame axis on images
    count = queries.first[0].numel()
    chunk = max(1, PAIR_CHUNK // keys.first[0].numel())
    origin = [torch.zeros((), dtype=torch.long)] * 3
    key_count, full_count, orders = [], [], []
    for start in range(0, count, chunk):
        near, far = _gaps(queries, keys, slice(start, start + chunk))
        some = local(origin[axes], near[axes], window.radius, window.temporal_radius)
        every = local(origin[axes], far[axes], window.radius, window.temporal_radius)
        key_count.append(some.sum(dim=1, dtype=torch.int32))
        full_count.append(every.sum(dim=1, dtype=torch.int32))
        rank = torch.where(every, 0, torch.where(some, 1, 2)).to(torch.int8)  # whole, partial, unseen
        orders.append(torch.argsort(rank, dim=1, stable=True).to(torch.int32))
    key_count, full_count = torch.cat(key_count), torch.cat(full_count)
    return BoxLists(key_count, full_count, torch.cat(orders)[:, : int(key_count.max())].contiguous())


@triton.jit
def _box_tokens(
    box, lanes, BOX_T: tl.constexpr, BOX_H: tl.constexpr, BOX_W: tl.constexpr, ROWS: tl.constexpr,
    COLUMNS: tl.constexpr, FRAMES: tl.constexpr, GRID_H: tl.constexpr, GRID_W: tl.constexpr,
):  # fmt: skip
    """(frame, row, column) of each lane of a box, and whether the lane is inside the grid."""
    t = box // (ROWS * COLUMNS) * BOX_T + lanes // (BOX_H * BOX_W)
    y = (box // COLUMNS) % ROWS * BOX_H + (lanes // BOX_W) % BOX_H
    x = box % COLUMNS * BOX_W + lanes % BOX_W
    return t, y, x, (t < FRAMES) & (y < GRID_H) & (x < GRID_W)


@triton.jit
def _grid_kernel(
    Q,
    K,
    V,
    Out,
    Res,
    KT,
    VT,
    key_count,
    full_count,
    key_boxes,
    max_keys,
    seq_len,
    kv_len,
    tile_rows,
    scale,
    HAS_RES: tl.constexpr,
    TILED: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QBOX_T: tl.constexpr,
    QBOX_H: tl.constexpr,
    QBOX_W: tl.constexpr,
    Q_ROWS: tl.constexpr,
    Q_COLUMNS: tl.constexpr,
    KBOX_T: tl.constexpr,
    KBOX_H: tl.constexpr,
    KBOX_W: tl.constexpr,
    K_ROWS: tl.constexpr,
    K_COLUMNS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IMAGE_START: tl.constexpr,
    TEXT_START: tl.constexpr,
    TEXT_LEN: tl.constexpr,
    FRAMES: tl.constexpr,
    GRID_H: tl.constexpr,
    GRID_W: tl.constexpr,
    CIRCLE: tl.constexpr,
    RADIUS: tl.constexpr,
    T_RADIUS: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)  # heads fastest: every head's text blocks (the longest) start first
    pid = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = head * seq_len * HEAD_DIM
    kv_base = head * kv_len * HEAD_DIM
    tiles_base = head * tile_rows * HEAD_DIM  # KT, VT: the image keys in key-box order (TILED)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    text_blocks = tl.cdiv(TEXT_LEN, BLOCK_M)
    if pid >= text_blocks:  # a box of image queries
        box = pid - text_blocks
        qt, qy, qx, q_ok = _box_tokens(
            box, tl.arange(0, BLOCK_M), QBOX_T, QBOX_H, QBOX_W, Q_ROWS, Q_COLUMNS, FRAMES, GRID_H, GRID_W
        )
        q_rows = IMAGE_START + (qt * GRID_H + qy) * GRID_W + qx
        q = load_rows(Q, q_base, q_rows, q_ok, offs_d, HEAD_DIM, UPCAST)
        whole = tl.load(full_count + box)
        for j in range(tl.load(key_count + box)):
            key_box = tl.load(key_boxes + box * max_keys + j)
            kt, ky, kx, k_ok = _box_tokens(
                key_box, tl.arange(0, BLOCK_N), KBOX_T, KBOX_H, KBOX_W, K_ROWS, K_COLUMNS, FRAMES, GRID_H, GRID_W
            )
            allowed = tl.broadcast_to(k_ok[None, :], (BLOCK_M, BLOCK_N))  # one type on both branches
            if j >= whole:  # a partial box: the window from coordinates
                dy = qy[:, None] - ky[None, :]
                dx = qx[:, None] - kx[None, :]
                if CIRCLE:
                    near = dy * dy + dx * dx < RADIUS * RADIUS
                else:
                    near = (tl.abs(dy) <= RADIUS) & (tl.abs(dx) <= RADIUS)
                allowed = allowed & near & (tl.abs(qt[:, None] - kt[None, :]) <= T_RADIUS)
            if TILED:  # the box's BLOCK_N slots are contiguous rows of KT, VT (padding slots included)
                slots = key_box * BLOCK_N + tl.arange(0, BLOCK_N)
                m_i, l_i, acc = attend_block(
                    q, KT, VT, tiles_base, slots, tl.full([BLOCK_N], True, tl.int1), offs_d, m_i, l_i, acc,
                    scale, allowed, HEAD_DIM, UPCAST, PRECISION,
                )  # fmt: skip
            else:
                m_i, l_i, acc = attend_block(
                    q, K, V, kv_base, IMAGE_START + (kt * GRID_H + ky) * GRID_W + kx, k_ok, offs_d, m_i, l_i,
                    acc, scale, allowed, HEAD_DIM, UPCAST, PRECISION,
                )  # fmt: skip
        # then the text keys and the pooled keys, which every image query sees
        m_i, l_i, acc = attend_range(
            q, K, V, kv_base, TEXT_START, TEXT_START + TEXT_LEN, offs_d, m_i, l_i, acc, scale,
            BLOCK_N, HEAD_DIM, UPCAST, PRECISION,
        )  # fmt: skip
        m_i, l_i, acc = attend_range(
            q, K, V, kv_base, seq_len, kv_len, offs_d, m_i, l_i, acc, scale, BLOCK_N, HEAD_DIM, UPCAST, PRECISION
        )  # fmt: skip
        store_rows(Out, Res, q_base, q_rows, q_ok, offs_d, acc, l_i, HEAD_DIM, HAS_RES)
    else:  # a block of text queries, every original key (first: the longest programs, no tail)
        q_rows = TEXT_START + pid * BLOCK_M + tl.arange(0, BLOCK_M)
        q_ok = q_rows < TEXT_START + TEXT_LEN
        q = load_rows(Q, q_base, q_rows, q_ok, offs_d, HEAD_DIM, UPCAST)
        m_i, l_i, acc = attend_range(
            q, K, V, kv_base, 0, seq_len, offs_d, m_i, l_i, acc, scale, BLOCK_N, HEAD_DIM, UPCAST, PRECISION
        )  # fmt: skip
        store_rows(Out, Res, q_base, q_rows, q_ok, offs_d, acc, l_i, HEAD_DIM, HAS_RES)


@functools.lru_cache(maxsize=32)
def tile_major_order(layout: TokenLayout, key_box: tuple[int, int, int], device: torch.device) -> Tensor:
    """Tile-major key order: for each key box (in the kernel's box numbering) its BLOCK_N slots,
    frames, rows, columns row-major inside the box, as the sequence index of the key each slot
    holds. Slots past the grid's far edges hold the box's first key (any real row would do: the
    kernel masks them out by their coordinates)."""
    boxes = grid_boxes(layout, key_box)
    frames, height, width = (layout.grid[0] if len(layout.grid) == 3 else 1, *layout.grid[-2:])
    lanes = torch.arange(math.prod(key_box))
    lane = (lanes // (key_box[1] * key_box[2]), lanes // key_box[2] % key_box[1], lanes % key_box[2])
    t, y, x = (first[:, None] + offset[None, :] for first, offset in zip(boxes.first, lane, strict=True))
    inside = (t < frames) & (y < height) & (x < width)
    corner = (boxes.first[0] * height + boxes.first[1]) * width + boxes.first[2]
    index = torch.where(inside, (t * height + y) * width + x, corner[:, None])
    return (layout.image_start + index).flatten().to(device)


@functools.lru_cache(maxsize=32)
def _lists_on(
    layout: TokenLayout, window: Window, query_box: tuple, key_box: tuple, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """The box lists on the kernel's device, copied once per shape."""
    lists = box_lists(layout, window, query_box, key_box)
    return lists.key_count.to(device), lists.full_count.to(device), lists.key_boxes.to(device)


def window_attention(p: Problem, config: GridConfig | None = None) -> Tensor:
    layout, window = p.layout, p.window
    config = config or default_config(layout)
    batch, heads, seq, _ = p.q.shape
    q, k, v = (x.contiguous() for x in (p.q, *p.keys_with_pooled()))
    queries, keys = grid_boxes(layout, config.query_box), grid_boxes(layout, config.key_box)
    query_boxes, block_m, block_n = math.prod(queries.counts), math.prod(config.query_box), math.prod(config.key_box)
    lists = _lists_on(layout, window, config.query_box, config.key_box, q.device)
    if config.tile_major_keys:  # once per call: every key block of the kernel becomes one dense tile
        slots = tile_major_order(layout, config.key_box, q.device)
        k_tiles, v_tiles = k.index_select(2, slots), v.index_select(2, slots)
    else:
        k_tiles, v_tiles = k, v  # not read
    out = torch.empty_like(q)
    _grid_kernel[(batch * heads, -(-layout.text_len // block_m) + query_boxes)](
        q,
        k,
        v,
        out,
        out if p.residual is None else p.residual.contiguous(),
        k_tiles,
        v_tiles,
        *lists,
        lists[2].shape[1],
        seq,
        k.shape[2],
        k_tiles.shape[2],
        p.scale,
        **launch_options(q, p.residual),
        TILED=config.tile_major_keys,
        QBOX_T=config.query_box[0],
        QBOX_H=config.query_box[1],
        QBOX_W=config.query_box[2],
        Q_ROWS=queries.counts[1],
        Q_COLUMNS=queries.counts[2],
        KBOX_T=config.key_box[0],
        KBOX_H=config.key_box[1],
        KBOX_W=config.key_box[2],
        K_ROWS=keys.counts[1],
        K_COLUMNS=keys.counts[2],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IMAGE_START=layout.image_start,
        TEXT_START=layout.text_start,
        TEXT_LEN=layout.text_len,
        FRAMES=layout.grid[0] if len(layout.grid) == 3 else 1,
        GRID_H=layout.grid[-2],
        GRID_W=layout.grid[-1],
        CIRCLE=window.shape == "circle",
        RADIUS=window.radius,
        T_RADIUS=window.temporal_radius,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def computed_pairs(layout: TokenLayout, window: Window, config: GridConfig | None = None) -> int:
    """Scores the kernel computes: every visited block whole."""
    config = config or default_config(layout)
    block_m, block_n = math.prod(config.query_box), math.prod(config.key_box)
    boxes = box_lists(layout, window, config.query_box, config.key_box).key_count
    shared_blocks = -(-layout.text_len // block_n) + -(-window.pooled_len(layout) // block_n)
    text_blocks = -(-layout.text_len // block_m) * -(-layout.seq_len // block_n)
    return (int(boxes.sum()) + boxes.numel() * shared_blocks + text_blocks) * block_m * block_n
