"""A sampling run's steps as noise levels, and start / end percent read as ComfyUI's own nodes read them.

Core EasyCache, core's sparse attention and the conditioning ranges turn a percent into a noise level
with the model's `model_sampling.percent_to_sigma` and compare it with the sigma being sampled. The
techniques do the same with the sigma each step starts from, so a range names the same noise levels
in a KSamplerAdvanced split (two samplers), at `denoise < 1` and with custom sigmas, where a fraction
of one sampler's steps would name others. Nothing here imports the rest of the pack.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import comfy.samplers


def same_level(a: float, b: float) -> bool:
    """Two noise levels equal within float rounding (the host's schedules are float32 tables,
    percent_to_sigma computes in float64)."""
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-8)


def _at_or_below(sigma: float, bound: float) -> bool:
    """sigma <= bound, equal within float rounding counting as equal."""
    return sigma <= bound or same_level(sigma, bound)


@dataclass(frozen=True)
class Timeline:
    """The noise levels of one sampling run: step i starts at sigmas[i] and ends at sigmas[i + 1]."""

    sigmas: tuple[float, ...]
    model_sampling: Any  # the model's noise schedule (has percent_to_sigma); compared by identity
    _ranges: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def of(cls, sample_sigmas: Iterable, model_sampling: Any) -> Timeline:
        return cls(tuple(float(sigma) for sigma in sample_sigmas), model_sampling)

    @classmethod
    def ksampler(cls, model_sampling: Any, scheduler: str, steps: int, sampler: str = "") -> Timeline | None:
        """The schedule KSampler samples `steps` steps of `scheduler` with (denoise 1) on this model's noise
        schedule; None for a scheduler this host does not know."""
        if scheduler not in comfy.samplers.SCHEDULER_HANDLERS or steps < 1:
            return None
        discard_penultimate = sampler in comfy.samplers.KSampler.DISCARD_PENULTIMATE_SIGMA_SAMPLERS
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps + discard_penultimate)
        if discard_penultimate:
            sigmas = sigmas[[*range(len(sigmas) - 2), len(sigmas) - 1]]
        return cls.of(sigmas, model_sampling)

    @property
    def steps(self) -> int:
        return max(len(self.sigmas) - 1, 1)

    def step_of(self, sigma: float) -> int:
        """Index of the step whose interval holds `sigma` (intermediate sigmas of multi-evaluation
        samplers belong to the step they started from)."""
        reached = sum(1 for s in self.sigmas[:-1] if s >= sigma or same_level(s, sigma))
        return min(max(reached - 1, 0), self.steps - 1)

    def same_levels(self, other: Timeline) -> bool:
        """Whether both runs step through the same noise levels."""
        return len(self.sigmas) == len(other.sigmas) and all(map(same_level, self.sigmas, other.sigmas))

    def nearest_step(self, sigma: float) -> int:
        """Index of the step whose starting noise level is nearest `sigma` (in log sigma, so that
        low-noise steps, close together in sigma, are told apart as well as high-noise ones)."""
        level = math.log(max(sigma, 1e-12))
        return min(range(self.steps), key=lambda step: abs(math.log(max(self.sigmas[step], 1e-12)) - level))

    def sigma_at(self, percent: float) -> float:
        """The model's noise level at `percent` of its schedule (0: the noisiest, 1: none)."""
        return float(self.model_sampling.percent_to_sigma(percent))

    def steps_within(self, start: float, end: float) -> tuple[int, ...]:
        """The steps whose noise level (the sigma they start from) lies in start..end percent: at or
        below sigma_at(start) and above sigma_at(end), the test core EasyCache applies to a call."""
        if (start, end) not in self._ranges:
            high, low = self.sigma_at(start), self.sigma_at(end)
            self._ranges[(start, end)] = tuple(step for step, sigma in enumerate(self.sigmas[:self.steps])
                                               if _at_or_below(sigma, high) and not _at_or_below(sigma, low))
        return self._ranges[(start, end)]
