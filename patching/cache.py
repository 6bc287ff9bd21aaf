"""Entries of a sampling run's cache, stored and read per batch chunk.

Every cached tensor is kept per chunk identity (conditioning, context window, device, evaluation
of the step) with the step that made it and what it was made for (token layout, window), so a
later call reads it only if it is the same kind of call and the entry is from an earlier step.
The attention runtime and DeepCache place model calls (step, chunk identity) the same way here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch


class CacheOwner(Protocol):
    """A sampling run's state: anything holding the run's cache dict."""

    cache: dict


@dataclass(frozen=True)
class Entry:
    """A cached tensor, the step that made it, and what it was made for."""

    step: int
    tensor: torch.Tensor
    made_for: tuple  # (layout,) for outputs; (layout, window) for residuals
    model_input: torch.Tensor | None = None  # for CFG copies: the chunk's model input


def store_chunks(run: CacheOwner, key: tuple, ids: tuple, step: int, tensor: torch.Tensor, made_for: tuple) -> None:
    """Store `tensor` split into one entry per chunk id, under (*key, chunk id)."""
    for chunk_id, chunk in zip(ids, tensor.chunk(len(ids)), strict=True):
        run.cache[(*key, chunk_id)] = Entry(step, chunk, made_for)


def gather_chunks(run: CacheOwner, key: tuple, ids: tuple, made_for: tuple, before_step: int) -> torch.Tensor | None:
    """The cached chunks for these ids, concatenated; None if any is missing, was made at this
    step or later, or for something else (another layout or window)."""
    entries = [run.cache.get((*key, chunk_id)) for chunk_id in ids]
    if any(entry is None or entry.step >= before_step or entry.made_for != made_for for entry in entries):
        return None
    return torch.cat([entry.tensor for entry in entries])


def chunk_ids(evaluation_of: Callable[[int, tuple], int], step: int, cond_or_uncond: tuple[int, ...],
              transformer_options: dict, device: torch.device) -> tuple:
    """A cache identity per batch chunk: its conditioning (the host's uuid, else its index and
    place), the frames of a context window, the device, and which evaluation of this step it is
    (`evaluation_of(step, chunk)`: a second-order sampler's second call, an extension's extra
    forward), so that a cache is read only by the same kind of call that wrote it."""
    uuids = tuple(transformer_options.get("uuids", ()))
    if len(uuids) != len(cond_or_uncond):
        uuids = tuple((index, cond_or_uncond[:place].count(index)) for place, index in enumerate(cond_or_uncond))
    window = transformer_options.get("context_window")
    frames = tuple(getattr(window, "index_list", ())) if window is not None else ()
    chunks = tuple((uuid, frames, str(device)) for uuid in uuids)
    return tuple((*chunk, evaluation_of(step, chunk)) for chunk in chunks)


def block_replacements(transformer_options: dict) -> frozenset:
    """The (kind, key) of every whole-block replacement the forward will use."""
    return frozenset((kind, key) for kind, blocks in transformer_options.get("patches_replace", {}).items()
                     for key in blocks)
