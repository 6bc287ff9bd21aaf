"""Entries of a sampling run's cache, stored and read per batch chunk.

Every cached tensor is kept per chunk identity (conditioning, context window, device, evaluation
of the step) with the step that made it and what it was made for (token layout, window), so a
later call reads it only if it is the same kind of call and the entry is from an earlier step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .runtime import SamplingRun


@dataclass(frozen=True)
class Entry:
    """A cached tensor, the step that made it, and what it was made for."""

    step: int
    tensor: torch.Tensor
    made_for: tuple  # (layout,) for outputs; (layout, window) for residuals
    model_input: torch.Tensor | None = None  # for CFG copies: the chunk's model input


def store_chunks(run: SamplingRun, key: tuple, ids: tuple, step: int, tensor: torch.Tensor, made_for: tuple) -> None:
    """Store `tensor` split into one entry per chunk id, under (*key, chunk id)."""
    for chunk_id, chunk in zip(ids, tensor.chunk(len(ids)), strict=True):
        run.cache[(*key, chunk_id)] = Entry(step, chunk, made_for)


def gather_chunks(run: SamplingRun, key: tuple, ids: tuple, made_for: tuple, before_step: int) -> torch.Tensor | None:
    """The cached chunks for these ids, concatenated; None if any is missing, was made at this
    step or later, or for something else (another layout or window)."""
    entries = [run.cache.get((*key, chunk_id)) for chunk_id in ids]
    if any(entry is None or entry.step >= before_step or entry.made_for != made_for for entry in entries):
        return None
    return torch.cat([entry.tensor for entry in entries])
