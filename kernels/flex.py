"""FlexAttention backend: the window as a block mask (cached per shape) for the compiled
flex_attention kernel; pooled keys are appended to the keys.

flex_attention is compiled once per shape (static shapes: the fastest kernels) and never runs
eagerly, which would materialise the full score matrix (hundreds of GiB at FLUX 4096^2): it is
compiled whole-graph, so torch.compile raises rather than falling back to eager, and its
recompile limit is raised to FLEX_SHAPES for these calls (dynamo's default, 8, is reached by a
session sampling a few resolutions and batch sizes). Past that many shapes, new shapes run on
Triton (on a GPU) or the torch tiles, with a log line.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch._dynamo
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .backends import backend_module, runs_here
from .blocks import block_map
from .layout import TokenLayout
from .masks import sequence_mask
from .problem import Problem
from .window import Window

BLOCK = 128
FLEX_SHAPES = 64  # compiled shapes (layouts x batch x heads x dtypes) per process
log = logging.getLogger(__name__)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process; fullgraph: any fallback to eager raises."""
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


@functools.lru_cache(maxsize=32)
def block_mask(layout: TokenLayout, window: Window, device: torch.device) -> BlockMask:
    blocks = block_map(layout, window, BLOCK)
    mask = sequence_mask(layout, window)
    return BlockMask.from_kv_blocks(
        *(
            x[None, None].to(device)
            for x in (blocks.partial_count, blocks.partial_index, blocks.full_count, blocks.full_index)
        ),
        BLOCK_SIZE=BLOCK,
        mask_mod=lambda b, h, q_idx, kv_idx: mask(q_idx, kv_idx),
        seq_lengths=(layout.seq_len, blocks.kv_len),
    )


@functools.cache
def _announce_fallback(fallback: str) -> None:
    log.warning(
        "FastAttn: FlexAttention has compiled %d shapes in this process; new shapes use the %s backend "
        "(eager FlexAttention would hold the full attention matrix)",
        FLEX_SHAPES,
        fallback,
    )


def window_attention(p: Problem) -> Tensor:
    k, v = p.keys_with_pooled()
    mask = block_mask(p.layout, p.window, p.q.device)
    try:
        with torch._dynamo.config.patch(recompile_limit=FLEX_SHAPES):
            out = compiled_flex_attention()(p.q, k, v, block_mask=mask, scale=p.scale)
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        fallback = "triton" if p.q.device.type != "cpu" and runs_here("triton") else "torch"
        _announce_fallback(fallback)
        return backend_module(fallback).window_attention(p)
    return out if p.residual is None else out + p.residual


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """Every block the kernel visits is computed whole."""
    return block_map(layout, window, BLOCK).computed_pairs
