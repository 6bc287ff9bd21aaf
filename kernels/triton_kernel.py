"""Triton backend for GPUs. Circle and square windows run the grid-tile kernel
(triton_grid.py: query and key blocks are boxes of the image grid). Bands, whose window is a
run of the sequence, run here: one program per (batch x head, query block) walks its list of
key blocks of the sequence (full blocks without a mask, partial blocks with the band computed
from indices), with an online softmax, and adds the residual before the store (DiTFastAttn's
window + residual in one pass). Checked on CPU with TRITON_INTERPRET=1.

float32 inputs are multiplied in full precision: TF32 (10-bit mantissas, ~1e-3 errors) only
where the user allowed it for torch's own float32 matmuls, torch.set_float32_matmul_precision
("high" or "medium")."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_grid
from .blocks import block_map
from .layout import TokenLayout
from .problem import Problem
from .triton_steps import attend_block, launch_options, load_rows, store_rows
from .window import Window


@dataclass(frozen=True)
class BandConfig:
    """The band kernel's square blocks of the sequence and its launch's warps and pipeline stages."""

    block: int = 64
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _in_band(
    qi, ki, seq_len, kv_len, IMAGE_START: tl.constexpr, IMAGE_LEN: tl.constexpr, RADIUS: tl.constexpr
):
    """masks.sequence_mask for a band, on a [BLOCK_M, 1] x [1, BLOCK_N] index pair."""
    q_image = (qi >= IMAGE_START) & (qi < IMAGE_START + IMAGE_LEN)
    k_image = (ki >= IMAGE_START) & (ki < IMAGE_START + IMAGE_LEN)
    near = tl.abs(qi - ki) <= RADIUS
    seen = tl.where(q_image, near | (k_image == 0), ki < seq_len)
    return seen & (ki < kv_len)


@triton.jit
def _band_kernel(
    Q,
    K,
    V,
    Out,
    Res,
    partial_count,
    partial_index,
    full_count,
    full_index,
    seq_len,
    kv_len,
    kv_blocks,
    scale,
    HAS_RES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    IMAGE_START: tl.constexpr,
    IMAGE_LEN: tl.constexpr,
    RADIUS: tl.constexpr,
):
    head = tl.program_id(0).to(tl.int64)  # heads fastest: every head's first blocks start first
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = head * seq_len * HEAD_DIM
    kv_base = head * kv_len * HEAD_DIM
    q = load_rows(Q, q_base, offs_m, offs_m < seq_len, offs_d, HEAD_DIM, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(tl.load(full_count + pid_m)):
        offs_n = tl.load(full_index + pid_m * kv_blocks + j) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_i, l_i, acc = attend_block(
            q, K, V, kv_base, offs_n, offs_n < kv_len, offs_d, m_i, l_i, acc, scale,
            offs_n[None, :] < kv_len, HEAD_DIM, UPCAST, PRECISION,
        )  # fmt: skip
    for j in range(tl.load(partial_count + pid_m)):
        offs_n = tl.load(partial_index + pid_m * kv_blocks + j) * BLOCK_M + tl.arange(0, BLOCK_M)
        allowed = _in_band(offs_m[:, None], offs_n[None, :], seq_len, kv_len, IMAGE_START, IMAGE_LEN, RADIUS)
        m_i, l_i, acc = attend_block(
            q, K, V, kv_base, offs_n, offs_n < kv_len, offs_d, m_i, l_i, acc, scale,
            allowed, HEAD_DIM, UPCAST, PRECISION,
        )  # fmt: skip
    store_rows(Out, Res, q_base, offs_m, offs_m < seq_len, offs_d, acc, l_i, HEAD_DIM, HAS_RES)


@functools.lru_cache(maxsize=32)
def _block_lists(layout: TokenLayout, window: Window, block: int, device: torch.device) -> tuple[Tensor, ...]:
    """The block map's lists on the kernel's device, copied once per shape."""
    blocks = block_map(layout, window, block)
    return tuple(
        x.to(device)
        for x in (blocks.partial_count, blocks.partial_index, blocks.full_count, blocks.full_index)
    )


def window_attention(p: Problem, config: BandConfig | triton_grid.GridConfig | None = None) -> Tensor:
    if p.window.shape != "band":
        return triton_grid.window_attention(p, config)
    layout, window, config = p.layout, p.window, config or BandConfig()
    batch, heads, seq, dim = p.q.shape
    q, k, v = (x.contiguous() for x in (p.q, *p.keys_with_pooled()))
    blocks = block_map(layout, window, config.block)
    out = torch.empty_like(q)
    _band_kernel[(batch * heads, blocks.partial_count.numel())](
        q,
        k,
        v,
        out,
        out if p.residual is None else p.residual.contiguous(),
        *_block_lists(layout, window, config.block, q.device),
        seq,
        blocks.kv_len,
        blocks.partial_index.shape[1],
        p.scale,
        **launch_options(q, p.residual),
        BLOCK_M=config.block,
        IMAGE_START=layout.image_start,
        IMAGE_LEN=layout.image_len,
        RADIUS=window.radius,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    return out


def computed_pairs(
    layout: TokenLayout, window: Window, config: BandConfig | triton_grid.GridConfig | None = None
) -> int:
    """Every key block a program visits is computed whole."""
    if window.shape != "band":
        return triton_grid.computed_pairs(layout, window, config)
    return block_map(layout, window, (config or BandConfig()).block).computed_pairs
