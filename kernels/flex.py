"""FlexAttention backend: the window as a block mask (cached per shape) for the compiled
flex_attention kernel; pooled keys are appended to the keys."""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from .blocks import block_map
from .layout import TokenLayout
from .masks import sequence_mask
from .problem import Problem
from .window import Window

BLOCK = 128


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled once per process (eager flex materialises the full scores)."""
    return torch.compile(flex_attention, dynamic=False)


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


def window_attention(p: Problem) -> Tensor:
    k, v = p.keys_with_pooled()
    mask = block_mask(p.layout, p.window, p.q.device)
    out = compiled_flex_attention()(p.q, k, v, block_mask=mask, scale=p.scale)
    return out if p.residual is None else out + p.residual


def computed_pairs(layout: TokenLayout, window: Window) -> int:
    """Every block the kernel visits is computed whole."""
    return block_map(layout, window, BLOCK).computed_pairs
