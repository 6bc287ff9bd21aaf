"""DiTFastAttn's and CLEAR's techniques as data, and the choice they make for each (step, layer).

Each node adds one technique; a chain of nodes is a tuple of techniques. For one attention
call the schedule answers: reuse the layer's output of an earlier step (step sharing), or
compute it, with a window plus the cached residual (window attention with residual sharing),
with a window alone (CLEAR's local attention) or in full, and in all cases for the
conditional half only, copied to the unconditional half (CFG sharing). When two techniques
of the same kind cover a call, the later node wins (the two window techniques are one kind).

A technique's range is a range of noise levels (timeline.py): the steps of the run that start
inside it. `refresh_every` and `compute_every` count those steps from the first one this sampler
runs: each sampler of a split run starts its range with a full (computed) step, since caches live
in one sampling run.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, Union

import torch

from ..kernels import TokenLayout, Window
from .timeline import Timeline


@dataclass(frozen=True)
class NoiseRange:
    """The noise levels a technique acts on, as start / end percent of the model's noise schedule
    (0: pure noise, 1: none), read as ComfyUI's own nodes read them (timeline.py)."""

    start: float = 0.0
    end: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"start/end percent must satisfy 0 <= start <= end <= 1, got {self.start} and {self.end}")

    def steps_in(self, timeline: Timeline) -> tuple[int, ...]:
        """The run's steps that start inside this range, in order."""
        return timeline.steps_within(self.start, self.end)


def parse_layers(text: str) -> frozenset[int] | None:
    """'0-3, 7' -> {0, 1, 2, 3, 7}; empty -> None (all layers). Numbers as the Attention
    Inspector lists them: the order of attention calls in one forward, from 0."""
    text = text.strip()
    if not text:
        return None
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(f"layers: cannot read {part.strip()!r} in {text!r}; write numbers and ranges like '0-3, 7'")
        first, last = int(match.group(1)), int(match.group(2) or match.group(1))
        if last < first:
            raise ValueError(f"layers: range {part.strip()!r} runs backwards; write it as '{last}-{first}'")
        layers.update(range(first, last + 1))
    return frozenset(layers)


@dataclass(frozen=True)
class Scope:
    noise: NoiseRange = NoiseRange()
    layers: frozenset[int] | None = None  # None: every layer
    kept_full: frozenset[int] = frozenset()  # layers left out even if `layers` names them

    def covers(self, step: int, timeline: Timeline, layer: int) -> bool:
        return ((self.layers is None or layer in self.layers) and layer not in self.kept_full
                and step in self.noise.steps_in(timeline))

    def ordinal(self, step: int, timeline: Timeline) -> int:
        """How many steps of this range the run took before `step` (a step it covers)."""
        return self.noise.steps_in(timeline).index(step)


@dataclass(frozen=True)
class WindowSize:
    """A window as a fraction of the image (per side) or in tokens per side.

    band: radius = fraction x image tokens; circle/square: radius = fraction x the larger grid
    side (and temporal radius = fraction x frames for video, or `temporal_tokens` frames when
    not None). `tokens` > 0 overrides fraction. `pool` > 0 adds CLEAR's pooled keys."""

    shape: Literal["band", "circle", "square"] = "band"
    fraction: float = 0.125
    tokens: int = 0
    temporal_tokens: int | None = None
    pool: int = 0

    def __post_init__(self) -> None:
        if self.tokens < 0 or not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"window: fraction must be in (0, 1] and tokens >= 0, got {self.fraction} and {self.tokens}")
        if self.temporal_tokens is not None and self.temporal_tokens < 0:
            raise ValueError(f"window: temporal radius must be >= 0 frames, got {self.temporal_tokens}")
        if self.pool < 0 or self.pool == 1 or (self.pool and self.shape == "band"):
            raise ValueError(f"window: pool must be 0 (off) or >= 2 with a circle or square window, got {self.pool}")

    def window_for(self, layout: TokenLayout) -> Window:
        if self.shape == "band":
            return Window("band", self.tokens or max(1, round(self.fraction * layout.image_len)))
        spatial = max(layout.grid[-2:])
        radius = self.tokens or max(1, round(self.fraction * spatial))
        temporal = 0
        if len(layout.grid) == 3:
            temporal = self.temporal_tokens if self.temporal_tokens is not None else round(self.fraction * layout.grid[0])
        return Window(self.shape, radius, temporal_radius=max(0, temporal), pool=self.pool)


@dataclass(frozen=True)
class WindowResidual:
    """Window attention with residual sharing: full attention every `refresh_every` steps of
    its range, from the first step of it the run takes (caching full - window), window + cached
    residual in between."""

    window: WindowSize = WindowSize()
    refresh_every: int = 2
    scope: Scope = Scope()
    residual: bool = True  # False: plain window attention between refreshes (the paper's ablation)

    def __post_init__(self) -> None:
        if self.refresh_every < 2:
            raise ValueError(f"refresh_every must be >= 2 (1 would compute full attention at every step), got {self.refresh_every}")


@dataclass(frozen=True)
class StepSharing:
    """Attention sharing across steps: compute every `compute_every`-th step of the range, from
    the first step of it the run takes, reuse the layer's last computed output in between."""

    compute_every: int = 2
    scope: Scope = Scope()

    def __post_init__(self) -> None:
        if self.compute_every < 2:
            raise ValueError(f"compute_every must be >= 2 (1 would share nothing), got {self.compute_every}")


@dataclass(frozen=True)
class CFGSharing:
    """Attention sharing across CFG: compute the conditional half, copy it to the unconditional."""

    scope: Scope = Scope()


class PoolWeights:
    """CLEAR's learned pooling weights, one [pool * pool] tensor per attention layer (as the
    Attention Inspector numbers them); layers not listed pool with plain averages. Compared by
    identity, so schedules holding them stay hashable."""

    def __init__(self, by_layer: dict[int, torch.Tensor]) -> None:
        self.by_layer = dict(by_layer)

    def get(self, layer: int) -> torch.Tensor | None:
        return self.by_layer.get(layer)


@dataclass(frozen=True)
class LocalAttention:
    """CLEAR: every covered step computes the window alone (no full steps, no residual): image
    queries see the image tokens within the radius, all text tokens and, with pooling, the
    pooled keys; text queries see everything."""

    window: WindowSize = WindowSize("circle", tokens=16)
    scope: Scope = Scope()
    pool_weights: PoolWeights | None = None

    def __post_init__(self) -> None:
        if self.window.shape == "band":
            raise ValueError("CLEAR's local attention needs a circle or square window on the image grid, got band")
        if self.pool_weights is not None and not self.window.pool:
            raise ValueError("pool weights were given but the window has no pooling (pool=0)")


Technique = Union[WindowResidual, StepSharing, CFGSharing, LocalAttention]


@dataclass(frozen=True)
class Choice:
    compute: Literal["full", "window", "reuse", "block"]  # block: the whole block skipped (a plan's block caching)
    share_cfg: bool = False
    window: WindowSize | None = None  # for "window"
    residual: bool = True  # for "window": add the residual cached at the last full step
    pool_weights: PoolWeights | None = None  # for a window with pooling: learned weights per layer
    heads: tuple[int, ...] | None = None  # for "window": the heads windowed (a calibrated per-head plan); None: all


@dataclass(frozen=True)
class Schedule:
    techniques: tuple[Technique, ...] = ()

    def then(self, technique: Technique) -> Schedule:
        return Schedule((*self.techniques, technique))

    @property
    def shares_cfg(self) -> bool:
        """Whether any step may share attention across CFG halves (DiTFastAttn reports if it never could)."""
        return any(isinstance(technique, CFGSharing) for technique in self.techniques)

    def _last(self, kind: type | tuple[type, ...], step: int, timeline: Timeline, layer: int):
        found = None
        for technique in self.techniques:
            if isinstance(technique, kind) and technique.scope.covers(step, timeline, layer):
                found = technique
        return found

    @functools.lru_cache(maxsize=65536)  # noqa: B019  (schedules are small, immutable and few)
    def choose(self, step: int, timeline: Timeline, layer: int) -> Choice:
        share_cfg = self._last(CFGSharing, step, timeline, layer) is not None
        sharing = self._last(StepSharing, step, timeline, layer)
        if sharing is not None and sharing.scope.ordinal(step, timeline) % sharing.compute_every:
            return Choice("reuse", share_cfg)
        windowed = self._last((WindowResidual, LocalAttention), step, timeline, layer)
        if windowed is None:
            return Choice("full", share_cfg)
        if isinstance(windowed, LocalAttention):
            return Choice("window", share_cfg, windowed.window, residual=False, pool_weights=windowed.pool_weights)
        if windowed.scope.ordinal(step, timeline) % windowed.refresh_every == 0:
            return Choice("full", share_cfg)
        return Choice("window", share_cfg, windowed.window, windowed.residual)

    @functools.lru_cache(maxsize=65536)  # noqa: B019
    def residual_window(self, step: int, timeline: Timeline, layer: int) -> WindowSize | None:
        """At a full step: the window of the next step that computes this layer, if it uses
        one; the residual full - window is only worth computing then."""
        for later in range(step + 1, timeline.steps):
            choice = self.choose(later, timeline, layer)
            if choice.compute != "reuse":
                return choice.window if choice.residual else None
        return None
