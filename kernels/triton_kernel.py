"""Triton backend for GPUs: one program per (query block, batch x head) walks its list of
key blocks (full blocks without a mask, partial blocks with the window mask computed from
indices), with an online softmax, and optionally adds the residual before the store
(DiTFastAttn's window + residual in one pass). Checked on CPU with TRITON_INTERPRET=1.

float32 inputs are multiplied in full precision: TF32 (10-bit mantissas, ~1e-3 errors) only
where the user allowed it for torch's own float32 matmuls, torch.set_float32_matmul_precision
("high" or "medium")."""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .blocks import block_map
from .layout import TokenLayout
from .problem import Problem
from .window import SHAPES, Window

BLOCK = 64


@triton.jit
def _allowed(
    qi,
    ki,
    seq_len,
    kv_len,
    IMAGE_START: tl.constexpr,
    IMAGE_LEN: tl.constexpr,
    SHAPE: tl.constexpr,
    RADIUS: tl.constexpr,
    T_RADIUS: tl.constexpr,
    GRID_H: tl.constexpr,
    GRID_W: tl.constexpr,
):
    """The window mask of masks.sequence_mask, on a [BLOCK_M, 1] x [1, BLOCK_N] index pair."""
    q_image = (qi >= IMAGE_START) & (qi < IMAGE_START + IMAGE_LEN)
    k_image = (ki >= IMAGE_START) & (ki < IMAGE_START + IMAGE_LEN)
    qa = qi - IMAGE_START
    ka = ki - IMAGE_START
    if SHAPE == 0:
        near = tl.abs(qa - ka) <= RADIUS
    else:
        dx = qa % GRID_W - ka % GRID_W
        dy = (qa // GRID_W) % GRID_H - (ka // GRID_W) % GRID_H
        dt = qa // (GRID_W * GRID_H) - ka // (GRID_W * GRID_H)
        if SHAPE == 1:
            near = dy * dy + dx * dx < RADIUS * RADIUS
        else:
            near = (tl.abs(dy) <= RADIUS) & (tl.abs(dx) <= RADIUS)
        near = near & (tl.abs(dt) <= T_RADIUS)
    seen = tl.where(q_image, near | (k_image == 0), ki < seq_len)
    return seen & (ki < kv_len)


@triton.jit
def _step(
    q,
    k_ptrs,
    v_ptrs,
    offs_n,
    kv_len,
    d_ok,
    m_i,
    l_i,
    acc,
    scale,
    allowed,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One key block of the online softmax; `allowed` is the block's [BLOCK_M, BLOCK_N] mask."""
    k = tl.load(k_ptrs, mask=(offs_n[:, None] < kv_len) & d_ok, other=0.0)
    v = tl.load(v_ptrs, mask=(offs_n[:, None] < kv_len) & d_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _window_kernel(
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
    SHAPE: tl.constexpr,
    RADIUS: tl.constexpr,
    T_RADIUS: tl.constexpr,
    GRID_H: tl.constexpr,
    GRID_W: tl.constexpr,
):
    pid_m = tl.program_id(0)
    head = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < HEAD_DIM
    q_ok = (offs_m[:, None] < seq_len) & d_ok
    q_offsets = head * seq_len * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q = tl.load(Q + q_offsets, mask=q_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    kv_base = head * kv_len * HEAD_DIM
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(tl.load(full_count + pid_m)):
        offs_n = tl.load(full_index + pid_m * kv_blocks + j) * BLOCK_M + tl.arange(0, BLOCK_M)
        kv_offsets = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        everything = offs_n[None, :] < kv_len
        m_i, l_i, acc = _step(
            q,
            K + kv_offsets,
            V + kv_offsets,
            offs_n,
            kv_len,
            d_ok,
            m_i,
            l_i,
            acc,
            scale,
            everything,
            UPCAST,
            PRECISION,
        )
    for j in range(tl.load(partial_count + pid_m)):
        offs_n = tl.load(partial_index + pid_m * kv_blocks + j) * BLOCK_M + tl.arange(0, BLOCK_M)
        kv_offsets = kv_base + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
        allowed = _allowed(
            offs_m[:, None],
            offs_n[None, :],
            seq_len,
            kv_len,
            IMAGE_START,
            IMAGE_LEN,
            SHAPE,
            RADIUS,
            T_RADIUS,
            GRID_H,
            GRID_W,
        )
        m_i, l_i, acc = _step(
            q,
            K + kv_offsets,
            V + kv_offsets,
            offs_n,
            kv_len,
            d_ok,
            m_i,
            l_i,
            acc,
            scale,
            allowed,
            UPCAST,
            PRECISION,
        )
    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if HAS_RES:
        acc += tl.load(Res + q_offsets, mask=q_ok, other=0.0).to(tl.float32)
    tl.store(Out + q_offsets, acc.to(Out.dtype.element_ty), mask=q_ok)


def input_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: "ieee" for float32 unless TF32 is allowed for float32 matmuls
    (torch.set_float32_matmul_precision); other dtypes multiply in their own precision."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


@functools.lru_cache(maxsize=32)
def _block_lists(layout: TokenLayout, window: Window, device: torch.device) -> tuple[Tensor, ...]:
    """The block map's lists on the kernel's device, copied once per shape."""
    blocks = block_map(layout, window, BLOCK)
    return tuple(
        x.to(device)
        for x in (blocks.partial_count, blocks.partial_index, blocks.full_count, blocks.full_index)
    )


def window_attention(p: Problem) -> Tensor:
    layout, window = p.layout, p.window
    batch, heads, seq, dim = p.q.shape
    q, k, v = (x.contiguous() for x in (p.q, *p.keys_with_pooled()))
    blocks = block_map(layout, window, BLOCK)
    index = _block_lists(layout, window, q.device)
    out = torch.empty_like(q)
    res = out if p.residual is None else p.residual.contiguous()
    height, width = layout.grid[-2:] if len(layout.grid) > 1 else (1, layout.image_len)
    grid = (blocks.partial_count.numel(), batch * heads)
    _window_kernel[grid](
        q,
        k,
        v,
        out,
        res,
        *index,
        seq,
        blocks.kv_len,
        blocks.partial_index.shape[1],
        p.scale,
        HAS_RES=p.residual is not None,
        # the interpreter multiplies bfloat16 bit patterns in tl.dot (triton issue 11584)
        UPCAST=triton.knobs.runtime.interpret and q.dtype == torch.bfloat16,
        PRECISION=input_precision(q.dtype),
        HEAD_DIM=dim,
        BLOCK_D=max(16, triton.next_power_of_2(dim)),
        BLOCK_M=BLOCK,
        IMAGE_START=layout.image_start,
        IMAGE_LEN=layout.image_len,
        SHAPE=SHAPES.index(window.shape),
        RADIUS=window.radius,
        T_RADIUS=window.temporal_radius,
        GRID_H=height,
        GRID_W=width,
    )
    return out


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """Every key block a program visits is computed whole."""
    return block_map(layout, window, BLOCK).computed_pairs
