"""Triton kernel for circle and square windows, in tile-major blocks: each query block and each
key block is a TILE box of the image grid (one frame deep on video), addressed through index
maps inside the kernel, so q, k, v stay in their row-major order and nothing is permuted.

A 64-token block of row-major order is a strip of a grid row (half a row of a 128-wide grid),
whose circle reaches whole rows of keys: at FLUX 2048^2 r16 the row-major blocks compute 27% of
the scores where the mask keeps 10%. A box's window is a box: far fewer key blocks per query
block. Per image query box: its key boxes (seen whole first: no mask but the grid's edge; then
the partial ones, masked by the window computed from coordinates), then the text keys and the
pooled keys (every image query sees them) in the same online softmax; the residual is added
before the store. Text queries attend to every original key in 64-row blocks.

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

TILE = (8, 8)  # (rows, columns) of a block: 64 tokens (not yet tuned on a GPU)
PAIR_CHUNK = 1 << 22  # box pairs classified at once


@dataclass(frozen=True)
class BoxLists:
    """Per query box (frame-major, then row-major over the boxes of a frame): its key boxes,
    the `full_count` seen whole first."""

    key_count: Tensor  # [boxes] int32
    full_count: Tensor  # [boxes] int32
    key_boxes: Tensor  # [boxes, max key boxes] int32


def _boxes(layout: TokenLayout) -> tuple[int, int, int, list[Tensor], list[Tensor]]:
    """The grid's boxes: (frames, boxes per column, per row, first and last coordinate per axis)."""
    frames, (height, width) = (layout.grid[0] if len(layout.grid) == 3 else 1), layout.grid[-2:]
    rows, columns = -(-height // TILE[0]), -(-width // TILE[1])
    box = torch.arange(frames * rows * columns)
    t, y, x = box // (rows * columns), box // columns % rows, box % columns
    first = [t, y * TILE[0], x * TILE[1]]
    last = [t, (first[1] + TILE[0]).clamp(max=height) - 1, (first[2] + TILE[1]).clamp(max=width) - 1]
    return frames, rows, columns, first, last


def _gaps(first: list[Tensor], last: list[Tensor], queries: slice) -> tuple[list[Tensor], list[Tensor]]:
    """Per axis, the smallest and largest |offset| between any query of boxes[queries] and any
    key of each box: [queries, boxes] each."""
    near, far = [], []
    for lo, hi in zip(first, last, strict=True):
        near.append(
            torch.maximum(lo[None, :] - hi[queries, None], lo[queries, None] - hi[None, :]).clamp(min=0)
        )
        far.append(torch.maximum(hi[None, :] - lo[queries, None], hi[queries, None] - lo[None, :]))
    return near, far


@functools.lru_cache(maxsize=32)
def box_lists(layout: TokenLayout, window: Window) -> BoxLists:
    """Classify every (query box, key box) pair by its smallest and largest per-axis gaps."""
    *_, first, last = _boxes(layout)
    local = circle if window.shape == "circle" else square
    axes = slice(0, 3) if len(layout.grid) == 3 else slice(1, 3)  # no frame axis on images
    count = first[0].numel()
    chunk = max(1, PAIR_CHUNK // count)
    origin = [torch.zeros((), dtype=torch.long)] * 3
    key_count, full_count, orders = [], [], []
    for start in range(0, count, chunk):
        near, far = _gaps(first, last, slice(start, start + chunk))
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
    box, lanes, TILE_H: tl.constexpr, TILE_W: tl.constexpr, ROWS: tl.constexpr, COLUMNS: tl.constexpr
):
    """(frame, row, column) of each lane of a box (lanes past the grid's edge included)."""
    t = box // (ROWS * COLUMNS)
    y = (box // COLUMNS) % ROWS * TILE_H + lanes // TILE_W
    x = box % COLUMNS * TILE_W + lanes % TILE_W
    return t, y, x


@triton.jit
def _grid_kernel(
    Q,
    K,
    V,
    Out,
    Res,
    key_count,
    full_count,
    key_boxes,
    max_keys,
    seq_len,
    kv_len,
    scale,
    HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_H: tl.constexpr,
    TILE_W: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    COLUMNS: tl.constexpr,
    BOXES: tl.constexpr,
    IMAGE_START: tl.constexpr,
    TEXT_START: tl.constexpr,
    TEXT_LEN: tl.constexpr,
    GRID_H: tl.constexpr,
    GRID_W: tl.constexpr,
    CIRCLE: tl.constexpr,
    RADIUS: tl.constexpr,
    T_RADIUS: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    lanes = tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = head * seq_len * HEAD_DIM
    kv_base = head * kv_len * HEAD_DIM
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    if pid < BOXES:  # a box of image queries
        qt, qy, qx = _box_tokens(pid, lanes, TILE_H, TILE_W, ROWS, COLUMNS)
        q_rows = IMAGE_START + (qt * GRID_H + qy) * GRID_W + qx
        q_ok = (qy < GRID_H) & (qx < GRID_W)
        q = load_rows(Q, q_base, q_rows, q_ok, offs_d, HEAD_DIM, UPCAST)
        whole = tl.load(full_count + pid)
        for j in range(tl.load(key_count + pid)):
            key_box = tl.load(key_boxes + pid * max_keys + j)
            kt, ky, kx = _box_tokens(key_box, lanes, TILE_H, TILE_W, ROWS, COLUMNS)
            k_ok = (ky < GRID_H) & (kx < GRID_W)
            allowed = tl.broadcast_to(k_ok[None, :], (BLOCK, BLOCK))  # one type on both branches
            if j >= whole:  # a partial box: the window from coordinates
                dy = qy[:, None] - ky[None, :]
                dx = qx[:, None] - kx[None, :]
                if CIRCLE:
                    near = dy * dy + dx * dx < RADIUS * RADIUS
                else:
                    near = (tl.abs(dy) <= RADIUS) & (tl.abs(dx) <= RADIUS)
                allowed = allowed & near & (tl.abs(qt[:, None] - kt[None, :]) <= T_RADIUS)
            m_i, l_i, acc = attend_block(
                q, K, V, kv_base, IMAGE_START + (kt * GRID_H + ky) * GRID_W + kx, k_ok, offs_d, m_i, l_i, acc,
                scale, allowed, HEAD_DIM, UPCAST, PRECISION,
            )  # fmt: skip
        # then the text keys and the pooled keys, which every image query sees
        m_i, l_i, acc = attend_range(
            q, K, V, kv_base, TEXT_START, TEXT_START + TEXT_LEN, offs_d, m_i, l_i, acc, scale,
            BLOCK, HEAD_DIM, UPCAST, PRECISION,
        )  # fmt: skip
        m_i, l_i, acc = attend_range(
            q, K, V, kv_base, seq_len, kv_len, offs_d, m_i, l_i, acc, scale, BLOCK, HEAD_DIM, UPCAST, PRECISION
        )  # fmt: skip
        store_rows(Out, Res, q_base, q_rows, q_ok, offs_d, acc, l_i, HEAD_DIM, HAS_RES)
    else:  # a block of text queries: every original key
        q_rows = TEXT_START + (pid - BOXES) * BLOCK + lanes
        q_ok = q_rows < TEXT_START + TEXT_LEN
        q = load_rows(Q, q_base, q_rows, q_ok, offs_d, HEAD_DIM, UPCAST)
        m_i, l_i, acc = attend_range(
            q, K, V, kv_base, 0, seq_len, offs_d, m_i, l_i, acc, scale, BLOCK, HEAD_DIM, UPCAST, PRECISION
        )  # fmt: skip
        store_rows(Out, Res, q_base, q_rows, q_ok, offs_d, acc, l_i, HEAD_DIM, HAS_RES)


@functools.lru_cache(maxsize=32)
def _lists_on(layout: TokenLayout, window: Window, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """The box lists on the kernel's device, copied once per shape."""
    lists = box_lists(layout, window)
    return lists.key_count.to(device), lists.full_count.to(device), lists.key_boxes.to(device)


def window_attention(p: Problem) -> Tensor:
    layout, window = p.layout, p.window
    batch, heads, seq, _ = p.q.shape
    q, k, v = (x.contiguous() for x in (p.q, *p.keys_with_pooled()))
    frames, rows, columns, _, _ = _boxes(layout)
    boxes = frames * rows * columns
    lists = _lists_on(layout, window, q.device)
    out = torch.empty_like(q)
    block = math.prod(TILE)
    _grid_kernel[(boxes + -(-layout.text_len // block), batch * heads)](
        q,
        k,
        v,
        out,
        out if p.residual is None else p.residual.contiguous(),
        *lists,
        lists[2].shape[1],
        seq,
        k.shape[2],
        p.scale,
        **launch_options(q, p.residual),
        TILE_H=TILE[0],
        TILE_W=TILE[1],
        BLOCK=block,
        ROWS=rows,
        COLUMNS=columns,
        BOXES=boxes,
        IMAGE_START=layout.image_start,
        TEXT_START=layout.text_start,
        TEXT_LEN=layout.text_len,
        GRID_H=layout.grid[-2],
        GRID_W=layout.grid[-1],
        CIRCLE=window.shape == "circle",
        RADIUS=window.radius,
        T_RADIUS=window.temporal_radius,
    )
    return out


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """Scores the kernel computes: every visited block whole (64 x 64)."""
    block = math.prod(TILE)
    boxes = box_lists(layout, window).key_count
    shared_blocks = -(-layout.text_len // block) + -(-window.pooled_len(layout) // block)
    text_blocks = -(-layout.text_len // block) * -(-layout.seq_len // block)
    return (int(boxes.sum()) + boxes.numel() * shared_blocks + text_blocks) * block * block
