"""Where an attention call sits in a run, and what its layer's projections do in this call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..kernels import TokenLayout

if TYPE_CHECKING:
    from .timeline import Timeline


@dataclass(frozen=True)
class CallSite:
    """Where an attention call sits: step of the schedule, layer of the forward, batch halves."""

    step: int  # index into the run's sampling schedule (0 = its first step)
    timeline: Timeline  # the run's steps as noise levels
    layer: int  # order of the call within one diffusion-model forward
    kind: str  # "joint" (text + image), "image", "text", "cross", or "unknown"
    layout: TokenLayout | None  # None when the call has no image grid the adapter can place
    cond_or_uncond: tuple[int, ...]  # one entry per batch chunk: its index in the guider's conditionings
    chunk_ids: tuple = ()  # one identity per batch chunk (conditioning, context window, device, evaluation)
    halves: tuple[int, ...] = ()  # one entry per chunk: 0 conditional, 1 unconditional, -1 neither or unknown
    inputs: tuple[torch.Tensor, ...] = ()  # each chunk's model input (CFG sharing copies only between equal ones)
    stand_aside: str | None = None  # why no technique may act on this forward, if none may
    branch: BranchPlan | None = None  # what this layer's projections did (mapped layers only)
    layout_unproven: str | None = None  # why windows may not use `layout` (a generic model's unproven order)



@dataclass
class BranchPlan:
    """What one layer's projections do in one forward."""

    layer: int
    step: int
    chunk_ids: tuple
    made_for: tuple
    cached: dict[str, torch.Tensor] = field(default_factory=dict)  # skip: output projection path -> stored output
    store: bool = False  # the next step reuses this layer: output projections store their outputs
    sources: dict[int, int] = field(default_factory=dict)  # CFG sharing: unconditional chunk -> chunk it copies

    @property
    def skip(self) -> bool:
        return bool(self.cached)

    @property
    def before_attention(self) -> bool:
        """Whether the QKV projections change (so the attention call must share as planned)."""
        return self.skip or bool(self.sources)

    def acts_on(self, role: str) -> bool:
        return self.before_attention or (role == "out" and self.store)
