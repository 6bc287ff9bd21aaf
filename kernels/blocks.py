"""Block sparsity of the window mask over sequence blocks: which (query block, key block)
pairs are empty, partial (need the mask) or full. Shared by the FlexAttention and Triton
backends; cached per (layout, window, block size)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .layout import TokenLayout
from .masks import sequence_mask
from .window import Window


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


@functools.lru_cache(maxsize=32)
def block_map(layout: TokenLayout, window: Window, block: int) -> BlockMap:
    """Classify every block pair by evaluating the mask one query block at a time."""
    seq, kv_len = layout.seq_len, layout.seq_len + window.pooled_len(layout)
    mask = sequence_mask(layout, window)
    kv_blocks = -(-kv_len // block)
    keys = torch.arange(kv_blocks * block)
    key_valid = (keys < kv_len).view(kv_blocks, block)
    partial, full = [], []
    for start in range(0, seq, block):
        rows = torch.arange(start, min(start + block, seq))
        seen = (mask(rows[:, None], keys[None, :]) & (keys < kv_len)).view(len(rows), kv_blocks, block)
        any_seen = seen.any(dim=2).any(dim=0)
        all_seen = seen.all(dim=2).all(dim=0) & key_valid.all(dim=1)
        full.append(all_seen)
        partial.append(any_seen & ~all_seen)
    partial_count, partial_index = _compact(torch.stack(partial))
    full_count, full_index = _compact(torch.stack(full))
    return BlockMap(block, kv_len, partial_count, partial_index, full_count, full_index)
