"""A plan as data: which technique each attention layer uses at each step, and what it was
calibrated on. Versioned JSON; loading validates everything and names what is wrong.

A cell may window only some of the layer's heads (a per-head plan, schema version 2): `heads`
lists, per (step, layer), the heads that use the window; the others compute full attention.
A cell may also use its own window size (schema version 3, from the budget search, which tries
several): `windows` lists, per (step, layer), the window fraction of a window cell, or null for the
plan's window. A step may skip the model altogether (schema version 4, budget search with step reuse):
`step_reuse` lists, per step, null or how the step takes its prediction from earlier steps ("reuse" or
"forecast", patching/step_reuse.py); its compressible layers are marked step sharing ("ast"), which is
what they do should the call have no prediction to reuse. A cell may skip its whole transformer block
(schema version 5, budget search with block caching): "block", on the block's first attention layer,
returns the block's inputs plus the change it made when it last ran (patching/block_cache.py). Plans
use the lowest version their content needs, so older FastAttn reads them. A budget plan also records its
check (`check_error`, read by no version's logic and ignored by older readers): how far the final latent
of its own calibration run lies from full attention's.

A plan answers DiTFastAttn's two questions (`choose`, `residual_window`) like a hand-set
Schedule does, mapping a sampling step to the plan step calibrated at the nearest NOISE LEVEL (the
calibration's schedule remade from the plan's scheduler and step count on the model at hand), so a
plan calibrated at 20 steps serves 30, and each sampler of a split run, or a run at denoise below 1,
uses the plan steps of its own noise levels. The plan's cells stay indexed by calibration step.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field

from ..patching.ditfastattn import (
    SELF_ATTENTION_KINDS as WINDOWED_KINDS,  # layers any technique may act on; cross / text stay full
)
from ..patching.schedule import Choice, WindowSize
from ..patching.step_reuse import STEP_REUSE
from ..patching.timeline import Timeline, same_level

FORMAT = "fastattn-plan"
# 2 added per-head cells ("heads"), 3 per-cell window sizes ("windows"), 4 step reuse ("step_reuse") and the
# calibration run's own noise levels ("calibration": {"sigmas"}, where KSampler's schedule would not give them),
# 5 block caching ("block" cells)
VERSION = 5

# The candidates of the DiTFastAttn paper (Yuan et al., NeurIPS 2024; docs/plans.md), in the order greedy search tries them.
# ast: attention sharing across timesteps; wars: window attention + residual sharing;
# asc: attention sharing across CFG.
CANDIDATES = ("ast", "wars+asc", "wars", "full+asc")
BLOCK = "block"  # block caching: a budget-search candidate only (greedy and fast search do not try it)
TECHNIQUES = ("full", *CANDIDATES, BLOCK)
TECHNIQUE_LABELS = {  # each technique as the user reads it (heatmap legend, cost table)
    "full": "full attention",
    "full+asc": "full + CFG sharing",
    "wars": "window + residual",
    "wars+asc": "window + residual + CFG sharing",
    "ast": "step sharing (reuse)",
    BLOCK: "block cache (the block's last change)",
}
WINDOW_SHAPES = ("band", "square", "circle")


class PlanError(ValueError):
    """A plan that cannot be read or does not fit the model; the message says what to do."""


HeadSet = tuple[int, ...] | None  # the heads a window technique applies to; None: all of them


def choice_of(technique: str, window: WindowSize, heads: HeadSet = None) -> Choice:
    """The DiTFastAttn choice for one technique name (window techniques on `heads` only, if given)."""
    share_cfg = technique.endswith("+asc")
    if technique == "ast":
        return Choice("reuse")
    if technique == BLOCK:
        return Choice("block")
    if technique.startswith("wars"):
        return Choice("window", share_cfg, window, True, heads=heads)
    return Choice("full", share_cfg)


@dataclass(frozen=True)
class LayerInfo:
    kind: str
    heads: int
    head_dim: int


@dataclass(frozen=True)
class Fingerprint:
    """The model a plan fits: architecture and its attention layers, in forward order."""

    architecture: str
    layers: tuple[LayerInfo, ...]


@dataclass(frozen=True)
class CalibrationInfo:
    """What a plan was calibrated on: for the user, and for applying it (`steps` maps another step
    count by position; another `grid` is warned about)."""

    steps: int
    sampler: str = ""
    scheduler: str = ""
    cfg: float = 1.0
    grid: tuple[int, ...] = ()
    latents: int = 1  # latents in the calibration batch (seeds or prompts)
    seed: int = 0
    delta: float = 0.0
    mode: str = ""
    # the run's noise levels, where KSampler's schedule of `steps` and `scheduler` is not them (denoise below 1,
    # custom sigmas); empty otherwise, so that plans of whole runs stay readable by older FastAttn
    sigmas: tuple[float, ...] = ()


@dataclass
class Plan:
    fingerprint: Fingerprint
    calibration: CalibrationInfo
    window: WindowSize
    methods: list[list[str]]  # [plan step][layer] -> technique name
    losses: list[list[float | None]] = field(default_factory=list)  # loss recorded for each accepted choice
    step_losses: list[float] = field(default_factory=list)  # model-output loss of each step's choices (budget: local)
    flops_kept: float = 1.0  # attention FLOPs computed / full, over the calibration run
    heads: list[list[list[int] | None]] = field(default_factory=list)  # [plan step][layer] -> windowed heads
    windows: list[list[float | None]] = field(default_factory=list)  # [plan step][layer] -> window fraction
    step_reuse: list[str | None] = field(default_factory=list)  # [plan step] -> "reuse", "forecast" or None
    # budget mode: the final latent of the plan's own calibration run against full attention's (run first, with the
    # same noise), as a relative squared error (0: the same latent); None where no full run was there to check against
    check_error: float | None = None

    def __post_init__(self) -> None:
        self._tables: dict[Timeline, list[list[Choice]]] = {}

    def heads_of(self, step: int, layer: int) -> HeadSet:
        """The heads the window technique of this cell applies to (None: all; always None off window cells)."""
        cell = self.heads[step][layer] if step < len(self.heads) else None
        return None if cell is None else tuple(cell)

    def window_of(self, step: int, layer: int) -> WindowSize:
        """The window of this cell: its own fraction where the plan lists one, else the plan's window."""
        fraction = self.windows[step][layer] if step < len(self.windows) else None
        return self.window if fraction is None else dataclasses.replace(self.window, fraction=fraction)

    @property
    def per_head(self) -> bool:
        return any(cell is not None for row in self.heads for cell in row)

    def windowed_share(self, step: int, layer: int) -> float:
        """The share of the layer's heads this cell windows (1 for a whole-layer window, 0 off window cells)."""
        if not self.methods[step][layer].startswith("wars"):
            return 0.0
        heads = self.heads_of(step, layer)
        return 1.0 if heads is None else len(heads) / self.fingerprint.layers[layer].heads

    @property
    def steps(self) -> int:
        return len(self.methods)

    @property
    def caches_blocks(self) -> bool:
        return any(name == BLOCK for row in self.methods for name in row)

    @property
    def reuses_steps(self) -> bool:
        return any(how is not None for how in self.step_reuse)

    def step_reuse_of(self, step: int, timeline: Timeline) -> str | None:
        """How the run's `step` reuses earlier predictions (None: it runs the model), from the plan step
        calibrated at the nearest noise level."""
        if not self.step_reuse or not 0 <= step < timeline.steps:
            return None
        plan_steps, _ = self.step_map(timeline)
        return self.step_reuse[plan_steps[step]]

    @property
    def shares_cfg(self) -> bool:
        return any(name.endswith("+asc") for row in self.methods for name in row)

    def step_map(self, timeline: Timeline) -> tuple[tuple[int, ...], bool]:
        """The plan step each step of the run uses (the one calibrated at the nearest noise level), and
        whether each is the very step (same noise level) of the calibration run: a whole run at the
        calibrated step count, or a part of one (a sampler of a split run). Where this host does not
        know the plan's scheduler: by position in the run."""
        calibrated = (Timeline.of(self.calibration.sigmas, timeline.model_sampling) if self.calibration.sigmas else
                      Timeline.ksampler(timeline.model_sampling, self.calibration.scheduler, self.steps,
                                        self.calibration.sampler))
        if calibrated is None:
            mapped = tuple(min(self.steps - 1, step * self.steps // timeline.steps) for step in range(timeline.steps))
            return mapped, timeline.steps == self.steps
        mapped = tuple(calibrated.nearest_step(sigma) for sigma in timeline.sigmas[:timeline.steps])
        same = all(same_level(sigma, calibrated.sigmas[step])
                   for sigma, step in zip(timeline.sigmas, mapped, strict=False))
        return mapped, same

    def choose(self, step: int, timeline: Timeline, layer: int) -> Choice:
        table = self._table(timeline)
        if not 0 <= step < timeline.steps or layer >= len(table[0]):
            return Choice("full")
        return table[step][layer]

    def residual_window(self, step: int, timeline: Timeline, layer: int) -> WindowSize | None:
        """At a full step: the window, if a later step of this layer uses window + residual before
        a full step without CFG sharing refreshes the residual of every batch row (one that shares
        CFG computes, so refreshes, the conditional rows only). The residual a window step reads is
        then the one the calibration run read: it cached one at every full step, and the latest wins."""
        table = self._table(timeline)
        if layer >= len(table[0]):
            return None
        for later in range(step + 1, timeline.steps):
            choice = table[later][layer]
            if choice.compute == "window":
                return choice.window
            if choice.compute == "full" and not choice.share_cfg:
                return None
        return None

    def _table(self, timeline: Timeline) -> list[list[Choice]]:
        if timeline not in self._tables:
            plan_steps, _ = self.step_map(timeline)
            self._tables[timeline] = [
                [choice_of(name, self.window_of(plan_step, layer), self.heads_of(plan_step, layer))
                 for layer, name in enumerate(self.methods[plan_step])]
                for plan_step in plan_steps
            ]
        return self._tables[timeline]

    def check_summary(self) -> str | None:
        """The check in words, for the node and the heatmap (None where the plan has none)."""
        if self.check_error is None:
            return None
        if self.check_error == 0:
            return "check: its calibration run's final latent is identical to full attention's"
        return (f"check: its calibration run's final latent against full attention's: "
                f"{-10 * math.log10(self.check_error):.1f} dB signal to error (higher is closer)")

    def counts(self) -> dict[str, int]:
        """How many (step, layer) cells use each technique."""
        tally = dict.fromkeys(TECHNIQUES, 0)
        for row in self.methods:
            for name in row:
                tally[name] += 1
        return tally

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "version": 5 if self.caches_blocks else 4 if self.reuses_steps or self.calibration.sigmas else 3
            if self.windows else 2 if self.per_head else 1,
            "model": {"architecture": self.fingerprint.architecture,
                      "layers": [asdict(layer) for layer in self.fingerprint.layers]},
            "calibration": {key: value for key, value in asdict(self.calibration).items()
                            if key != "sigmas" or value},
            "window": {"shape": self.window.shape, "fraction": self.window.fraction},
            "methods": self.methods,
            "losses": self.losses,
            "step_losses": self.step_losses,
            "flops_kept": self.flops_kept,
        }
        if self.per_head:
            data["heads"] = self.heads
        if self.windows:
            data["windows"] = self.windows
        if self.reuses_steps:
            data["step_reuse"] = self.step_reuse
        if self.check_error is not None:
            data["check_error"] = self.check_error
        return json.dumps(data, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse and validate a plan; every problem raises PlanError saying what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise PlanError(f"the plan is not valid JSON ({error}); paste the whole text a Calibrate node wrote") from None
        _require(isinstance(data, dict) and data.get("format") == FORMAT,
                 f"this is not a FastAttn plan (no \"format\": \"{FORMAT}\" field)")
        version = data.get("version")
        _require(isinstance(version, int), "the plan has no integer \"version\"")
        _require(version <= VERSION, f"the plan has schema version {version}, newer than this FastAttn reads "
                                     f"({VERSION}); update the FastAttn node pack")
        model, calibration, window = (_section(data, name) for name in ("model", "calibration", "window"))
        layers = model.get("layers")
        _require(isinstance(layers, list) and layers, "model.layers must be a non-empty list")
        try:
            fingerprint = Fingerprint(str(model["architecture"]), tuple(
                LayerInfo(str(layer["kind"]), int(layer["heads"]), int(layer["head_dim"])) for layer in layers))
            info = CalibrationInfo(**{**calibration, "grid": tuple(calibration.get("grid", ())),
                                      "sigmas": tuple(float(sigma) for sigma in calibration.get("sigmas", ()))})
            size = WindowSize(window["shape"], float(window["fraction"]))
        except (KeyError, TypeError, ValueError) as error:
            raise PlanError(f"the plan's model, calibration or window section is incomplete or wrong: {error}") from None
        _require(size.shape in WINDOW_SHAPES, f"unknown window shape {size.shape!r}; one of {', '.join(WINDOW_SHAPES)}")
        methods = data.get("methods")
        _require(isinstance(methods, list) and methods and all(isinstance(row, list) for row in methods),
                 "methods must be a non-empty list of steps, each a list of technique names")
        for step, row in enumerate(methods):
            _require(len(row) == len(layers), f"methods step {step} has {len(row)} layers, the model section {len(layers)}")
            for layer, name in enumerate(row):
                _require(name in TECHNIQUES, f"unknown technique {name!r} at step {step}, layer {layer}; "
                                             f"known: {', '.join(TECHNIQUES)}")
                _require(name == "full" or layers[layer]["kind"] in WINDOWED_KINDS,
                         f"step {step}, layer {layer}: {name} on a {layers[layer]['kind']} layer (only joint / image "
                         "self-attention may be compressed)")
        _require(all(name not in ("ast", "wars", "wars+asc", BLOCK) for name in methods[0]),
                 "step 0 must compute attention (full or full+asc): nothing is cached before it")
        flops_kept = data.get("flops_kept", 1.0)
        _require(isinstance(flops_kept, (int, float)), "flops_kept must be a number")
        heads = _heads(data.get("heads", []), methods, fingerprint)
        windows = _windows(data.get("windows", []), methods)
        step_reuse = data.get("step_reuse", [])
        _require(step_reuse == [] or (isinstance(step_reuse, list) and len(step_reuse) == len(methods)
                                      and all(how is None or how in STEP_REUSE for how in step_reuse)),
                 f"step_reuse must list, for every step, null or one of {', '.join(STEP_REUSE)}")
        _require(not step_reuse or step_reuse[0] is None, "step 0 cannot reuse a step: nothing was computed before it")
        check_error = data.get("check_error")
        _require(check_error is None or (isinstance(check_error, (int, float)) and 0 <= check_error < math.inf),
                 "check_error must be a number >= 0 (or absent)")
        return cls(fingerprint, info, size, methods, data.get("losses", []), data.get("step_losses", []),
                   float(flops_kept), heads, windows, step_reuse, None if check_error is None else float(check_error))


def _heads(heads, methods: list[list[str]], fingerprint: Fingerprint) -> list[list[list[int] | None]]:
    """The per-head cells, checked: absent (a version 1 plan) or one entry per (step, layer), each
    null or the increasing head numbers a window cell applies to."""
    if heads == []:
        return []
    _require(isinstance(heads, list) and len(heads) == len(methods) and all(
        isinstance(row, list) and len(row) == len(fingerprint.layers) for row in heads),
        "heads must list, for every step, one entry per layer (null or a list of head numbers)")
    for step, row in enumerate(heads):
        for layer, cell in enumerate(row):
            if cell is None:
                continue
            count = fingerprint.layers[layer].heads
            _require(methods[step][layer].startswith("wars"),
                     f"step {step}, layer {layer}: heads are listed for {methods[step][layer]}, only window cells "
                     "(wars, wars+asc) may apply to some heads")
            _require(isinstance(cell, list) and cell and all(type(h) is int for h in cell)
                     and cell == sorted(set(cell)) and 0 <= cell[0] and cell[-1] < count,
                     f"step {step}, layer {layer}: heads must be increasing head numbers in 0..{count - 1}, "
                     f"got {cell!r}")
    return heads


def _windows(windows, methods: list[list[str]]) -> list[list[float | None]]:
    """The per-cell window fractions, checked: absent (a version 1 or 2 plan) or one entry per (step,
    layer), each null or a fraction in (0, 1] on a window cell."""
    if windows == []:
        return []
    _require(isinstance(windows, list) and len(windows) == len(methods) and all(
        isinstance(row, list) and len(row) == len(methods[0]) for row in windows),
        "windows must list, for every step, one entry per layer (null or a window fraction)")
    for step, row in enumerate(windows):
        for layer, fraction in enumerate(row):
            if fraction is None:
                continue
            _require(methods[step][layer].startswith("wars"),
                     f"step {step}, layer {layer}: a window size is listed for {methods[step][layer]}, only window "
                     "cells (wars, wars+asc) have one")
            _require(type(fraction) in (int, float) and 0 < fraction <= 1,
                     f"step {step}, layer {layer}: a window fraction must be a number in (0, 1], got {fraction!r}")
    return windows


def _section(data: dict, name: str) -> dict:
    section = data.get(name)
    _require(isinstance(section, dict), f"the plan has no {name!r} section")
    return section


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise PlanError(f"FastAttn plan: {message}.")
