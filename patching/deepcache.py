"""DeepCache for U-Nets: the full U-Net every N steps, only its shallow blocks between.

A U-Net's output blocks take the deep path's feature plus one skip connection each. DeepCache
keeps, from each full call, the feature that enters the output block of the chosen skip branch
(`depth`: input block `depth` feeds output block L-1-depth, L = number of input blocks; 0 is the
shallowest, conv_in -> last output block, the paper's default), and on the steps between runs
only input blocks 0..depth and output blocks L-1-depth.. on top of it ("1:N inference").

Hooked through the host's own extension points, no copied forward:
    OUTER_SAMPLE wrapper    sampling starts: a DeepCacheRun (schedule, caches, report) for this
                            run only, dropped when sampling ends, however it ends.
    DIFFUSION_MODEL wrapper each U-Net call: its step (sigma within the schedule), a cache
                            identity per batch chunk, full or shallow; published through ACTIVE.
    output_block_patch      at output block L-1-depth: a full call stores the feature entering it
                            (per chunk), a shallow call replaces it with the stored one.
    object patches          the `forward` of every layer of the deep blocks (input blocks after
                            `depth`, the middle block, output blocks before L-1-depth): runs the
                            layer, except in a shallow call, where it returns zeros of the shape
                            the layer gave at the last full call (never read: the output block
                            patch replaces what they feed).
The host's loop still visits every block, so block numbers, `transformer_index` and ControlNet's
per-block residuals keep their order: on a shallow call ControlNet's residuals for the shallow
skip connections are added as usual, those for the deep blocks and the middle act only through
the feature cached at the last full call (which had that step's residuals).

Cache rule: a shallow call reads, per chunk, the feature stored by the same kind of call at the
last full step: same conditioning (uuid), context window, device, evaluation of the step (a
Heun / DPM 2 second call reads what a second call stored), per-sample input shape and dtype, and
block replacements (an extension's perturbed forward keeps its own). A call with any chunk
missing runs the full U-Net and stores (counted in the report as standing aside).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field

import comfy.model_patcher
import comfy.patcher_extension
import torch
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

from .cache import block_replacements, chunk_ids, gather_chunks, store_chunks
from .deepcache_schedule import SCHEDULES, ScheduleKind, full_steps
from .run_scope import run_in_options, sampled_timeline
from .timeline import Timeline

HOLDER_KEY = "fastattn_deepcache"  # key of the holder in transformer_options and of our wrappers
RUN_KEY = "fastattn_deepcache_run"  # key of the per-run state in a run's transformer_options
FEATURE = ("deepcache",)  # cache key prefix of the stored deep features


class UnsupportedModelError(ValueError):
    """DeepCache was given a model that is not a U-Net."""


@dataclass(frozen=True)
class DeepCacheSettings:
    interval: int  # N: the full U-Net every N active steps
    depth: int  # skip branch: input block the shallow path stops at (0 = conv_in)
    start_percent: float = 0.0  # noise range, as ComfyUI's nodes mean it (percent_to_sigma)
    end_percent: float = 1.0
    schedule: ScheduleKind = "uniform"

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"DeepCache: cache_interval must be at least 1, got {self.interval}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"DeepCache: start/end percent must satisfy 0 <= start <= end <= 1, got "
                             f"{self.start_percent} and {self.end_percent}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"DeepCache: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


@dataclass(frozen=True)
class UNetLayout:
    """Which blocks of one U-Net a shallow call runs, for one depth."""

    inputs: int  # number of input blocks (= output blocks)
    has_middle: bool
    depth: int

    @classmethod
    def of(cls, unet: torch.nn.Module, depth: int) -> UNetLayout:
        if not isinstance(unet, UNetModel):
            raise UnsupportedModelError(
                f"DeepCache works on U-Net models (SD 1.5, SD 2.x, SDXL and other ComfyUI UNetModel checkpoints); "
                f"this model is a {type(unet).__name__}. For diffusion transformers use the DiTFastAttn or CLEAR nodes.")
        inputs, has_middle = len(unet.input_blocks), unet.middle_block is not None
        if len(unet.output_blocks) != inputs:
            raise UnsupportedModelError(f"DeepCache: this U-Net has {inputs} input and {len(unet.output_blocks)} "
                                        "output blocks; it needs one output block per skip connection.")
        if not 0 <= depth < inputs:
            raise ValueError(f"DeepCache: cache_depth {depth} is not a skip branch of this U-Net: it has {inputs} "
                             f"input blocks, so the depth is 0 to {inputs - 1} (0 = the shallowest, fastest).")
        if depth == inputs - 1 and not has_middle:
            raise ValueError(f"DeepCache: cache_depth {depth} leaves nothing to cache on this U-Net (no middle "
                             f"block below its last input block): choose 0 to {inputs - 2}.")
        return cls(inputs, has_middle, depth)

    @property
    def entry(self) -> int:
        """The output block whose input feature is cached (the first output block a shallow call runs)."""
        return self.inputs - 1 - self.depth

    def skipped_blocks(self) -> list[str]:
        """Module paths (under the diffusion model) of the blocks a shallow call skips."""
        blocks = [f"input_blocks.{i}" for i in range(self.depth + 1, self.inputs)]
        blocks += ["middle_block"] if self.has_middle else []
        return blocks + [f"output_blocks.{i}" for i in range(self.entry)]

    @property
    def total_blocks(self) -> int:
        return 2 * self.inputs + int(self.has_middle)


@dataclass
class DeepCacheReport:
    """What DeepCache did in one sampling run (kept on the holder for the Attention Report)."""

    settings: DeepCacheSettings
    layout: UNetLayout
    total_steps: int
    full_calls: int = 0
    shallow_calls: int = 0
    blocks_skipped: int = 0
    stood_aside: dict[str, int] = field(default_factory=dict)  # why a scheduled shallow call ran full -> calls

    def summary(self) -> str:
        calls = self.full_calls + self.shallow_calls
        blocks = calls * self.layout.total_blocks
        share = self.blocks_skipped / blocks if blocks else 0.0
        s = self.settings
        text = (f"DeepCache (1:{s.interval} {s.schedule}, depth {s.depth}): {calls} U-Net calls over "
                f"{self.total_steps} steps, {self.full_calls} full and {self.shallow_calls} shallow; skipped "
                f"{self.blocks_skipped} of {blocks} block runs ({share:.0%}; input, middle and output blocks)")
        return text + "".join(f"; ran full on {count} calls: {why}" for why, count in sorted(self.stood_aside.items()))


class DeepCacheHolder:
    """Stored on the patched clone: the settings, the U-Net's layout and the last run's report.
    Carries no per-run state; clones share it."""

    def __init__(self, settings: DeepCacheSettings, layout: UNetLayout) -> None:
        self.settings = settings
        self.layout = layout
        self.last_report: DeepCacheReport | None = None


class DeepCacheRun:
    """State of one sampling run: which steps are full, the stored features and the report."""

    def __init__(self, holder: DeepCacheHolder, timeline: Timeline) -> None:
        s = holder.settings
        self.timeline = timeline
        active = self.timeline.steps_within(s.start_percent, s.end_percent)
        self.full = full_steps(self.timeline.steps, active, s.interval, s.schedule)
        self.layout = holder.layout
        self.skipped = frozenset(holder.layout.skipped_blocks())
        self.cache: dict = {}
        self.shapes: dict[tuple, dict[str, torch.Size]] = {}  # made_for -> skipped layer -> its output shape[1:]
        self.evaluations: dict[tuple, int] = {}
        self.report = DeepCacheReport(s, holder.layout, self.timeline.steps)

    def evaluation_of(self, step: int, chunk: tuple) -> int:
        count = self.evaluations.get((step, chunk), 0)
        self.evaluations[(step, chunk)] = count + 1
        return count

    def close(self) -> DeepCacheReport:
        self.cache.clear()
        self.shapes.clear()
        self.evaluations.clear()
        return self.report


@dataclass
class UNetCall:
    """One diffusion-model call: what the gates and the output block patch need to know."""

    unet: torch.nn.Module
    run: DeepCacheRun
    step: int
    chunk_ids: tuple
    made_for: tuple
    shapes: dict[str, torch.Size]
    cached: torch.Tensor | None = None  # the stored deep feature (a shallow call); None: a full call


ACTIVE: ContextVar[UNetCall | None] = ContextVar("fastattn_deepcache_call", default=None)


def diffusion_model_wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
    """Decide full or shallow for this U-Net call and publish it to the gates for its duration."""
    run: DeepCacheRun | None = transformer_options.get(RUN_KEY)
    sigmas = transformer_options.get("sigmas")
    if run is None or sigmas is None:  # outside sampling: the model as it is
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    step = run.timeline.step_of(float(sigmas.flatten()[0]))
    cond_or_uncond = tuple(transformer_options.get("cond_or_uncond", ()))
    ids = chunk_ids(run.evaluation_of, step, cond_or_uncond, transformer_options, x.device)
    made_for = (tuple(x.shape[1:]), x.dtype, block_replacements(transformer_options))
    call = UNetCall(executor.class_obj, run, step, ids, made_for, run.shapes.setdefault(made_for, {}))
    if step not in run.full:
        call.cached = gather_chunks(run, FEATURE, ids, made_for, before_step=step) if ids else None
        if call.cached is None:
            reason = "no feature stored for this kind of call (a conditioning, evaluation, size or batch the last full step did not have)"
            run.report.stood_aside[reason] = run.report.stood_aside.get(reason, 0) + 1
    if call.cached is None:
        run.report.full_calls += 1
    else:
        run.report.shallow_calls += 1
        run.report.blocks_skipped += run.layout.total_blocks - 2 * (run.layout.depth + 1)
    token = ACTIVE.set(call)
    try:
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    finally:
        ACTIVE.reset(token)


def output_block_patch(h: torch.Tensor, hsp: torch.Tensor, transformer_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """At the cached branch's output block: store the deep feature (full call) or swap it in (shallow)."""
    call = ACTIVE.get()
    if call is None or transformer_options.get("block") != ("output", call.run.layout.entry):
        return h, hsp
    if call.cached is not None:
        return call.cached.to(h.dtype), hsp
    if call.chunk_ids:
        store_chunks(call.run, FEATURE, call.chunk_ids, call.step, h.clone(), call.made_for)
    return h, hsp


def gated_forward(block: str, name: str, original: Callable, unet: torch.nn.Module) -> Callable:
    """The `forward` of layer `name` of a deep block (`block`): the layer itself, or placeholder zeros
    in a shallow call that skips that block."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        call = ACTIVE.get()
        if call is None or call.unet is not unet or block not in call.run.skipped:
            return original(x, *args, **kwargs)
        if call.cached is None:
            out = original(x, *args, **kwargs)
            call.shapes[name] = out.shape[1:]
            return out
        return x.new_zeros((x.shape[0], *call.shapes[name]))

    forward.fastattn_original = original
    return forward


def outer_sample_wrapper(executor, *args, **kwargs):
    """Create the run's state when sampling starts; drop it when sampling ends, however it ends."""
    guider = executor.class_obj
    holder: DeepCacheHolder = guider.model_options["transformer_options"][HOLDER_KEY]
    run = DeepCacheRun(holder, sampled_timeline(executor, args, kwargs))
    try:
        with run_in_options(guider, RUN_KEY, run):
            return executor(*args, **kwargs)
    finally:
        holder.last_report = run.close()
        logging.info("FastAttn: %s", holder.last_report.summary())


def install(model, settings: DeepCacheSettings):
    """A clone of `model` (a ModelPatcher) that runs DeepCache when sampled. A DeepCache already on
    the model is replaced. Raises UnsupportedModelError for a model that is not a U-Net."""
    unet = model.get_model_object("diffusion_model")
    layout = UNetLayout.of(unet, settings.depth)
    patched = model.clone()
    for block in layout.skipped_blocks():
        for name, _ in patched.get_model_object(f"diffusion_model.{block}").named_children():
            key = f"diffusion_model.{block}.{name}.forward"
            current = patched.get_model_object(key)
            original = getattr(current, "fastattn_original", current)
            patched.add_object_patch(key, gated_forward(block, f"{block}.{name}", original, unet))
    options = patched.model_options["transformer_options"]
    options[HOLDER_KEY] = DeepCacheHolder(settings, layout)
    if output_block_patch not in options.get("patches", {}).get("output_block_patch", []):
        patched.set_model_output_block_patch(output_block_patch)
    for wrapper_type, wrapper in ((comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, outer_sample_wrapper),
                                  (comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, diffusion_model_wrapper)):
        patched.remove_wrappers_with_key(wrapper_type, HOLDER_KEY)
        patched.add_wrapper_with_key(wrapper_type, HOLDER_KEY, wrapper)
    return patched


def holder_of(model) -> DeepCacheHolder | None:
    """The DeepCache holder installed on a patched model, if any."""
    return model.model_options.get("transformer_options", {}).get(HOLDER_KEY)
